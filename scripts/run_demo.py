"""The main job on the embedded default model: starts a real ComfyUI with this pack, runs the
Preview workflow through the HTTP API and prints where the mp4 is.

The default model is tiny and trained by the pack (copied by `liveavatar_core.default_models`):
the video shows the portrait blurred, its mouth moving with the speech, not a real avatar. Put the real weights in the models folders
(README) and pick them in the workflow's loader for real videos.

    python scripts/run_demo.py [--base out/demo] [--preset liveavatar_preview] [--num-clip N]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from comfyui_client import ComfyUIServer, copy_example_media  # noqa: E402

from liveavatar_core.default_models import DEFAULT_FILES, has_default_models, write_default_models  # noqa: E402

LOADER_WIDGETS = {
    "diffusion_models": "diffusion_model",
    "loras": "lora",
    "text_encoders": "text_encoder",
    "vae": "vae",
    "audio_encoders": "audio_encoder",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=Path, default=ROOT / "out" / "demo", help="ComfyUI base folder to use")
    parser.add_argument("--preset", default="liveavatar_preview", help="workflow in workflows/api/ (without _api.json)")
    parser.add_argument("--num-clip", type=int, default=None, help="override the preset's clip count")
    args = parser.parse_args()

    base = args.base.resolve()
    models = base / "models"
    if not has_default_models(models):
        print(f"copying the embedded default model to {models}")
        write_default_models(models)
    prompt = json.loads((ROOT / "workflows" / "api" / f"{args.preset}_api.json").read_text())
    for node in prompt.values():
        if node["class_type"] == "LoadLiveAvatarModel":
            node["inputs"].update({widget: DEFAULT_FILES[folder] for folder, widget in LOADER_WIDGETS.items()})
        if node["class_type"] == "LiveAvatarSampler" and args.num_clip:
            node["inputs"]["num_clip"] = args.num_clip

    print(f"starting ComfyUI in {base} ...", flush=True)
    with ComfyUIServer(base) as server:
        (base / "models").mkdir(exist_ok=True)
        copy_example_media(base)
        print(f"ComfyUI is up at {server.url}; running {args.preset} through POST /prompt", flush=True)
        started = time.monotonic()

        def show(message):
            if message.get("type") == "progress":
                data = message["data"]
                print(f"\r  node {data['node']}: step {data['value']}/{data['max']}", end="", flush=True)

        execution = server.run(prompt, on_message=show)
        print()
        if not execution.ok:
            error = execution.error()
            sys.exit(
                f"the workflow failed: {error.get('exception_type')}: {error.get('exception_message')}\n"
                f"(ComfyUI's log: {server.log_path})"
            )
        decode_id = next(k for k, v in prompt.items() if v["class_type"] == "OnlineVAEDecode")
        saved = execution.outputs(decode_id)["images"][0]
        mp4 = base / "output" / saved["subfolder"] / saved["filename"]
        print(f"done in {time.monotonic() - started:.1f} s")
        print(mp4)


if __name__ == "__main__":
    main()
