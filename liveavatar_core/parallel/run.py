"""Headless pipeline-parallel generation to an mp4, one process per GPU under torchrun:

    torchrun --nproc-per-node 5 -m liveavatar_core.parallel.run \\
        --dit ckpt/Wan2.2-S2V-14B --lora ckpt/LiveAvatar/liveavatar.safetensors \\
        --vae ckpt/Wan2.2-S2V-14B/Wan2.1_VAE.pth \\
        --text-encoder ckpt/Wan2.2-S2V-14B/models_t5_umt5-xxl-enc-bf16.pth \\
        --audio-encoder ckpt/Wan2.2-S2V-14B/wav2vec2-large-xlsr-53-english \\
        --image face.png --audio speech.wav --prompt "A woman talks to the camera." \\
        --size 688*368 --sample-steps 4 --output avatar.mp4

Any process count works (see `plan.py` for who does what); without torchrun it runs in one
process. The last rank reads the image and the audio, runs the audio and text encoders (or
reads `--prompt-embedding`, a safetensors file with `context` and optionally
`negative_context`), sends the results to the other ranks, decodes and writes the mp4.
Every rank with denoising steps loads the DiT itself.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time

import numpy as np
import torch

from ..errors import DistributedError, InputError, LiveAvatarError
from ..model_files import ModelFiles, Precision
from ..pipeline import write_video
from ..run_spec import RunSpec
from ..semantics import SEMANTICS, VideoSemantics
from ..streaming import SamplerSettings
from ..streaming.sampler import KV_CACHE_PLACES, NOISE_SOURCES
from ..streaming.solvers import SOLVERS
from . import messages
from .group import join, leave, rank_device, resolve_device_kind
from .messages import Kind, Message
from .models import FileModels, RankModels
from .plan import plan_stages
from .stage import run_stage

DTYPES = ("bf16", "fp16", "fp32")  # `model_files.WEIGHT_DTYPES` names this command offers


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m liveavatar_core.parallel.run", description=__doc__.split("\n\n")[0])
    files = p.add_argument_group("model files")
    files.add_argument("--dit", required=True, help="Wan2.2-S2V-14B folder, one of its shards, or ComfyUI's file")
    files.add_argument("--lora", help="LiveAvatar's liveavatar.safetensors")
    files.add_argument("--lora-strength", type=float, default=1.0)
    files.add_argument("--vae", required=True, help="Wan2.1_VAE.pth or ComfyUI's wan_2.1_vae.safetensors")
    files.add_argument("--audio-encoder", required=True, help="the wav2vec2 folder or ComfyUI's file")
    files.add_argument("--text-encoder", help="umT5-XXL (needed with --prompt)")
    files.add_argument("--tokenizer", help="umT5 tokenizer folder (default: found beside the text encoder)")
    files.add_argument("--dtype", choices=DTYPES, default="bf16", help="weights of the DiT (and encoders on GPUs)")
    inputs = p.add_argument_group("inputs")
    inputs.add_argument("--image", required=True)
    inputs.add_argument("--audio", required=True)
    inputs.add_argument("--prompt", help="what the video shows (encoded by --text-encoder)")
    inputs.add_argument("--negative-prompt", help="default: Wan's negative prompt (used with guidance only)")
    inputs.add_argument(
        "--prompt-embedding", help="safetensors with 'context' (and 'negative_context') instead of --prompt"
    )
    run = p.add_argument_group("generation")
    run.add_argument("--size", default="688*368", help="width*height, multiples of 16")
    run.add_argument("--num-clip", type=int, default=0, help="clips to make (0: as many as the audio needs)")
    run.add_argument("--infer-frames", type=int, default=48)
    run.add_argument("--sample-steps", type=int, default=4)
    run.add_argument("--sample-solver", choices=SOLVERS, default="euler")
    run.add_argument("--sample-guide-scale", type=float, default=0.0)
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--no-trim", action="store_true", help="keep the video running past the end of the audio")
    run.add_argument(
        "--semantics",
        choices=SEMANTICS,
        default=SEMANTICS[0],
        help="which official pipeline's motion context, sink roll and decode to reproduce",
    )
    run.add_argument(
        "--no-sink-roll",
        action="store_true",
        help="official-single-gpu only: keep the first sink (the official script without --enable_online_decode)",
    )
    run.add_argument(
        "--noise",
        choices=NOISE_SOURCES,
        default="cpu",
        help="cpu: the same noise on every machine; official: as the official code draws it",
    )
    run.add_argument(
        "--kv-cache",
        choices=KV_CACHE_PLACES,
        default="device",
        help="where each rank keeps its attention caches: on its GPU, or in host memory (low VRAM)",
    )
    out = p.add_argument_group("output and processes")
    out.add_argument("--output", required=True, help="the mp4 to write")
    out.add_argument("--crf", type=int, default=19)
    out.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    out.add_argument("--join-timeout", type=float, default=300.0, help="seconds the ranks may take to connect")
    args = p.parse_args(argv)
    if (args.prompt is None) == (args.prompt_embedding is None):
        p.error("give exactly one of --prompt (with --text-encoder) and --prompt-embedding")
    if args.prompt is not None and args.text_encoder is None:
        p.error("--prompt needs --text-encoder")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    local_rank, local_world = int(os.environ.get("LOCAL_RANK", "0")), int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    # torchrun ends the other ranks with SIGTERM when one fails: unwinding lets the mp4 close.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    try:
        settings = SamplerSettings(
            sample_steps=args.sample_steps,
            infer_frames=args.infer_frames,
            sample_solver=args.sample_solver,
            guide_scale=args.sample_guide_scale,
            seed=args.seed,
            noise=args.noise,
        )
        settings.validate()  # before the ranks join: a bad setting needs no process group
        plan = plan_stages(world, settings.sample_steps)
        if plan.stage(rank) is None:
            print(f"rank {rank}: idle ({settings.sample_steps} steps keep at most {len(plan.stages)} processes busy)")
        device = rank_device(resolve_device_kind(args.device, local_world), local_rank)
        if world > 1:
            join(rank, world, device, None, args.join_timeout)
        spec, waveform = share_inputs(args, settings, plan.decoder, rank, world, device)
        files = ModelFiles(dit=args.dit, vae=args.vae, lora=args.lora, lora_strength=args.lora_strength)
        models = RankModels(FileModels(files, Precision.of(args.dtype)), device)
        chunks = run_stage(spec, plan, rank, device, models)
        if rank == plan.decoder:
            started = time.monotonic()
            written = write_video(chunks, args.output, waveform[None], 16000, (spec.width, spec.height), crf=args.crf)
            seconds = time.monotonic() - started
            print(f"wrote {written} frames to {args.output} in {seconds:.1f} s ({written / seconds:.2f} frames/s)")
        else:
            for _ in chunks:
                pass
    except LiveAvatarError as err:
        print(f"rank {rank}: {err}", file=sys.stderr, flush=True)
        return 2
    finally:
        leave()
    return 0


def share_inputs(args, settings: SamplerSettings, source: int, rank: int, world: int, device):
    """The `RunSpec` on every rank (and the 16 kHz track on the rank that writes the mp4): the
    source rank reads and encodes the inputs and sends them to the others."""
    others = [r for r in range(world) if r != rank]
    if rank == source:
        try:
            image, waveform, features, context, negative = read_inputs(args, settings, device)
        except LiveAvatarError:
            # The others wait for the inputs: tell them why none come, so the log names this rank.
            for r in others:
                messages.send(Message(Kind.ABORT), r, device)
            raise
        tensors = (image, features, context) + (() if negative is None else (negative,))
        for r in others:
            messages.send(Message(Kind.INPUTS, tensors=tensors), r, device)
    else:
        message, waveform = messages.recv(source, device), None
        if message.kind == Kind.ABORT:
            raise DistributedError(f"stopped: rank {source} could not read the inputs (its message says why).")
        tensors = message.tensors
    image, features, context, *negative = tensors
    spec = RunSpec.make(
        image,
        features,
        context,
        args.size,
        settings,
        num_clip=args.num_clip or None,
        negative_context=negative[0] if negative else None,
        trim_to_audio=not args.no_trim,
        semantics=VideoSemantics(args.semantics, sink_roll=not args.no_sink_roll),
        kv_cache=args.kv_cache,
        gpus=world,
    )
    return spec, waveform


def read_inputs(args, settings: SamplerSettings, device):
    from ..audio_encoder import load_audio_encoder
    from ..audio_io import SAMPLE_RATE, load_audio
    from ..conditioning import encode_audio
    from ..dit.loading import open_dit_file
    from ..model_files import whole_checkpoint

    image = load_image(args.image)
    waveform = load_audio(args.audio)
    dit_config = open_dit_file(whole_checkpoint(args.dit))[1]
    precision = Precision.of(args.dtype)
    encoder = load_audio_encoder(
        args.audio_encoder, device, precision.small(device), dit_config.audio_dim, dit_config.num_audio_layers
    )
    features = encode_audio(encoder, waveform, SAMPLE_RATE, name=f"audio file {args.audio}").features
    del encoder
    context, negative = read_prompt(args, settings.guide_scale > 0, device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return image, waveform, features, context, negative


def read_prompt(args, guided: bool, device):
    if args.prompt_embedding is not None:
        from safetensors.torch import load_file

        tensors = load_file(args.prompt_embedding)
        if "context" not in tensors or (guided and "negative_context" not in tensors):
            wanted = "'context' and 'negative_context'" if guided else "'context'"
            raise InputError(f"{args.prompt_embedding} must hold {wanted} (text embeddings [tokens, 4096]).")
        return tensors["context"], tensors.get("negative_context") if guided else None
    from ..conditioning import check_prompt, encode_prompt
    from ..text_encoder import load_text_encoder

    check_prompt(args.prompt)  # before loading umT5
    encoder = load_text_encoder(args.text_encoder, args.tokenizer, device, Precision.of(args.dtype).dense)
    prompt = encode_prompt(encoder, args.prompt, args.negative_prompt)
    return prompt.positive, prompt.negative if guided else None


def load_image(path) -> torch.Tensor:
    """[H, W, 3] float32 in 0..1."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    except (FileNotFoundError, UnidentifiedImageError) as err:
        raise InputError(f"reference image {path} could not be read ({err}); give a .png or .jpg file.") from err
    return torch.from_numpy(pixels)


if __name__ == "__main__":
    sys.exit(main())
