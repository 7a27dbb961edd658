"""Flow-matching solvers over the distilled model's few-step schedule (shift 3).

The schedule comes from diffusers' `FlowMatchEulerDiscreteScheduler` (4 steps: timesteps
about [1000, 858, 602, 9]), the one LiveAvatar's student was distilled on. `dpmpp_2m` runs
DPM-Solver++(2M) over those same sigmas; diffusers' own multistep scheduler spaces flow
sigmas differently, which this few-step model was not trained for, so it is written here.
Each block of latents gets a fresh solver state. `history` is that state between steps, so
a block's steps may run in different processes (pipeline parallelism) and match one process.
"""

from __future__ import annotations

import math

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

SOLVERS = ("euler", "dpmpp_2m")
NUM_TRAIN_TIMESTEPS = 1000


def flow_sigmas(steps: int, shift: float = 3.0) -> torch.Tensor:
    """[steps + 1] sigmas from 1 down to 0 (timestep = 1000 * sigma)."""
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, shift=shift)
    scheduler.set_timesteps(steps)
    return scheduler.sigmas.double()


class FlowSolver:
    """Steps one block from noise to clean latents given velocity predictions."""

    def __init__(self, sigmas: torch.Tensor, kind: str = "euler", history: torch.Tensor | None = None):
        if kind not in SOLVERS:
            raise ValueError(f"sample_solver must be one of {SOLVERS}, got {kind!r}")
        self.sigmas = sigmas
        self.kind = kind
        self._previous_x0: torch.Tensor | None = history

    @property
    def history(self) -> torch.Tensor | None:
        """What later steps need from earlier ones: dpmpp_2m's last data prediction (None
        for euler or before the first step)."""
        return self._previous_x0

    def timestep(self, index: int) -> float:
        return float(self.sigmas[index]) * NUM_TRAIN_TIMESTEPS

    def step(self, index: int, x: torch.Tensor, velocity: torch.Tensor) -> torch.Tensor:
        sigma, sigma_next = float(self.sigmas[index]), float(self.sigmas[index + 1])
        if self.kind == "euler":
            return (x.float() + (sigma_next - sigma) * velocity.float()).to(x.dtype)
        return self._dpmpp_2m(index, x, velocity, sigma, sigma_next)

    def _dpmpp_2m(self, index, x, velocity, sigma, sigma_next):
        x0 = x.float() - sigma * velocity.float()  # data prediction of a flow model
        previous, self._previous_x0 = self._previous_x0, x0
        if sigma_next == 0.0:
            return x0.to(x.dtype)
        h = _log_snr(sigma_next) - _log_snr(sigma)  # inf on the first step from pure noise
        if previous is not None and index > 0 and math.isfinite(h):
            r = (_log_snr(sigma) - _log_snr(float(self.sigmas[index - 1]))) / h
            if math.isfinite(r):
                x0 = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * previous
        out = (sigma_next / sigma) * x.float() - (1.0 - sigma_next) * math.expm1(-h) * x0
        return out.to(x.dtype)


def _log_snr(sigma: float) -> float:
    """lambda = log(alpha / sigma) of the flow path x = (1 - sigma) x0 + sigma noise."""
    return -math.inf if sigma >= 1.0 else math.log((1.0 - sigma) / sigma)
