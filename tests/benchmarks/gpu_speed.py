"""GPU speed of LiveAvatar on the real Wan2.2-S2V-14B architecture (random bf16 weights).

Parts (each fits well inside 10 minutes on one 80 GB GPU, so they can run as separate jobs):

- attention: each attention kernel at the streaming block's Standard shape, and its error
          against float32 (the FlashAttention-3 row needs `flash_attn_interface`).
- dit:    one clip's full DiT forward, ours (`WanS2VTransformer`) against ComfyUI's
          `WanModel_S2V` with the very same weight tensors and inputs; speed-up, TFLOP/s,
          peak memory, and the relative difference of the outputs: as given, and with audio
          constant in time (ComfyUI aligns the audio a few frames off the official model; with
          steady audio only its RoPE conventions for the motion tokens and bf16 noise remain).
- stream: our streaming DiT: `CausalDiT.denoise_block` per block and step with the KV caches
          filled as in a run (a `CausalSampler` goes through a few clips), per-clip DiT time.
- vae:    streaming decode of one clip and the encodes of the reference and motion context
          (full-size `AutoencoderKLWan`, random weights).
- e2e:    `StreamingPipeline.stream` over a few clips, into an mp4 when PyAV is installed:
          frames per second, first-frame latency (models already loaded), peak memory; once
          per `--semantics` (official-multi-gpu, official-single-gpu: what the single-GPU
          semantics' motion windows cost per clip).
- load:   the 14B DiT written to one safetensors file on local disk, then `load_dit` in a fresh
          process: wall time, peak host RSS, device peak (needs ~33 GB of free disk).

    python tests/benchmarks/gpu_speed.py --parts dit,stream --presets preview,standard,hd
    python tests/benchmarks/gpu_speed.py --tiny     # small model, any device: a smoke test

Results go to <out>/gpu_speed-<date>.json and .md; a later run on the same date (another
part, another machine) updates the same files, and `--merge a.json b.json` folds result files
made elsewhere into them.

FLOPs of one DiT call (a multiply-add counts 2; embeddings, norms, RoPE, convolutions and the
head are left out, well under 1%). With d = dim, f = ffn_dim, n_L = blocks, n_I = audio
injectors, T = 512 text tokens, A = num_audio_token + 1 audio tokens per latent frame:
  Q   tokens through the blocks (full forward: video + sink; streaming: the block's video)
  K   keys of self-attention (full forward: Q; streaming: cached frames + this block + sink)
  V   video tokens, F latent frames of the call
  per block:    8 Q d^2 (q,k,v,o) + 4 Q K d (QK^T, AV)
              + 4 Q d^2 + 4 T d^2 + 4 Q T d (text cross-attention: q,o; k,v; QK^T, AV)
              + 4 Q d f (FFN)
  per injector: 4 V d^2 + 4 F A d^2 + 4 V A d + 4 F d^2 (q,o; k,v; attention; AdaIN linear)
  total = n_L * block + n_I * injector
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import math
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from liveavatar_core.dit import S2VConfig, WanS2VTransformer, load_dit, save_dit  # noqa: E402
from liveavatar_core.dit import attention as attention_dispatch  # noqa: E402
from liveavatar_core.dit.fp8 import quantize_dit_, set_activation_scaling_  # noqa: E402
from liveavatar_core.dit.fp8_attention import (  # noqa: E402
    FP8,
    Fp8Heads,
    emulated_attention,
    kernel_attention,
    quantize_per_head,
)
from liveavatar_core.dit.kernels import Kernels  # noqa: E402
from liveavatar_core.dit.kernels import use as use_kernels  # noqa: E402
from liveavatar_core.pipeline import StreamingPipeline, write_video  # noqa: E402
from liveavatar_core.run_spec import RunSpec  # noqa: E402
from liveavatar_core.semantics import MOTION_FRAMES, REFERENCE_COPIES  # noqa: E402
from liveavatar_core.sizing import parse_size  # noqa: E402
from liveavatar_core.streaming import (  # noqa: E402
    CausalDiT,
    CausalSampler,
    SamplerSettings,  # noqa: E402
)
from liveavatar_core.streaming.sampler import BLOCK_FRAMES  # noqa: E402
from liveavatar_core.time_grid import FPS  # noqa: E402
from liveavatar_core.vae import WanVAE, latent_frame_count  # noqa: E402
from liveavatar_core.vae_kernels import VAEKernels  # noqa: E402

GIB = 2**30
TEXT_TOKENS = 64  # prompt length before padding to text_len; the DiT always sees 512 rows
SAMPLE_RATE = 16000
PARTS = ("attention", "dit", "stream", "vae", "e2e", "load")
# How our DiT runs: "eager" = every element-wise op on its own (the state before fusion),
# "compiled" = the fused element-wise chains of liveavatar_core/dit/fused.py compiled.
# "fp8" = compiled, with the DiT's linear layers in fp8 (liveavatar_core/dit/fp8.py), inputs
# scaled per token; "fp8-tensor" the same with one input scale per call; "fp8-static" the same
# with each layer's input scale fixed after its first call (cast inside the producing kernels).
# A variant may add options after "+" (e.g. "fp8-tensor+inplace+graphs"); without them it runs
# as the pack did before they existed:
#   inplace  the KV ring and the sink read from one [sink | ring] buffer (no concatenation)
#   graphs   steady-state streaming DiT calls replayed as CUDA graphs
#   vae      the VAE's cuDNN autotuning and channels-last convolutions (e2e part)
#   vaeautocast  the VAE under bf16 autocast, as the official code runs it (e2e part)
#   vaecompile   the VAE's per-frame decoder and per-chunk encoder compiled (e2e part)
#   kvfp8    the streaming KV caches and sink in e4m3 (a scale per token and head)
#   calclip  fp8-static calibrated over the sink prefill and a whole Standard clip (17 calls), not 1
#   cudnn, flash, efficient, fa3: the attention kernel (default: SDPA's own pick)
#   fa3fp8   FlashAttention-3's fp8 forward, a scale per head; with kvfp8 the caches become
#            e4m3 with one scale per head, read by it as they lie (no dequantised copy)
#   fp8emu   the same e4m3 inputs through float32 SDPA (what fa3fp8 computes, on any device)
VARIANTS = ("eager", "compiled", "fp8", "fp8-tensor", "fp8-static")
OPTIONS = (
    "inplace",
    "graphs",
    "vae",
    "vaeautocast",
    "vaecompile",
    "kvfp8",
    "calclip",
    "cudnn",
    "flash",
    "efficient",
    "fa3",
    "fa3fp8",
    "fp8emu",
)
CLIP_CALIBRATION_CALLS = 1 + 4 * 4  # the sink prefill, then Standard's 4 blocks x 4 steps
ACTIVATION_SCALING = {"fp8": "row", "fp8-tensor": "tensor", "fp8-static": "static"}
# A variant's option -> the attention backend it picks.
ATTENTION_OPTIONS = {
    "cudnn": "cudnn",
    "flash": "flash",
    "efficient": "efficient",
    "fa3": "fa3",
    "fa3fp8": "fa3-fp8",
    "fp8emu": "fp8-emulated",
}
FA3_OPTIONS = ("fa3", "fa3fp8")
# The VAE part's variants: "plain" (bf16 weights, every op in bf16, cuDNN's default kernels) or
# options joined by "+" (see liveavatar_core/vae_kernels.py): "autotune" (cudnn.benchmark),
# "channels-last" (NDHWC activations and weights), "autocast" (bf16 autocast: norms in float32,
# as the official code), "compile" (torch.compile of the per-frame decoder / per-chunk encoder),
# "fp32" (float32 weights: the reference the others' pixel errors are measured against when the
# variant "fp32" runs first). "autotune+channels-last" was WanVAE's default on CUDA before
# autocast; with autocast it is "autotune+channels-last+autocast".
VAE_OPTIONS = ("autotune", "channels-last", "autocast", "compile", "fp32")
TINY_DIT = S2VConfig(
    dim=256, ffn_dim=512, num_heads=4, num_layers=4, text_dim=64, audio_dim=32, audio_inject_layers=(0, 2), freq_dim=256
)


@dataclass(frozen=True)
class Preset:
    size: str
    infer_frames: int
    steps: int
    guide_scale: float
    tiny_size: str  # smaller frames for --tiny; frames, steps and guidance stay

    @property
    def branches(self) -> int:
        return 2 if self.guide_scale > 0 else 1


PRESETS = {
    "preview": Preset("384*256", 32, 3, 0.0, "64*64"),
    "standard": Preset("688*368", 48, 4, 0.0, "96*64"),
    "hd": Preset("704*384", 48, 5, 5.0, "128*64"),
}


# -- setup ---------------------------------------------------------------------------------------
class Bench:
    """What every part shares: device, dtype, model size, clocks, repetitions."""

    def __init__(self, args):
        self.device = torch.device(args.device)
        self.cuda = self.device.type == "cuda"
        self.tiny = args.tiny
        self.config = TINY_DIT if args.tiny else S2VConfig()
        # bf16 is what runs on GPUs; CPUs are only for the smoke test, where float32 is faster.
        self.dtype = torch.bfloat16 if self.cuda else torch.float32
        self.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 2)
        self.iters = args.iters if args.iters is not None else (1 if args.tiny else 5)
        self.clips = args.clips if args.clips is not None else (2 if args.tiny else 3)
        self.force = args.force
        self.variants = [v for v in args.variants.split(",") if v]
        self.profile_dir = Path(args.profile) if args.profile else None
        self.args = args

    def size(self, preset: Preset) -> tuple[int, int]:
        return parse_size(preset.tiny_size if self.tiny else preset.size)

    def latent_hw(self, preset: Preset) -> tuple[int, int]:
        width, height = self.size(preset)
        return height // 8, width // 8

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def ms(self, start, end) -> float:
        """Milliseconds between two marks (call after `sync`)."""
        return start.elapsed_time(end) if self.cuda else (end - start) * 1000

    def measure(self, fn, iters: int | None = None) -> list[float]:
        """Milliseconds of each of `iters` (default: the run's) calls after `warmup` untimed ones."""
        for _ in range(self.warmup):
            fn()
        marks = []
        for _ in range(self.iters if iters is None else iters):
            start = self.mark()
            fn()
            marks.append((start, self.mark()))
        self.sync()
        return [self.ms(a, b) for a, b in marks]

    def reset_peak(self) -> None:
        if self.cuda:
            self.sync()
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_gib(self) -> float | None:
        return torch.cuda.max_memory_allocated(self.device) / GIB if self.cuda else None

    def free_gib(self) -> float | None:
        return torch.cuda.mem_get_info(self.device)[0] / GIB if self.cuda else None

    def release(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()

    def generator(self, seed: int) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(seed)

    def randn(self, *shape, seed: int, scale: float = 1.0) -> torch.Tensor:
        """Float32 values exactly representable in the model dtype, so ours and ComfyUI's
        models start from identical inputs."""
        x = torch.randn(*shape, generator=self.generator(seed), device=self.device) * scale
        return x.to(self.dtype).float()


def peak_rss_gib() -> float:
    """Peak resident memory of this process image. VmHWM, not ru_maxrss: Linux carries
    ru_maxrss over from the parent through fork and exec, so a child started by a process that
    once held the whole file in memory would report the parent's peak."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


@torch.no_grad()
def randomize_(model: torch.nn.Module, gen: torch.Generator) -> None:
    """Seeded weights of a sane scale: unit-variance activations through every linear layer."""
    for name, p in model.named_parameters():
        if name == "casual_audio_encoder.weights":
            p.fill_(0.01)  # the layer mix divides by the sum of silu(weights): keep it positive
        elif p.ndim == 1 and name.endswith("weight"):
            p.fill_(1.0)  # norm gains
        elif p.ndim == 1:
            p.normal_(0.0, 0.02, generator=gen)
        else:
            p.normal_(0.0, (p.numel() // p.shape[0]) ** -0.5, generator=gen)


def build_dit(bench: Bench, seed: int = 0) -> WanS2VTransformer:
    # Built on the meta device and materialised on the target in its dtype: initialising 16B
    # float32 parameters on the host would take minutes and twice the memory.
    with torch.device("meta"):
        model = WanS2VTransformer(bench.config)
    model = model.to(bench.dtype).to_empty(device=bench.device)
    randomize_(model, bench.generator(seed))
    return model.eval().requires_grad_(False)


def build_vae(bench: Bench, seed: int = 1, dtype: torch.dtype | None = None) -> WanVAE:
    from diffusers import AutoencoderKLWan
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # its dtype-cast advice is about loading real files
    torch.manual_seed(seed)
    with torch.device(bench.device):
        net = AutoencoderKLWan(base_dim=16) if bench.tiny else AutoencoderKLWan()
    return WanVAE(net.to(dtype or bench.dtype).eval().requires_grad_(False))


def vae_options(variant: str) -> set[str]:
    """The options of a VAE variant ("plain" has none)."""
    return set() if variant == "plain" else set(variant.split("+"))


def vae_kernels(options: set[str]) -> VAEKernels:
    return VAEKernels(
        autotune="autotune" in options,
        channels_last="channels-last" in options,
        autocast="autocast" in options,
        compile="compile" in options,
    )


def split_variant(variant: str) -> tuple[str, set[str]]:
    base, *options = variant.split("+")
    return base, set(options)


def variant_kernels(variant: str) -> Kernels:
    base, options = split_variant(variant)
    chosen = [backend for option, backend in ATTENTION_OPTIONS.items() if option in options]
    if len(chosen) > 1:
        raise ValueError(f"variant {variant!r} names more than one attention kernel")
    return Kernels(
        compile_elementwise=base != "eager",
        attention=chosen[0] if chosen else "sdpa",
        sink_in_place="inplace" in options,
        cuda_graphs="graphs" in options,
        kv_fp8="kvfp8" in options,
    )


def use_variant(model: WanS2VTransformer, variant: str) -> WanS2VTransformer:
    """`model` set to run as `variant` says (its `kernels`)."""
    model.kernels = variant_kernels(variant)
    return model


class VariantModels:
    """The DiT each variant runs: the model itself, or for fp8 a twin that shares every tensor
    but the quantised linear layers' weights (made once, +half the linears' bytes)."""

    def __init__(self, model: WanS2VTransformer):
        self.model = model
        self._fp8: WanS2VTransformer | None = None

    def __call__(self, variant: str) -> WanS2VTransformer:
        base, options = split_variant(variant)
        if not base.startswith("fp8"):
            return use_variant(self.model, variant)
        if self._fp8 is None:
            with torch.device("meta"):
                twin = WanS2VTransformer(self.model.config)
            twin.load_state_dict(self.model.state_dict(), assign=True)
            self._fp8 = quantize_dit_(twin).eval().requires_grad_(False)
        # "static" starts a new calibration: the variant's first DiT call (the sink prefill) sets the scales.
        calls = CLIP_CALIBRATION_CALLS if "calclip" in options else 1
        return use_variant(
            set_activation_scaling_(self._fp8, ACTIVATION_SCALING[base], calibration_calls=calls), variant
        )

    def release(self) -> None:
        self._fp8 = None


def profile(bench: Bench, name: str, fn) -> None:
    """With --profile: one call of `fn` under torch.profiler; appends a table of the kernels
    that take the most device time to <profile>/profiles.txt."""
    if bench.profile_dir is None:
        return
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if bench.cuda else [])
    fn()
    bench.sync()
    with torch_profile(activities=activities) as prof:
        fn()
        bench.sync()
    sort = "self_cuda_time_total" if bench.cuda else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=25, max_name_column_width=70)
    bench.profile_dir.mkdir(parents=True, exist_ok=True)
    with open(bench.profile_dir / "profiles.txt", "a") as f:
        f.write(f"## {name}\n{table}\n\n")
    print(f"profile {name}: written to {bench.profile_dir / 'profiles.txt'}", flush=True)


# -- token and FLOP counts -----------------------------------------------------------------------
def tokens_per_frame(config: S2VConfig, h: int, w: int) -> int:
    return (h // config.patch_size[1]) * (w // config.patch_size[2])


def sink_tokens(config: S2VConfig, h: int, w: int) -> int:
    """Reference frame + frame-packed motion tokens (buckets 1, 2, 16 at 1x, 2x, 4x patches)."""
    motion = sum(
        (span // scale) * (h // (2 * scale)) * (w // (2 * scale))
        for span, scale in zip(config.framepack_buckets, (1, 2, 4), strict=True)
    )
    return tokens_per_frame(config, h, w) + motion


def dit_flops(config: S2VConfig, q: int, k: int, video: int, frames: int, audio: bool = True) -> float:
    """FLOPs of one DiT call; the formula is in the module docstring."""
    d, f, t = config.dim, config.ffn_dim, config.text_len
    a = config.num_audio_token + 1
    block = 8 * q * d * d + 4 * q * k * d + 4 * q * d * d + 4 * t * d * d + 4 * q * t * d + 4 * q * d * f
    injector = 4 * video * d * d + 4 * frames * a * d * d + 4 * video * a * d + 4 * frames * d * d
    return float(config.num_layers * block + (len(config.audio_inject_layers) * injector if audio else 0))


def stream_cache_gib(bench: Bench, preset: Preset, fp8: bool = False, fp8_heads: bool = False) -> float:
    """Device memory of the streaming caches: per branch, one clip of keys/values per step + the
    sink (with `fp8`: e4m3 values and a float32 scale per token and head; with `fp8_heads` too,
    the rings e4m3 with a scale per head, each behind a slot for the sink)."""
    c = bench.config
    h, w = bench.latent_hw(preset)
    if fp8:
        per_token = c.num_layers * 2 * (c.dim + 4 * c.num_heads)
    else:
        per_token = c.num_layers * c.dim * 2 * torch.finfo(bench.dtype).bits // 8
    frames = preset.infer_frames // 4
    ring, sink = preset.steps * frames * tokens_per_frame(c, h, w), sink_tokens(c, h, w)
    if fp8 and fp8_heads:
        rings = preset.steps * (frames * tokens_per_frame(c, h, w) + sink) * c.num_layers * 2 * c.dim
        return preset.branches * (rings + sink * per_token) / GIB
    return preset.branches * (ring + sink) * per_token / GIB


def check_room(bench: Bench, preset: Preset, extra_gib: float = 0.0) -> str | None:
    """A note when the caches will not fit next to the model (None: go ahead)."""
    if not bench.cuda or bench.force:
        return None
    need = stream_cache_gib(bench, preset) + extra_gib + 3.0  # + activations and allocator slack
    free = bench.free_gib()
    if need > free:
        return (
            f"skipped: the KV caches need ~{need:.0f} GiB next to the model, {free:.0f} GiB free "
            f"(run on a larger GPU, or --force)"
        )
    return None


# -- inputs ---------------------------------------------------------------------------------------
def clip_inputs(bench: Bench, preset: Preset, seed: int = 0) -> dict:
    c = bench.config
    h, w = bench.latent_hw(preset)
    frames = preset.infer_frames // 4
    return {
        "latents": bench.randn(1, c.in_dim, frames, h, w, seed=seed),
        "timestep": torch.tensor([858.0], device=bench.device),  # the 2nd of the 4-step schedule
        "context": bench.randn(TEXT_TOKENS, c.text_dim, seed=seed + 1, scale=0.2),
        "ref": bench.randn(1, c.in_dim, 1, h, w, seed=seed + 2),
        "motion": bench.randn(1, c.in_dim, c.motion_latent_frames, h, w, seed=seed + 3),
        "audio": bench.randn(1, c.num_audio_layers, c.audio_dim, preset.infer_frames, seed=seed + 4),
    }


def run_ours(model: WanS2VTransformer, x: dict) -> torch.Tensor:
    return model(x["latents"], x["timestep"], [x["context"]], x["ref"], x["motion"], x["audio"])


def run_comfy(model, x: dict, dtype: torch.dtype, text_len: int) -> torch.Tensor:
    # As ComfyUI's WAN22_S2V hands them over: everything in the model dtype, the text padded
    # to 512 rows, a zero control video.
    context = torch.zeros(1, text_len, x["context"].shape[1], device=x["context"].device, dtype=dtype)
    context[0, : x["context"].shape[0]] = x["context"].to(dtype)
    latents = x["latents"].to(dtype)
    return model(
        latents,
        x["timestep"],
        context,
        audio_embed=x["audio"].to(dtype),
        reference_latent=x["ref"].to(dtype),
        reference_motion=x["motion"].to(dtype),
        control_video=torch.zeros_like(latents),
    )


def steady_audio(x: dict) -> dict:
    """The inputs with every audio frame equal to the first: ComfyUI aligns the audio a few
    frames differently from the official model (it skips the motion-frame padding), which
    changes nothing for audio that does not change in time."""
    audio = x["audio"]
    return {**x, "audio": audio[..., :1].expand_as(audio).contiguous()}


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.double().cpu(), expected.double().cpu()
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-30)).item()


# -- ComfyUI ---------------------------------------------------------------------------------------
def import_comfy(bench: Bench):
    """ComfyUI's `comfy` package from LIVEAVATAR_COMFYUI (default: the test setup's copy)."""
    path = Path(os.environ.get("LIVEAVATAR_COMFYUI", ROOT / ".venv" / "ComfyUI"))
    if not (path / "comfy").is_dir():
        return None, f"ComfyUI not found at {path} (set LIVEAVATAR_COMFYUI)"
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
    import comfy.cli_args

    if not bench.cuda:
        comfy.cli_args.args.cpu = True  # before comfy.model_management picks a device
    import comfy.ldm.modules.attention
    import comfy.ldm.wan.model
    import comfy.ops

    version = "?"
    if (path / "comfyui_version.py").is_file():
        version = (path / "comfyui_version.py").read_text().split('"')[-2]
    return comfy, f"ComfyUI {version}, attention {comfy.ldm.modules.attention.optimized_attention.__name__}"


def comfy_twin(comfy, ours: WanS2VTransformer):
    """ComfyUI's WanModel_S2V holding our very weight tensors (no second copy); only tensors
    ComfyUI keeps in another dtype (the float32 patch embedding) are converted."""
    c = ours.config
    meta = torch.device("meta")
    theirs = comfy.ldm.wan.model.WanModel_S2V(
        model_type="s2v",
        patch_size=c.patch_size,
        text_len=c.text_len,
        in_dim=c.in_dim,
        dim=c.dim,
        ffn_dim=c.ffn_dim,
        freq_dim=c.freq_dim,
        text_dim=c.text_dim,
        out_dim=c.out_dim,
        num_heads=c.num_heads,
        num_layers=c.num_layers,
        eps=c.eps,
        audio_dim=c.audio_dim,
        num_audio_token=c.num_audio_token,
        cond_dim=c.cond_dim,
        audio_inject_layers=list(c.audio_inject_layers),
        device=meta,
        dtype=ours.dtype,
        operations=comfy.ops.disable_weight_init,
    )
    expected = theirs.state_dict()
    state = ours.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    misshaped = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if missing or unexpected or misshaped:
        raise RuntimeError(
            f"key sets differ: missing {missing[:5]}, unexpected {unexpected[:5]}, mis-shaped {misshaped[:5]}"
        )
    shared = {k: v if v.dtype == expected[k].dtype else v.to(expected[k].dtype) for k, v in state.items()}
    theirs.load_state_dict(shared, strict=True, assign=True)
    leftover = [n for n, t in list(theirs.named_parameters()) + list(theirs.named_buffers()) if t.is_meta]
    if leftover:
        raise RuntimeError(f"ComfyUI tensors left unfilled: {leftover[:5]}")
    return theirs.eval().requires_grad_(False), f"{len(state)} tensors, same names and shapes"


# -- parts ----------------------------------------------------------------------------------------
ATTENTION_BACKENDS = ("sdpa", "cudnn", "flash", "efficient", "fa3", "fa3-fp8", "fp8-emulated")
# The attention part's inputs: unit Gaussian heads, and heads 10^-3..10^3 apart in size (the
# values; queries and keys 10^-1.5..10^1.5, their logits keeping a spread of 1), where e4m3
# without per-head scales loses the small heads to its subnormals and clips the large ones.
ATTENTION_INPUTS = {"gaussian": "", "spread": ", heads apart"}


def attention_inputs(bench: Bench, kind: str, q_len: int, k_len: int) -> tuple[torch.Tensor, ...]:
    c = bench.config
    q, k, v = (bench.randn(1, n, c.num_heads, c.head_dim, seed=s) for n, s in ((q_len, 1), (k_len, 2), (k_len, 3)))
    if kind == "spread":
        size = torch.logspace(-3, 3, c.num_heads, device=bench.device)[None, None, :, None]
        q, k, v = q / size.sqrt(), k * size.sqrt(), v * size
    return tuple(x.to(bench.dtype) for x in (q, k, v))


def host_us_per_call(fn, calls: int = 20) -> float:
    """Host time to issue one call (no synchronisation inside): the launch cost a block step
    pays per attention call when the GPU is not the bottleneck."""
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    host = (time.perf_counter() - start) / calls * 1e6
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return host


def fa3_op_attention(q, k, v) -> torch.Tensor:
    """FlashAttention-3's forward as its registered op (`torch.ops.fa3_fwd.fwd`, the fa3-fwd
    wheel's), skipping the autograd Function and the Python custom op that `flash_attn_func`
    goes through; q/k/v tensors, or `Fp8Heads` (their scales as descales)."""
    descales = [x.scale if isinstance(x, Fp8Heads) else None for x in (q, k, v)]
    q, k, v = (x.data if isinstance(x, Fp8Heads) else x for x in (q, k, v))
    unused = [None] * 17  # k_new ... seqlens_rotary
    # descales, softmax scale, causal, window left/right, attention chunk, softcap,
    # interleaved rotary, scheduler metadata, splits, pack GQA, SM margin
    out = torch.ops.fa3_fwd.fwd(
        q, k, v, *unused, *descales, q.shape[-1] ** -0.5, False, -1, -1, 0, 0.0, True, None, 1, None, 0
    )
    return out[0].flatten(2)


def part_attention(bench: Bench) -> list[dict]:
    """Each attention kernel at the streaming block's shape (Standard: a block's queries against
    the full ring and the sink), timed, and its error against float32 SDPA (math kernel); the
    fp8 ones also against their emulation (the same e4m3 inputs in float32: the kernel's own
    rounding), with e4m3 keys/values handed in as the fp8 caches do, and with unit descales."""
    c = bench.config
    p = PRESETS["standard"]
    h, w = bench.latent_hw(p)
    tpf = tokens_per_frame(c, h, w)
    q_len = BLOCK_FRAMES * tpf
    k_len = p.infer_frames // 4 * tpf + sink_tokens(c, h, w)
    flops = 4 * q_len * k_len * c.num_heads * c.head_dim
    dispatch = attention_dispatch
    rows = []
    for kind, label in ATTENTION_INPUTS.items():
        q, k, v = attention_inputs(bench, kind, q_len, k_len)
        with use_kernels(Kernels(attention="math")):
            reference = dispatch.attention(q.float(), k.float(), v.float())
        q8, k8, v8 = (quantize_per_head(x) for x in (q, k, v))
        emulated = emulated_attention(q8, k8, v8).flatten(2)
        unit = [
            Fp8Heads(x.float().clamp(-448, 448).to(FP8), torch.ones_like(s.scale))
            for x, s in ((q, q8), (k, k8), (v, v8))
        ]
        cases = [(backend, backend, dispatch.attention, (q, k, v)) for backend in ATTENTION_BACKENDS]
        # What the e4m3 caches cost the fp8 kernel: their keys and values come quantised.
        cases.append(("fa3-fp8 (e4m3 k/v in)", "fa3-fp8", dispatch.attention, (q, k8, v8)))
        # The host cost of FlashAttention-3's Python wrappers: its registered op called directly.
        cases.append(("fa3 (op, no Python wrappers)", "sdpa", fa3_op_attention, (q, k, v)))
        cases.append(("fa3-fp8 (op, no Python wrappers, e4m3 k/v in)", "sdpa", fa3_op_attention, (q8, k8, v8)))
        for name, backend, fn, args in cases:
            row = {
                "part": "attention",
                "preset": "standard",
                "variant": name + label,
                "q tokens": q_len,
                "k tokens": k_len,
            }
            try:
                with use_kernels(Kernels(attention=backend)):
                    call = partial(fn, *args)
                    out = call()
                    ms = statistics.median(bench.measure(call, iters=20))
                    host_us = host_us_per_call(call)
            except Exception as error:  # a kernel that cannot run here is a row's note, not the run's end
                rows.append({**row, "note": f"not run: {str(error).splitlines()[0][:120]}"})
                print(f"attention [{name}{label}]: not run ({str(error).splitlines()[0][:120]})", flush=True)
                continue
            row.update(
                {
                    "ms": ms,
                    "TFLOP/s": flops / ms / 1e9,
                    "host us/call": host_us,
                    "rel error vs float32": relative_error(out, reference),
                }
            )
            if backend == "fa3-fp8" or name.startswith("fa3-fp8"):
                row["rel diff vs its emulation"] = relative_error(out, emulated)
                if name == backend and bench.cuda and dispatch._fa3_runs_on(q):
                    unit_out = kernel_attention(dispatch._fa3(), *unit).flatten(2)
                    row["rel error vs float32, unit descales"] = relative_error(unit_out, reference)
            rows.append(row)
            print(
                f"attention [{name}{label}]: {ms:.2f} ms, {row['TFLOP/s']:.0f} TFLOP/s, host {host_us:.0f} us/call, "
                f"rel error {row['rel error vs float32']:.2e}"
                + "".join(
                    f", {key} {row[key]:.2e}"
                    for key in ("rel diff vs its emulation", "rel error vs float32, unit descales")
                    if key in row
                ),
                flush=True,
            )
        del q, k, v, q8, k8, v8, unit, reference, emulated
        bench.release()
    return rows


def part_dit(bench: Bench, presets: list[str]) -> list[dict]:
    c = bench.config
    model = build_dit(bench)
    variant_models = VariantModels(model)
    rows, outputs = {}, {}
    with torch.inference_mode():
        # All of ours first: importing ComfyUI changes global backend settings.
        for name in presets:
            p = PRESETS[name]
            x = clip_inputs(bench, p)
            h, w = bench.latent_hw(p)
            frames = p.infer_frames // 4
            video = frames * tokens_per_frame(c, h, w)
            total = video + sink_tokens(c, h, w)
            flops = dit_flops(c, total, total, video, frames)
            for variant in bench.variants:
                ours = variant_models(variant)
                bench.reset_peak()
                times = bench.measure(partial(run_ours, ours, x))
                ours_ms = statistics.median(times)
                outputs[name, variant] = run_ours(ours, x).cpu(), run_ours(ours, steady_audio(x)).cpu()
                rows[name, variant] = {
                    "variant": variant,
                    "tokens (video+sink)": f"{video}+{total - video}",
                    "TFLOP/forward": flops / 1e12,
                    "ours ms/forward": ours_ms,
                    "ours TFLOP/s": flops / ours_ms / 1e9,
                    "ours ms/step": ours_ms * p.branches,
                    "ours peak GiB": bench.peak_gib(),
                }
                print(
                    f"dit {name} [{variant}]: ours {ours_ms:.1f} ms/forward "
                    f"({rows[name, variant]['ours TFLOP/s']:.0f} TFLOP/s)",
                    flush=True,
                )
                profile(bench, f"dit-{name}-{variant}", partial(run_ours, ours, x))
        variant_models.release()
        bench.release()
        use_variant(model, "compiled")
    comfy, info = import_comfy(bench)
    if comfy is None:
        print(f"dit: {info}; ComfyUI columns left empty", flush=True)
    else:
        theirs, keys = comfy_twin(comfy, model)
        print(f"dit: {info}; {keys}", flush=True)
        with torch.inference_mode():
            for name in presets:
                p = PRESETS[name]
                x = clip_inputs(bench, p)
                bench.reset_peak()
                times = bench.measure(partial(run_comfy, theirs, x, bench.dtype, c.text_len))
                theirs_ms = statistics.median(times)
                peak = bench.peak_gib()
                out = run_comfy(theirs, x, bench.dtype, c.text_len)
                out_steady = run_comfy(theirs, steady_audio(x), bench.dtype, c.text_len)
                for variant in bench.variants:
                    row = rows[name, variant]
                    row.update(
                        {
                            "ComfyUI ms/forward": theirs_ms,
                            "ComfyUI TFLOP/s": row["TFLOP/forward"] * 1e12 / theirs_ms / 1e9,
                            "ComfyUI peak GiB": peak,
                            "speed-up (ComfyUI ms / ours ms)": theirs_ms / row["ours ms/forward"],
                            "rel diff vs ComfyUI": relative_error(outputs[name, variant][0], out),
                            "rel diff, audio constant in time": relative_error(outputs[name, variant][1], out_steady),
                            "ComfyUI setup": info,
                        }
                    )
                    print(
                        f"dit {name} [{variant}]: ComfyUI {theirs_ms:.1f} ms/forward, speed-up "
                        f"{row['speed-up (ComfyUI ms / ours ms)']:.2f}x, rel diff {row['rel diff vs ComfyUI']:.3g}",
                        flush=True,
                    )
                profile(bench, f"dit-{name}-comfyui", partial(run_comfy, theirs, x, bench.dtype, c.text_len))
                del out, out_steady
            del theirs
    del model
    bench.release()
    return [{"part": "dit", "preset": name, **row} for (name, _), row in rows.items()]


class TimedDenoise:
    """Wraps `CausalDiT.denoise_block` to record each call's device time, keys and FLOPs."""

    def __init__(self, bench: Bench, dit: CausalDiT):
        self.bench, self.inner, self.calls = bench, dit.denoise_block, []
        self.clip = 0
        dit.denoise_block = self

    def __call__(self, latents, timestep, first_frame, context, audio, cache, sink, sink_distance, cond=None):
        c = self.bench.config
        start = self.bench.mark()
        out = self.inner(latents, timestep, first_frame, context, audio, cache, sink, sink_distance, cond)
        end = self.bench.mark()
        frames = latents.shape[2]
        video = frames * cache.tokens_per_frame
        keys = min(cache.frames, first_frame + frames) * cache.tokens_per_frame + sink.raw_keys[0].shape[1]
        self.calls.append(
            {
                "clip": self.clip,
                "frames": frames,
                "keys": keys,
                "marks": (start, end),
                "flops": dit_flops(c, video, keys, video, frames),
            }
        )
        return out

    def resolve(self) -> None:
        self.bench.sync()
        for call in self.calls:
            if "ms" not in call:
                call["ms"] = self.bench.ms(*call.pop("marks"))


def part_stream(bench: Bench, presets: list[str]) -> list[dict]:
    c = bench.config
    variant_models = VariantModels(build_dit(bench))
    rows, first_clips, last_clips = [], {}, {}
    for name, variant in [(n, v) for n in presets for v in bench.variants]:
        model = variant_models(variant)
        base, options = split_variant(variant)
        p = PRESETS[name]
        row = {
            "part": "stream",
            "preset": name,
            "variant": variant,
            "KV caches GiB": stream_cache_gib(
                bench, p, fp8="kvfp8" in options, fp8_heads=bool(options & {"fa3fp8", "fp8emu"})
            ),
        }
        note = check_room(bench, p)
        if note:
            rows.append({**row, "note": note})
            print(f"stream {name}: {note}", flush=True)
            continue
        h, w = bench.latent_hw(p)
        settings = SamplerSettings(sample_steps=p.steps, infer_frames=p.infer_frames, guide_scale=p.guide_scale)
        x = clip_inputs(bench, p)
        negative = bench.randn(TEXT_TOKENS, c.text_dim, seed=9, scale=0.2)
        bench.reset_peak()
        with torch.inference_mode():
            dit = CausalDiT(model)
            sampler = CausalSampler(dit, settings, bench.device)
            start = bench.mark()
            sampler.start(x["ref"], x["motion"], x["context"], negative)
            end = bench.mark()
            bench.sync()
            prefill_ms = bench.ms(start, end)
            timer = TimedDenoise(bench, dit)
            clip_s = []
            for clip in range(bench.clips):
                timer.clip = clip
                audio = bench.randn(1, c.num_audio_layers, c.audio_dim, p.infer_frames, seed=100 + clip)
                t0 = time.perf_counter()
                first, blocks = None, []
                for _, latents in sampler.generate_clip(clip, audio):
                    first = latents[:, :, :1] if first is None else first
                    blocks.append(latents)
                bench.sync()
                if clip == 0:
                    first_clips[name, variant] = torch.cat(blocks, dim=2).cpu()
                last_clips[name, variant] = torch.cat(blocks, dim=2).cpu()
                clip_s.append(time.perf_counter() - t0)
                if clip == 0 and bench.clips > 1:
                    sampler.replace_sink(first, x["motion"])  # the pipeline's sink roll
            timer.resolve()
        steady = [k for k in timer.calls if k["clip"] >= 1] or timer.calls
        full = [k for k in steady if k["frames"] == BLOCK_FRAMES] or steady
        last = [k for k in timer.calls if k["clip"] == bench.clips - 1 and k["frames"] == BLOCK_FRAMES] or full
        call_ms = statistics.median(k["ms"] for k in full)
        steady_clip_s = statistics.median(clip_s[1:] or clip_s)
        row.update(
            {
                "tokens/block": BLOCK_FRAMES * tokens_per_frame(c, h, w),
                "keys/block (steady)": max(k["keys"] for k in full),
                "ms/call (steady)": call_ms,
                "ms/call (last clip)": statistics.median(k["ms"] for k in last),
                "ms/block-step": call_ms * p.branches,
                "TFLOP/s (steady)": sum(k["flops"] for k in steady) / sum(k["ms"] for k in steady) / 1e9,
                "sink prefill ms": prefill_ms,
                "clip 0 DiT s": clip_s[0],
                "clip 1 DiT s": clip_s[1] if len(clip_s) > 1 else None,
                "steady clip DiT s": steady_clip_s,
                "last clip DiT s": clip_s[-1],
                "DiT-only fps": p.infer_frames / steady_clip_s,
                "DiT-only fps (last clip)": p.infer_frames / clip_s[-1],
                "CUDA graphs": dit.graphs.count() if "graphs" in options else None,
                "device peak GiB": bench.peak_gib(),
            }
        )
        if dit.graphs.failed:
            row["note"] = f"graph capture failed: {dit.graphs.failed[:200]}"
        bf16 = first_clips.get((name, "compiled"), first_clips.get((name, "eager")))
        bf16_last = last_clips.get((name, "compiled"), last_clips.get((name, "eager")))
        changes_numbers = base.startswith("fp8") or options & {"kvfp8", "fa3fp8", "fp8emu"}
        if changes_numbers and bf16 is not None:
            # The quality proxy: same seed and weights, latents after one clip (and after the last).
            row["clip 0 latents rel diff vs bf16"] = relative_error(first_clips[name, variant], bf16)
            row["last clip latents rel diff vs bf16"] = relative_error(last_clips[name, variant], bf16_last)
        elif changes_numbers:
            print(f"stream {name} [{variant}]: no bf16 variant in this run to compare the latents with", flush=True)
        # One change at a time against the same run's variant without it: static vs dynamic
        # fp8 input scales, e4m3 vs bf16 caches.
        for label, twin in (
            ("fp8-tensor", variant.replace("fp8-static", "fp8-tensor", 1)),
            ("no kvfp8", "+".join([base, *[o for o in variant.split("+")[1:] if o != "kvfp8"]])),
            ("no fa3fp8", "+".join([base, *[o for o in variant.split("+")[1:] if o != "fa3fp8"]])),
            ("fa3 for fa3fp8", variant.replace("+fa3fp8", "+fa3")),
        ):
            if twin != variant and (name, twin) in last_clips:
                row[f"rel diff vs {label}, clip 0"] = relative_error(
                    first_clips[name, variant], first_clips[name, twin]
                )
                row[f"rel diff vs {label}, last clip"] = relative_error(
                    last_clips[name, variant], last_clips[name, twin]
                )
        if options and (name, base) in last_clips:
            # Each option's own error: the same run without the options, clip 0 and the last clip.
            row["rel diff vs no options, clip 0"] = relative_error(first_clips[name, variant], first_clips[name, base])
            row["rel diff vs no options, last clip"] = relative_error(last_clips[name, variant], last_clips[name, base])
        rows.append(row)
        print(
            f"stream {name} [{variant}]: {call_ms:.1f} ms/call, last clip {row['ms/call (last clip)']:.1f} ms/call, "
            f"steady clip {steady_clip_s:.2f} s ({row['DiT-only fps']:.1f} fps DiT only), "
            f"clips {', '.join(f'{t:.2f}' for t in clip_s)} s",
            flush=True,
        )
        with torch.inference_mode():
            dit.denoise_block = timer.inner
            profile(
                bench,
                f"stream-{name}-{variant}",
                lambda sampler=sampler, audio=audio: next(iter(sampler.generate_clip(bench.clips, audio))),
            )
        del sampler, dit, timer
        bench.release()
    del model, variant_models
    bench.release()
    return rows


def part_vae(bench: Bench, presets: list[str]) -> list[dict]:
    rows = []
    decoded = {}
    for variant in bench.args.vae_variants.split(","):
        options = vae_options(variant)
        vae = build_vae(bench, dtype=torch.float32 if "fp32" in options else None)
        vae.kernels = vae_kernels(options)
        with torch.inference_mode():
            for name in presets:
                rows.append(vae_row(bench, vae, name, variant, decoded))
        del vae
        bench.release()
    return rows


def vae_row(bench: Bench, vae: WanVAE, name: str, variant: str, decoded: dict) -> dict:
    p = PRESETS[name]
    h, w = bench.latent_hw(p)
    width, height = bench.size(p)
    frames = p.infer_frames // 4
    bench.reset_peak()
    clip_ms, last = [], None
    with vae.streaming_decoder() as decoder:
        for clip in range(bench.clips):
            latents = bench.randn(1, 16, frames, h, w, seed=200 + clip)
            start = bench.mark()
            out = [
                decoder.decode_next(latents[:, :, first : first + BLOCK_FRAMES])  # block by block, as the pipeline
                for first in range(0, frames, BLOCK_FRAMES)
            ]
            clip_ms.append((start, bench.mark()))
            last = torch.cat(out, dim=2)
        bench.sync()
        clip_ms = [bench.ms(a, b) for a, b in clip_ms]
    decoded[name, variant] = last.cpu()
    decode_ms = statistics.median(clip_ms[1:] or clip_ms)
    motion = bench.randn(1, 3, MOTION_FRAMES, height, width, seed=3).clamp(-1, 1)
    ref = motion[:, :, :5]
    motion_ms = statistics.median(bench.measure(partial(vae.encode, motion)))
    ref_ms = statistics.median(bench.measure(partial(vae.encode, ref)))
    row = {
        "part": "vae",
        "preset": name,
        "variant": variant,
        "decode clip ms (steady)": decode_ms,
        "decode ms/frame": decode_ms / p.infer_frames,
        "decode clip 0 ms": clip_ms[0],
        f"encode motion ({MOTION_FRAMES} frames) ms": motion_ms,
        "encode reference (5 frames) ms": ref_ms,
    }
    for reference in ("plain", "fp32"):
        expected = decoded.get((name, reference))
        if expected is not None and variant != reference:
            error = (decoded[name, variant] - expected).abs()
            row[f"last clip frames rel diff vs {reference}"] = relative_error(decoded[name, variant], expected)
            # Pixels in [-1, 1]: 0.0078 is one level of 8-bit video.
            row[f"last clip pixels max abs diff vs {reference}"] = error.max().item()
            row[f"last clip pixels mean abs diff vs {reference}"] = error.mean().item()
    if bench.args.vae_windows:
        # official-single-gpu's extra work per clip: the 365-frame window re-encoded, and the
        # clip decoded behind its 92 motion latents.
        window = motion.repeat(1, 1, REFERENCE_COPIES, 1, 1)
        row["single-gpu: encode 365-frame window ms"] = statistics.median(
            bench.measure(partial(vae.encode, window), iters=2)
        )
        prefix = bench.randn(1, 16, latent_frame_count(window.shape[2]), h, w, seed=4)
        row["single-gpu: decode 92-latent prefix ms"] = statistics.median(
            bench.measure(partial(decode_from_scratch, vae, prefix), iters=2)
        )
        del window, prefix
    row["device peak GiB"] = bench.peak_gib()
    print(
        f"vae {name} [{variant}]: decode {decode_ms:.0f} ms/clip (clip 0 {clip_ms[0]:.0f}), "
        f"encode motion {motion_ms:.0f} ms",
        flush=True,
    )
    bench.release()
    return row


def decode_from_scratch(vae, latents):
    with vae.streaming_decoder() as decoder:
        return decoder.decode_next(latents)


def part_e2e(bench: Bench, presets: list[str]) -> list[dict]:
    c = bench.config
    try:
        import av  # noqa: F401

        writer = True
    except ImportError:
        writer = False
        print("e2e: PyAV is not installed; frames are generated and dropped (no writer)", flush=True)
    variant_models = VariantModels(build_dit(bench))
    vae = build_vae(bench)
    clips = bench.args.e2e_clips if bench.args.e2e_clips is not None else bench.clips
    rows = []
    semantics_list = bench.args.semantics.split(",")
    e2e_variants = [v for v in (bench.args.e2e_variants or ",".join(bench.variants)).split(",") if v]
    for name, variant, semantics in [(n, v, s) for n in presets for v in e2e_variants for s in semantics_list]:
        options = split_variant(variant)[1]
        vae.kernels = VAEKernels(
            autotune="vae" in options,
            channels_last="vae" in options,
            autocast="vaeautocast" in options,
            compile="vaecompile" in options,
        )
        pipeline = StreamingPipeline(variant_models(variant), vae, bench.device)
        p = PRESETS[name]
        row = {
            "part": "e2e",
            "preset": name,
            "variant": variant,
            "semantics": semantics,
            "clips": clips,
            "writer": writer,
        }
        note = check_room(bench, p, extra_gib=2.0)
        if note:
            rows.append({**row, "note": note})
            print(f"e2e {name}: {note}", flush=True)
            continue
        settings = SamplerSettings(sample_steps=p.steps, infer_frames=p.infer_frames, guide_scale=p.guide_scale)
        frames = clips * p.infer_frames
        features = torch.randn(1, c.num_audio_layers, c.audio_dim, frames, generator=torch.Generator().manual_seed(5))
        context = torch.randn(TEXT_TOKENS, c.text_dim, generator=torch.Generator().manual_seed(6)) * 0.2
        negative = torch.randn(TEXT_TOKENS, c.text_dim, generator=torch.Generator().manual_seed(7)) * 0.2
        image = torch.rand(512, 512, 3, generator=torch.Generator().manual_seed(8))
        stamps = []  # (seconds since start, frames, clip)
        with torch.inference_mode():  # one untimed clip: compiles, and lets cuDNN pick its kernels
            for _ in pipeline.stream(RunSpec.make(image, features, context, bench.size(p), settings, num_clip=1)):
                pass
        bench.reset_peak()
        with torch.inference_mode(), tempfile.TemporaryDirectory() as folder:
            t0 = time.perf_counter()
            clip_peaks = {}
            spec = RunSpec.make(
                image,
                features,
                context,
                bench.size(p),
                settings,
                num_clip=clips,
                negative_context=negative,
                semantics=semantics,
            )
            chunks = stamped(pipeline.stream(spec), t0, stamps, clip_peaks)
            if writer:
                waveform = torch.zeros(1, SAMPLE_RATE * frames // FPS)
                path = Path(folder) / "e2e.mp4"
                write_video(chunks, path, waveform, SAMPLE_RATE, bench.size(p))
                file_mb = path.stat().st_size / 1e6
            else:
                for _ in chunks:
                    pass
                file_mb = None
            total = time.perf_counter() - t0
        made = sum(s[1] for s in stamps)
        clip0_end = max(s[0] for s in stamps if s[2] == 0)
        later = sum(s[1] for s in stamps if s[2] > 0)
        clip1_end = max((s[0] for s in stamps if s[2] == 1), default=None)
        after_1 = sum(s[1] for s in stamps if s[2] > 1)
        row.update(
            {
                "frames": made,
                "first-frame latency s": stamps[0][0],
                "total s": total,
                "fps": made / total,
                "fps after clip 0": later / (total - clip0_end) if later else None,
                "fps after clip 1": after_1 / (total - clip1_end) if after_1 else None,
                "device peak GiB": bench.peak_gib(),
                # Memory must not grow with the clip count: the peak after clip 2 and after the last.
                "device peak GiB at clip 2": clip_peaks.get(2),
                "device peak GiB at last clip": clip_peaks.get(clips),
                "host peak RSS GiB": peak_rss_gib(),
                "mp4 MB": file_mb,
            }
        )
        rows.append(row)
        print(
            f"e2e {name} [{variant}, {semantics}]: {made} frames in {total:.1f} s = {row['fps']:.1f} fps, first frame after "
            f"{stamps[0][0]:.2f} s",
            flush=True,
        )
        del pipeline
        bench.release()
    del variant_models, vae
    bench.release()
    return rows


def stamped(chunks, t0: float, stamps: list, clip_peaks: dict | None = None):
    """Passes chunks on, noting (seconds since t0, frames, clip) of each as it arrives, and
    the device peak so far at the end of each clip into `clip_peaks` (clip number from 1)."""
    for chunk in chunks:
        stamps.append((time.perf_counter() - t0, chunk.frames.shape[0], chunk.clip))
        if clip_peaks is not None and chunk.ends_clip and torch.cuda.is_available():
            clip_peaks[chunk.clip + 1] = torch.cuda.max_memory_allocated() / GIB
        yield chunk


def drop_page_cache() -> bool:
    """Empties the OS page cache so the next read comes from disk (needs root; False if refused)."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1\n")
        return True
    except OSError:
        return False


def part_load(bench: Bench) -> list[dict]:
    folder = Path(bench.args.load_dir or tempfile.gettempdir())
    params = sum(p.numel() for p in build_meta(bench).parameters())
    size_gib = params * torch.finfo(bench.dtype).bits / 8 / GIB
    free = shutil.disk_usage(folder).free / GIB
    row = {"part": "load", "preset": "-", "file GiB": size_gib}
    if free < size_gib + 2:
        note = f"skipped: {free:.0f} GiB free in {folder}, the file needs {size_gib:.0f} GiB (use --load-dir)"
        print(f"load: {note}", flush=True)
        return [{**row, "note": note}]
    path = folder / "liveavatar-gpu-speed-dit.safetensors"
    try:
        model = build_dit(bench)
        t0 = time.perf_counter()
        save_dit(model, path)
        row["write s"] = time.perf_counter() - t0
        print(f"load: wrote {size_gib:.1f} GiB in {row['write s']:.0f} s", flush=True)
        del model
        bench.release()
        for label in ("cold", "warm"):
            cold = drop_page_cache() if label == "cold" else False
            if label == "cold" and not cold:
                label = "cache kept"  # no root: the file may still be in the page cache
            result = load_in_subprocess(path, bench)
            row.update(
                {
                    f"{label}: load s": result["seconds"],
                    f"{label}: peak RSS GiB": result["rss_peak_gib"],
                    f"{label}: RSS before GiB": result["rss_before_gib"],
                    f"{label}: device peak GiB": result["device_peak_gib"],
                }
            )
            print(
                f"load ({label}): {result['seconds']:.1f} s, peak RSS {result['rss_peak_gib']:.1f} GiB "
                f"(before load {result['rss_before_gib']:.1f})",
                flush=True,
            )
    finally:
        if not bench.args.keep_file:
            path.unlink(missing_ok=True)
    return [row]


def build_meta(bench: Bench) -> WanS2VTransformer:
    with torch.device("meta"):
        return WanS2VTransformer(bench.config)


def load_in_subprocess(path: Path, bench: Bench) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--load-child", str(path), "--device", str(bench.device)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"loading in a subprocess failed:\n{done.stdout}\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def load_child(path: str, device: str) -> None:
    """Runs in a fresh process: only the loader's own memory shows in its RSS."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    if cuda:
        torch.empty(1, device=device)  # CUDA context before the clock starts
        torch.cuda.synchronize(device)
    before = peak_rss_gib()
    t0 = time.perf_counter()
    model = load_dit(path, device=device, dtype=torch.bfloat16 if cuda else torch.float32)
    if cuda:
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    print(
        json.dumps(
            {
                "seconds": seconds,
                "rss_peak_gib": peak_rss_gib(),
                "rss_before_gib": before,
                "device_peak_gib": torch.cuda.max_memory_allocated(device) / GIB if cuda else None,
                "tensors": len(model.state_dict()),
            }
        )
    )


# -- results ---------------------------------------------------------------------------------------
def fmt(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        size = abs(value)
        if size >= 100:
            return f"{value:.0f}"
        if size >= 10:
            return f"{value:.1f}"
        if size >= 1:
            return f"{value:.2f}"
        return f"{value:.3g}"
    return str(value)


def tables(runs: dict) -> str:
    """One markdown table per part, a row per preset, from the stored runs."""
    lines = []
    others = [part for part in dict.fromkeys(key.split("/")[0] for key in runs) if part not in PARTS]
    for part in [*PARTS, *others]:
        keyed = [(key, run) for key, run in runs.items() if key.split("/")[0] == part]
        if not keyed:
            continue
        columns = []
        for _, run in keyed:
            columns += [k for k in run["values"] if k not in columns]
        lines += [
            f"### {part}",
            "",
            "| preset | " + " | ".join(columns) + " | device | torch | run at |",
            "|" + "---|" * (len(columns) + 4),
        ]
        for key, run in sorted(keyed, key=lambda kv: _preset_order(kv[0])):
            cells = [fmt(run["values"].get(col)) for col in columns]
            lines.append(
                f"| {key.split('/', 1)[1]} | "
                + " | ".join(cells)
                + f" | {run['device']} | {run['torch']} | {run['time']} |"
            )
        lines.append("")
    return "\n".join(lines)


def _preset_order(key: str) -> tuple[int, str]:
    preset = key.split("/", 1)[1].split(" (")[0]
    return (list(PRESETS).index(preset) if preset in PRESETS else len(PRESETS)), key


def environment(bench: Bench | None) -> dict:
    if bench is not None and bench.cuda:
        device = torch.cuda.get_device_name(bench.device)
    else:
        device = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    return {"device": device, "torch": torch.__version__, "time": dt.datetime.now().strftime("%Y-%m-%d %H:%M")}


GPU_SPEED_NOTES = (
    "Random weights of the real 14B architecture (bf16); speed-up = ComfyUI's time / ours. "
    "`tests/benchmarks/gpu_speed.py` explains the FLOP count."
)


def store(
    out: Path, name: str, runs: dict, title: str | None = None, notes: str = GPU_SPEED_NOTES
) -> tuple[Path, Path]:
    """Merges `runs` into <out>/<name>.json (a later run of a part/preset replaces the earlier)
    and rewrites <out>/<name>.md from everything stored."""
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / f"{name}.json", out / f"{name}.md"
    stored = json.loads(json_path.read_text()) if json_path.exists() else {"runs": {}}
    stored["runs"].update(runs)
    json_path.write_text(json.dumps(stored, indent=1) + "\n")
    title = title or f"LiveAvatar GPU speed, {name.removeprefix('gpu_speed-')}"
    md_path.write_text(f"# {title}\n\n{notes}\n\n{tables(stored['runs'])}")
    return json_path, md_path


def rows_to_runs(rows: list[dict], env: dict, tiny: bool) -> dict:
    runs = {}
    for row in rows:
        values = {k: v for k, v in row.items() if k not in ("part", "preset", "variant")}
        variant = f" ({row['variant']})" if row.get("variant") else ""
        semantics = f" [{row['semantics']}]" if row.get("semantics") else ""
        runs[f"{row['part']}/{row['preset']}{variant}{semantics}"] = {**env, "tiny": tiny, "values": values}
    return runs


def drop_fa3(variants: str | None) -> str | None:
    """The variants less those that need FlashAttention-3, saying why they go (it does not import)."""
    if variants is None:
        return None
    kept = [v for v in variants.split(",") if not split_variant(v)[1] & set(FA3_OPTIONS)]
    dropped = sorted(set(variants.split(",")) - set(kept) - {""})
    if dropped:
        reasons = []
        for module in attention_dispatch.FA3_MODULES:
            try:
                __import__(module)
            except Exception as error:  # noqa: BLE001 - shown, not handled
                reasons.append(f"{module}: {type(error).__name__}: {str(error).splitlines()[0][:160]}")
        print(f"FlashAttention-3 does not import ({'; '.join(reasons)}): not running {', '.join(dropped)}", flush=True)
    return ",".join(kept)


# -- main ------------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="dit,stream,vae,e2e", help=f"comma list of {', '.join(PARTS)}")
    parser.add_argument("--presets", default=",".join(PRESETS), help=f"comma list of {', '.join(PRESETS)}")
    parser.add_argument("--tiny", action="store_true", help="small model and frames: a smoke test on any device")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--out",
        default=str(ROOT / "tests" / "benchmarks" / "results"),
        help="folder of the results files ('' = print only)",
    )
    parser.add_argument("--iters", type=int, help="timed repetitions (default 5; tiny 1)")
    parser.add_argument("--warmup", type=int, help="untimed repetitions first (default 2; tiny 1)")
    parser.add_argument("--clips", type=int, help="clips of the stream and vae parts (default 3; tiny 2)")
    parser.add_argument("--e2e-clips", type=int, help="clips of the e2e part (default: --clips)")
    parser.add_argument(
        "--semantics",
        default="official-multi-gpu",
        help="comma list of the e2e part's semantics (official-multi-gpu, official-single-gpu)",
    )
    parser.add_argument("--load-dir", help="folder for the load part's file (default: the temp folder)")
    parser.add_argument("--keep-file", action="store_true", help="keep the load part's file")
    parser.add_argument("--force", action="store_true", help="run presets whose caches look too big for the GPU")
    parser.add_argument(
        "--variants",
        default="compiled",
        help=f"comma list of {', '.join(VARIANTS)}: how our DiT runs in the dit and stream parts",
    )
    parser.add_argument("--e2e-variants", help="comma list of the e2e part's variants (default: --variants)")
    parser.add_argument(
        "--vae-variants",
        default="plain",
        help=f"comma list of plain or of {', '.join(VAE_OPTIONS)} joined by '+' (e.g. autotune+channels-last+compile)",
    )
    parser.add_argument(
        "--vae-windows",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time the single-GPU semantics' window encode and prefix decode",
    )
    parser.add_argument("--profile", metavar="DIR", help="also profile one call per preset and variant into DIR")
    parser.add_argument("--merge", nargs="+", metavar="JSON", help="only fold these result files into --out")
    parser.add_argument("--load-child", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.load_child:
        load_child(args.load_child, args.device)
        return
    if args.merge:
        for source in args.merge:
            source = Path(source)
            paths = store(Path(args.out), source.stem, json.loads(source.read_text())["runs"])
            print(f"merged {source} into {paths[0]}")
        return

    parts = [p for p in args.parts.split(",") if p]
    presets = [p for p in args.presets.split(",") if p]
    unknown = [p for p in parts if p not in PARTS] + [p for p in presets if p not in PRESETS]
    for variant in (v for v in f"{args.variants},{args.e2e_variants or ''}".split(",") if v):
        base, options = split_variant(variant)
        unknown += [base] if base not in VARIANTS else []
        unknown += sorted(options - set(OPTIONS))
    unknown += [v for v in args.vae_variants.split(",") if not vae_options(v) <= set(VAE_OPTIONS)]
    if unknown:
        parser.error(f"unknown part or preset: {', '.join(unknown)}")
    if attention_dispatch._fa3() is None:
        args.variants, args.e2e_variants = (drop_fa3(v) for v in (args.variants, args.e2e_variants))
    bench = Bench(args)
    torch.set_grad_enabled(False)
    # Each compiled VAE variant adds its own graphs (3 per frame size, per autocast and layout)
    # to the same decoder code: past Dynamo's default limit of 8 it would silently run eager.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    env = environment(bench)
    print(
        f"{env['device']}, torch {env['torch']}, {'tiny' if bench.tiny else '14B'} DiT, {bench.dtype}, "
        f"{bench.warmup} warm-up + {bench.iters} timed runs",
        flush=True,
    )

    rows = []
    name = f"gpu_speed-{dt.date.today().isoformat()}" + ("-tiny" if bench.tiny else "")
    for part in parts:
        start = time.perf_counter()
        if part == "attention":
            rows += part_attention(bench)
        elif part == "dit":
            rows += part_dit(bench, presets)
        elif part == "stream":
            rows += part_stream(bench, presets)
        elif part == "vae":
            rows += part_vae(bench, presets)
        elif part == "e2e":
            rows += part_e2e(bench, presets)
        elif part == "load":
            rows += part_load(bench)
        print(f"[{part} took {time.perf_counter() - start:.0f} s]", flush=True)
        if args.out:  # after every part: a run cut short still leaves what it measured
            store(Path(args.out), name, rows_to_runs(rows, env, bench.tiny))

    runs = rows_to_runs(rows, env, bench.tiny)
    print("\n" + tables(runs))
    if args.out:
        json_path, md_path = store(Path(args.out), name, runs)
        print(f"results: {json_path} and {md_path.name}")


if __name__ == "__main__":
    main()
