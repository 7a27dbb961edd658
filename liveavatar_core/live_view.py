"""Watching a video while it renders: its finished clips, read back from the mp4 being written.

The streaming writer makes a fragmented mp4: a header (ftyp+moov), then one fragment (moof+mdat)
per clip, each starting on a keyframe and holding its audio. Every fragment on disk in full is a
playable segment, so a live view needs no second encoder: `segments` lists them by reading the
box headers of the file, and `hls_playlist` turns the list into an HLS playlist whose segments
are byte ranges of that same file (VLC, ffplay, Safari and hls.js play it). Browsers play it
through Media Source Extensions (the pack's web/live.html), fed from the same list.

`LiveRuns` keeps which renders there are and whether each is still running, so a playlist
ends (#EXT-X-ENDLIST) once its run finished, was cancelled or failed.
"""

from __future__ import annotations

import contextlib
import math
import struct
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

RUNNING, FINISHED, CANCELLED, FAILED = "running", "finished", "cancelled", "failed"
KEPT_RUNS = 20  # the newest runs stay listed; older ones are forgotten (their files stay)


@dataclass(frozen=True)
class Segment:
    offset: int
    size: int
    frames: int  # video frames in it


@dataclass(frozen=True)
class FileLayout:
    """What of the mp4 is on disk in full: the header's byte range and the whole fragments."""

    header: tuple[int, int] | None  # (offset, size), None before the first clip is written
    segments: tuple[Segment, ...] = ()
    codecs: str = ""  # RFC 6381 codecs of the tracks, e.g. 'avc1.64001e,mp4a.40.2'


def _boxes(file, start: int, end: int):
    """(type, offset, size) of the boxes in [start, end) whose whole extent lies before `end`."""
    position = start
    while position + 8 <= end:
        file.seek(position)
        head = file.read(16)
        if len(head) < 8:
            return
        size, kind = struct.unpack_from(">I4s", head)
        if size == 1 and len(head) >= 16:
            size = struct.unpack_from(">Q", head, 8)[0]
        elif size == 0:
            size = end - position
        if size < 8 or position + size > end:
            return  # being written, or not a box: nothing after it is whole yet
        yield kind, position, size
        position += size


def _video_track_id(file, offset: int, size: int) -> int | None:
    """The track ID of the moov's video track (its handler is 'vide')."""
    for kind, trak, trak_size in _boxes(file, offset + 8, offset + size):
        if kind != b"trak":
            continue
        track_id, handler = None, None
        for child, child_offset, child_size in _boxes(file, trak + 8, trak + trak_size):
            if child == b"tkhd":
                file.seek(child_offset + 8)
                version = file.read(1)[0]
                file.seek(child_offset + 8 + 4 + (16 if version == 1 else 8))
                track_id = struct.unpack(">I", file.read(4))[0]
            elif child == b"mdia":
                for leaf, leaf_offset, _ in _boxes(file, child_offset + 8, child_offset + child_size):
                    if leaf == b"hdlr":
                        file.seek(leaf_offset + 16)
                        handler = file.read(4)
        if handler == b"vide":
            return track_id
    return None


def _video_frames_in(file, offset: int, size: int, video_track: int | None) -> int:
    """Samples of the video track in a moof (its trun sample counts)."""
    frames = 0
    for kind, traf, traf_size in _boxes(file, offset + 8, offset + size):
        if kind != b"traf":
            continue
        track, count = None, 0
        for child, child_offset, _ in _boxes(file, traf + 8, traf + traf_size):
            file.seek(child_offset + 12)
            if child == b"tfhd":
                track = struct.unpack(">I", file.read(4))[0]
            elif child == b"trun":
                count += struct.unpack(">I", file.read(4))[0]
        if video_track is None or track == video_track:
            frames += count
    return frames


def read_layout(path: str | Path) -> FileLayout:
    """The header and the whole fragments of a (possibly growing) fragmented mp4."""
    path = Path(path)
    try:
        file = open(path, "rb")
    except FileNotFoundError:
        return FileLayout(None)
    with file:
        end = path.stat().st_size
        header_end, video_track, segments, moof = None, None, [], None
        for kind, offset, size in _boxes(file, 0, end):
            if kind == b"moov":
                header_end = offset + size
                video_track = _video_track_id(file, offset, size)
            elif kind == b"moof":
                moof = (offset, size)
            elif kind == b"mdat" and moof is not None:
                frames = _video_frames_in(file, *moof, video_track)
                segments.append(Segment(moof[0], offset + size - moof[0], frames))
                moof = None
        if header_end is None:
            return FileLayout(None)
        file.seek(0)
        return FileLayout((0, header_end), tuple(segments), _codecs(file.read(header_end)))


def _codecs(header: bytes) -> str:
    """The codecs string a browser's Media Source wants, from the header's sample entries: H.264's
    profile, constraints and level are the first bytes of its avcC record."""
    codecs = []
    avcc = header.find(b"avcC")
    if avcc >= 0 and avcc + 8 <= len(header):
        codecs.append("avc1." + header[avcc + 5 : avcc + 8].hex())
    if b"mp4a" in header:
        codecs.append("mp4a.40.2")  # AAC-LC, what the writer encodes
    return ",".join(codecs)


@dataclass
class LiveRun:
    id: str
    path: Path
    fps: float
    width: int
    height: int
    started: float = field(default_factory=time.time)
    state: str = RUNNING
    ended: float | None = None

    @property
    def running(self) -> bool:
        return self.state == RUNNING

    def describe(self) -> dict:
        layout = read_layout(self.path)
        frames = sum(segment.frames for segment in layout.segments)
        return {
            "id": self.id,
            "state": self.state,
            "file": self.path.name,
            "width": self.width,
            "height": self.height,
            "fps": self.fps,
            "started": self.started,
            "ended": self.ended,
            "segments": len(layout.segments),
            "seconds": frames / self.fps,
        }


class LiveRuns:
    """The renders that can be watched, newest last; safe to use from several threads."""

    def __init__(self, kept: int = KEPT_RUNS):
        self._runs: dict[str, LiveRun] = {}
        self._lock = threading.Lock()
        self._kept = kept

    def start(self, path: str | Path, fps: float, width: int, height: int) -> LiveRun:
        run = LiveRun(uuid.uuid4().hex[:12], Path(path), float(fps), int(width), int(height))
        with self._lock:
            self._runs[run.id] = run
            while len(self._runs) > self._kept:
                oldest = next(iter(self._runs))
                if self._runs[oldest].running:
                    break
                del self._runs[oldest]
        return run

    def end(self, run: LiveRun, state: str) -> None:
        with self._lock:
            run.state, run.ended = state, time.time()

    def get(self, run_id: str) -> LiveRun | None:
        """A run by its id; 'latest' is the newest run."""
        with self._lock:
            if run_id == "latest":
                return next(reversed(self._runs.values()), None)
            return self._runs.get(run_id)

    def all(self) -> list[LiveRun]:
        with self._lock:
            return list(self._runs.values())


def hls_playlist(run: LiveRun, media_uri: str = "video.mp4") -> str:
    """An HLS playlist (version 7, fMP4) of the run's whole fragments, as byte ranges of its mp4;
    it ends with #EXT-X-ENDLIST once the run has ended. An EVENT playlist: players may start
    from the beginning, and segments are only ever added."""
    # The state is read before the file: a run that ends meanwhile is listed without its end, and
    # the next poll adds the end with every segment (a run is marked ended once its file is closed).
    ended = not run.running
    layout = read_layout(run.path)
    durations = [segment.frames / run.fps for segment in layout.segments]
    lines = [
        "#EXTM3U",
        "#EXT-X-VERSION:7",
        f"#EXT-X-TARGETDURATION:{max(1, math.ceil(max(durations, default=2)))}",
        "#EXT-X-PLAYLIST-TYPE:EVENT",
        "#EXT-X-MEDIA-SEQUENCE:0",
        "#EXT-X-INDEPENDENT-SEGMENTS",
    ]
    if layout.header is not None:
        offset, size = layout.header
        lines.append(f'#EXT-X-MAP:URI="{media_uri}",BYTERANGE="{size}@{offset}"')
        for segment, duration in zip(layout.segments, durations):
            lines += [f"#EXTINF:{duration:.3f},", f"#EXT-X-BYTERANGE:{segment.size}@{segment.offset}", media_uri]
    if ended:
        lines.append("#EXT-X-ENDLIST")
    return "\n".join(lines) + "\n"


def segment_list(run: LiveRun) -> dict:
    """The run's state and whole fragments, for the browser page's player."""
    ended = not run.running  # read before the file, as in `hls_playlist`
    layout = read_layout(run.path)
    return {
        "id": run.id,
        "state": run.state if ended else RUNNING,
        "codecs": layout.codecs,
        "fps": run.fps,
        "width": run.width,
        "height": run.height,
        "header": list(layout.header) if layout.header else None,
        "segments": [[s.offset, s.size, s.frames] for s in layout.segments],
    }


LIVE_RUNS = LiveRuns()  # this process's renders (ComfyUI renders one prompt at a time)


@contextlib.contextmanager
def watched(
    path: str | Path,
    fps: float,
    width: int,
    height: int,
    runs: LiveRuns = LIVE_RUNS,
    cancel_errors: tuple[type[BaseException], ...] = (),
):
    """Lists a render in `runs` while the block runs; its end is marked when the block is left
    (after the writer has closed the file): finished, cancelled (GenerationCancelled or one of
    `cancel_errors`, e.g. the host's own interrupt) or failed."""
    from .streaming import GenerationCancelled

    run = runs.start(path, fps, width, height)
    try:
        yield run
    except (GenerationCancelled, *cancel_errors):
        runs.end(run, CANCELLED)
        raise
    except BaseException:
        runs.end(run, FAILED)
        raise
    runs.end(run, FINISHED)
