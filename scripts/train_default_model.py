"""Trains the tiny default model (the files `liveavatar_core.default_models` ships) on synthetic
talking faces, so the pipeline's first run shows the portrait talking.

    python scripts/train_default_model.py --out liveavatar_core/default_model --seed 0 \
        --vae-steps 589 --dit-steps 168 --faces 600 --utterances 96

The shipped files were made on one H200 with time limits instead of step counts
(`--vae-steps 100000 --dit-steps 100000 --vae-seconds 130 --dit-seconds 270 --faces 600
--utterances 96 --workers 15`): 589 VAE steps and 168 DiT steps in 411 s; the step counts
above repeat that run by steps (its schedule ran on elapsed time, close to steps at a
steady speed; the learning rate follows whichever of steps and seconds runs out first). The loss
was still falling: more DiT steps are what the model needs most. What it makes, all in the
real files' formats and tensor names:

- umT5, wav2vec2 and the LoRA file: the seeded random networks of `default_models` (seed 0),
  the LoRA with zero up-projections (PEFT's initial state), so merging it changes nothing;
- the VAE (Wan 2.1 architecture, base width 4): trained as an autoencoder on the talking
  faces, the clips encoded and decoded whole as the streaming decoder decodes them; its
  output layers are then rescaled so the official latent normalisation gives zero mean and
  unit variance per channel;
- the DiT (Wan2.2-S2V architecture, audio injector after every block): trained through our
  own streaming sampler (`CausalSampler`: sink prefill, per-step caches, sink roll after clip 0,
  seeded sink distance, the schedule's timesteps, Euler steps) unrolled with gradients: the
  clean latents it makes for each block are regressed onto the VAE latents of the target
  clip, encoded behind the 25 still frames the streaming decoder is primed with. So training
  runs exactly what inference runs.

Data recipe (all seeded from `--seed`): faces from `talking_faces.random_style` (colours,
place, size; one in four the example's own style), each drawn at zooms 1..3 at 128*128;
speech from `talking_faces.random_speech` (random syllables and pauses through the example's
formant synthesiser), one utterance per seed; the mouth opening of each frame is
`talking_faces.mouth_track` of the speech; one clip in eight ends in silence (zero features,
as the pipeline pads), and the reference's own mouth opening is random.
"""

from __future__ import annotations

import argparse
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
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import talking_faces as faces  # noqa: E402
from liveavatar_core import default_models as dm  # noqa: E402

SIZE = 128  # training frames are SIZE x SIZE
LEVELS = 17  # mouth openings drawn per face (a frame takes the nearest)
INFER_FRAMES = 32
STEPS = 3
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
    seed, = args
    rng = np.random.default_rng(10_000 + seed)
    style = faces.FaceStyle() if rng.random() < 0.25 else faces.random_style(rng)
    zoom = float(rng.choice([1.0, 1.0, rng.uniform(1.0, 3.0)]))
    # Zoomed in, the centre moves towards the mouth so it stays in view.
    t = (zoom - 1) / 2
    centre = (256 + style.dx * t + rng.uniform(-20, 20) * t, 320 + (40 + style.dy) * t)
    images = [np.asarray(faces.draw_face(style, level / (LEVELS - 1), SIZE, SIZE, zoom, centre))
              for level in range(LEVELS)]
    return np.stack(images), faces.mouth_box(style, SIZE, SIZE, zoom, centre)


def _speech(seed):
    wave = faces.random_speech(20_000 + seed)
    return wave


def make_data(seed: int, num_faces: int, num_speech: int, audio_encoder, workers: int):
    with Pool(workers) as pool:
        face_data = pool.map(_face_levels, [(seed * 100_000 + i,) for i in range(num_faces)])
        waves = pool.map(_speech, [seed * 100_000 + i for i in range(num_speech)])
    levels = torch.from_numpy(np.stack([f[0] for f in face_data]))  # [N, L, H, W, 3]
    boxes = torch.tensor([f[1] for f in face_data])
    features, tracks = [], []
    for wave in waves:
        f = audio_encoder.features_for_video(torch.from_numpy(wave), faces.FPS)[0]  # [layers, dim, frames]
        features.append(f)
        tracks.append(torch.from_numpy(faces.mouth_track(wave, f.shape[-1])).float())
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
        return (frames.to(self.device).permute(0, 4, 1, 2, 3).float() / 127.5 - 1)

    def mouth_weight(self, face, scale=8):
        boxes = self.boxes[face]
        weight = torch.ones(len(face), 1, 1, SIZE // scale, SIZE // scale)
        for i, (x0, y0, x1, y1) in enumerate(boxes.tolist()):
            weight[i, ..., y0 // scale : -(-y1 // scale), x0 // scale : -(-x1 // scale)] = 5.0
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


def train_vae(batches: Batches, steps: int, seconds: float, seed: int, device, log):
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed)
    model = AutoencoderKLWan(base_dim=dm.VAE_BASE_DIM, z_dim=16).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    began, step = time.monotonic(), 0
    while (progress := max(step / steps, (time.monotonic() - began) / seconds)) < 1:
        for group in opt.param_groups:
            group["lr"] = _lr(2e-3, progress)
        face, ref_level, level, _ = batches.clip(12, 8)
        # A still first frame (as the primed decoder sees), then eight talking frames.
        levels = torch.cat([ref_level[:, None], level], dim=1)
        video = batches.pixels(face, levels)
        with torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda"):
            mu = model.encode(video).latent_dist.mode()
            out = model.decode(mu).sample.float()
        weight = batches.mouth_weight(face, 1)
        loss = (weight * (out - video).abs()).mean() + 1e-4 * mu.float().pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 100 == 0:
            log(f"vae step {step} loss {loss.item():.4f}")
        step += 1
    log(f"vae: {step} steps, last loss {loss.item():.4f}")
    return model.eval().requires_grad_(False)


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


# -- DiT through the streaming sampler ------------------------------------------------------------
def grad_sampler_classes():
    from liveavatar_core.streaming import CausalDiT, CausalSampler
    from liveavatar_core.streaming.caches import BlockKVCache
    from liveavatar_core.streaming.sampler import _Branch

    class GradCausalDiT(CausalDiT):
        """CausalDiT with gradients (the same code without its no_grad)."""

        prefill_sink = CausalDiT.prefill_sink.__wrapped__
        denoise_block = CausalDiT.denoise_block.__wrapped__

    class GradKVCache(BlockKVCache):
        """BlockKVCache writing out of place, so earlier reads stay valid for backward."""

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

    class BatchSampler(CausalSampler):
        """CausalSampler over a batch of runs (one prompt each) with its own noise."""

        def start_batch(self, ref, motion, contexts, noise_generator):
            s, model = self.settings, self.dit.model
            height, width = ref.shape[-2:]
            self._latent_hw = (height, width)
            tokens = self.dit.tokens_per_frame(height, width)
            self._noise_generator = noise_generator
            self._batch = ref.shape[0]
            branch = _Branch(model.embed_text(list(contexts)), model.config.num_layers, s.sample_steps,
                             s.latent_frames, tokens, False)
            branch.caches = [GradKVCache(model.config.num_layers, s.latent_frames, tokens) for _ in range(s.sample_steps)]
            self._branches = [branch]
            self.replace_sink(ref, motion)

        def clip_noise(self, clip):
            height, width = self._latent_hw
            shape = (self._batch, self.dit.config.in_dim, self.settings.latent_frames, height, width)
            return torch.randn(shape, generator=self._noise_generator, device=self.device)

    return GradCausalDiT, BatchSampler


def train_dit(vae, batches: Batches, contexts, steps: int, seconds: float, seed: int, device, log):
    from liveavatar_core.dit import WanS2VTransformer
    from liveavatar_core.semantics import MOTION_FRAMES, PRIMING_LATENTS
    from liveavatar_core.streaming import SamplerSettings
    from liveavatar_core.vae import WanVAE

    GradCausalDiT, BatchSampler = grad_sampler_classes()
    wan = WanVAE(vae)
    torch.manual_seed(seed)
    model = WanS2VTransformer(dm.TINY_DIT).to(device).train()
    torch.nn.init.zeros_(model.head.head.weight)
    torch.nn.init.zeros_(model.head.head.bias)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    noise_gen = torch.Generator(device).manual_seed(seed)
    pick = random.Random(seed)
    batch = 16
    began, step = time.monotonic(), 0
    while (progress := max(step / steps, (time.monotonic() - began) / seconds)) < 1:
        for group in opt.param_groups:
            group["lr"] = _lr(1e-3, progress)
        clips = pick.choice([2, 2, 3])
        settings = SamplerSettings(sample_steps=STEPS, infer_frames=INFER_FRAMES, seed=pick.randrange(1 << 30))
        frames = clips * INFER_FRAMES
        face, ref_level, level, feats = batches.clip(batch, frames)
        with torch.no_grad():
            ref_pixels = batches.pixels(face, ref_level[:, None])
            ref = wan.encode(ref_pixels)
            motion = wan.encode(ref_pixels.repeat(1, 1, MOTION_FRAMES, 1, 1))
            # The target clip behind the 25 still frames the streaming decoder first consumes.
            still = ref_pixels.repeat(1, 1, 1 + 4 * (PRIMING_LATENTS - 1), 1, 1)
            target = wan.encode(torch.cat([still, batches.pixels(face, level)], dim=2))[:, :, PRIMING_LATENTS:]
        ctx = contexts[torch.randint(0, len(contexts), (batch,))]
        sampler = BatchSampler(GradCausalDiT(model), settings, device)
        sampler.start_batch(ref, motion, ctx, noise_gen)
        weight = batches.mouth_weight(face)
        loss = 0.0
        per_clip = settings.latent_frames
        for clip in range(clips):
            audio = feats[..., clip * INFER_FRAMES : (clip + 1) * INFER_FRAMES]
            for start, latents in sampler.generate_clip(clip, audio):
                goal = target[:, :, clip * per_clip + start : clip * per_clip + start + latents.shape[2]]
                loss = loss + (weight * (latents - goal) ** 2).mean()
                if clip == 0 and start == 0:
                    first = latents[:, :, :1]
            if clip == 0:
                sampler.replace_sink(first, motion)  # the sink roll, as the pipeline does
        loss = loss / (clips * len(settings.blocks()))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 25 == 0:
            log(f"dit step {step} clips {clips} loss {loss.item():.4f}")
        step += 1
    log(f"dit: {step} steps, last loss {loss.item():.4f}")
    return model.eval().requires_grad_(False)


# -- files ----------------------------------------------------------------------------------------
def write_files(out: Path, dit, vae, text_state, audio_state, seed: int):
    from safetensors.torch import save_file

    from liveavatar_core.dit import save_dit
    from liveavatar_core.vae_keys import wan_to_diffusers_names

    out.mkdir(parents=True, exist_ok=True)
    metadata = {dm.MARKER_KEY: json.dumps({"version": dm.FORMAT_VERSION, "seed": seed, "trained": True})}
    names = dm.DEFAULT_FILES
    dit = dit.cpu()
    lora = dm.lora_state(dit, seed)
    lora = {k: (torch.zeros_like(v) if "lora_B" in k else v) for k, v in lora.items()}
    save_file(lora, str(out / names["loras"]), metadata=metadata)
    save_dit(dit.to(torch.bfloat16), out / names["diffusion_models"])
    save_file(text_state, str(out / names["text_encoders"]), metadata=metadata)
    ours = dm._state(vae.cpu(), torch.bfloat16)
    mapping = wan_to_diffusers_names(dm.wan_vae_names())
    save_file({w: ours[d] for w, d in mapping.items()}, str(out / names["vae"]), metadata=metadata)
    save_file(audio_state, str(out / names["audio_encoders"]), metadata=metadata)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the five files")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vae-steps", type=int, default=900)
    parser.add_argument("--dit-steps", type=int, default=700)
    parser.add_argument("--vae-seconds", type=float, default=1e9, help="also stop the VAE's training after this long")
    parser.add_argument("--dit-seconds", type=float, default=1e9, help="also stop the DiT's training after this long")
    parser.add_argument("--faces", type=int, default=600)
    parser.add_argument("--utterances", type=int, default=96)
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    started = time.monotonic()

    def log(message):
        print(f"[{time.monotonic() - started:6.1f} s] {message}", flush=True)

    from safetensors.torch import save_file

    from liveavatar_core.audio_encoder import load_audio_encoder
    from liveavatar_core.text_encoder import load_text_encoder

    # The seeded random umT5 and wav2vec2 of `default_models`, read back through our loaders.
    text_state, audio_state = dm.text_encoder_state(args.seed), dm.audio_encoder_state(args.seed)
    tmp = args.out / "_tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    save_file(text_state, str(tmp / "t.safetensors"))
    save_file(audio_state, str(tmp / "a.safetensors"))
    text = load_text_encoder(tmp / "t.safetensors", dtype=torch.float32)
    audio = load_audio_encoder(tmp / "a.safetensors", expected_hidden_size=dm.AUDIO_DIM,
                               expected_hidden_states=dm.AUDIO_LAYERS + 1)
    # Zero rows past a prompt's end are what `embed_text` pads with at inference too.
    contexts = torch.stack(_pad(list(text.encode(PROMPTS)))).to(device)
    log("drawing faces and synthesising speech")
    data = make_data(args.seed, args.faces, args.utterances, audio, args.workers)
    log(f"data: {tuple(data[0].shape)} faces, {tuple(data[2].shape)} features")
    batches = Batches(data, device, torch.Generator().manual_seed(args.seed))
    vae = train_vae(batches, args.vae_steps, args.vae_seconds, args.seed, device, log)
    vae = normalise_vae(vae, batches, device)
    dit = train_dit(vae, batches, contexts, args.dit_steps, args.dit_seconds, args.seed, device, log)
    write_files(args.out, dit, vae, text_state, audio_state, args.seed)
    shutil.rmtree(tmp)
    log(f"wrote {args.out}")


def _pad(embeddings):
    longest = max(e.shape[0] for e in embeddings)
    return [F.pad(e, (0, 0, 0, longest - e.shape[0])) for e in embeddings]


if __name__ == "__main__":
    main()
