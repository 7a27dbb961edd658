"""Stream Upscale and Stream Face Restore: per-block post-processing of the video stream.

Each takes a video stream and gives one back whose blocks pass through a spandrel model (core's
UPSCALE_MODEL, from Load Upscale Model) as soon as they are decoded, so Online VAE Decode
writes the processed frames with flat memory for any length. They chain in any order.
"""

from __future__ import annotations

import contextlib

import torch

from liveavatar_core.face_restore import FaceRegion, FaceRestore
from liveavatar_core.stream_transforms import TransformedJob
from liveavatar_core.upscale import ModelUpscale

from .types import CATEGORY, VIDEO_STREAM

STREAM_INPUT = (VIDEO_STREAM, {"tooltip": "From LiveAvatar Sampler (or another stream node)."})


def _device():
    import comfy.model_management

    return comfy.model_management.get_torch_device()


def _held_on(model, device):
    """A context manager factory: the spandrel model on `device` while the run streams, then
    back in RAM (as core's Upscale Image (using Model) leaves it)."""

    @contextlib.contextmanager
    def held():
        model.to(device)
        try:
            yield
        finally:
            model.to("cpu")

    return held


def _identity(model) -> str:
    """Its weights' digest: a resumed run checks that it appends frames of the same model."""
    from liveavatar_core.resume import module_digest

    network = getattr(model, "model", None)
    return module_digest(network) if isinstance(network, torch.nn.Module) else "unknown"


def _check_image_model(model, input_name: str) -> None:
    from liveavatar_core.errors import InputError

    if not callable(model) or not hasattr(model, "scale"):
        raise InputError(
            f"{input_name} is not an image model: load it with Load Upscale Model (models/upscale_models)."
        )
    if getattr(model, "input_channels", 3) != 3 or getattr(model, "output_channels", 3) != 3:
        raise InputError(f"{input_name} works on {model.input_channels}-channel images; pick an RGB model.")


class LiveAvatarStreamUpscale:
    DISPLAY_NAME = "LiveAvatar Stream Upscale"
    DESCRIPTION = (
        "Upscales every block of the video as soon as it is decoded, with an upscale model (RealESRGAN, "
        "4x-UltraSharp, ...) from Load Upscale Model. Memory stays flat for any length; the mp4 has the "
        "upscaled size. Tiles as Upscale Image (using Model) does when GPU memory is short."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = (VIDEO_STREAM,)
    RETURN_NAMES = ("video_stream",)
    OUTPUT_TOOLTIPS = ("The upscaled video stream, for Online VAE Decode (or another stream node).",)
    FUNCTION = "wrap"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "video_stream": STREAM_INPUT,
                "upscale_model": ("UPSCALE_MODEL", {"tooltip": "From Load Upscale Model."}),
                "rescale_factor": (
                    "FLOAT",
                    {
                        "default": 1.0,
                        "min": 0.05,
                        "max": 8.0,
                        "step": 0.05,
                        "tooltip": "Resize after the model: 1.0 keeps its size, 0.5 makes a 4x model 2x. Sides are "
                        "rounded to even numbers (H.264 needs them).",
                    },
                ),
            }
        }

    def wrap(self, video_stream, upscale_model, rescale_factor):
        import comfy.model_management
        import comfy.utils

        _check_image_model(upscale_model, "upscale_model")
        device = _device()

        def run_tiled(images, tile, overlap):
            return comfy.utils.tiled_scale(
                images,
                lambda a: upscale_model(a),
                tile_x=tile,
                tile_y=tile,
                overlap=overlap,
                upscale_amount=upscale_model.scale,
            )

        transform = ModelUpscale(
            run_tiled,
            upscale_model.scale,
            rescale_factor,
            device=device,
            on_device=_held_on(upscale_model, device),
            oom_errors=(comfy.model_management.OOM_EXCEPTION,),
        )
        transform.model_identity = _identity(upscale_model)
        return (TransformedJob(video_stream, transform),)


class LiveAvatarStreamFaceRestore:
    DISPLAY_NAME = "LiveAvatar Stream Face Restore"
    DESCRIPTION = (
        "Restores the face in every block as soon as it is decoded, with a face model (GFPGAN, CodeFormer, "
        "RestoreFormer, ...) from Load Upscale Model, and pastes it back with a soft edge. The face square "
        "is set once (a talking avatar keeps its face in place). Memory stays flat for any length."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = (VIDEO_STREAM,)
    RETURN_NAMES = ("video_stream",)
    OUTPUT_TOOLTIPS = ("The restored video stream, for Online VAE Decode (or another stream node).",)
    FUNCTION = "wrap"

    @classmethod
    def INPUT_TYPES(cls):
        fraction = {"min": 0.0, "max": 1.0, "step": 0.01}
        return {
            "required": {
                "video_stream": STREAM_INPUT,
                "face_model": ("UPSCALE_MODEL", {"tooltip": "A face model from Load Upscale Model (e.g. GFPGANv1.4)."}),
                "center_x": (
                    "FLOAT",
                    {"default": 0.5, **fraction, "tooltip": "The face's centre, as a fraction of the width."},
                ),
                "center_y": (
                    "FLOAT",
                    {"default": 0.4, **fraction, "tooltip": "The face's centre, as a fraction of the height."},
                ),
                "face_size": (
                    "FLOAT",
                    {
                        "default": 0.6,
                        "min": 0.05,
                        "max": 1.0,
                        "step": 0.01,
                        "tooltip": "The face square's side, as a fraction of the shorter side.",
                    },
                ),
                "strength": (
                    "FLOAT",
                    {"default": 1.0, **fraction, "tooltip": "1 = the restored face, 0.5 = half-way, 0 = untouched."},
                ),
            }
        }

    def wrap(self, video_stream, face_model, center_x, center_y, face_size, strength):
        _check_image_model(face_model, "face_model")
        device = _device()
        # Face models (GFPGAN, CodeFormer) were trained on 512*512 aligned faces; other restoration
        # models take the square at its own size.
        input_size = None
        if getattr(face_model, "purpose", None) == "FaceSR":
            input_size = max(512, getattr(getattr(face_model, "size_requirements", None), "minimum", 0) or 0)
        transform = FaceRestore(
            lambda faces: face_model(faces),
            FaceRegion(center_x, center_y, face_size),
            input_size=input_size,
            strength=strength,
            device=device,
            on_device=_held_on(face_model, device),
        )
        transform.model_identity = _identity(face_model)
        return (TransformedJob(video_stream, transform),)
