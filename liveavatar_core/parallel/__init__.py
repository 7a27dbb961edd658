"""Pipeline parallelism over processes (LiveAvatar's timestep-forcing pipeline parallelism):
ranks own denoising steps, block latents flow rank to rank, the last rank decodes.

- `WorkerPool`: warm worker processes driven from the caller's process.
- `shared_pools.shared_pool`: one warm pool kept between runs, for hosts (the ComfyUI nodes).
- `python -m liveavatar_core.parallel.run` under torchrun: headless runs to an mp4.
- `run_stage`: one rank's part of a run, for other launchers.
"""

from .models import FileModels, ModelSource
from .plan import StagePlan, plan_stages
from .pool import WorkerPool
from .stage import run_stage

__all__ = ["FileModels", "ModelSource", "StagePlan", "WorkerPool", "plan_stages", "run_stage"]
