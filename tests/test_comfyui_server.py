"""The node pack inside a real ComfyUI 0.3.75 server, driven as users drive it: over the HTTP
API and websocket, with the shipped workflows and the embedded small model."""

from __future__ import annotations

import copy
import io
import json
import re
import shutil
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from build_workflows import API_DIR, PRESETS, UI_DIR, WIDGET_NAMES, render_all
from comfyui_client import PACK_NAME, PromptRejected
from PIL import Image

from conftest import ROOT, TINY_UPSCALER, WIDGET_FOR_FOLDER, serve_small_models, write_wav
from liveavatar_core.default_models import DEFAULT_FILES, SHIPPED_DIR
from liveavatar_core.sizing import fit_reference
from liveavatar_core.video_writer import read_video_info

pytestmark = [pytest.mark.server, pytest.mark.slow]

OUR_NODES = (
    "LoadLiveAvatarModel",
    "EncodeAudio",
    "EncodePrompt",
    "LiveAvatarPromptFromConditioning",
    "LiveAvatarSampler",
    "LiveAvatarStreamUpscale",
    "LiveAvatarStreamFaceRestore",
    "OnlineVAEDecode",
)
SOCKET_TYPES = {
    "LIVEAVATAR_MODEL",
    "LIVEAVATAR_AUDIO",
    "LIVEAVATAR_PROMPT",
    "LIVEAVATAR_VIDEO_STREAM",
    "IMAGE",
    "AUDIO",
    "MASK",
    "VIDEO",
    "LATENT",
    "UPSCALE_MODEL",
    "CONDITIONING",
    "CLIP",
    "VAE",
    "AUDIO_ENCODER",
    "AUDIO_ENCODER_OUTPUT",
}
SPEECH_SECONDS_FRAMES = 100  # the example speech is 4 s = 100 frames at 25 fps


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("comfyui")
    yield from serve_small_models(base)


def small_model(prompt: dict) -> dict:
    """The workflow with the embedded small model's files picked in the loader."""
    prompt = copy.deepcopy(prompt)
    loader = next(n for n in prompt.values() if n["class_type"] == "LoadLiveAvatarModel")
    for folder, widget in WIDGET_FOR_FOLDER.items():
        loader["inputs"][widget] = DEFAULT_FILES[folder]
    for node in prompt.values():
        if node["class_type"] == "UpscaleModelLoader":
            node["inputs"]["model_name"] = TINY_UPSCALER
    return tiny_core_loaders(prompt) if "vae_model" in loader["inputs"] else prompt


def tiny_core_loaders(prompt: dict) -> dict:
    """The core-loaders workflow runnable with the small model: core Load VAE reads the tiny VAE
    (so ours takes the VAE from it), but core Load CLIP and Load Audio Encoder only recognise
    full-size umT5 and wav2vec2 files, so those two come from the LiveAvatar loader here."""
    ids = {n["class_type"]: i for i, n in prompt.items()}
    prompt[ids["VAELoader"]]["inputs"]["vae_name"] = DEFAULT_FILES["vae"]
    loader = prompt[ids["LoadLiveAvatarModel"]]["inputs"]
    loader["vae"] = "none"
    del loader["audio_encoder_model"], prompt[ids["EncodeAudio"]]["inputs"]["audio_encoder_output"]
    text = prompt[ids["CLIPTextEncode"]]["inputs"]["text"]
    prompt[ids["LiveAvatarPromptFromConditioning"]] = {
        "class_type": "EncodePrompt",
        "inputs": {"model": loader_link(ids), "prompt": text, "negative_prompt": ""},
    }
    for core in ("CLIPLoader", "CLIPTextEncode", "AudioEncoderLoader", "AudioEncoderEncode"):
        del prompt[ids[core]]
    return prompt


def loader_link(ids: dict) -> list:
    return [ids["LoadLiveAvatarModel"], 0]


def node_of(prompt: dict, class_type: str) -> dict:
    return next(n for n in prompt.values() if n["class_type"] == class_type)


def api_workflow(preset_name: str, num_clip: int = 2) -> dict:
    prompt = small_model(json.loads((API_DIR / f"{preset_name}_api.json").read_text()))
    node_of(prompt, "LiveAvatarSampler")["inputs"]["num_clip"] = num_clip
    return prompt


def output_file(server, execution, node_id: str) -> Path:
    saved = execution.outputs(node_id)["images"][0]
    return server.base / "output" / saved["subfolder"] / saved["filename"]


def widget_count(spec: dict) -> int:
    """Widgets the canvas makes for a node: one per non-socket input, plus the seed's 'control
    after generate' and the upload buttons."""
    count = 0
    for section in ("required", "optional"):
        for kind, *options in spec["input"].get(section, {}).values():
            options = options[0] if options else {}
            if isinstance(kind, str) and kind in SOCKET_TYPES:
                continue
            count += 1 + bool(options.get("control_after_generate")) + bool(options.get("image_upload"))
            count += 2 * bool(options.get("audio_upload"))
    return count


def test_object_info_lists_our_nodes_with_tooltips(server):
    info = server.object_info()
    for name in OUR_NODES:
        spec = info[name]
        assert spec["category"] == "LiveAvatar"
        inputs = spec["input"]["required"]
        assert inputs, name
        for input_name, (_, *options) in (inputs | spec["input"].get("optional", {})).items():
            assert options and options[0].get("tooltip"), f"{name}.{input_name} has no tooltip"
    assert set(info["LoadLiveAvatarModel"]["input"]["required"]) >= set(WIDGET_FOR_FOLDER.values()) | {"offload_model"}
    assert info["LiveAvatarSampler"]["input"]["optional"]["gpus"][1]["default"] == 1
    # Core types in: ComfyUI's own umT5 conditioning, VAE, audio encoder and its output.
    assert info["LiveAvatarPromptFromConditioning"]["input"]["required"]["positive"][0] == "CONDITIONING"
    loader = info["LoadLiveAvatarModel"]["input"]["optional"]
    assert (loader["vae_model"][0], loader["audio_encoder_model"][0]) == ("VAE", "AUDIO_ENCODER")
    assert info["EncodeAudio"]["input"]["optional"]["audio_encoder_output"][0] == "AUDIO_ENCODER_OUTPUT"
    assert info["LiveAvatarSampler"]["input"]["required"]["size"][0][-1] == "384*256"


def test_committed_workflows_are_what_the_builder_writes():
    for path, text in render_all().items():
        assert path.read_text() == text, f"{path.name} is stale: run scripts/build_workflows.py"


def test_each_workflow_note_states_its_own_settings():
    """What a preset's Note promises (clips, frames, size, steps, guidance, length, semantics)
    is what its sampler's widgets do."""
    names = WIDGET_NAMES["LiveAvatarSampler"]
    for preset in PRESETS:
        workflow = json.loads((UI_DIR / f"{preset.name}.json").read_text())
        note = next(n for n in workflow["nodes"] if n["type"] == "Note")["widgets_values"][0]
        sampler = next(n for n in workflow["nodes"] if n["type"] == "LiveAvatarSampler")
        widgets = {name: value for name, value in zip(names, sampler["widgets_values"]) if name}
        clips = re.search(r"up to (\d+) clips", note)
        assert clips and int(clips[1]) == widgets["num_clip"], preset.name
        for size in re.findall(r"\b(\d+\*\d+)\b", note):
            assert size == widgets["size"], f"{preset.name}: the note says {size}"
        for frames in re.findall(r"clips of (\d+) frames", note):
            assert int(frames) == widgets["infer_frames"], preset.name
        for frames, secs in re.findall(r"a clip of (\d+) frames is (\d+(?:\.\d+)?) s", note):
            assert int(frames) == widgets["infer_frames"], f"{preset.name}: the note says a clip of {frames} frames"
            assert abs(float(secs) - int(frames) / 25) < 0.005, preset.name
        for steps in re.findall(r"(\d+) steps", note):
            assert int(steps) == widgets["sample_steps"], preset.name
        for guidance in re.findall(r"guidance (\d+(?:\.\d+)?)", note):
            assert float(guidance) == widgets["sample_guide_scale"], preset.name
        seconds = (widgets["num_clip"] * widgets["infer_frames"] - 3) / 25
        for minutes, secs in re.findall(r"about (?:(\d+) min)? ?(?:(\d+(?:\.\d+)?) s)?", note):
            if minutes or secs:
                stated = int(minutes or 0) * 60 + float(secs or 0)
                assert abs(stated - seconds) < 60 if not secs else abs(stated - seconds) < 1, (
                    preset.name,
                    stated,
                    seconds,
                )
        assert f"({widgets['semantics']} here" in note, preset.name


def test_ui_workflows_match_object_info(server):
    info = server.object_info()
    for preset in PRESETS:
        workflow = json.loads((UI_DIR / f"{preset.name}.json").read_text())
        for node in workflow["nodes"]:
            if node["type"] == "Note":
                continue
            assert node["type"] in info, f"{preset.name}: unknown node {node['type']}"
            assert len(node["widgets_values"]) == widget_count(info[node["type"]]), f"{preset.name}: {node['type']}"
        for _, src, src_slot, _, _, kind in workflow["links"]:
            source = next(n for n in workflow["nodes"] if n["id"] == src)
            assert info[source["type"]]["output"][src_slot] == kind


def test_template_browser_lists_the_presets_with_thumbnails(server):
    """What the frontend's template browser fetches: the list, then per template its JSON and
    `<name>.jpg` (the only thumbnail name it asks for a custom node's template)."""
    templates = server.get("/api/workflow_templates")
    assert sorted(templates.get(PACK_NAME, [])) == sorted(p.name for p in PRESETS)
    for preset in PRESETS:
        base = f"{server.url}/api/workflow_templates/{PACK_NAME}/{preset.name}"
        with urllib.request.urlopen(base + ".json", timeout=30) as response:
            assert json.loads(response.read())["nodes"], preset.name
        with urllib.request.urlopen(base + ".jpg", timeout=30) as response:
            assert response.status == 200 and response.headers["Content-Type"] == "image/jpeg"
            body = response.read()
        assert len(body) < 60_000, f"{preset.name}.jpg is {len(body)} bytes"
        with Image.open(io.BytesIO(body)) as image:
            assert image.format == "JPEG" and image.width == image.height >= 256


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.title)
def test_preset_workflow_makes_an_mp4_with_audio(server, preset):
    prompt = api_workflow(preset.name, num_clip=2)
    width, height = (int(v) for v in preset.size.split("*"))
    if preset.upscale_model:  # the tiny upscaler is slow at full size on a CPU: a small video, upscaled 2x
        node_of(prompt, "LiveAvatarSampler")["inputs"]["size"] = "64*64"
        width, height = 128, 128
    execution = server.run(prompt)
    assert execution.ok, execution.error()
    mp4 = output_file(server, execution, "7")
    info = read_video_info(mp4)
    frames = 2 * preset.infer_frames - 3
    assert (info["width"], info["height"], info["frames"]) == (width, height, frames)
    assert info["fps"] == 25
    assert abs(info["audio_duration_s"] - frames / 25) <= 1 / 25
    assert "7" in execution.progress_nodes(), "no progress from Online VAE Decode"


def test_the_shipped_default_model_shows_the_portrait(server):
    """What a user who installed the trained default model gets from the Preview workflow:
    frames that resemble the portrait (random weights give about 0). The other tests run the
    random stand-ins under the default names; the shipped files sit in a subfolder here."""
    import av

    for folder, name in DEFAULT_FILES.items():
        (server.base / "models" / folder / "shipped").mkdir(exist_ok=True)
        shutil.copyfile(SHIPPED_DIR / name, server.base / "models" / folder / "shipped" / name)
    prompt = api_workflow("liveavatar_preview", num_clip=1)
    loader = node_of(prompt, "LoadLiveAvatarModel")["inputs"]
    for folder, widget in WIDGET_FOR_FOLDER.items():
        loader[widget] = f"shipped/{DEFAULT_FILES[folder]}"
    node_of(prompt, "LiveAvatarSampler")["inputs"]["size"] = "128*128"  # the size it was trained at
    node_of(prompt, "OnlineVAEDecode")["inputs"]["filename_prefix"] = "shipped/avatar"
    execution = server.run(prompt)
    assert execution.ok, execution.error()
    with av.open(str(output_file(server, execution, "7"))) as video:
        frames = [frame.to_ndarray(format="rgb24") / 255 for frame in video.decode(video=0)]
    image = np.asarray(Image.open(ROOT / "workflows" / "media" / "liveavatar_example_portrait.png").convert("RGB"))
    portrait = (
        (fit_reference(torch.from_numpy(image).float() / 255, 128, 128)[0, :, 0].permute(1, 2, 0) + 1) / 2
    ).numpy()
    scores = [np.corrcoef(frame.ravel(), portrait.ravel())[0, 1] for frame in frames]
    assert len(frames) == 32 - 3 and min(scores) > 0.3, (
        f"correlation with the portrait {min(scores):.2f}..{max(scores):.2f}"
    )


def test_gpus_2_runs_in_worker_processes_and_makes_the_same_video(server):
    """Two CPU worker processes started from the node (ComfyUI runs with --cpu here)."""
    lengths = {}
    for gpus in (2, 1):  # 1 last: it ends the workers
        prompt = api_workflow("liveavatar_preview", num_clip=2)
        node_of(prompt, "LiveAvatarSampler")["inputs"]["gpus"] = gpus
        node_of(prompt, "OnlineVAEDecode")["inputs"]["filename_prefix"] = f"gpus{gpus}/avatar"
        execution = server.run(prompt)
        assert execution.ok, execution.error()
        lengths[gpus] = read_video_info(output_file(server, execution, "7"))["frames"]
        last = [m["data"] for m in execution.messages if m.get("type") == "progress" and m["data"].get("node") == "7"][
            -1
        ]
        assert last["value"] == last["max"], f"gpus={gpus}: the progress bar did not end full"
    assert lengths[2] == lengths[1] == 2 * 32 - 3


def test_frames_chain_through_core_image_and_video_nodes(server):
    prompt = api_workflow("liveavatar_preview", num_clip=1)
    node_of(prompt, "OnlineVAEDecode")["inputs"]["output"] = "frames"
    prompt["20"] = {
        "class_type": "ImageScaleBy",
        "inputs": {"image": ["7", 0], "upscale_method": "bilinear", "scale_by": 1.5},
    }
    prompt["21"] = {"class_type": "CreateVideo", "inputs": {"images": ["20", 0], "fps": 25.0, "audio": ["7", 1]}}
    prompt["22"] = {
        "class_type": "SaveVideo",
        "inputs": {"video": ["21", 0], "filename_prefix": "chained/avatar", "format": "mp4", "codec": "h264"},
    }
    execution = server.run(prompt)
    assert execution.ok, execution.error()
    info = read_video_info(output_file(server, execution, "22"))
    assert (info["width"], info["height"], info["frames"]) == (576, 384, 32 - 3)
    # Core's SaveVideo encodes AAC without trimming the last packet: up to ~0.1 s more.
    assert info["audio_duration_s"] == pytest.approx(29 / 25, abs=0.1)


def test_interrupt_stops_within_a_block_and_keeps_a_playable_mp4(server):
    prompt = api_workflow("liveavatar_long", num_clip=3)
    node_of(prompt, "OnlineVAEDecode")["inputs"]["filename_prefix"] = "interrupted/avatar"
    steps_per_clip = 4 * 4  # 4 blocks of 3 latent frames, 4 steps each
    after_interrupt = []
    interrupted = threading.Event()

    def on_message(message):
        if message.get("type") != "progress" or message["data"].get("node") != "7":
            return
        if interrupted.is_set():
            after_interrupt.append(message["data"]["value"])
        elif message["data"]["value"] >= steps_per_clip + 1:  # clip 0 is on disk, clip 1 under way
            interrupted.set()
            server.interrupt()

    execution = server.run(prompt, on_message=on_message)
    assert execution.outcome == "execution_interrupted"
    assert len(after_interrupt) <= 4, "more than one block ran after the interrupt"
    mp4 = next((server.base / "output" / "interrupted").glob("*.mp4"))
    info = read_video_info(mp4)
    assert info["frames"] == 45 and info["width"] == 688
    assert abs(info["audio_duration_s"] - 45 / 25) <= 1 / 25
    assert server.run(api_workflow("liveavatar_preview", num_clip=1)).ok, "the server did not recover"


def test_resume_continues_an_interrupted_run_in_the_same_mp4(server):
    prompt = api_workflow("liveavatar_preview", num_clip=3)
    node_of(prompt, "LiveAvatarSampler")["inputs"]["size"] = "64*64"
    node_of(prompt, "OnlineVAEDecode")["inputs"].update(filename_prefix="resumed/avatar", resume=True)
    steps_per_clip = 3 * 3  # 32 frames: blocks of 3, 3 and 2 latent frames, 3 steps each
    interrupted = threading.Event()

    def on_message(message):
        if message.get("type") == "progress" and message["data"].get("node") == "7" and not interrupted.is_set():
            if message["data"]["value"] >= steps_per_clip + 1:  # clip 0 made, clip 1 under way
                interrupted.set()
                server.interrupt()

    assert server.run(prompt, on_message=on_message).outcome == "execution_interrupted"
    folder = server.base / "output" / "resumed"
    (mp4,) = folder.glob("*.mp4")
    assert read_video_info(mp4)["frames"] < 3 * 32 - 3
    assert (folder / f"{mp4.stem}.resume.json").exists()

    execution = server.run(prompt)  # the same prompt again: resume picks the unfinished mp4
    assert execution.ok, execution.error()
    assert output_file(server, execution, "7") == mp4 and list(folder.glob("*.mp4")) == [mp4]
    info = read_video_info(mp4)
    assert info["frames"] == 3 * 32 - 3 and abs(info["audio_duration_s"] - info["frames"] / 25) <= 1 / 25
    assert not list(folder.glob("*.resume*")), "the finished run left its sidecar"
    last = [m["data"] for m in execution.messages if m.get("type") == "progress" and m["data"].get("node") == "7"][-1]
    assert last["value"] == last["max"]


@pytest.mark.parametrize(
    "change, message",
    [
        (
            lambda p, s: node_of(p, "LoadLiveAvatarModel")["inputs"].update(
                diffusion_model="missing_model.safetensors"
            ),
            "missing_model.safetensors",
        ),
        (
            lambda p, s: node_of(p, "LoadLiveAvatarModel")["inputs"].update(diffusion_model=DEFAULT_FILES["vae"]),
            "diffusion",
        ),
        (lambda p, s: node_of(p, "LoadAudio")["inputs"].update(audio=s("silent.wav", np.zeros(16000))), "silent"),
        (lambda p, s: node_of(p, "LoadAudio")["inputs"].update(audio=s("empty.wav", np.zeros(0))), "audio"),
        (lambda p, s: node_of(p, "LiveAvatarSampler")["inputs"].update(size="100*96"), "multiple of 16"),
    ],
    ids=["missing-model", "vae-as-diffusion-model", "silent-audio", "empty-audio", "bad-size"],
)
def test_bad_inputs_come_back_as_clear_errors_and_the_next_prompt_runs(server, change, message):
    def save(name, samples):
        write_wav(server.base / "input" / name, samples)
        return name

    prompt = api_workflow("liveavatar_preview", num_clip=1)
    change(prompt, save)
    try:
        execution = server.run(prompt)
    except PromptRejected as rejected:  # refused before running: also a clear answer
        assert message.lower() in json.dumps(rejected.body).lower()
    else:
        assert execution.outcome == "execution_error"
        assert message.lower() in execution.error()["exception_message"].lower()
    assert server.run(api_workflow("liveavatar_preview", num_clip=1)).ok


def test_comfyui_unloads_our_networks_and_loads_them_again(server):
    """Ours are in ComfyUI's model manager: they stay loaded between runs, `POST /free`
    (ComfyUI's own unload of every model) takes them out, and the next run loads them again."""
    loads = "Requested to load LiveAvatarNetwork"

    def run(seed: int) -> None:
        prompt = api_workflow("liveavatar_preview", num_clip=1)
        node_of(prompt, "LoadLiveAvatarModel")["inputs"]["offload_model"] = False
        node_of(prompt, "LiveAvatarSampler")["inputs"]["seed"] = seed
        execution = server.run(prompt)
        assert execution.ok, execution.error()

    run(1)
    assert loads in server.log()
    before = server.log().count(loads)
    run(2)
    assert server.log().count(loads) == before, "loaded again although ComfyUI held them loaded"
    server.post("/free", {"unload_models": True})
    time.sleep(3)  # the queue's worker unloads when it wakes, before it takes the next prompt
    run(3)
    assert server.log().count(loads) > before, "ComfyUI did not unload them (or they did not load again)"
