"""Memory of a long streaming run: peak host RSS (and device memory) as clips accumulate.

Runs the Long preset's shape (688*368, 48 frames/clip, 4 steps, online decode) on a small
random model of the real architecture, and prints a table of peak RSS at chosen clips.
Growth from clip 10 to the last clip should stay under 5%.

    python tests/benchmarks/streaming_memory.py --clips 1000 [--device cuda] [--mp4 out.mp4]
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from diffusers import AutoencoderKLWan  # noqa: E402

from liveavatar_core.dit import S2VConfig, WanS2VTransformer  # noqa: E402
from liveavatar_core.pipeline import StreamingPipeline, write_video  # noqa: E402
from liveavatar_core.run_spec import RunSpec  # noqa: E402
from liveavatar_core.streaming import SamplerSettings  # noqa: E402
from liveavatar_core.time_grid import FPS  # noqa: E402
from liveavatar_core.vae import WanVAE  # noqa: E402

SMALL_DIT = S2VConfig(
    dim=256, ffn_dim=512, num_heads=2, num_layers=4, text_dim=64, audio_dim=32, audio_inject_layers=(0, 2), freq_dim=256
)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=1000)
    parser.add_argument("--size", default="688*368")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--mp4", help="also stream the video into this file")
    parser.add_argument(
        "--dtype",
        choices=("bf16", "fp32"),
        help="weights of both networks (default: bf16 on GPUs, as the pack loads them; fp32 on CPUs)",
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    torch.manual_seed(0)
    dit = WanS2VTransformer(SMALL_DIT).to(device, dtype).eval().requires_grad_(False)
    vae = WanVAE(AutoencoderKLWan(base_dim=16).to(device, dtype).eval().requires_grad_(False))
    pipeline = StreamingPipeline(dit, vae, device)
    frames = args.clips * 48
    features = torch.randn(1, 25, SMALL_DIT.audio_dim, frames)  # stays on the host, sliced per clip
    context = torch.randn(7, SMALL_DIT.text_dim)
    image = torch.rand(512, 512, 3)
    marks = sorted({m for m in (2, 10, 20, 100, 200, 300, 400, 500, 1000, args.clips) if m <= args.clips})
    rows, start = [], time.perf_counter()

    def on_chunk(chunks):
        for chunk in chunks:
            if chunk.ends_clip:
                done = chunk.clip + 1
                if done in marks:
                    gpu = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else float("nan")
                    rows.append((done, peak_rss_mib(), gpu, time.perf_counter() - start))
                    print(
                        f"clip {done}: peak RSS {rows[-1][1]:.0f} MiB, device peak {gpu:.0f} MiB, {rows[-1][3]:.0f} s",
                        flush=True,
                    )
            yield chunk

    spec = RunSpec.make(
        image, features, context, args.size, SamplerSettings(sample_steps=args.steps), num_clip=args.clips
    )
    chunks = on_chunk(pipeline.stream(spec))
    if args.mp4:
        audio = torch.zeros(1, 16000 * frames // FPS)
        write_video(chunks, args.mp4, audio, 16000, args.size)
    else:
        for _ in chunks:
            pass
    base = rows[[r[0] for r in rows].index(10)] if any(r[0] == 10 for r in rows) else rows[0]
    print(f"\n| clips | peak RSS MiB | vs clip {base[0]} | device peak MiB | seconds |")
    print("|---|---|---|---|---|")
    for clip, rss, gpu, seconds in rows:
        print(f"| {clip} | {rss:.0f} | {rss / base[1]:.3f}x | {gpu:.0f} | {seconds:.0f} |")


if __name__ == "__main__":
    main()
