"""The low-VRAM mode against full speed, on the real 14B architecture (random weights).

One process, one preset (default Standard, 688*368, 4 steps), the same fp8 DiT and VAE
throughout, end to end into an mp4 (`StreamingPipeline.stream` + `write_video`):

1. full speed, decode in line:  KV caches on the GPU, each block decoded before the next;
2. full speed, decode beside:   KV caches on the GPU, decode on its own thread and stream;
3. low VRAM:                     KV caches in pinned host memory (`kv_cache="host"`), device
                                 memory capped with `torch.cuda.set_per_process_memory_fraction`
                                 (default 22 GiB), after the DiT went to the CPU and back as
                                 `offload_model` moves it for each video;
   (`--host-uncapped` adds the host caches without the cap, decode in line: this tells what
   the caches change from what the cap changes);
4. text encoder under the cap:  umT5-XXL at its real size encodes one 512-token prompt alone on
                                 the GPU (with offload it never shares the GPU with the DiT).

Each row gives fps, first-frame latency and device peaks; rows 2 and 3 give their speed as a
ratio of row 1 and say whether their frames equal row 1's (they must: only where the caches
live and when the decode runs differ).

    bash tests/benchmarks/run_on_gpu.sh tests/benchmarks/low_vram.py --clips 3
    python tests/benchmarks/low_vram.py --tiny      # small model, any device: a smoke test
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import os
import sys
import tempfile
import time
from pathlib import Path

# Segments that grow in place: near a memory cap, fragmentation would otherwise decide.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_speed import (  # noqa: E402
    FPS,
    GIB,
    PRESETS,
    SAMPLE_RATE,
    TEXT_TOKENS,
    Bench,
    VariantModels,
    build_dit,
    build_vae,
    environment,
    peak_rss_gib,
    rows_to_runs,
    stamped,
    store,
    tables,
)

from liveavatar_core.pipeline import StreamingPipeline, write_video  # noqa: E402
from liveavatar_core.run_spec import RunSpec  # noqa: E402
from liveavatar_core.streaming import SamplerSettings  # noqa: E402


def fp8_dit(bench: Bench):
    """The fp8 DiT alone: the bf16 copy it was made from is dropped, as loading does."""
    variants = VariantModels(build_dit(bench))
    model = variants("fp8-tensor")
    variants.model = None
    del variants
    gc.collect()
    if bench.cuda:
        torch.cuda.empty_cache()
    return model


class Inputs:
    def __init__(self, bench: Bench, preset, clips: int):
        c = bench.config
        self.frames = clips * preset.infer_frames
        self.features = torch.randn(
            1, c.num_audio_layers, c.audio_dim, self.frames, generator=torch.Generator().manual_seed(5)
        )
        self.context = torch.randn(TEXT_TOKENS, c.text_dim, generator=torch.Generator().manual_seed(6)) * 0.2
        self.image = torch.rand(512, 512, 3, generator=torch.Generator().manual_seed(8))
        self.settings = SamplerSettings(
            sample_steps=preset.steps, infer_frames=preset.infer_frames, guide_scale=preset.guide_scale
        )
        self.size = bench.size(preset)


def run_video(
    bench: Bench, pipeline: StreamingPipeline, inputs: Inputs, clips: int, kv_cache: str = "device"
) -> tuple[dict, torch.Tensor]:
    """One untimed clip (compiles, picks kernels, allocates the caches' first time), then
    `clips` clips into an mp4; returns the figures and every frame made."""

    def spec(num_clip: int) -> RunSpec:
        return RunSpec.make(
            inputs.image,
            inputs.features,
            inputs.context,
            inputs.size,
            inputs.settings,
            num_clip=num_clip,
            kv_cache=kv_cache,
        )

    with torch.inference_mode():
        for _ in pipeline.stream(spec(1)):
            pass
    bench.reset_peak()
    stamps, clip_peaks, kept = [], {}, []

    def keep(chunks):
        for chunk in chunks:
            kept.append(chunk.frames)
            yield chunk

    with torch.inference_mode(), tempfile.TemporaryDirectory() as folder:
        t0 = time.perf_counter()
        chunks = stamped(pipeline.stream(spec(clips)), t0, stamps, clip_peaks)
        try:
            import av  # noqa: F401

            waveform = torch.zeros(1, SAMPLE_RATE * inputs.frames // FPS)
            write_video(keep(chunks), Path(folder) / "video.mp4", waveform, SAMPLE_RATE, inputs.size)
        except ImportError:
            for _ in keep(chunks):
                pass
        total = time.perf_counter() - t0
    made = sum(s[1] for s in stamps)
    return {
        "clips": clips,
        "frames": made,
        "fps": made / total,
        "first-frame latency s": stamps[0][0],
        "device peak GiB": bench.peak_gib(),
        "device reserved peak GiB": torch.cuda.max_memory_reserved() / GIB if bench.cuda else None,
        "device peak GiB at clip 2": clip_peaks.get(2),
        "device peak GiB at last clip": clip_peaks.get(clips),
        "host peak RSS GiB": peak_rss_gib(),
    }, torch.cat(kept)


def cap_device_memory(bench: Bench, cap_gib: float) -> None:
    if bench.cuda:
        gc.collect()
        torch.cuda.empty_cache()
        index = bench.device.index if bench.device.index is not None else torch.cuda.current_device()
        total = torch.cuda.get_device_properties(index).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gib * GIB / total), index)


def text_encoder_peak(bench: Bench) -> dict:
    """umT5-XXL (real size, random weights) encoding one padded prompt on the device."""
    from liveavatar_core.text_encoder import build_umt5_encoder, umt5_xxl_config

    config = umt5_xxl_config()
    if bench.tiny:
        config.num_layers, config.d_model, config.d_ff, config.num_heads, config.vocab_size = 2, 64, 128, 2, 1000
    with torch.device("meta"):
        model = build_umt5_encoder(config)
    model = model.to(bench.dtype).to_empty(device=bench.device).eval()
    model.encoder.embed_tokens = model.shared
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02)
    bench.reset_peak()
    ids = torch.randint(0, config.vocab_size, (1, 512), device=bench.device)
    start = time.perf_counter()
    with torch.inference_mode():
        model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state.float().sum().item()
    row = {"encode s": time.perf_counter() - start, "device peak GiB": bench.peak_gib()}
    del model
    bench.release()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="standard", choices=list(PRESETS))
    parser.add_argument("--clips", type=int, default=3, help="timed clips per configuration")
    parser.add_argument("--cap-gib", type=float, default=22.0, help="device memory cap of the low-VRAM run")
    parser.add_argument("--tiny", action="store_true", help="small model and frames: a smoke test on any device")
    parser.add_argument("--skip-beside", action="store_true", help="leave out the full-speed run with decode beside")
    parser.add_argument(
        "--host-uncapped",
        action="store_true",
        help="also run the host caches without the cap, decode in line (tells the caches from the cap)",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--out",
        default=str(Path(__file__).resolve().parent / "results"),
        help="folder of the results files ('' = print only)",
    )
    args = parser.parse_args()
    bench = Bench(
        argparse.Namespace(
            device=args.device,
            tiny=args.tiny,
            warmup=0,
            iters=1,
            clips=args.clips,
            force=True,
            variants="fp8-tensor",
            profile=None,
        )
    )
    torch.set_grad_enabled(False)
    env = environment(bench)
    preset = PRESETS[args.preset]
    print(
        f"{env['device']}, torch {env['torch']}, {'tiny' if bench.tiny else '14B'} fp8 DiT, {args.preset}, "
        f"{args.clips} clips per run, cap {args.cap_gib} GiB",
        flush=True,
    )

    dit, vae = fp8_dit(bench), build_vae(bench)
    inputs = Inputs(bench, preset, args.clips)
    rows, base_frames, base_fps = [], None, None

    def record(label: str, row: dict, frames: torch.Tensor | None = None) -> None:
        nonlocal base_frames, base_fps
        row = {"part": "low_vram", "preset": args.preset, "variant": label, **row}
        if frames is not None and base_frames is None:
            base_frames, base_fps = frames, row["fps"]
        elif frames is not None:
            row["fps vs full speed, decode in line"] = row["fps"] / base_fps
            row["frames equal to full speed"] = bool(torch.equal(frames, base_frames))
            row["frames max abs diff"] = (frames - base_frames).abs().max().item()
        rows.append(row)
        shown = {k: round(v, 3) if isinstance(v, float) else v for k, v in row.items() if k not in ("part", "preset")}
        print(f"low_vram: {shown}", flush=True)

    full_speed = [("full speed, decode in line", False)] + (
        [] if args.skip_beside else [("full speed, decode beside", True)]
    )
    for label, overlap in full_speed:
        record(
            label,
            *run_video(bench, StreamingPipeline(dit, vae, bench.device, overlap_decode=overlap), inputs, args.clips),
        )
        bench.release()

    if args.host_uncapped:
        pipeline = StreamingPipeline(dit, vae, bench.device, overlap_decode=False)
        record("host KV caches, no cap, decode in line", *run_video(bench, pipeline, inputs, args.clips, "host"))
        del pipeline
        bench.release()

    # Low VRAM: as offload_model does per video, the DiT comes from the CPU under the cap.
    dit.to("cpu")
    cap_device_memory(bench, args.cap_gib)
    try:
        record(f"text encoder alone, cap {args.cap_gib:g} GiB", text_encoder_peak(bench))
    except torch.OutOfMemoryError as err:
        record(f"text encoder alone, cap {args.cap_gib:g} GiB", {"note": f"out of memory: {err}"[:200]})
    bench.reset_peak()
    start = time.perf_counter()
    dit.to(bench.device)
    bench.sync()
    moved_s = time.perf_counter() - start
    label = f"low VRAM (host KV caches), cap {args.cap_gib:g} GiB"
    pipeline = StreamingPipeline(dit, vae, bench.device, overlap_decode=True)
    try:
        row, frames = run_video(bench, pipeline, inputs, args.clips, "host")
        record(label, {**row, "DiT from CPU s": moved_s}, frames)
    except torch.OutOfMemoryError as err:
        record(label, {"note": f"out of memory: {err}"[:300]})
        # What it needs, then: the same run without the cap.
        cap_device_memory(bench, 1e6)
        row, frames = run_video(bench, pipeline, inputs, args.clips)
        record("low VRAM (host KV caches), no cap", row, frames)

    runs = rows_to_runs(rows, env, bench.tiny)
    print("\n" + tables(runs))
    if args.out:
        name = f"low_vram-{dt.date.today().isoformat()}" + ("-tiny" if bench.tiny else "")
        notes = (
            "Random weights of the real 14B architecture, DiT in fp8 (one input scale per call), "
            "compiled element-wise chains; `tests/benchmarks/low_vram.py` says what each row runs."
        )
        json_path, md_path = store(Path(args.out), name, runs, f"LiveAvatar low-VRAM mode, {dt.date.today()}", notes)
        print(f"results: {json_path} and {md_path.name}")


if __name__ == "__main__":
    main()
