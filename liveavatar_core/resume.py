"""Resuming a run after a crash: a sidecar beside the mp4 says what the next clip needs.

After every clip that is on disk, the run writes `<video>.resume.json` (the job's inputs, the
clips, frames and bytes written), `<video>.resume-<clips>.safetensors` (the state after that
clip) and `<video>.resume-clip-<clip>.safetensors` (that clip's DiT inputs, kept while a resume
needs them). A later run with the same inputs and resume on continues after the last finished
clip and appends to the same mp4; a finished run removes its sidecar.

What crosses a clip boundary, and how a resumed run rebuilds it, bit for bit:

- The sink: clip 0's first latent (recorded) and the motion latents (encoded from the portrait
  again, as every run does).
- The per-step key/value caches (38 GiB at 688*368, not recorded): every block attends to one
  clip of frames before it, so their content reaches back a bounded number of clips
  (`replay_clips`: 37 for the 40-layer DiT at 48 frames per clip). A resumed run repeats
  those clips' DiT calls on the latents each step was given (recorded, in the DiT's input
  dtype, which its first layer casts to anyway), which refills every cached value the next
  clip reads exactly.
- The online decoder's causal-convolution caches: its state after a latent depends only on a
  bounded window of latents before it (`WanVAE.decoder_memory`), so a fresh decoder fed the
  last that many (recorded) is in the same state.
- Noise and sink distances are functions of (seed, clip, block, step): nothing to record.

The mp4 is a fragmented MP4 (see `video_writer`); a resumed run truncates it to the bytes the
sidecar counted (dropping a clip half written when the run died) and appends. The sidecar is
written after its clip's fragment is synced to disk, its tensors before the json that names
them, so a kill at any moment leaves a consistent set.
"""

from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import threading
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .atomic_files import write_atomically
from .errors import InputError
from .file_stamps import file_stamp
from .run_spec import RunSpec, WorkItem
from .time_grid import clip_features

if TYPE_CHECKING:  # the writer needs PyAV; the pipeline (and a benchmark without PyAV) imports this module
    from .video_writer import WrittenPart

FORMAT_VERSION = 1
SIDECAR_SUFFIX = ".resume.json"


# -- the job's inputs -----------------------------------------------------------------------
def tensor_digest(tensor: torch.Tensor | None) -> str:
    """A digest of a tensor's shape, dtype and bytes ('none' for None)."""
    if tensor is None:
        return "none"
    tensor = tensor.detach().cpu().contiguous()
    digest = hashlib.blake2b(f"{tuple(tensor.shape)}:{tensor.dtype}:".encode(), digest_size=16)
    digest.update(tensor.reshape(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()


def module_digest(module: torch.nn.Module) -> str:
    """A digest of a network's weights (e.g. a stream transform's `model_identity`)."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(f"{name}={tensor_digest(tensor)};".encode())
    return digest.hexdigest()


def job_inputs(job, crf: int) -> dict[str, str]:
    """Everything that decides a job's video, by name: digests of the tensors, the settings'
    values, the model files' stamps, the stream transforms. Two jobs with equal entries make
    the same frames."""
    transforms = []
    while hasattr(job, "transform"):
        transforms.append(job.transform)
        job = job.source
    spec, audio, models = job.spec, job.audio, job.models
    settings = spec.settings
    files = models.files
    entries = {
        "portrait": tensor_digest(spec.reference),
        "audio": tensor_digest(spec.audio_features),
        "audio track": f"{tensor_digest(audio.track)}@{audio.sample_rate}",
        "prompt": tensor_digest(spec.context),
        "negative prompt": tensor_digest(spec.negative_context) if settings.guide_scale > 0 else "unused",
        "size": f"{spec.width}*{spec.height}",
        "clips": str(spec.clips),
        "frames": str(spec.frames),
        "trim_to_audio": str(spec.trim_to_audio),
        "semantics": spec.semantics.name,
        "sink_roll": str(spec.semantics.sink_roll),
        "sample_steps": str(settings.sample_steps),
        "infer_frames": str(settings.infer_frames),
        "sample_solver": settings.sample_solver,
        "sample_guide_scale": str(settings.guide_scale),
        "seed": str(settings.seed),
        "shift": str(settings.shift),
        "sink_distance": str(settings.sink_distance),
        "noise": settings.noise,
        "crf": str(crf),
        "weight dtype": str(models.precision.weights),
        "diffusion model": "given in memory" if files is None else file_stamp(files.dit),
        "lora": "given in memory" if files is None else f"{file_stamp(files.lora)}@{files.lora_strength}",
        "vae": "given in memory" if files is None or files.vae is None else file_stamp(files.vae),
        "stream transforms": "; ".join(t.describe() for t in reversed(transforms)) or "none",
    }
    return entries


_DIGESTS = ("portrait", "audio", "audio track", "prompt", "negative prompt")


def differences(recorded: dict[str, str], current: dict[str, str]) -> list[str]:
    """What changed, in words: settings with their two values, tensors and files by name."""
    changed = []
    for name in sorted(set(recorded) | set(current)):
        was, now = recorded.get(name, "missing"), current.get(name, "missing")
        if was == now:
            continue
        if name in _DIGESTS:
            changed.append(f"the {name} changed")
        else:
            changed.append(f"{name} was {was}, now {now}")
    return changed


# -- the sidecar ---------------------------------------------------------------------------
@dataclass
class ResumePoint:
    """A sidecar read back: where its video stopped and what the next clip needs."""

    mp4: Path
    clips_done: int
    written: WrittenPart
    inputs: dict[str, str]
    first_latent: torch.Tensor  # clip 0's first latent [1, 16, 1, h, w] (the rolled sink's reference)
    decoded: torch.Tensor  # the latest latents the decoder consumed [1, 16, n, h, w]
    step_inputs: dict[tuple[int, int], list[torch.Tensor]]  # (clip, block) -> each step's DiT latents


def replay_clips(num_layers: int, latent_frames: int, first_block: int) -> int:
    """Clips before a resume point whose DiT calls rebuild the caches exactly.

    A block attends to the latest `latent_frames` frames (one clip) and the sink; so a layer's
    keys of frame f depend on the layer below's outputs of frames f - (latent_frames - 1) .. f,
    and the top layer's on the DiT inputs of frames (num_layers - 1) * (latent_frames - 1)
    back. The next clip's first block reads cached frames from latent_frames - first_block
    before it. Repeating the calls from that far back on the recorded inputs gives every value
    it reads bit for bit."""
    reach = (num_layers - 1) * (latent_frames - 1) + latent_frames - first_block
    return max(0, math.ceil(reach / latent_frames))


def sidecar_path(mp4: str | os.PathLike) -> Path:
    mp4 = Path(mp4)
    return mp4.with_name(mp4.stem + SIDECAR_SUFFIX)


def _state_path(mp4: Path, clips_done: int) -> Path:
    return mp4.with_name(f"{mp4.stem}.resume-{clips_done:05}.safetensors")


def _clip_path(mp4: Path, clip: int) -> Path:
    return mp4.with_name(f"{mp4.stem}.resume-clip-{clip:05}.safetensors")


def _state_files(mp4: Path) -> list[Path]:
    return sorted(mp4.parent.glob(f"{glob.escape(mp4.stem)}.resume-*.safetensors"))


def remove_sidecar(mp4: str | os.PathLike) -> None:
    """Forgets a video's resume state (its run finished, or it is being replaced)."""
    mp4 = Path(mp4)
    sidecar_path(mp4).unlink(missing_ok=True)
    for path in _state_files(mp4):
        path.unlink(missing_ok=True)


def _save(path: Path, tensors: dict[str, torch.Tensor], stamp: str) -> None:
    write_atomically(path, lambda partial: save_file(tensors, str(partial), metadata={"stamp": stamp}))


def write_sidecar(
    mp4: Path, clips_done: int, written: WrittenPart, inputs: dict[str, str], state: dict, replayed: range
) -> None:
    """Writes the last clip's DiT inputs (each clip's once, in a file of its own), the state
    after it, then the json naming them; files no longer named go last. A kill at any point
    leaves the json and every file it names.

    state: 'first_latent', 'decoded' and 'inputs' ({block: [latents per step]} of clip
    clips_done - 1); replayed: the clips whose inputs a resume from here repeats."""
    clip = clips_done - 1
    clip_inputs = {
        f"input.{block:03}.{step:03}": x for block, steps in state["inputs"].items() for step, x in enumerate(steps)
    }
    if clip in replayed:
        _save(_clip_path(mp4, clip), clip_inputs, f"clip {clip}")
    state_file = _state_path(mp4, clips_done)
    _save(state_file, {"first_latent": state["first_latent"], "decoded": state["decoded"]}, f"after {clips_done}")
    names = [state_file.name] + [_clip_path(mp4, c).name for c in replayed]
    record = {
        "format": FORMAT_VERSION,
        "mp4": mp4.name,
        "clips_done": clips_done,
        "frames": written.frames,
        "fragments": written.fragments,
        "bytes": written.size,
        "state": state_file.name,
        "replayed": [replayed.start, replayed.stop],
        "inputs": inputs,
    }
    write_atomically(sidecar_path(mp4), lambda partial: partial.write_text(json.dumps(record, indent=1)))
    for old in _state_files(mp4):
        if old.name not in names:
            old.unlink(missing_ok=True)


def _damaged(sidecar: Path, reason: str) -> InputError:
    return InputError(
        f"the resume file {sidecar} is damaged ({reason}): delete it (and the files beside it "
        f"named {sidecar.name.removesuffix(SIDECAR_SUFFIX)}.resume-*) to start a new video, "
        "or turn resume off."
    )


def read_inputs(sidecar: Path) -> dict:
    """The sidecar's json (InputError naming the file and the fix when it is unreadable)."""
    try:
        record = json.loads(sidecar.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _damaged(sidecar, f"unreadable: {err}") from None
    keys = ("format", "mp4", "clips_done", "frames", "fragments", "bytes", "state", "replayed", "inputs")
    if not isinstance(record, dict) or any(key not in record for key in keys):
        raise _damaged(sidecar, "fields are missing")
    if record["format"] != FORMAT_VERSION:
        raise _damaged(sidecar, f"format {record['format']}, this version reads {FORMAT_VERSION}")
    return record


def _load(sidecar: Path, path: Path, stamp: str) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(path), "pt") as file:
            if (file.metadata() or {}).get("stamp") != stamp:
                raise _damaged(sidecar, f"{path.name} is not the state it names")
            return {name: file.get_tensor(name) for name in file.keys()}
    except (OSError, SafetensorError) as err:
        raise _damaged(sidecar, f"{path.name} is unreadable: {err}") from None


def read_sidecar(sidecar: Path) -> ResumePoint:
    record = read_inputs(sidecar)
    mp4 = sidecar.with_name(record["mp4"])
    from .video_writer import WrittenPart

    written = WrittenPart(int(record["frames"]), int(record["fragments"]), int(record["bytes"]))
    clips_done = int(record["clips_done"])
    if not mp4.is_file():
        raise _damaged(sidecar, f"its video {mp4.name} is gone")
    if mp4.stat().st_size < written.size:
        raise _damaged(
            sidecar, f"{mp4.name} holds {mp4.stat().st_size} bytes, fewer than the {written.size} it recorded"
        )
    state = _load(sidecar, sidecar.with_name(record["state"]), f"after {clips_done}")
    if "first_latent" not in state or "decoded" not in state:
        raise _damaged(sidecar, f"{record['state']} lacks the decoder's latents")
    step_inputs: dict[tuple[int, int], list[torch.Tensor]] = {}
    for clip in range(*record["replayed"]):
        tensors = _load(sidecar, _clip_path(mp4, clip), f"clip {clip}")
        for name in sorted(tensors):
            _, block, _ = name.split(".")
            step_inputs.setdefault((clip, int(block)), []).append(tensors[name])
    return ResumePoint(mp4, clips_done, written, record["inputs"], state["first_latent"], state["decoded"], step_inputs)


def find_resumable(folder: str | os.PathLike, name: str, inputs: dict[str, str]) -> ResumePoint | None:
    """The unfinished video named `<name>_<counter>_.mp4` in `folder` whose inputs are `inputs`
    (the newest when several), or None when there is none to continue.

    InputError when there are unfinished videos but none of them has these inputs: it names
    what differs from the newest one and the fix (the run would otherwise start a second video
    beside the one meant to be continued)."""
    sidecars = sorted(Path(folder).glob(f"{glob.escape(name)}_*_{SIDECAR_SUFFIX}"), reverse=True)
    newest = None
    for sidecar in sidecars:
        record = read_inputs(sidecar)
        if record["inputs"] == inputs:
            return read_sidecar(sidecar)
        newest = newest or (sidecar, record)
    if newest is None:
        return None
    raise _mismatch(*newest, inputs)


def resume_point(mp4: str | os.PathLike, inputs: dict[str, str]) -> ResumePoint | None:
    """Where the unfinished video `mp4` stopped, or None when it has no sidecar (then a run
    makes it anew); InputError when its inputs were others (naming what differs) or its
    sidecar is damaged."""
    sidecar = sidecar_path(mp4)
    if not sidecar.exists():
        return None
    record = read_inputs(sidecar)
    if record["inputs"] != inputs:
        raise _mismatch(sidecar, record, inputs)
    return read_sidecar(sidecar)


def _mismatch(sidecar: Path, record: dict, inputs: dict[str, str]) -> InputError:
    changed = "; ".join(differences(record["inputs"], inputs))
    return InputError(
        f"resume: the inputs differ from those of the unfinished video {record['mp4']} ({record['clips_done']} "
        f"clips done): {changed}. Give the same inputs to continue it, turn resume off to start a new video, "
        f"or delete {sidecar.name} to forget it."
    )


def steps_done(job, clips_done: int) -> int:
    """DiT steps of the clips a resumed run skips (where its progress bar starts)."""
    spec = _base(job).spec
    return sum(item.clip < clips_done for item in spec.schedule.items) * spec.settings.sample_steps


def _base(job):
    while hasattr(job, "transform"):  # a TransformedJob wrapping the job below it
        job = job.source
    return job


def records(job) -> bool:
    """Whether a run of `job` can leave resume state (one process, official-multi-gpu)."""
    spec = _base(job).spec
    return spec.gpus == 1 and spec.semantics.name == "official-multi-gpu"


def journal_for(job, mp4: str | os.PathLike, crf: int, resume: bool) -> ClipJournal | None:
    """The journal of a run of `job` into `mp4`: continuing its sidecar with `resume` (if it
    has one), else starting it anew; None when such runs record nothing."""
    if resume:
        check_resumable(job)
    elif not records(job):
        return None
    inputs = job_inputs(job, crf)
    point = resume_point(mp4, inputs) if resume else None
    if point is None:
        remove_sidecar(mp4)  # a new video at this path: older state is void
    return ClipJournal(mp4, inputs, point)


def check_resumable(job) -> None:
    """InputError, before any compute, for runs a resume cannot continue."""
    job = _base(job)
    if job.spec.gpus > 1:
        raise InputError(
            "resume works in one process: set gpus to 1 (worker processes record no resume state), or turn resume off."
        )
    if job.spec.semantics.name != "official-multi-gpu":
        raise InputError(
            f"resume works with the official-multi-gpu semantics, not {job.spec.semantics.name} "
            "(whose 365-frame motion window would have to be recorded): pick official-multi-gpu, "
            "or turn resume off."
        )


# -- during a run ---------------------------------------------------------------------------
class ClipJournal:
    """Records, while a run streams, what the clip after each finished one needs, and writes
    it beside the mp4 once that clip is on disk; with a `ResumePoint`, first rebuilds the run's
    state after the point's clips.

    The pipeline calls `begin` once its sink is filled, `on_input` and `block_done` per block;
    the mp4 writer calls `clip_written` from its thread after each clip's fragment is synced.
    Memory: one clip's DiT inputs and the decoder's window (the earlier clips' are on disk)."""

    def __init__(self, mp4: str | os.PathLike, inputs: dict[str, str], point: ResumePoint | None = None):
        self.mp4 = Path(mp4)
        self.inputs = inputs
        self.point = point
        self._steps: dict[int, dict[int, list[torch.Tensor]]] = {}  # clip -> block -> step latents
        self._decoded: deque[torch.Tensor] = deque()  # the decoder's latest latents, one frame each
        self._decoder_memory = 0
        self._replay = 0
        self._first_latent: torch.Tensor | None = None
        self._dtype = torch.float32
        self._blocks_per_clip = 0
        self._ready: dict[int, dict] = {}  # clip -> state after it, until the clip is on disk
        self._lock = threading.Lock()

    @property
    def written(self) -> WrittenPart | None:
        """What of the mp4 the resumed run keeps (None for a new video)."""
        return None if self.point is None else self.point.written

    def begin(self, sampler, video, spec: RunSpec) -> tuple[WorkItem, ...]:
        """Called after the sampler's first sink is filled; returns the work items left to run."""
        if not video.resumable:
            raise InputError(f"resume: the {spec.semantics.name} semantics records no resume state.")
        settings = spec.settings
        self._dtype = sampler.dit.model.dtype  # the DiT's first step casts its input to it: nothing is lost
        self._blocks_per_clip = spec.schedule.blocks_per_clip
        self._replay = replay_clips(sampler.dit.config.num_layers, settings.latent_frames, settings.blocks()[0][1])
        self._decoder_memory = video.vae.decoder_memory()
        if self.point is None:
            self._keep_decoded(video.decoder_prefix())
            return spec.schedule.items
        return self._rebuild(sampler, video, spec)

    def _rebuild(self, sampler, video, spec: RunSpec) -> tuple[WorkItem, ...]:
        point, schedule = self.point, spec.schedule
        done = point.clips_done
        first = max(0, done - self._replay)
        self._first_latent = point.first_latent
        video.continue_after(point.first_latent, point.decoded, point.written.frames)
        self._keep_decoded(point.decoded)
        if first > 0:
            sampler.start_caches_at(first)
            if schedule.roll_after is not None:
                sampler.replace_sink(*video.rolled_sink())
        for item in schedule.items:
            if not first <= item.clip < done:
                continue
            inputs = point.step_inputs.get((item.clip, item.block))
            if inputs is None or len(inputs) != spec.settings.sample_steps:
                raise _damaged(
                    sidecar_path(self.mp4),
                    f"the DiT inputs of clip {item.clip + 1}, block {item.block + 1} are missing",
                )
            features = clip_features(spec.audio_features, item.clip, spec.settings.infer_frames)
            sampler.replay_block(item.clip, item.block, inputs, features)
            if item == schedule.roll_after:
                sampler.replace_sink(*video.rolled_sink())
        return tuple(item for item in schedule.items if item.clip >= done)

    def on_input(self, item: WorkItem):
        """`CausalSampler.denoise`'s `on_input` for this block: keeps each step's latents."""
        steps = self._steps.setdefault(item.clip, {}).setdefault(item.block, [])
        steps.clear()

        def keep(step: int, x: torch.Tensor) -> None:
            steps.append(x.detach().to("cpu", self._dtype, copy=True))

        return keep

    def block_done(self, item: WorkItem, latents: torch.Tensor) -> None:
        """The block's clean latents, as the decoder is given them; after a clip's last block
        the state the next clip needs is set aside until the clip is on disk."""
        if item.clip == 0 and item.block == 0:
            self._first_latent = latents[:, :, :1].detach().to("cpu", torch.float32, copy=True)
        self._keep_decoded(latents)
        if item.block != self._blocks_per_clip - 1:
            return
        state = {
            "first_latent": self._first_latent,
            "decoded": torch.cat(list(self._decoded), dim=2),
            "inputs": self._steps.pop(item.clip, {}),
        }
        with self._lock:
            self._ready[item.clip] = state

    def _keep_decoded(self, latents: torch.Tensor) -> None:
        latents = latents.detach().to("cpu", torch.float32)
        for index in range(latents.shape[2]):
            self._decoded.append(latents[:, :, index : index + 1].clone())
        while len(self._decoded) > self._decoder_memory:
            self._decoded.popleft()

    def clip_written(self, clip: int, written: WrittenPart) -> None:
        """Clip `clip`'s fragment is on disk: the sidecar now vouches for it."""
        with self._lock:
            state = self._ready.pop(clip, None)
        if state is not None:
            done = clip + 1
            write_sidecar(self.mp4, done, written, self.inputs, state, range(max(0, done - self._replay), done))

    def finish(self) -> None:
        """The run finished: nothing is left to resume."""
        remove_sidecar(self.mp4)
