"""Trains the tiny default model (the files `liveavatar_core.default_models` ships) on synthetic
talking faces, so the pipeline's first run shows the portrait talking.

    python scripts/train_default_model.py --out OUT --seed 0 --vae-seconds 150 \
        --decoder-seconds 150 --dit-seconds 600 --workers 15

(on one GPU; `--*-seconds` stop a stage early, the learning rate following whichever of
steps and seconds runs out first). What it makes, all in the real files' formats and names:

- umT5, wav2vec2 and the LoRA file: the seeded random networks of `default_models` (seed 0),
  the LoRA with zero up-projections (PEFT's initial state), so merging it changes nothing;
- the VAE (Wan 2.1 architecture, base width `--vae-dim`, 8 shipped): trained as an autoencoder on short talking
  clips (a still frame, then 8 talking frames); its output layers then rescaled so the
  official latent normalisation gives zero mean and unit variance per channel; then its
  decoder alone (`train_decoder`) on what the streaming decoder decodes at inference: the 7
  priming latents of the still portrait, then 8 talking latents;
- the DiT (Wan2.2-S2V architecture, audio injector after every block): the clips' latents
  are cached once (`cache_latents`: reference, motion context and target exactly as the
  pipeline encodes them), then `train_dit` runs the streaming sampler's own DiT calls
  (`CausalDiT.denoise_block` with the per-step KV caches, the sink, the sink roll after clip
  0, the seeded sink distance, the schedule's timesteps) on the latents the sampler would
  hold at each step, and regresses the clean latents each call implies onto the targets.

Measured on one H200: VAE 3.7 steps/s (batch 32 of 9 frames), DiT 0.95 steps/s (batch 128,
2-3 clips: 12-18 DiT calls and their backward per step; the tiny calls are launch-bound, so
the batch could grow at almost no cost). One run of the stages above without
`train_decoder` (VAE 769 steps on 5-frame clips, then 361 on 9-frame ones; DiT 215 steps,
loss 3.2 -> 0.15) gave latents the
DiT reproduced, but the decoder drifted to a dark screen a few latents into the stream;
`train_decoder` is the stage that addresses it. Two later runs on one H200, measured through
the streaming decoder on the VAE's own latents of an unheard utterance (7 priming latents,
then 24 talking ones, 128*128):

- that VAE with `train_decoder` on 24-latent streams (96 steps, 170 s) then the DiT continued
  from its checkpoint (203 steps, loss 0.15 -> 0.14): the stream no longer goes dark (frame
  correlation 0.42-0.67 all the way, was 0.05-0.10 after frame 20), but the VAE itself is the
  limit: a still portrait comes back blurred with wrong colours (correlation 0.59-0.83), its
  mouth barely (mouth darkness vs truth -0.04..0.33); through the pipeline another portrait's
  video correlated 0.13 with that portrait;
- from scratch with `--vae-batch 256` (197 steps in 200 s: the VAE is not launch-bound at that
  batch, 1 step/s), 45 decoder steps and 166 DiT steps (loss 0.28): worse on every figure.

Two changes then made the VAE learn: its decoder is trained without diffusers' final clamp
(`decode_unclamped`: the clamp gives no gradient to a pixel pushed past [-1, 1], so wrong
colours stuck), and a width of 8 (`--vae-dim 8`; loss 0.19 after 619 steps where width 4 had
0.28 after 670). The shipped files come from two runs on one H200:

    python scripts/train_default_model.py --out A --vae-dim 8 --vae-steps 100000 --vae-seconds 250 \
        --decoder-steps 100000 --decoder-seconds 70 --decoder-latents 24 --dit-steps 100000 \
        --dit-seconds 150 --cached-clips 4096 --dit-from OLD_DIT --workers 7
    python scripts/train_default_model.py --out B --vae-init A/wan_tiny_vae.safetensors \
        --vae-steps 100000 --vae-seconds 150 --decoder-steps 100000 --decoder-seconds 80 \
        --decoder-latents 24 --dit-steps 100000 --dit-seconds 185 --cached-clips 2048 \
        --dit-from OLD_DIT --workers 15

(seed 0; OLD_DIT the DiT checkpoint of the run above that continued the DiT, dim 128 x 4
blocks; the first run shared the GPU with a width-4 twin and its DiT stage was cut off, so
only its VAE was used). The second run: VAE 608 more steps (loss 0.136), decoder 45 steps,
DiT 185 steps (loss 6.0 -> 0.39). Through the streaming decoder the VAE's frames correlate
0.75 / 0.64 with the true ones all the way (two faces, 96 frames) and the mouth's darkness
0.79 / 0.57 with the truth. Measured through the pipeline: see
tests/test_default_model_talks.py. What is left: the VAE blends the frames of each latent with
the previous latent's (a mouth opening at frame 5 reaches its full darkness at frame 9), so
the mouth moves about 4 frames late; either a VAE trained to sharper time (longer, or with
the decoder stage weighted on frame-to-frame change) or DiT targets encoded from frames that
lead the audio by that lag (`--target-lead 4`) would fix it. Through the
pipeline, shifting the loudness by 4 frames lifts the mouth's Pearson per clip from 0.19 / 0.84 /
0.61 to 0.71 / 0.98 / 0.79. A third run trained that DiT on with the shipped VAE (its latents
stay) and targets 4 frames ahead, on one H200:

    python scripts/train_default_model.py --out C \
        --vae-from liveavatar_core/default_model/wan_tiny_vae.safetensors --decoder-steps 0 \
        --dit-from B/liveavatar_tiny_s2v.safetensors --target-lead 4 \
        --dit-steps 100000 --dit-seconds 330 --cached-clips 2048 --workers 7

(seed 0; a shipped DiT file or a `dit_checkpoint.safetensors` both read as `--dit-from`.)
Data 98 s, latent cache 67 s, DiT 371 steps at 1.1 steps/s (loss 0.58 -> 0.20; a twin with
`--target-lead 5` beside it on the same GPU reached 0.22). Through the pipeline at 128*128 on
the unheard utterance its mouth's Pearson per clip was 0.62 / 0.89 / 0.68 (B: 0.19 / 0.84 /
0.61), but at the Preview size (384*256) on the example speech 0.07 (B: 0.33). The shipped DiT
is the midpoint of B and C, made on the CPU in seconds:

    python scripts/train_default_model.py --out D \
        --vae-from liveavatar_core/default_model/wan_tiny_vae.safetensors --decoder-steps 0 \
        --dit-steps 0 --dit-from C/dit_checkpoint.safetensors \
        --blend-with B/liveavatar_tiny_s2v.safetensors --blend-weight 0.5 --faces 8 --utterances 4

(only D's DiT file is taken: the umT5 file's tokenizer is trained by sentencepiece on each
run, and other sentencepiece versions cut other pieces). Per clip 0.55 / 0.83 / 0.82 on the
unheard utterance (0.73 overall: B 0.59, C 0.74), 0.86 / 0.79 / 0.84 overall on three more
(B 0.82 / 0.71 / 0.74, C 0.76 / 0.80 / 0.56), 0.33 at the Preview size (as B) and 0.67 on the
example speech at 128*128 (B 0.53, C 0.58); tests/test_default_model_talks.py has the rest.
On a 2-core CPU the latent cache alone takes 5.4 s a clip, so that stage wants a GPU: a CPU try (160 clips,
`--cache-chunk 8`, 76 DiT steps of batch 16 in 840 s) left the loss flat (0.65 -> 0.69) and
was not shipped.

Data recipe (all seeded from `--seed`): faces from `talking_faces.random_style` (colours,
place, size; one in four the example's own style), each drawn at zoom 1 (three in four) or
1..2.5 at 128*128, at 17 mouth openings; speech from `talking_faces.random_speech` (random
syllables and pauses through the example's formant synthesiser), one utterance per seed,
one in ten a silent track with one click (mouth closed throughout); the mouth opening of
each frame is `talking_faces.mouth_track` of the speech; one clip in eight ends in silence
(zero features, as the pipeline pads), and the reference's own mouth opening is random.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import shutil
import sys
import time
from multiprocessing import Pool
from pathlib import Path

os.environ.setdefault("LIVEAVATAR_COMPILE", "0")  # eager fused chains: differentiable everywhere

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import numpy as np  # noqa: E402
import talking_faces as faces  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from liveavatar_core import default_models as dm  # noqa: E402

SIZE = 128  # training frames are SIZE x SIZE
LEVELS = 17  # mouth openings drawn per face (a frame takes the nearest)
INFER_FRAMES = 32
STEPS = 3
SILENT_TRACKS = 0.1  # share of the utterances that are silence with one click
MOUTH_WEIGHT = 8.0  # loss weight of the mouth's region
PROMPTS = [
    "A cheerful young man with short brown hair and a blue shirt speaks directly to the camera, with natural "
    "lip movements, gentle head motion and expressive eyes. Soft even light, a plain pale blue wall behind him, "
    "stable framing.",
    "A friendly cartoon character looks straight at the camera and talks.",
    "A person talks to the camera.",
    "The presenter greets the audience, then describes the new product in detail.",
    "A young woman with short dark hair explains the weather for tomorrow.",
    "An old man with a grey beard tells a short story about the sea.",
]


# -- data -------------------------------------------------------------------------------------
def _face_levels(args):
    """One face drawn at every mouth level: uint8 [LEVELS, SIZE, SIZE, 3], and its mouth box."""
    (seed,) = args
    rng = np.random.default_rng(10_000 + seed)
    style = faces.FaceStyle() if rng.random() < 0.25 else faces.random_style(rng)
    zoom = float(rng.choice([1.0, 1.0, 1.0, rng.uniform(1.0, 2.5)]))
    # Zoomed in, the centre moves towards the mouth so it stays in view.
    t = (zoom - 1) / 2
    centre = (256 + style.dx * t + rng.uniform(-20, 20) * t, 320 + (40 + style.dy) * t)
    images = [
        np.asarray(faces.draw_face(style, level / (LEVELS - 1), SIZE, SIZE, zoom, centre)) for level in range(LEVELS)
    ]
    return np.stack(images), faces.mouth_box(style, SIZE, SIZE, zoom, centre)


def _speech(seed):
    """An utterance and its mouth track; one in ten is a silent track with one click (mouth closed)."""
    rng = np.random.default_rng(30_000 + seed)
    if rng.random() < SILENT_TRACKS:
        wave = np.zeros(int(4.5 * faces.media.RATE), dtype=np.float32)
        at = int(rng.integers(0, len(wave) - 160))
        wave[at : at + 160] = rng.uniform(1e-4, 1e-2)
        return wave, True
    return faces.random_speech(20_000 + seed), False


def make_data(seed: int, num_faces: int, num_speech: int, audio_encoder, workers: int):
    with Pool(workers) as pool:
        face_data = pool.map(_face_levels, [(seed * 100_000 + i,) for i in range(num_faces)])
        waves = pool.map(_speech, [seed * 100_000 + i for i in range(num_speech)])
    levels = torch.from_numpy(np.stack([f[0] for f in face_data]))  # [N, L, H, W, 3]
    boxes = torch.tensor([f[1] for f in face_data])
    features, tracks = [], []
    for wave, silent in waves:
        f = audio_encoder.features_for_video(torch.from_numpy(wave), faces.FPS)[0]  # [layers, dim, frames]
        features.append(f)
        track = torch.from_numpy(faces.mouth_track(wave, f.shape[-1])).float()
        tracks.append(track * 0 if silent else track)
    n = min(f.shape[-1] for f in features)
    return levels, boxes, torch.stack([f[..., :n] for f in features]), torch.stack([t[:n] for t in tracks])


class Batches:
    """Random (face, utterance, window) clips: pixels in -1..1 [B, 3, T, H, W], features, mask."""

    def __init__(self, data, device, generator: torch.Generator):
        self.levels, self.boxes, self.features, self.tracks = data
        self.device = device
        self.g = generator

    def _pick(self, n, high):
        return torch.randint(0, high, (n,), generator=self.g)

    def pixels(self, face, level_index):
        """[B, T] level indices -> [B, 3, T, H, W] in -1..1."""
        frames = self.levels[face[:, None], level_index]  # [B, T, H, W, 3]
        return frames.to(self.device).permute(0, 4, 1, 2, 3).float() / 127.5 - 1

    def mouth_weight(self, face, scale=8, value=MOUTH_WEIGHT):
        boxes = self.boxes[face]
        weight = torch.ones(len(face), 1, 1, SIZE // scale, SIZE // scale)
        for i, (x0, y0, x1, y1) in enumerate(boxes.tolist()):
            weight[i, ..., y0 // scale : -(-y1 // scale), x0 // scale : -(-x1 // scale)] = value
        return weight.to(self.device)

    def clip(self, batch: int, frames: int):
        face = self._pick(batch, len(self.levels))
        speech = self._pick(batch, len(self.features))
        start = self._pick(batch, self.features.shape[-1] - frames + 1)
        idx = start[:, None] + torch.arange(frames)[None]
        feats = torch.stack([self.features[s, ..., i] for s, i in zip(speech.tolist(), idx)])
        track = torch.stack([self.tracks[s, i] for s, i in zip(speech.tolist(), idx)])
        # One clip in eight ends in silence, as the pipeline pads the audio past its end.
        for b in range(batch):
            if torch.rand((), generator=self.g) < 0.125:
                cut = int(torch.randint(0, frames, (), generator=self.g))
                feats[b, ..., cut:] = 0
                track[b, cut:] = 0
        level = (track * (LEVELS - 1)).round().long()
        ref_level = self._pick(batch, LEVELS)
        return face, ref_level, level, feats.to(self.device).float()


# -- VAE ----------------------------------------------------------------------------------------
def _lr(peak: float, progress: float) -> float:
    """Warm-up over the first 5 %, then a cosine down to zero."""
    return peak * min(1.0, progress / 0.05) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


class Schedule:
    """A stage's step numbers, until `steps` or `seconds` run out, whichever comes first; the
    learning rate (`_lr`) follows whichever is further along. `done` counts the steps taken."""

    def __init__(self, opt, peak_lr: float, steps: int, seconds: float):
        self.opt, self.peak_lr, self.steps, self.seconds = opt, peak_lr, max(steps, 1), seconds
        self.began, self.done = time.monotonic(), 0

    def elapsed(self) -> float:
        return time.monotonic() - self.began

    def __iter__(self):
        while (progress := max(self.done / self.steps, self.elapsed() / self.seconds)) < 1:
            for group in self.opt.param_groups:
                group["lr"] = _lr(self.peak_lr, progress)
            yield self.done
            self.done += 1


def descend(opt, loss, params) -> None:
    """One optimiser step on `loss`, gradients clipped to norm 1."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()


def decode_unclamped(vae, latents):
    """`AutoencoderKLWan.decode` without its final clamp to [-1, 1]: the clamp has no gradient
    outside that range, so a pixel the decoder pushes past it (wrong colour, saturated) would
    never be pulled back. The same causal frame-by-frame loop as diffusers' `_decode`."""
    vae.clear_cache()
    x = vae.post_quant_conv(latents)
    frames = []
    for i in range(x.shape[2]):
        vae._conv_idx = [0]
        frames.append(
            vae.decoder(x[:, :, i : i + 1], feat_cache=vae._feat_map, feat_idx=vae._conv_idx, first_chunk=i == 0)
        )
    vae.clear_cache()
    return torch.cat(frames, dim=2)


def train_vae(
    batches: Batches,
    steps: int,
    seconds: float,
    seed: int,
    device,
    log,
    init=None,
    batch: int = 32,
    base_dim: int = dm.VAE_BASE_DIM,
):
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed)
    model = AutoencoderKLWan(base_dim=base_dim, z_dim=16).to(device).train() if init is None else init.train()
    model.requires_grad_(True)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    schedule = Schedule(opt, 2e-3, steps, seconds)
    for step in schedule:
        face, ref_level, level, _ = batches.clip(batch, 8)
        # A still first frame, then eight talking frames. Short clips teach the picture; the
        # decoder's behaviour deep into a stream is `train_decoder`'s job.
        levels = torch.cat([ref_level[:, None], level], dim=1)
        video = batches.pixels(face, levels)
        with torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda"):
            mu = model.encode(video).latent_dist.mode()
            out = decode_unclamped(model, mu).float()
        weight = batches.mouth_weight(face, 1, 10.0)
        loss = (weight * (out - video).abs()).mean() + 1e-4 * mu.float().pow(2).mean()
        descend(opt, loss, model.parameters())
        if step % 100 == 0:
            log(f"vae step {step} loss {loss.item():.4f}")
    log(f"vae: {schedule.done} steps, last loss {loss.item():.4f}")
    return model.eval().requires_grad_(False)


def train_decoder(vae, batches: Batches, steps: int, seconds: float, device, log, latents: int = 24, batch: int = 8):
    """Trains the decoder (encoder frozen, so its latents and a DiT trained on them stay
    valid) on what the streaming decoder decodes at inference: the 7 priming latents of the
    still portrait, then `latents` talking latents. Clips of 9 frames alone leave it untrained
    deep into a stream, where its causal convolutions see long histories; it then drifts
    to a dark screen after about four latents (measured: correlation with the true frames
    0.3-0.4 falling to 0.05-0.1 by frame 20)."""
    from liveavatar_core.semantics import PRIMING_LATENTS

    params = [p for name, p in vae.named_parameters() if name.startswith(("decoder.", "post_quant_conv."))]
    vae.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    vae.decoder.train()
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    still_frames = 1 + 4 * (PRIMING_LATENTS - 1)
    schedule = Schedule(opt, 1e-3, steps, seconds)
    for step in schedule:
        face, ref_level, level, _ = batches.clip(batch, 4 * latents)
        video = torch.cat(
            [batches.pixels(face, ref_level[:, None]).repeat(1, 1, still_frames, 1, 1), batches.pixels(face, level)],
            dim=2,
        )
        with torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda"):
            with torch.no_grad():
                mu = vae.encode(video).latent_dist.mode()
            out = decode_unclamped(vae, mu).float()
        weight = batches.mouth_weight(face, 1, 10.0)
        loss = (weight * (out - video).abs())[:, :, still_frames:].mean() + 0.1 * (out - video)[
            :, :, :still_frames
        ].abs().mean()
        descend(opt, loss, params)
        if step % 25 == 0:
            log(f"decoder step {step} loss {loss.item():.4f}")
    log(f"decoder: {schedule.done} steps, last loss {loss.item():.4f}")
    return vae.eval().requires_grad_(False)


@torch.no_grad()
def normalise_vae(model, batches: Batches, device):
    """Rescales quant_conv / post_quant_conv so the official normalisation of the encoder's
    means gives zero mean, unit variance per channel (and the decoder undoes it exactly)."""
    face, ref_level, level, _ = batches.clip(32, 8)
    video = batches.pixels(face, torch.cat([ref_level[:, None], level], dim=1))
    mu = model.encode(video).latent_dist.mode().float()
    m = mu.mean(dim=(0, 2, 3, 4))
    s = mu.std(dim=(0, 2, 3, 4)).clamp_min(1e-4)
    mean = torch.tensor(model.config.latents_mean, device=device)
    std = torch.tensor(model.config.latents_std, device=device)
    a, b = std / s, mean - m * std / s  # mu' = a * mu + b
    q = model.quant_conv
    q.weight[:16] *= a.view(-1, 1, 1, 1, 1)
    q.bias[:16] = q.bias[:16] * a + b
    p = model.post_quant_conv  # takes mu' -> must see mu = (mu' - b) / a
    p.bias += (p.weight * (-b / a).view(1, -1, 1, 1, 1)).sum(dim=(1, 2, 3, 4))
    p.weight /= a.view(1, -1, 1, 1, 1)
    return model


# -- DiT: cached latents, then the streaming sampler's own calls ---------------------------------
def grad_sampler_classes():
    from liveavatar_core.streaming import CausalDiT
    from liveavatar_core.streaming.caches import BlockKVCache

    class GradCausalDiT(CausalDiT):
        """CausalDiT with gradients (the same code without its no_grad)."""

        prefill_sink = CausalDiT.prefill_sink.__wrapped__
        denoise_block = CausalDiT.denoise_block.__wrapped__

    class GradKVCache(BlockKVCache):
        """BlockKVCache writing out of place, so earlier reads stay valid for backward."""

        reads_sink_in_place = False

        def write_and_read(self, layer, first_frame, frames, keys, values):
            if self.keys[layer] is None:
                shape = (keys.shape[0], self.frames * self.tokens_per_frame, *keys.shape[2:])
                self.keys[layer] = keys.new_zeros(shape)
                self.values[layer] = values.new_zeros(shape)
            slots = self.token_slots(first_frame, frames, keys.device)
            self.keys[layer] = self.keys[layer].index_copy(1, slots, keys.to(self.keys[layer].dtype))
            self.values[layer] = self.values[layer].index_copy(1, slots, values.to(self.values[layer].dtype))
            used = min(self.frames, first_frame + frames) * self.tokens_per_frame
            return self.keys[layer][:, :used], self.values[layer][:, :used]

    return GradCausalDiT, GradKVCache


@torch.no_grad()
def cache_latents(vae, batches: Batches, count: int, frames: int, device, log, chunk: int = 256, lead: int = 0):
    """`count` random clips of `frames` frames encoded once, as the pipeline encodes them: the
    reference alone, the motion context (MOTION_FRAMES copies of it) and the talking frames
    behind the 25 still frames the streaming decoder is primed with. `lead` frames: the target
    frames show the mouth that far ahead of the audio, for a VAE whose decoder shows each
    frame's mouth that late (see the module's docstring). Returns a dict of tensors on
    `device` (latents bfloat16)."""
    from liveavatar_core.semantics import MOTION_FRAMES, PRIMING_LATENTS
    from liveavatar_core.vae import WanVAE

    wan = WanVAE(vae)
    parts = {"ref": [], "motion": [], "target": [], "features": [], "weight": [], "track": []}
    for first in range(0, count, chunk):
        n = min(chunk, count - first)
        face, ref_level, level, feats = batches.clip(n, frames + lead)
        level, feats = level[:, lead:], feats[..., :frames]
        with torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda"):
            ref_pixels = batches.pixels(face, ref_level[:, None])
            ref = wan.encode(ref_pixels)
            motion = wan.encode(ref_pixels.repeat(1, 1, MOTION_FRAMES, 1, 1))
            still = ref_pixels.repeat(1, 1, 1 + 4 * (PRIMING_LATENTS - 1), 1, 1)
            target = wan.encode(torch.cat([still, batches.pixels(face, level)], dim=2))[:, :, PRIMING_LATENTS:]
        parts["ref"].append(ref.bfloat16())
        parts["motion"].append(motion.bfloat16())
        parts["target"].append(target.bfloat16())
        parts["features"].append(feats)
        parts["weight"].append(batches.mouth_weight(face))
        parts["track"].append(level.to(device))
        if first % (chunk * 4) == 0:
            log(f"cached {first + n}/{count} clips")
    return {k: torch.cat(v) for k, v in parts.items()}


def train_dit(
    cache,
    contexts,
    steps: int,
    seconds: float,
    seed: int,
    device,
    log,
    batch: int = 128,
    peak_lr: float = 2e-3,
    checkpoint=None,
    init_state=None,
):
    """Teacher-forced through the streaming sampler's own DiT calls: for every clip, every
    block and each of the first two of the three steps, `CausalDiT.denoise_block` runs as
    `CausalSampler.denoise` runs it (the step's KV cache holding the earlier blocks' keys at
    that step, the sink, the seeded sink distance, the schedule's timesteps), on the latents
    the sampler would hold there: pure noise at step 0, the Euler step of the model's own
    step-0 velocity at step 1 (detached). Each call is regressed on the clean latents it
    implies (x - sigma * v). After clip 0 the sink is refilled with clip 0's first latent as
    the sampler makes it (its last step, sigma 0.009, included), as the pipeline does. The
    last step is otherwise skipped in training: it moves the latents by 0.9 % of a velocity."""
    from liveavatar_core.dit import WanS2VTransformer
    from liveavatar_core.streaming import SamplerSettings
    from liveavatar_core.streaming.caches import SinkCache
    from liveavatar_core.streaming.sampler import sink_distance
    from liveavatar_core.streaming.solvers import flow_sigmas
    from liveavatar_core.time_grid import TEMPORAL_STRIDE

    GradCausalDiT, GradKVCache = grad_sampler_classes()
    torch.manual_seed(seed)
    model = WanS2VTransformer(dm.TINY_DIT).to(device).train()
    torch.nn.init.zeros_(model.head.head.weight)
    torch.nn.init.zeros_(model.head.head.bias)
    if init_state is not None:
        model.load_state_dict(init_state)
    dit = GradCausalDiT(model, sink_in_place=False, cuda_graphs=False)
    opt = torch.optim.AdamW(model.parameters(), lr=peak_lr, betas=(0.9, 0.98), weight_decay=0.01)
    sigmas = [float(s) for s in flow_sigmas(STEPS, 3.0)]
    pick = random.Random(seed)
    count = cache["target"].shape[0]
    total_frames = cache["target"].shape[2]
    autocast = torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda")
    schedule = Schedule(opt, peak_lr, steps, seconds)
    last_save, average = time.monotonic(), None
    for step in schedule:
        settings = SamplerSettings(sample_steps=STEPS, infer_frames=INFER_FRAMES, seed=pick.randrange(1 << 30))
        per_clip = settings.latent_frames
        clips = min(pick.choice([2, 2, 3]), total_frames // per_clip)
        rows = torch.randint(0, count, (batch,), device=device)
        ref, motion = cache["ref"][rows].float(), cache["motion"][rows].float()
        target, feats = cache["target"][rows].float(), cache["features"][rows]
        weight = cache["weight"][rows]
        tokens = dit.tokens_per_frame(*ref.shape[-2:])
        with autocast:
            context = model.embed_text(list(contexts[torch.randint(0, len(contexts), (batch,))]))
            sink = SinkCache(model.config.num_layers)
            dit.prefill_sink(sink, ref, motion, context)
        caches = [GradKVCache(model.config.num_layers, per_clip, tokens) for _ in range(STEPS)]
        loss, terms = 0.0, 0
        for clip in range(clips):
            noise = torch.randn_like(target[:, :, :per_clip])
            clip_feats = feats[..., clip * INFER_FRAMES : (clip + 1) * INFER_FRAMES]
            goal = target[:, :, clip * per_clip : (clip + 1) * per_clip]
            xs = [noise[:, :, a : a + n] for a, n in settings.blocks()]
            for s in range(STEPS - 1):
                sigma, sigma_next = sigmas[s], sigmas[s + 1]
                for b, (a, n) in enumerate(settings.blocks()):
                    features = clip_feats[..., a * TEMPORAL_STRIDE : (a + n) * TEMPORAL_STRIDE]
                    distance = sink_distance(settings.seed, clip, b, s, settings.sink_distance)
                    with autocast:
                        v = dit.denoise_block(
                            xs[b], sigma * 1000, clip * per_clip + a, context, features, caches[s], sink, distance
                        ).float()
                    clean = xs[b] - sigma * v
                    loss = loss + (weight * (clean - goal[:, :, a : a + n]) ** 2).mean()
                    terms += 1
                    xs[b] = (xs[b] + (sigma_next - sigma) * v).detach()
            if clip == 0 and clips > 1:
                with torch.no_grad(), autocast:
                    a, n = settings.blocks()[0]
                    distance = sink_distance(settings.seed, 0, 0, STEPS - 1, settings.sink_distance)
                    v = dit.denoise_block(
                        xs[0],
                        sigmas[-2] * 1000,
                        0,
                        context,
                        clip_feats[..., : n * TEMPORAL_STRIDE],
                        GradKVCache(model.config.num_layers, per_clip, tokens),
                        sink,
                        distance,
                    ).float()
                    first = (xs[0] + (sigmas[-1] - sigmas[-2]) * v)[:, :, :1]
                with autocast:
                    sink = SinkCache(model.config.num_layers)
                    dit.prefill_sink(sink, first, motion, context)  # the sink roll, as the pipeline does
        loss = loss / terms
        descend(opt, loss, model.parameters())
        value = loss.item() if step % 10 == 0 else None
        if value is not None:
            average = value if average is None else 0.9 * average + 0.1 * value
        if step % 50 == 0:
            rate = step / max(1e-6, schedule.elapsed())
            log(
                f"dit step {step} clips {clips} loss {value:.4f} (avg {average:.4f}) lr {opt.param_groups[0]['lr']:.2e} {rate:.2f} steps/s"
            )
        if checkpoint is not None and time.monotonic() - last_save > 60:
            checkpoint(model, step)
            last_save = time.monotonic()
    log(f"dit: {schedule.done} steps, last loss {loss.item():.4f}")
    return model.eval().requires_grad_(False), schedule.done


# -- files ----------------------------------------------------------------------------------------
def write_files(out: Path, dit, vae, text_state, audio_state, seed: int):
    from safetensors.torch import save_file

    from liveavatar_core.dit import save_dit

    out.mkdir(parents=True, exist_ok=True)
    metadata = {dm.MARKER_KEY: json.dumps({"version": dm.FORMAT_VERSION, "seed": seed, "trained": True})}
    names = dm.DEFAULT_FILES
    dit = dit.cpu()
    lora = dm.lora_state(dit, seed)
    lora = {k: (torch.zeros_like(v) if "lora_B" in k else v) for k, v in lora.items()}
    save_file(lora, str(out / names["loras"]), metadata=metadata)
    save_dit(dit.to(torch.bfloat16), out / names["diffusion_models"])
    save_file(text_state, str(out / names["text_encoders"]), metadata=metadata)
    write_vae(out, vae, seed)
    save_file(audio_state, str(out / names["audio_encoders"]), metadata=metadata)


def write_vae(out: Path, vae, seed: int):
    from safetensors.torch import save_file

    from liveavatar_core.vae_keys import wan_to_diffusers_names

    out.mkdir(parents=True, exist_ok=True)
    metadata = {dm.MARKER_KEY: json.dumps({"version": dm.FORMAT_VERSION, "seed": seed, "trained": True})}
    ours = dm._state(vae, torch.bfloat16)
    mapping = wan_to_diffusers_names(dm.wan_vae_names())
    save_file(
        {w: ours[d].cpu().contiguous() for w, d in mapping.items()},
        str(out / dm.DEFAULT_FILES["vae"]),
        metadata=metadata,
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the five files")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vae-steps", type=int, default=900)
    parser.add_argument("--dit-steps", type=int, default=2000)
    parser.add_argument("--vae-seconds", type=float, default=1e9, help="also stop the VAE's training after this long")
    parser.add_argument("--dit-seconds", type=float, default=1e9, help="also stop the DiT's training after this long")
    parser.add_argument(
        "--vae-from", type=Path, default=None, help="take this trained VAE file instead of training one"
    )
    parser.add_argument("--decoder-steps", type=int, default=400)
    parser.add_argument("--vae-dim", type=int, default=dm.VAE_BASE_DIM, help="the VAE's base width")
    parser.add_argument("--vae-batch", type=int, default=32, help="clips per VAE step (the tiny VAE is launch-bound)")
    parser.add_argument("--decoder-batch", type=int, default=8)
    parser.add_argument(
        "--decoder-latents", type=int, default=24, help="talking latents after the priming ones per decoder clip"
    )
    parser.add_argument(
        "--decoder-seconds", type=float, default=1e9, help="also stop the decoder's training after this long"
    )
    parser.add_argument("--vae-init", type=Path, default=None, help="continue training the VAE of this file")
    parser.add_argument(
        "--dit-from", type=Path, default=None, help="start the DiT from this file (a checkpoint or a shipped DiT)"
    )
    parser.add_argument(
        "--target-lead",
        type=int,
        default=0,
        help="frames the DiT's targets show the mouth ahead of the audio (the VAE's measured lag, e.g. 4)",
    )
    parser.add_argument(
        "--blend-with",
        type=Path,
        default=None,
        help="write the DiT halfway (see --blend-weight) between the trained one and this DiT file",
    )
    parser.add_argument("--blend-weight", type=float, default=0.5, help="the trained DiT's share of the blend")
    parser.add_argument("--faces", type=int, default=800)
    parser.add_argument("--utterances", type=int, default=160)
    parser.add_argument("--cached-clips", type=int, default=6144, help="clips whose latents are cached for the DiT")
    parser.add_argument(
        "--cache-chunk", type=int, default=256, help="clips encoded at once for the cache (a CPU wants few)"
    )
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    started = time.monotonic()

    def log(message):
        print(f"[{time.monotonic() - started:6.1f} s] {message}", flush=True)

    from safetensors.torch import save_file

    from liveavatar_core.audio_encoder import load_audio_encoder
    from liveavatar_core.dit import load_dit, save_dit
    from liveavatar_core.text_encoder import load_text_encoder
    from liveavatar_core.vae import load_vae

    # The seeded random umT5 and wav2vec2 of `default_models`, read back through our loaders.
    text_state, audio_state = dm.text_encoder_state(args.seed), dm.audio_encoder_state(args.seed)
    tmp = args.out / "_tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    save_file(text_state, str(tmp / "t.safetensors"))
    save_file(audio_state, str(tmp / "a.safetensors"))
    text = load_text_encoder(tmp / "t.safetensors", dtype=torch.float32)
    audio = load_audio_encoder(
        tmp / "a.safetensors", expected_hidden_size=dm.AUDIO_DIM, expected_hidden_states=dm.AUDIO_LAYERS + 1
    )
    # Zero rows past a prompt's end are what `embed_text` pads with at inference too.
    contexts = torch.stack(_pad(list(text.encode(PROMPTS)))).to(device)
    log("drawing faces and synthesising speech")
    data = make_data(args.seed, args.faces, args.utterances, audio, args.workers)
    log(f"data: {tuple(data[0].shape)} faces, {tuple(data[2].shape)} features")
    batches = Batches(data, device, torch.Generator().manual_seed(args.seed))
    if args.vae_from is not None:
        vae = load_vae(args.vae_from, device).model
        log(f"VAE from {args.vae_from}")
    else:
        init = load_vae(args.vae_init, device).model if args.vae_init is not None else None
        vae = train_vae(
            batches,
            args.vae_steps,
            args.vae_seconds,
            args.seed,
            device,
            log,
            init,
            batch=args.vae_batch,
            base_dim=args.vae_dim,
        )
        vae = normalise_vae(vae, batches, device)
    if args.decoder_steps > 0:
        vae = train_decoder(
            vae,
            batches,
            args.decoder_steps,
            args.decoder_seconds,
            device,
            log,
            latents=args.decoder_latents,
            batch=args.decoder_batch,
        )
    write_vae(args.out, vae, args.seed)
    log("VAE written")
    cache = None
    if args.dit_steps > 0:
        cache = cache_latents(
            vae,
            batches,
            args.cached_clips,
            3 * INFER_FRAMES,
            device,
            log,
            chunk=args.cache_chunk,
            lead=args.target_lead,
        )
        log(f"cached latents {tuple(cache['target'].shape)}")

    def checkpoint(model, step):
        # float32 in the shipped file's format (config in the metadata), so --dit-from reads both
        save_dit(copy.deepcopy(model).float().cpu(), args.out / "dit_checkpoint.safetensors")
        log(f"checkpoint at step {step}")

    init = load_dit(args.dit_from, dtype=torch.float32) if args.dit_from is not None else None
    if args.dit_steps == 0:  # a finished DiT with a new decoder: the encoder, so its latents, are unchanged
        if init is None:
            parser.error("--dit-steps 0 needs --dit-from")
        write_files(args.out, blended(init, args, log), vae, text_state, audio_state, args.seed)
        shutil.rmtree(tmp)
        log(f"wrote {args.out}")
        return
    dit, steps = train_dit(
        cache,
        contexts,
        args.dit_steps,
        args.dit_seconds,
        args.seed,
        device,
        log,
        batch=args.batch,
        peak_lr=args.lr,
        checkpoint=checkpoint,
        init_state=init.state_dict() if init is not None else None,
    )
    checkpoint(dit, steps)
    write_files(args.out, blended(dit, args, log), vae, text_state, audio_state, args.seed)
    shutil.rmtree(tmp)
    log(f"wrote {args.out}")


def blended(dit, args, log):
    """The DiT `--blend-weight` of the way from the `--blend-with` DiT to this one (float32),
    or this one as it is. Two DiTs of one lineage (one trained on from the other) blend
    smoothly: the shipped DiT is such a midpoint (see the module's docstring)."""
    if args.blend_with is None:
        return dit
    from liveavatar_core.dit import load_dit

    other = load_dit(args.blend_with, dtype=torch.float32).state_dict()
    w = args.blend_weight
    dit.load_state_dict({k: w * v.float() + (1 - w) * other[k] for k, v in dit.state_dict().items()})
    log(f"DiT blended: {w} of it, {1 - w} of {args.blend_with}")
    return dit


def _pad(embeddings):
    longest = max(e.shape[0] for e in embeddings)
    return [F.pad(e, (0, 0, 0, longest - e.shape[0])) for e in embeddings]


if __name__ == "__main__":
    main()
