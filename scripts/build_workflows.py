"""Writes the preset workflows, in the canvas (UI) format and the HTTP API format.

Both formats come from one description per preset, so they cannot drift apart; the tests
check the committed files against this script and against a running ComfyUI's /object_info.

    python scripts/build_workflows.py            # rewrite workflows/*.json and workflows/api/*.json
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
UI_DIR = ROOT / "workflows"
API_DIR = ROOT / "workflows" / "api"

PORTRAIT = "liveavatar_example_portrait.png"
SPEECH = "liveavatar_example_speech.wav"
# ComfyUI's repackaged file names: what users who ran core Wan S2V already have.
MODEL_FILES = {
    "diffusion_model": "wan2.2_s2v_14B_bf16.safetensors",
    "lora": "liveavatar.safetensors",
    "text_encoder": "umt5_xxl_fp16.safetensors",
    "vae": "wan_2.1_vae.safetensors",
    "audio_encoder": "wav2vec2_large_english_fp16.safetensors",
}
PROMPT = (
    "A cheerful young man with short brown hair and a blue shirt speaks directly to the camera, with natural "
    "lip movements, gentle head motion and expressive eyes. Soft even light, a plain pale blue wall behind him, "
    "stable framing."
)


@dataclass(frozen=True)
class Preset:
    name: str
    title: str
    size: str
    num_clip: int
    steps: int
    infer_frames: int = 48
    guide_scale: float = 0.0
    offload: bool = True
    gpus: int = 1  # the presets run in ComfyUI's process; more is a setting of the machine
    compile: bool = True  # fused GPU kernels pay off from 688*368 up
    weight_dtype: str = "bf16"
    kv_cache: str = "gpu"
    semantics: str = "official-multi-gpu"  # the official streaming path the paper's figures come from
    sink_roll: bool = True
    noise: str = "cpu"
    core_loaders: bool = False  # umT5, VAE and wav2vec2 from ComfyUI's own loader nodes
    note: str = ""
    extra: dict = field(default_factory=dict)
    upscale_model: str | None = None  # set: a Stream Upscale node with this model between sampler and decode
    rescale_factor: float = 1.0
    resume: bool = False  # on: queueing it again after a crash continues the unfinished mp4


PRESETS = (
    Preset(
        "liveavatar_preview",
        "Preview",
        "384*256",
        10,
        3,
        infer_frames=32,
        compile=False,
        note="A quick look: up to 10 clips of 32 frames at 384*256, 3 steps (about 12.7 s of video).",
    ),
    Preset(
        "liveavatar_standard",
        "Standard",
        "688*368",
        100,
        4,
        note="The official quality: up to 100 clips of 48 frames at 688*368, 4 steps (about 3 min 12 s).",
    ),
    Preset(
        "liveavatar_standard_low_vram",
        "Standard (low VRAM)",
        "688*368",
        100,
        4,
        weight_dtype="fp8_e4m3fn",
        kv_cache="system RAM (low VRAM)",
        note="The Standard preset for 24 GB cards (up to 100 clips of 48 frames at 688*368, 4 steps): fp8 weights, networks in system RAM while idle, and the "
        "attention caches (38 GB at this size) in system RAM, streamed to the GPU a layer at a time. "
        "The caches take about 40 GB of system RAM while a video runs; the same video as Standard "
        "with fp8 weights.",
    ),
    Preset(
        "liveavatar_long",
        "Long",
        "688*368",
        1000,
        4,
        offload=False,
        resume=True,
        note="Very long videos: up to 1000 clips (about 32 min). Every clip is decoded and written to the "
        "mp4 as soon as it is made, so memory stays flat; weights stay on the GPU (no offload). "
        "Cancel keeps a playable mp4 of every finished clip. resume is on: after a crash or a cancel, "
        "queue the same workflow again and it continues that mp4 after its last finished clip.",
    ),
    Preset(
        "liveavatar_long_upscale",
        "Long + upscale",
        "688*368",
        1000,
        4,
        offload=False,
        resume=True,
        upscale_model="RealESRGAN_x2plus.pth",
        note="The Long preset with every block upscaled as soon as it is decoded: up to 1000 clips (about "
        "32 min) at 688*368, 4 steps, written at twice the width and height by RealESRGAN x2 (put it in "
        "models/upscale_models, or pick another upscale model; rescale_factor resizes its output). "
        "Memory stays flat for any length. Watch it while it renders at /liveavatar/live/latest/ "
        "on the ComfyUI address. resume is on: queued again after a crash, it continues the mp4.",
    ),
    Preset(
        "liveavatar_hd",
        "HD",
        "704*384",
        50,
        5,
        guide_scale=5.0,
        note="The sharpest: up to 50 clips at 704*384, 5 steps, guidance 5 (negative prompt + silenced "
        "audio; twice the compute per step).",
    ),
    Preset(
        "liveavatar_core_wan_loaders",
        "Core Wan loaders",
        "688*368",
        100,
        4,
        core_loaders=True,
        note="Standard (up to 100 clips of 48 frames at 688*368, 4 steps) with the umT5, VAE and wav2vec2 "
        "that ComfyUI's own Wan nodes use: Load CLIP (type wan) + CLIP Text Encode, Load VAE and Load "
        "Audio Encoder, so a workflow beside core Wan nodes holds one umT5 in memory, not two. The "
        "LiveAvatar loader loads only the diffusion model and LoRA (its other files are 'none').",
    ),
)

COMMON_NOTE = (
    "\n\nPut the model files in ComfyUI's models folders (see the pack's README): diffusion_models, loras, "
    "text_encoders, vae, audio_encoders. Load your own portrait and speech in the two loaders. The video "
    "follows the audio: shorter speech gives a shorter video (num_clip is the upper limit; set "
    "trim_to_audio off to render every clip). 25 fps: a clip of {frames} frames is {seconds:g} s. The sampler's "
    "semantics input picks the official pipeline the video reproduces exactly (official-multi-gpu here; "
    "official-single-gpu is slower)."
)


def _nodes(p: Preset) -> list[dict]:
    """(id, type, position, size, widgets, inputs {name: (type, from id, from slot)}, outputs [(name, type)])."""
    model = [
        MODEL_FILES["diffusion_model"],
        MODEL_FILES["lora"],
        1.0,
        MODEL_FILES["text_encoder"],
        MODEL_FILES["vae"],
        MODEL_FILES["audio_encoder"],
        p.weight_dtype,
        p.offload,
        p.compile,
    ]
    sampler = [
        p.size,
        "exact",
        p.num_clip,
        p.steps,
        p.infer_frames,
        "euler",
        p.guide_scale,
        42,
        "fixed",
        True,
        p.gpus,
        p.semantics,
        p.sink_roll,
        p.noise,
        p.kv_cache,
    ]
    nodes = [
        dict(
            id=1,
            type="LoadLiveAvatarModel",
            pos=[40, 60],
            size=[360, 266],
            widgets=model,
            inputs={},
            outputs=[("model", "LIVEAVATAR_MODEL")],
        ),
        dict(
            id=2,
            type="LoadImage",
            pos=[40, 380],
            size=[320, 360],
            widgets=[PORTRAIT, "image"],
            inputs={},
            outputs=[("IMAGE", "IMAGE"), ("MASK", "MASK")],
        ),
        dict(
            id=3,
            type="LoadAudio",
            pos=[40, 790],
            size=[320, 140],
            widgets=[SPEECH, None, None],
            inputs={},
            outputs=[("AUDIO", "AUDIO")],
        ),
        dict(
            id=4,
            type="EncodeAudio",
            pos=[450, 620],
            size=[300, 120],
            widgets=[p.infer_frames],
            inputs={"model": ("LIVEAVATAR_MODEL", 1, 0), "audio": ("AUDIO", 3, 0)},
            outputs=[
                ("audio_features", "LIVEAVATAR_AUDIO"),
                ("audio", "AUDIO"),
                ("num_clip", "INT"),
                ("num_frames", "INT"),
            ],
        ),
        dict(
            id=5,
            type="EncodePrompt",
            pos=[450, 60],
            size=[400, 300],
            widgets=[PROMPT, ""],
            inputs={"model": ("LIVEAVATAR_MODEL", 1, 0)},
            outputs=[("prompt", "LIVEAVATAR_PROMPT")],
        ),
        dict(
            id=6,
            type="LiveAvatarSampler",
            pos=[900, 60],
            size=[340, 514],
            widgets=sampler,
            inputs={
                "model": ("LIVEAVATAR_MODEL", 1, 0),
                "image": ("IMAGE", 2, 0),
                "audio_features": ("LIVEAVATAR_AUDIO", 4, 0),
                "prompt": ("LIVEAVATAR_PROMPT", 5, 0),
            },
            outputs=[("video_stream", "LIVEAVATAR_VIDEO_STREAM")],
        ),
    ]
    stream_from, decode_x = 6, 1290
    if p.upscale_model:
        nodes += [
            dict(
                id=8,
                type="UpscaleModelLoader",
                pos=[1290, 300],
                size=[320, 80],
                widgets=[p.upscale_model],
                inputs={},
                outputs=[("UPSCALE_MODEL", "UPSCALE_MODEL")],
            ),
            dict(
                id=9,
                type="LiveAvatarStreamUpscale",
                pos=[1290, 60],
                size=[320, 110],
                widgets=[p.rescale_factor],
                inputs={"video_stream": ("LIVEAVATAR_VIDEO_STREAM", 6, 0), "upscale_model": ("UPSCALE_MODEL", 8, 0)},
                outputs=[("video_stream", "LIVEAVATAR_VIDEO_STREAM")],
            ),
        ]
        stream_from, decode_x = 9, 1660
    nodes.append(
        dict(  # last: it runs the stream
            id=7,
            type="OnlineVAEDecode",
            pos=[decode_x, 60],
            size=[360, 420],
            widgets=["mp4", f"LiveAvatar/{p.name.removeprefix('liveavatar_')}", 19, p.resume],
            inputs={"video_stream": ("LIVEAVATAR_VIDEO_STREAM", stream_from, 0)},
            outputs=[("frames", "IMAGE"), ("audio", "AUDIO"), ("video", "VIDEO"), ("mp4_path", "STRING")],
        )
    )
    return _with_core_loaders(nodes) if p.core_loaders else nodes


def _with_core_loaders(nodes: list[dict]) -> list[dict]:
    """The same graph with umT5, the VAE and wav2vec2 from ComfyUI's own loader nodes."""
    by_id = {n["id"]: n for n in nodes}
    loader, encode_audio = by_id[1], by_id[4]
    loader["widgets"] = [
        loader["widgets"][0],
        loader["widgets"][1],
        loader["widgets"][2],
        "none",
        "none",
        "none",
        *loader["widgets"][6:],
    ]
    loader["inputs"] = {"vae_model": ("VAE", 10, 0), "audio_encoder_model": ("AUDIO_ENCODER", 11, 0)}
    loader["pos"] = [40, 400]
    encode_audio["inputs"] = encode_audio["inputs"] | {"audio_encoder_output": ("AUDIO_ENCODER_OUTPUT", 12, 0)}
    by_id[2]["pos"], by_id[3]["pos"] = [40, 740], [40, 1150]
    by_id[5] = dict(
        id=5,
        type="LiveAvatarPromptFromConditioning",
        pos=[450, 400],
        size=[320, 80],
        widgets=[],
        inputs={"model": ("LIVEAVATAR_MODEL", 1, 0), "positive": ("CONDITIONING", 9, 0)},
        outputs=[("prompt", "LIVEAVATAR_PROMPT")],
    )
    return list(by_id.values()) + [
        dict(
            id=8,
            type="CLIPLoader",
            pos=[40, 60],
            size=[320, 110],
            widgets=[MODEL_FILES["text_encoder"], "wan", "default"],
            inputs={},
            outputs=[("CLIP", "CLIP")],
        ),
        dict(
            id=9,
            type="CLIPTextEncode",
            pos=[450, 60],
            size=[400, 300],
            widgets=[PROMPT],
            inputs={"clip": ("CLIP", 8, 0)},
            outputs=[("CONDITIONING", "CONDITIONING")],
        ),
        dict(
            id=10,
            type="VAELoader",
            pos=[40, 210],
            size=[320, 60],
            widgets=[MODEL_FILES["vae"]],
            inputs={},
            outputs=[("VAE", "VAE")],
        ),
        dict(
            id=11,
            type="AudioEncoderLoader",
            pos=[40, 300],
            size=[320, 60],
            widgets=[MODEL_FILES["audio_encoder"]],
            inputs={},
            outputs=[("AUDIO_ENCODER", "AUDIO_ENCODER")],
        ),
        dict(
            id=12,
            type="AudioEncoderEncode",
            pos=[450, 800],
            size=[260, 50],
            widgets=[],
            inputs={"audio_encoder": ("AUDIO_ENCODER", 11, 0), "audio": ("AUDIO", 3, 0)},
            outputs=[("AUDIO_ENCODER_OUTPUT", "AUDIO_ENCODER_OUTPUT")],
        ),
    ]


# Widget order of each node's inputs, for the API format (the UI format is positional).
WIDGET_NAMES = {
    "LoadLiveAvatarModel": [
        "diffusion_model",
        "lora",
        "lora_strength",
        "text_encoder",
        "vae",
        "audio_encoder",
        "weight_dtype",
        "offload_model",
        "compile",
    ],
    "LoadImage": ["image", None],
    "LoadAudio": ["audio", None, None],
    "EncodeAudio": ["infer_frames"],
    "EncodePrompt": ["prompt", "negative_prompt"],
    "LiveAvatarSampler": [
        "size",
        "size_mode",
        "num_clip",
        "sample_steps",
        "infer_frames",
        "sample_solver",
        "sample_guide_scale",
        "seed",
        None,
        "trim_to_audio",
        "gpus",
        "semantics",
        "sink_roll",
        "noise",
        "kv_cache",
    ],
    "OnlineVAEDecode": ["output", "filename_prefix", "crf", "resume"],
    "UpscaleModelLoader": ["model_name"],
    "LiveAvatarStreamUpscale": ["rescale_factor"],
    "LiveAvatarPromptFromConditioning": [],
    "CLIPLoader": ["clip_name", "type", "device"],
    "CLIPTextEncode": ["text"],
    "VAELoader": ["vae_name"],
    "AudioEncoderLoader": ["audio_encoder_name"],
    "AudioEncoderEncode": [],
}


def ui_workflow(p: Preset) -> dict:
    nodes, links = [], []
    specs = _nodes(p)
    outgoing: dict[tuple[int, int], list[int]] = {}
    for spec in specs:
        for name, (kind, src, slot) in spec["inputs"].items():
            link_id = len(links) + 1
            links.append([link_id, src, slot, spec["id"], list(spec["inputs"]).index(name), kind])
            outgoing.setdefault((src, slot), []).append(link_id)
    for order, spec in enumerate(specs):
        inputs = [
            {
                "name": name,
                "type": kind,
                "link": next(link[0] for link in links if link[3] == spec["id"] and link[4] == i),
            }
            for i, (name, (kind, _, _)) in enumerate(spec["inputs"].items())
        ]
        outputs = [
            {"name": name, "type": kind, "links": outgoing.get((spec["id"], slot), []), "slot_index": slot}
            for slot, (name, kind) in enumerate(spec["outputs"])
        ]
        nodes.append(
            {
                "id": spec["id"],
                "type": spec["type"],
                "pos": spec["pos"],
                "size": spec["size"],
                "flags": {},
                "order": order,
                "mode": 0,
                "inputs": inputs,
                "outputs": outputs,
                "properties": {"Node name for S&R": spec["type"]},
                "widgets_values": spec["widgets"],
            }
        )
    note_id = len(specs) + 1
    nodes.append(
        {
            "id": note_id,
            "type": "Note",
            "pos": [900, 530],
            "size": [400, 260],
            "flags": {},
            "order": len(specs),
            "mode": 0,
            "inputs": [],
            "outputs": [],
            "properties": {"text": ""},
            "widgets_values": [
                f"LiveAvatar {p.title} preset\n\n{p.note}"
                + COMMON_NOTE.format(frames=p.infer_frames, seconds=p.infer_frames / 25)
            ],
            "color": "#432",
            "bgcolor": "#653",
        }
    )
    return {
        "last_node_id": note_id,
        "last_link_id": len(links),
        "nodes": nodes,
        "links": links,
        "groups": [],
        "config": {},
        "extra": {"ds": {"scale": 0.75, "offset": [80, 120]}},
        "version": 0.4,
    }


def api_workflow(p: Preset) -> dict:
    prompt = {}
    for spec in _nodes(p):
        inputs = {name: value for name, value in zip(WIDGET_NAMES[spec["type"]], spec["widgets"]) if name}
        inputs.update({name: [str(src), slot] for name, (_, src, slot) in spec["inputs"].items()})
        prompt[str(spec["id"])] = {"class_type": spec["type"], "inputs": inputs, "_meta": {"title": spec["type"]}}
    return prompt


def render_all() -> dict[Path, str]:
    files = {}
    for p in PRESETS:
        files[UI_DIR / f"{p.name}.json"] = json.dumps(ui_workflow(p), indent=2, ensure_ascii=False) + "\n"
        files[API_DIR / f"{p.name}_api.json"] = json.dumps(api_workflow(p), indent=2, ensure_ascii=False) + "\n"
    return files


def main() -> None:
    API_DIR.mkdir(parents=True, exist_ok=True)
    for path, text in render_all().items():
        path.write_text(text)
        print(path.relative_to(ROOT))


if __name__ == "__main__":
    main()
