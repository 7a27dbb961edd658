"""OnlineVAEDecode: runs the video stream, decoding each block as soon as it is denoised, into
an mp4 written clip by clip and/or frames for other image nodes."""

from __future__ import annotations

import contextlib

from liveavatar_core.errors import InputError, LiveAvatarError
from liveavatar_core.generation import render
from liveavatar_core.live_view import watched
from liveavatar_core.pipeline import FPS
from liveavatar_core.resume import check_resumable, find_resumable, job_inputs, steps_done
from liveavatar_core.streaming import GenerationCancelled

from . import comfy_bridge, live_routes
from .types import CATEGORY, VIDEO_STREAM

OUTPUT_MODES = ("mp4", "frames", "mp4 + frames")


class OnlineVAEDecode:
    DISPLAY_NAME = "LiveAvatar Online VAE Decode"
    DESCRIPTION = (
        "Generates the video and decodes it block by block with the causal VAE. 'mp4' streams every "
        "clip to a file as it is made, so memory stays flat for any length and a cancelled run keeps "
        "a playable file; with resume on, a later run with the same inputs continues it after its last "
        "finished clip. 'frames' returns IMAGE frames for upscale or face-restore nodes. With the "
        "sampler's gpus > 1, warm worker processes (one per GPU) do the work and progress advances per block."
    )
    CATEGORY = CATEGORY
    OUTPUT_NODE = True
    RETURN_TYPES = ("IMAGE", "AUDIO", "VIDEO", "STRING")
    RETURN_NAMES = ("frames", "audio", "video", "mp4_path")
    OUTPUT_TOOLTIPS = (
        "The video's frames (in 'mp4' mode only the last frame, to keep memory flat).",
        "The audio under these frames, starting at the first frame (for Create Video).",
        "The video with its audio (the mp4 file, or the frames in 'frames' mode) for Save Video.",
        "Where the mp4 was written (empty in 'frames' mode).",
    )
    FUNCTION = "decode"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "video_stream": (VIDEO_STREAM, {"tooltip": "From LiveAvatar Sampler."}),
                "output": (
                    list(OUTPUT_MODES),
                    {
                        "default": "mp4",
                        "tooltip": "mp4: stream to a file in the output folder (any length). frames: keep every "
                        "frame in RAM (about 3 MB per 688*368 frame: fine for a few clips, not for "
                        "hundreds). mp4 + frames: both.",
                    },
                ),
                "filename_prefix": (
                    "STRING",
                    {"default": "LiveAvatar/avatar", "tooltip": "Where in the output folder the mp4 goes."},
                ),
                "crf": (
                    "INT",
                    {
                        "default": 19,
                        "min": 0,
                        "max": 51,
                        "tooltip": "H.264 quality: lower is better and bigger; 17-23 is the usual range.",
                    },
                ),
            },
            # Optional, so API prompts written before it existed still run.
            "optional": {
                "resume": (
                    "BOOLEAN",
                    {
                        "default": False,
                        "tooltip": "Continue the unfinished mp4 of an earlier run with the same inputs (one that "
                        "crashed, was killed or cancelled) after its last finished clip, appending to "
                        "it; with none, a new video starts. Changed inputs are refused, naming what "
                        "differs. 'mp4' output, gpus 1, official-multi-gpu semantics.",
                    },
                ),
            },
        }

    def decode(self, video_stream, output, filename_prefix, crf, resume=False):
        job = video_stream
        if resume and output != "mp4":
            raise InputError(
                f"resume continues an mp4, but output is {output!r}: set output to 'mp4', or turn "
                "resume off (the frames of the clips made before are not in memory)."
            )
        mp4 = file = subfolder = point = None
        if resume:
            check_resumable(job)
            folder, name, subfolder = comfy_bridge.output_folder(filename_prefix, job.width, job.height)
            point = find_resumable(folder, name, job_inputs(job, crf))  # before any compute
            if point is not None:
                mp4, file = point.mp4, point.mp4.name
        comfy_bridge.make_room_for_run(job)
        progress = comfy_bridge.NodeProgress(job.total_steps)
        if point is not None:
            progress.steps = steps_done(job, point.clips_done)  # the bar starts where the video stopped
        elif output != "frames":
            mp4, file, subfolder = comfy_bridge.new_output_file(filename_prefix, job.width, job.height, "mp4")
        saved = {"filename": file, "subfolder": subfolder, "type": "output"}
        try:
            with self._live_view(mp4, job):
                result = render(
                    job,
                    mp4,
                    keep_frames=output != "mp4",
                    progress=progress.on_step,
                    should_stop=comfy_bridge.cancel_requested,
                    on_frames=progress.on_frames,
                    crf=crf,
                    resume=point is not None,
                )
        except GenerationCancelled:
            self._show_kept(mp4, saved)
            raise comfy_bridge.interrupted_error() from None
        except LiveAvatarError as err:
            if not self._show_kept(mp4, saved):
                raise
            # The same error, naming the playable file with every clip finished before it.
            raise type(err)(f"{err} The clips made before it are kept in {mp4}.") from None
        audio = {
            "waveform": job.rendered_audio(result.frames_written)[None].contiguous(),
            "sample_rate": job.audio.sample_rate,
        }
        if mp4 is None:
            video = comfy_bridge.video_from_frames(result.frames, audio, FPS)
        else:
            video = comfy_bridge.video_from_file(mp4)
        outputs = (result.frames, audio, video, "" if mp4 is None else str(mp4))
        if mp4 is None:
            return outputs
        return {"ui": self._ui(saved), "result": outputs}

    @staticmethod
    @contextlib.contextmanager
    def _live_view(mp4, job):
        """The mp4 can be watched while it is written (see `live_routes`)."""
        if mp4 is None:
            yield
            return
        with watched(mp4, FPS, job.width, job.height, cancel_errors=live_routes.cancel_errors()) as run:
            live_routes.announce(run.id)
            yield

    @staticmethod
    def _ui(saved: dict) -> dict:
        return {"images": [saved], "animated": (True,)}

    def _show_kept(self, mp4, saved: dict) -> bool:
        """After a stop or failure: shows the kept partial mp4 on the node, if one was made."""
        if mp4 is None or not mp4.exists():
            return False
        comfy_bridge.show_output_on_node(self._ui(saved))
        return True
