"""Hostile inputs and faults: damaged or malicious model files, bad audio, images, numbers and
names, interrupts, a full queue and killed processes. Each case asserts what a user would see:
a clear message naming the input and the fix (or a run that makes the input safe), a server
that stays alive and runs the next prompt, and no corrupt or lost file, no code run.

Cases that need ComfyUI's own validation, caching, queue or process go through one real server
(tiny default model, one short clip); cases that prove the same thing faster run on
`liveavatar_core` directly.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import psutil
import pytest
import soundfile
import torch
from comfyui_client import ComfyUIServer, PromptRejected, copy_example_media
from PIL import Image
from safetensors.torch import save_file

from conftest import write_wav
from liveavatar_core.default_models import DEFAULT_FILES, RANDOM_DIT, write_random_models
from liveavatar_core.dit.config import config_from_shapes
from liveavatar_core.dit.loading import CONFIG_METADATA_KEY, load_dit
from liveavatar_core.errors import CheckpointError, InputError
from liveavatar_core.limits import check_frames_fit
from liveavatar_core.output_names import checked_prefix
from liveavatar_core.safetensors_reader import SafetensorsFile
from liveavatar_core.tensor_files import open_tensor_file
from liveavatar_core.video_writer import StreamingVideoWriter, read_video_info

LOADER, AUDIO, IMAGE, ENCODE_AUDIO, PROMPT, SAMPLER, DECODE = "1", "3", "2", "4", "5", "6", "7"
API_PRESET = Path(__file__).resolve().parents[1] / "workflows" / "api" / "liveavatar_preview_api.json"
WIDGET_FOR_FOLDER = {
    "diffusion_models": "diffusion_model",
    "loras": "lora",
    "text_encoders": "text_encoder",
    "vae": "vae",
    "audio_encoders": "audio_encoder",
}
SENTINEL = "code_ran.txt"  # a malicious pickle would create this file


# -- the server and its hostile files --------------------------------------------------------------
def _tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    file = SafetensorsFile(str(path))
    return {k: file.read(k) for k in file.keys()}, dict(file.metadata)


class Evil:
    """Pickles to a call of os.system: loading it unsafely would create the sentinel file."""

    def __init__(self, sentinel: Path):
        self.sentinel = sentinel

    def __reduce__(self):
        return os.system, (f"touch {self.sentinel}",)


def write_hostile_models(models: Path, sentinel: Path) -> None:
    """Broken variants of the tiny model files, each under a name of its own."""
    dit_dir, vae_dir = models / "diffusion_models", models / "vae"
    good_dit = dit_dir / DEFAULT_FILES["diffusion_models"]
    tensors, metadata = _tensors(good_dit)
    data = good_dit.read_bytes()

    def dit(name, change_tensors=None, **config_changes):
        state = {k: v.clone() for k, v in tensors.items()}
        meta = dict(metadata)
        if change_tensors:
            change_tensors(state)
        if config_changes:
            config = json.loads(meta[CONFIG_METADATA_KEY])
            config.update({k: v for k, v in config_changes.items() if k != "raw"})
            meta[CONFIG_METADATA_KEY] = config_changes.get("raw", json.dumps(config))
        save_file(state, str(dit_dir / name), metadata=meta)

    (dit_dir / "cut_dit.safetensors").write_bytes(data[: len(data) // 2])
    (dit_dir / "empty_dit.safetensors").write_bytes(b"")
    (dit_dir / "garbage_dit.safetensors").write_bytes(b"this is not a model\n" * 50)
    dit("nan_dit.safetensors", lambda s: s["blocks.0.ffn.0.weight"].view(-1)[7:9].fill_(float("nan")))
    dit("inf_dit.safetensors", lambda s: s["head.head.weight"].view(-1)[0:1].fill_(float("inf")))
    # Finite, but the output layer's modulation sits at the largest bf16 value, so scaling the
    # features by it overflows into inf and NaN: caught on the first block's latents, not at load.
    dit("overflow_dit.safetensors", lambda s: s["head.modulation"].fill_(torch.finfo(torch.bfloat16).max))
    dit("heads3_dit.safetensors", num_heads=3)
    dit("heads0_dit.safetensors", num_heads=0)
    dit("headsneg_dit.safetensors", num_heads=-4)
    dit("heads_text_dit.safetensors", num_heads="many")
    dit("inject_dit.safetensors", audio_inject_layers=[0, 7])
    dit("textlen_dit.safetensors", text_len=0)
    dit("notjson_dit.safetensors", raw="{num_heads: 1,")
    dit("nohead_dit.safetensors", lambda s: s.pop("head.head.weight"))
    lora_tensors, lora_meta = _tensors(models / "loras" / DEFAULT_FILES["loras"])
    next(v for k, v in sorted(lora_tensors.items()) if k.endswith("lora_B.weight"))[0, 0] = float("nan")
    save_file(lora_tensors, str(models / "loras" / "nan_lora.safetensors"), metadata=lora_meta)
    umt5 = models / "text_encoders" / DEFAULT_FILES["text_encoders"]
    (models / "text_encoders" / "cut_umt5.safetensors").write_bytes(umt5.read_bytes()[: umt5.stat().st_size // 3])
    vae_state, _ = _tensors(vae_dir / DEFAULT_FILES["vae"])
    torch.save(vae_state, vae_dir / "legacy_vae.pth", _use_new_zipfile_serialization=False)
    torch.save({"encoder.conv1.weight": Evil(sentinel)}, vae_dir / "evil_vae.pth")
    with open(vae_dir / "evil_legacy_vae.pth", "wb") as file:
        pickle.dump({"weight": Evil(sentinel)}, file)
    (vae_dir / "dit_as_vae.safetensors").write_bytes(data)


def speech(seconds: float, rate: int = 16000, peak: float = 0.5) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (peak * np.sin(2 * np.pi * 180 * t) * (1 + np.sin(2 * np.pi * 3 * t)) / 2).astype(np.float32)


def write_hostile_media(inputs: Path) -> None:
    write_wav(inputs / "silent.wav", np.zeros(16000))
    write_wav(inputs / "empty.wav", np.zeros(0))
    write_wav(inputs / "blip.wav", speech(0.01))
    with_nan = speech(1.0)
    with_nan[100:200] = np.nan
    soundfile.write(inputs / "nan.wav", with_nan, 16000, subtype="FLOAT")
    soundfile.write(inputs / "loud.wav", speech(1.0, peak=8.0), 16000, subtype="FLOAT")  # +18 dBFS
    (inputs / "text.wav").write_text("not audio at all\n" * 100)
    Image.new("RGB", (8, 8), "white").save(inputs / "tiny.png")
    Image.new("RGB", (2000, 8), "white").save(inputs / "sliver.png")
    Image.new("RGBA", (96, 80), (200, 100, 50, 0)).save(inputs / "transparent.png")
    Image.new("L", (80, 96), 128).save(inputs / "grey.png")
    (inputs / "text.png").write_text("not an image\n" * 100)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("hostile")
    with ComfyUIServer(base) as running:
        write_random_models(base / "models")
        copy_example_media(base)
        write_hostile_models(base / "models", base / SENTINEL)
        write_hostile_media(base / "input")
        yield running


_seed = iter(range(1000, 10**6))


def quick_prompt(**sampler) -> dict:
    """The Preview workflow cut to the quickest real run: one short clip, one step, 64*64. A
    fresh seed each time, so ComfyUI's cache never answers in place of a run."""
    prompt = json.loads(API_PRESET.read_text())
    for folder, widget in WIDGET_FOR_FOLDER.items():
        prompt[LOADER]["inputs"][widget] = DEFAULT_FILES[folder]
    prompt[SAMPLER]["inputs"].update(size="64*64", num_clip=1, sample_steps=1, infer_frames=8, seed=next(_seed))
    prompt[SAMPLER]["inputs"].update(sampler)
    prompt[ENCODE_AUDIO]["inputs"]["infer_frames"] = prompt[SAMPLER]["inputs"]["infer_frames"]
    prompt[DECODE]["inputs"]["filename_prefix"] = "hostile/quick"
    return prompt


@dataclass
class Outcome:
    kind: str  # "rejected" (HTTP 400 before running), "error", "interrupted" or "ran"
    text: str
    node: str | None = None
    execution: object = None


def submit(server, prompt: dict, on_message=None, timeout: float = 300) -> Outcome:
    try:
        execution = server.run(prompt, timeout=timeout, on_message=on_message)
    except PromptRejected as rejected:
        return Outcome("rejected", json.dumps(rejected.body))
    if execution.ok:
        return Outcome("ran", "", None, execution)
    if execution.outcome == "execution_interrupted":
        return Outcome("interrupted", "", None, execution)
    error = execution.error()
    return Outcome("error", error.get("exception_message", ""), error.get("node_id"), execution)


def saved_mp4(server, execution, node: str = DECODE) -> Path:
    saved = execution.outputs(node)["images"][0]
    return server.base / "output" / saved["subfolder"] / saved["filename"]


def assert_server_alive(server) -> None:
    assert server.process.poll() is None, "the ComfyUI process died"
    assert server.get("/system_stats")["system"], "the server does not answer"


def assert_next_prompt_runs(server) -> None:
    outcome = submit(server, quick_prompt())
    assert outcome.kind == "ran", outcome.text
    assert read_video_info(saved_mp4(server, outcome.execution))["frames"] == 5


def mp4s(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.mp4")) if folder.exists() else []


# -- the table of hostile prompts ------------------------------------------------------------------
def loader(**inputs) -> Callable[[dict], None]:
    return lambda prompt: prompt[LOADER]["inputs"].update(inputs)


def node_input(node: str, **inputs) -> Callable[[dict], None]:
    return lambda prompt: prompt[node]["inputs"].update(inputs)


@dataclass(frozen=True)
class Case:
    id: str
    change: Callable[[dict], None]
    expect: str  # "error" (our node explains), "refused" (error or HTTP 400), "ran"
    words: tuple[str, ...] = ()  # all must appear in the message: the input and the fix


CASES = [
    # model files
    Case(
        "dit-truncated",
        loader(diffusion_model="cut_dit.safetensors"),
        "error",
        ("cut_dit.safetensors", "damaged or incomplete", "download it again"),
    ),
    Case(
        "dit-empty-file",
        loader(diffusion_model="empty_dit.safetensors"),
        "error",
        ("empty_dit.safetensors", "too short for a header", "download it again"),
    ),
    Case(
        "dit-not-safetensors",
        loader(diffusion_model="garbage_dit.safetensors"),
        "error",
        ("garbage_dit.safetensors", "damaged", "download it again"),
    ),
    Case(
        "dit-nan-tensor",
        loader(diffusion_model="nan_dit.safetensors"),
        "error",
        ("nan_dit.safetensors", "blocks.0.ffn.0.weight", "nan", "download it again"),
    ),
    Case(
        "dit-inf-tensor",
        loader(diffusion_model="inf_dit.safetensors"),
        "error",
        ("inf_dit.safetensors", "head.head.weight", "infinite"),
    ),
    Case(
        "dit-overflows-in-first-block",
        loader(diffusion_model="overflow_dit.safetensors"),
        "error",
        ("the model produced nan", "first block", "bf16"),
    ),
    Case(
        "dit-num-heads-3",
        loader(diffusion_model="heads3_dit.safetensors"),
        "error",
        ("heads3_dit.safetensors", "num_heads = 3", "set num_heads"),
    ),
    Case(
        "dit-num-heads-0",
        loader(diffusion_model="heads0_dit.safetensors"),
        "error",
        ("heads0_dit.safetensors", "num_heads = 0", "positive whole number"),
    ),
    Case(
        "dit-num-heads-negative",
        loader(diffusion_model="headsneg_dit.safetensors"),
        "error",
        ("headsneg_dit.safetensors", "num_heads = -4"),
    ),
    Case(
        "dit-num-heads-text",
        loader(diffusion_model="heads_text_dit.safetensors"),
        "error",
        ("heads_text_dit.safetensors", "num_heads = 'many'"),
    ),
    Case(
        "dit-inject-layer-out-of-range",
        loader(diffusion_model="inject_dit.safetensors"),
        "error",
        ("inject_dit.safetensors", "audio_inject_layers", "0..1"),
    ),
    Case(
        "dit-text-len-0",
        loader(diffusion_model="textlen_dit.safetensors"),
        "error",
        ("textlen_dit.safetensors", "text_len = 0", "512"),
    ),
    Case(
        "dit-metadata-not-json",
        loader(diffusion_model="notjson_dit.safetensors"),
        "error",
        ("notjson_dit.safetensors", CONFIG_METADATA_KEY, "not valid json"),
    ),
    Case(
        "dit-missing-head",
        loader(diffusion_model="nohead_dit.safetensors"),
        "error",
        ("nohead_dit.safetensors", "head.head.weight", "download it again"),
    ),
    Case(
        "dit-missing-file",
        loader(diffusion_model="missing_model.safetensors"),
        "error",
        ("diffusion_model", "missing_model.safetensors", "models/diffusion_models"),
    ),
    Case(
        "dit-name-escapes-folder",
        loader(diffusion_model="../../../../etc/passwd"),
        "error",
        ("diffusion_model", "passwd", "put the file there"),
    ),
    Case("vae-is-a-dit", loader(vae="dit_as_vae.safetensors"), "error", ("dit_as_vae.safetensors", "vae")),
    Case(
        "vae-legacy-pickle",
        loader(vae="legacy_vae.pth"),
        "error",
        ("legacy_vae.pth", "legacy pickle format", ".safetensors"),
    ),
    Case(
        "vae-pickle-runs-code", loader(vae="evil_vae.pth"), "error", ("evil_vae.pth", "would run code", ".safetensors")
    ),
    Case(
        "vae-legacy-pickle-runs-code",
        loader(vae="evil_legacy_vae.pth"),
        "error",
        ("evil_legacy_vae.pth", "could run code", ".safetensors"),
    ),
    Case("lora-nan-tensor", loader(lora="nan_lora.safetensors"), "error", ("nan_lora.safetensors", "lora_b", "nan")),
    Case(
        "text-encoder-truncated",
        loader(text_encoder="cut_umt5.safetensors"),
        "error",
        ("cut_umt5.safetensors", "damaged or incomplete"),
    ),
    # numbers
    Case("lora-strength-nan", loader(lora_strength=float("nan")), "error", ("lora_strength", "nan", "1.0")),
    Case("lora-strength-inf", loader(lora_strength=float("inf")), "refused", ("lora_strength",)),
    Case(
        "guide-scale-nan",
        node_input(SAMPLER, sample_guide_scale=float("nan")),
        "error",
        ("sample_guide_scale", "nan", "0 (off"),
    ),
    Case(
        "guide-scale-negative-inf",
        node_input(SAMPLER, sample_guide_scale=float("-inf")),
        "refused",
        ("sample_guide_scale",),
    ),
    Case("size-65536", node_input(SAMPLER, size="65536*65536"), "error", ("65536*65536", "at most 2048")),
    Case("size-not-a-size", node_input(SAMPLER, size="big"), "error", ("size", "688*368")),
    Case("size-off-grid", node_input(SAMPLER, size="100*96"), "error", ("100*96", "multiple of 16")),
    Case("size-too-small", node_input(SAMPLER, size="32*32"), "error", ("32*32", "at least 64")),
    Case(
        "frames-mode-100000-clips",
        lambda p: (
            p[SAMPLER]["inputs"].update(num_clip=100000, trim_to_audio=False, size="688*368"),
            p[DECODE]["inputs"].update(output="frames"),
        ),
        "error",
        ("frames", "gib", "use output 'mp4'"),
    ),
    Case("num-clip-negative", node_input(SAMPLER, num_clip=-1), "refused", ("num_clip",)),
    Case("sample-steps-0", node_input(SAMPLER, sample_steps=0), "refused", ("sample_steps",)),
    Case(
        "infer-frames-not-multiple-of-4",
        lambda p: (p[SAMPLER]["inputs"].update(infer_frames=6), p[ENCODE_AUDIO]["inputs"].update(infer_frames=8)),
        "error",
        ("infer_frames", "multiple of 4"),
    ),
    Case("seed-negative", node_input(SAMPLER, seed=-5), "refused", ("seed",)),
    Case("gpus-0", node_input(SAMPLER, gpus=0), "refused", ("gpus",)),
    Case("gpus-16-on-cpu", node_input(SAMPLER, gpus=16), "error", ("gpus = 16", "set gpus to at most 4")),
    Case("crf-99", node_input(DECODE, crf=99), "refused", ("crf",)),
    Case("solver-unknown", node_input(SAMPLER, sample_solver="magic"), "refused", ("sample_solver",)),
    Case("weight-dtype-unknown", loader(weight_dtype="int3"), "refused", ("weight_dtype",)),
    Case("prompt-empty", node_input(PROMPT, prompt="   "), "error", ("prompt is empty", "describe the speaker")),
    # audio
    Case("audio-silent", node_input(AUDIO, audio="silent.wav"), "error", ("silent", "check the file")),
    Case("audio-empty", node_input(AUDIO, audio="empty.wav"), "refused", ("audio",)),
    Case("audio-10-ms", node_input(AUDIO, audio="blip.wav"), "error", ("too short", "at least 0.1 s")),
    Case("audio-nan-samples", node_input(AUDIO, audio="nan.wav"), "error", ("nan", "re-export")),
    Case("audio-not-audio", node_input(AUDIO, audio="text.wav"), "refused", ()),
    Case("audio-missing-file", node_input(AUDIO, audio="nowhere.wav"), "refused", ("nowhere.wav",)),
    # images
    Case("image-8-pixels", node_input(IMAGE, image="tiny.png"), "error", ("reference image", "16*16")),
    Case("image-sliver", node_input(IMAGE, image="sliver.png"), "error", ("reference image", "16*16")),
    Case("image-not-an-image", node_input(IMAGE, image="text.png"), "refused", ()),
    Case("image-transparent", node_input(IMAGE, image="transparent.png"), "ran"),
    Case("image-greyscale", node_input(IMAGE, image="grey.png"), "ran"),
    # output names
    Case(
        "prefix-with-nul",
        node_input(DECODE, filename_prefix="bad\x00name/avatar"),
        "error",
        ("filename_prefix", "control character", "u+0000"),
    ),
    Case(
        "prefix-with-newline",
        node_input(DECODE, filename_prefix="two\nlines"),
        "error",
        ("filename_prefix", "control character"),
    ),
    Case(
        "prefix-climbs-out",
        node_input(DECODE, filename_prefix="../../escaped/avatar"),
        "error",
        ("filename_prefix", "..", "inside comfyui's output folder"),
    ),
    Case(
        "prefix-absolute",
        node_input(DECODE, filename_prefix="/tmp/liveavatar_escape/avatar"),
        "error",
        ("filename_prefix", "absolute path"),
    ),
]


@pytest.mark.server
@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_hostile_prompt_gets_a_clear_answer_and_the_server_lives_on(server, case):
    before = {p: p.stat().st_size for p in mp4s(server.base / "output")}
    prompt = quick_prompt()
    case.change(prompt)
    outcome = submit(server, prompt)
    if case.expect == "ran":
        assert outcome.kind == "ran", outcome.text
        assert read_video_info(saved_mp4(server, outcome.execution))["frames"] == 5
    elif case.expect == "error":
        assert outcome.kind == "error", f"expected a clear error, got {outcome.kind}: {outcome.text[:300]}"
    else:
        assert outcome.kind in ("error", "rejected"), f"expected a refusal, got {outcome.kind}"
    message = outcome.text.lower()
    for word in case.words:
        assert word.lower() in message, f"{word!r} not in: {outcome.text[:600]}"
    assert "weights_only=false" not in message.replace(" ", ""), "never advise loading code-running pickles"
    assert not (server.base / SENTINEL).exists(), "a pickle ran code"
    assert_server_alive(server)
    # No file lost or left corrupt: earlier videos untouched, any new one playable, nothing
    # written outside the output folder.
    for path, size in before.items():
        assert path.stat().st_size == size
    for path in set(mp4s(server.base / "output")) - set(before):
        assert read_video_info(path)["frames"] > 0
    assert not (server.base / "escaped").exists() and not Path("/tmp/liveavatar_escape").exists()
    assert not any((server.base / "output").glob("bad*")), "a junk folder was left"


@pytest.mark.server
@pytest.mark.slow
def test_after_the_hostile_prompts_the_next_prompt_runs(server):
    assert_next_prompt_runs(server)


# -- prompts that run, with the input made safe ---------------------------------------------------------
@pytest.mark.server
@pytest.mark.slow
def test_empty_prefix_writes_a_visible_file_under_the_default_name(server):
    prompt = quick_prompt()
    prompt[DECODE]["inputs"]["filename_prefix"] = "  "
    outcome = submit(server, prompt)
    assert outcome.kind == "ran", outcome.text
    mp4 = saved_mp4(server, outcome.execution)
    assert mp4.parent == server.base / "output" / "LiveAvatar" and mp4.name.startswith("avatar_")
    assert read_video_info(mp4)["frames"] == 5


@pytest.mark.server
@pytest.mark.slow
def test_loud_audio_is_limited_to_full_scale_in_the_video(server):
    prompt = quick_prompt()
    prompt[AUDIO]["inputs"]["audio"] = "loud.wav"
    outcome = submit(server, prompt)
    assert outcome.kind == "ran", outcome.text
    with av.open(str(saved_mp4(server, outcome.execution))) as container:
        peak = max(float(np.abs(frame.to_ndarray()).max()) for frame in container.decode(audio=0))
    assert peak < 1.2, f"the video's audio peaks at {peak:.1f} (the input's peak is 8)"
    assert "above full scale" in server.log()


# -- model files changed on disk after loading ---------------------------------------------------------
@pytest.mark.server
@pytest.mark.slow
def test_model_file_replaced_or_truncated_after_loading_is_reloaded_not_crashed_on(server):
    folder = server.base / "models" / "diffusion_models"
    good = (folder / DEFAULT_FILES["diffusion_models"]).read_bytes()
    nan = (folder / "nan_dit.safetensors").read_bytes()
    swap = folder / "swap_dit.safetensors"
    swap.write_bytes(good)
    prompt = quick_prompt()
    prompt[LOADER]["inputs"]["diffusion_model"] = swap.name

    def run_with_swap():
        again = quick_prompt()
        again[LOADER]["inputs"]["diffusion_model"] = swap.name
        return submit(server, again)

    assert submit(server, prompt).kind == "ran"
    assert len(nan) == len(good)
    with open(swap, "r+b") as file:  # overwritten in place, as a copy over the old file does
        file.write(nan)
    os.utime(swap, ns=(time.time_ns(), time.time_ns() + 10**9))
    outcome = run_with_swap()
    assert outcome.kind == "error" and "nan" in outcome.text.lower() and swap.name in outcome.text, outcome.text
    os.truncate(swap, len(good) // 3)
    outcome = run_with_swap()
    assert outcome.kind == "error" and "damaged or incomplete" in outcome.text and swap.name in outcome.text
    assert_server_alive(server)
    swap.write_bytes(good)
    assert run_with_swap().kind == "ran"


# -- faults -------------------------------------------------------------------------------------
def progress_of(message: dict, node: str = DECODE) -> int | None:
    if message.get("type") == "progress" and message["data"].get("node") == node:
        return message["data"]["value"]
    return None


@pytest.mark.server
@pytest.mark.slow
def test_interrupt_keeps_a_playable_mp4_shown_on_the_node(server):
    prompt = quick_prompt(size="128*128", num_clip=10, infer_frames=16, sample_steps=1, trim_to_audio=False)
    prompt[DECODE]["inputs"]["filename_prefix"] = "interrupted/avatar"
    blocks_per_clip = 2  # 4 latent frames: blocks of 3 and 1

    def on_message(message):
        value = progress_of(message)
        if value is not None and value == blocks_per_clip + 1:  # clip 0 is on disk, clip 1 under way
            server.interrupt()

    outcome = submit(server, prompt, on_message=on_message)
    assert outcome.kind == "interrupted"
    shown = [
        m["data"]["output"]
        for m in outcome.execution.messages
        if m.get("type") == "executed" and m["data"].get("node") == DECODE
    ]
    assert shown, "the kept mp4 is not shown on the node"
    saved = shown[-1]["images"][0]
    kept = server.base / "output" / saved["subfolder"] / saved["filename"]
    assert mp4s(server.base / "output" / "interrupted") == [kept]
    assert 16 - 3 <= read_video_info(kept)["frames"] < 10 * 16 - 3  # clip 0 and more, not the whole run
    assert_next_prompt_runs(server)


@pytest.mark.server
@pytest.mark.slow
def test_a_queue_of_ten_prompts_each_gets_its_own_outcome(server):
    bad = [
        ("lora_strength", loader(lora_strength=float("nan"))),
        ("65536", node_input(SAMPLER, size="65536*65536")),
        ("silent", node_input(AUDIO, audio="silent.wav")),
        ("filename_prefix", node_input(DECODE, filename_prefix="../up")),
        ("damaged", loader(diffusion_model="cut_dit.safetensors")),
    ]
    expected, ws = {}, server.connect()
    try:
        for index in range(10):
            prompt = quick_prompt()
            word = None
            if index % 2:
                word, change = bad[index // 2]
                change(prompt)
            expected[server.queue(prompt)] = word
        ends = {}
        deadline = time.monotonic() + 240
        while len(ends) < len(expected) and time.monotonic() < deadline:
            ws.settimeout(max(1.0, deadline - time.monotonic()))
            raw = ws.recv()
            if isinstance(raw, bytes):
                continue
            message = json.loads(raw)
            prompt_id = message.get("data", {}).get("prompt_id")
            if prompt_id in expected and message["type"] in ("execution_success", "execution_error"):
                ends[prompt_id] = message
    finally:
        ws.close()
    assert len(ends) == 10, "not every queued prompt finished"
    for prompt_id, word in expected.items():
        end = ends[prompt_id]
        if word is None:
            assert end["type"] == "execution_success"
            entry = server.history(prompt_id)
            saved = entry["outputs"][DECODE]["images"][0]
            assert read_video_info(server.base / "output" / saved["subfolder"] / saved["filename"])["frames"] == 5
        else:
            assert end["type"] == "execution_error" and word in end["data"]["exception_message"]
    assert_server_alive(server)


def worker_processes(server) -> list[psutil.Process]:
    """The pool's workers: the children of the fork server that ComfyUI started."""
    workers = []
    for child in psutil.Process(server.process.pid).children():
        try:
            if "forkserver" in " ".join(child.cmdline()):
                workers += child.children()
        except psutil.NoSuchProcess:
            pass
    return workers


def gone(process: psutil.Process) -> bool:
    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.server
@pytest.mark.slow
def test_kill_9_of_a_worker_is_named_and_the_next_run_starts_fresh_workers(server):
    prompt = quick_prompt(gpus=2, num_clip=10, sample_steps=2, infer_frames=16, trim_to_audio=False)
    killed = []

    def on_message(message):
        if progress_of(message) is not None and not killed:
            victim = worker_processes(server)[-1]
            killed.append(victim.pid)
            victim.send_signal(signal.SIGKILL)

    outcome = submit(server, prompt, on_message=on_message)
    assert killed, "no progress arrived from the workers"
    assert outcome.kind == "error", outcome.kind
    assert "died (killed by SIGKILL)" in outcome.text and "rank" in outcome.text, outcome.text
    assert_server_alive(server)
    again = submit(server, quick_prompt(gpus=2))
    assert again.kind == "ran", again.text
    assert killed[0] not in [p.pid for p in worker_processes(server)]


@pytest.mark.server
@pytest.mark.slow
def test_kill_9_of_comfyui_leaves_no_workers_and_no_empty_mp4(server):
    """Last: it ends the module's server."""
    prompt = quick_prompt(gpus=2, size="128*128", num_clip=2, sample_steps=2, infer_frames=16, trim_to_audio=False)
    prompt[DECODE]["inputs"]["filename_prefix"] = "killed/avatar"
    ws = server.connect()
    try:
        server.queue(prompt)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            ws.settimeout(max(1.0, deadline - time.monotonic()))
            raw = ws.recv()
            if not isinstance(raw, bytes) and progress_of(json.loads(raw)) is not None:
                break
    finally:
        ws.close()
    workers = worker_processes(server)
    assert len(workers) == 2
    helpers = psutil.Process(server.process.pid).children(recursive=True)  # + fork server, resource tracker
    server.process.send_signal(signal.SIGKILL)
    server.process.wait(10)
    deadline = time.monotonic() + 15
    while not all(gone(p) for p in helpers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert all(gone(w) for w in workers), "worker processes outlived ComfyUI"
    assert all(gone(p) for p in helpers), [p.cmdline() for p in helpers if not gone(p)]
    for path in mp4s(server.base / "output" / "killed"):
        assert read_video_info(path)["frames"] > 0  # never a 0-byte or unplayable file


# -- the same guarantees, proved on liveavatar_core directly -----------------------------------------
@pytest.fixture(scope="module")
def tiny_files(default_model_files):
    return default_model_files


def test_loaded_weights_survive_their_file_being_truncated_or_overwritten(tmp_path, tiny_files):
    path = tmp_path / "dit.safetensors"
    path.write_bytes(tiny_files["diffusion_models"].read_bytes())
    model = load_dit(path)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    size = path.stat().st_size
    with open(path, "r+b") as file:  # the same bytes position by position, all different
        file.seek(size // 2)
        file.write(b"\xff" * (size - size // 2))
    os.truncate(path, 100)  # a file cut short under a mapping would kill the process here
    after = model.state_dict()
    for name, value in before.items():
        assert torch.equal(after[name], value), f"{name} changed with the file on disk"


def test_a_tensor_that_ends_past_the_file_is_named_at_open(tmp_path, tiny_files):
    path = tmp_path / "short.safetensors"
    data = tiny_files["vae"].read_bytes()
    path.write_bytes(data[:-10])
    with pytest.raises(CheckpointError, match=r"short\.safetensors.*ends at byte .* but the file has"):
        open_tensor_file(path)


# As many injection layers as the tiny DiT has injectors, one of them listed twice.
INJECT_TWICE = [*RANDOM_DIT.audio_inject_layers[:-1], RANDOM_DIT.audio_inject_layers[0]]


@pytest.mark.parametrize(
    "hints, words",
    [
        ({"num_heads": 3}, ("num_heads = 3", f"divisor of {RANDOM_DIT.dim}")),
        ({"num_heads": 0}, ("num_heads = 0", "positive whole number")),
        (
            {"num_heads": RANDOM_DIT.dim},
            (f"num_heads = {RANDOM_DIT.dim}", "even size"),
        ),  # heads of one channel: RoPE needs pairs
        ({"num_heads": True}, ("num_heads = True",)),
        ({"audio_inject_layers": "0,1"}, ("audio_inject_layers = '0,1'", "list of block numbers")),
        ({"audio_inject_layers": INJECT_TWICE}, (f"audio_inject_layers = {INJECT_TWICE}", "twice")),
        ({"motion_frames": -73}, ("motion_frames = -73", "73")),
        ({"eps": "tiny"}, ("eps = 'tiny'", "1e-6")),
        ({"eps": 5.0}, ("eps = 5.0", "small positive")),
    ],
    ids=[
        "heads-3",
        "heads-0",
        "head-dim-odd",
        "heads-bool",
        "inject-string",
        "inject-twice",
        "motion-negative",
        "eps-text",
        "eps-large",
    ],
)
def test_bad_config_values_are_named_with_their_source_and_fix(tiny_files, hints, words):
    shapes = open_tensor_file(tiny_files["diffusion_models"]).shapes()
    config = json.loads(RANDOM_DIT.to_json())
    with pytest.raises(CheckpointError) as info:
        config_from_shapes(shapes, "tiny.safetensors", {**config, **hints}, "config.json beside tiny.safetensors")
    message = str(info.value)
    assert message.startswith("config.json beside tiny.safetensors: ")
    for word in words:
        assert word in message, message
    assert info.value.__cause__ is None


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf"), "1.0x"])
def test_lora_strength_that_is_not_finite_is_refused_before_loading(tiny_files, value):
    from liveavatar_core.models import ModelFiles, load_models

    files = ModelFiles(
        dit=Path("never-read.safetensors"),
        text_encoder=tiny_files["text_encoders"],
        vae=tiny_files["vae"],
        audio_encoder=tiny_files["audio_encoders"],
        lora=tiny_files["loras"],
        lora_strength=value,
    )
    with pytest.raises(InputError, match=r"lora_strength .*1\.0 is what LiveAvatar was trained for") as info:
        load_models(files)
    error = info.value
    assert error.__cause__ is None and (error.__context__ is None or error.__suppress_context__), "chained traceback"


@pytest.mark.parametrize(
    "field, value", [("guide_scale", float("nan")), ("guide_scale", float("inf")), ("shift", float("nan"))]
)
def test_sampler_numbers_that_are_not_finite_are_refused(field, value):
    from liveavatar_core.streaming import SamplerSettings

    name = "sample_guide_scale" if field == "guide_scale" else field
    with pytest.raises(InputError, match=rf"{name} is {value}, not a finite number"):
        SamplerSettings(**{field: value}).validate()


@pytest.mark.parametrize(
    "prefix, used, refusal",
    [
        ("", "LiveAvatar/avatar", None),
        ("   ", "LiveAvatar/avatar", None),
        ("clips/", "clips/avatar", None),
        ("a//b", "a/b", None),
        ("LiveAvatar/%year%/x", "LiveAvatar/%year%/x", None),
        ("x\ty", None, "control character (U+0009)"),
        ("\x7fdel", None, "control character (U+007F)"),
        ("a/../../b", None, "'..'"),
        ("./here", None, "'..' or '.'"),
        ("\\\\server\\share", None, "absolute path"),
        ("C:\\x", None, "absolute path"),
        ("n" * 300, None, "longer than 200"),
    ],
    ids=[
        "empty",
        "blank",
        "folder-only",
        "double-slash",
        "date-pattern",
        "tab",
        "del",
        "dotdot",
        "dot",
        "unc",
        "drive",
        "long",
    ],
)
def test_filename_prefixes(prefix, used, refusal):
    if refusal is None:
        assert checked_prefix(prefix, "LiveAvatar/avatar") == used
    else:
        with pytest.raises(InputError, match="filename_prefix") as info:
            checked_prefix(prefix, "LiveAvatar/avatar")
        assert refusal in str(info.value)


def test_frames_that_do_not_fit_in_ram_are_refused_with_the_figure():
    check_frames_fit(45, 688, 368, available=16 * 2**30)  # 3 clips: fine
    with pytest.raises(
        InputError,
        match=r"1000 frames of 688\*368 in RAM: 2\.8 GiB, but only 2\.0 GiB is free\. "
        r"Use output 'mp4'",
    ):
        check_frames_fit(1000, 688, 368, available=2 * 2**30)


def test_loud_audio_is_scaled_to_full_scale_with_a_warning(caplog):
    from liveavatar_core.audio_io import limit_peak

    quiet = torch.tensor([[0.5, -0.25, 0.1]])
    assert limit_peak(quiet) is quiet
    with caplog.at_level(logging.WARNING):
        limited = limit_peak(torch.tensor([[4.0, -8.0, 2.0]]))
    assert torch.allclose(limited, torch.tensor([[0.5, -1.0, 0.25]]))
    assert "peaks at 18.1 dBFS, above full scale" in caplog.text


def test_a_writer_killed_before_its_first_clip_leaves_no_file(tmp_path):
    import subprocess
    import sys
    import textwrap

    path = tmp_path / "never.mp4"
    script = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
        import numpy as np
        from liveavatar_core.video_writer import StreamingVideoWriter
        writer = StreamingVideoWriter({str(path)!r}, 25, 64, 64)
        writer.write_frames(np.zeros((10, 64, 64, 3), np.uint8), clip_boundary=False)
        os._exit(0)  # killed mid-clip, before the first fragment
        """)
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
    assert list(tmp_path.iterdir()) == []
    with StreamingVideoWriter(path, 25, 64, 64) as writer:
        writer.write_frames(np.zeros((10, 64, 64, 3), np.uint8))
        assert writer.created and read_video_info(path)["frames"] == 10


def test_cpu_workers_need_the_test_flag_and_are_few(monkeypatch):
    from liveavatar_core.parallel.group import check_cpu_workers

    monkeypatch.delenv("LIVEAVATAR_CPU_WORKERS", raising=False)
    check_cpu_workers(1)
    with pytest.raises(InputError, match=r"gpus = 2, but no CUDA GPU is in use here .* Set gpus to 1"):
        check_cpu_workers(2)
    monkeypatch.setenv("LIVEAVATAR_CPU_WORKERS", "1")
    check_cpu_workers(4)
    with pytest.raises(InputError, match=r"gpus = 5 CPU worker processes: at most 4 .* Set gpus to at most 4"):
        check_cpu_workers(5)


def test_an_idle_worker_pool_is_released(monkeypatch, tiny_files):
    from liveavatar_core.model_files import ModelFiles
    from liveavatar_core.parallel import FileModels, shared_pools

    monkeypatch.setenv("LIVEAVATAR_WORKER_IDLE_S", "0.3")
    monkeypatch.setattr(shared_pools, "IDLE_CHECK_S", 0.1)
    released = threading.Event()
    source = FileModels(ModelFiles(dit=tiny_files["diffusion_models"], vae=tiny_files["vae"]))
    pool = shared_pools.shared_pool(source, 2, "cpu")
    monkeypatch.setattr(pool, "shutdown", released.set)
    assert shared_pools.shared_pool(source, 2, "cpu") is pool
    assert released.wait(10), "the idle pool was not released"
    assert shared_pools._pool is None
