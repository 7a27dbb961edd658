"""Streaming MP4 output: each clip goes to disk, with its audio, as soon as it is decoded.

A run that is stopped, crashes or is killed leaves a playable MP4 holding every finished clip,
and a run killed before its first clip leaves no MP4 at all: the file appears, by a rename,
only once its header and first fragment are on disk.
The file is a fragmented MP4 (H.264 yuv420p + AAC): a header (ftyp+moov) and then one fragment
(moof+mdat) per clip, each starting on a keyframe.

Why one short-lived muxer per clip: FFmpeg's MP4 muxer keeps the current fragment in memory
until it receives the packet that follows it, and PyAV has no call that forces it out. So each
clip is muxed on its own, into memory, as a fragmented MP4 with absolute timestamps
(`frag_discont`); its fragment is appended to the file, and the first clip also contributes the
header, which is the same for every clip. The audio encoder lives for the whole run, so the
sound has no seams at clip borders; each clip takes the audio packets that start before its end.

Memory stays flat however long the run: frames are converted one at a time, and only the
compressed clip being built is held.
"""

from __future__ import annotations

import collections
import io
import math
import os
import struct
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from .errors import InputError

AUDIO_SAMPLE_RATE = 48_000  # AAC at 48 kHz: 21 ms packets keep the audio end within a frame
AUDIO_BIT_RATE = 128_000
# A clip boundary is forced after this long, so a caller that never marks one still gets
# bounded memory and a file that keeps growing on disk.
MAX_SECONDS_PER_FRAGMENT = 10

_MUXER_OPTIONS = {
    # empty_moov: the header needs no sample tables; frag_custom: cut only when the muxer
    # closes; frag_discont: fragments carry absolute decode times (tfdt), so fragments from
    # separate muxers line up; skip_trailer: no random-access index after the last clip.
    "movflags": "empty_moov+frag_custom+default_base_moof+frag_discont+skip_trailer",
    # Keep our timestamps as given: shifting each muxer's first packet to zero would restart
    # every clip at time 0.
    "avoid_negative_ts": "disabled",
}
_HEADER_BOXES = {b"ftyp", b"moov"}
_FRAGMENT_BOXES = {b"moof", b"mdat"}

X264_PRESETS = ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow")

# H.264 colour tags for BT.709 limited range, matching the RGB -> YUV conversion below.
_BT709 = 1
_LIMITED_RANGE = 1


class StreamingVideoWriter:
    """Writes frames to an MP4 clip by clip; a clip is on disk when `write_frames` returns.

    path:         the .mp4 to create (replaced once the first clip is ready).
    fps:          frames per second (int, float or Fraction).
    width/height: frame size in pixels; both must be even (yuv420p halves the chroma planes).
    audio:        waveform float [C, T] (C = 1 or 2; [T] and [1, C, T] accepted) or None. It is
                  trimmed to the frames written and padded with silence if shorter.
    sample_rate:  sample rate of `audio` in Hz (the file's audio is 48 kHz AAC).
    crf:          H.264 quality, 0 (lossless) .. 51 (worst); 17-23 is the usual range.
    preset:       x264 speed/size trade-off ("ultrafast" .. "veryslow").
    append_to:    continue an mp4 this writer made (a resumed run): its first `size` bytes are
                  kept (anything after them, e.g. a clip half written when a run died, is cut)
                  and the next clip follows its `frames` frames, the audio too.

    Use as a context manager: leaving the block, even through an exception, finishes the clip
    in progress and closes the file.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        fps: float | Fraction,
        width: int,
        height: int,
        audio=None,
        sample_rate: int | None = None,
        crf: int = 19,
        preset: str = "medium",
        append_to: WrittenPart | None = None,
    ):
        self.path = Path(path)
        self.fps = _checked_fps(fps)
        self.width, self.height = _checked_size(width, height)
        if not 0 <= int(crf) <= 51:
            raise InputError(f"crf={crf} is outside H.264's range; pick a value from 0 to 51 (19 is a good default).")
        if preset not in X264_PRESETS:
            raise InputError(f"preset={preset!r} is not an x264 preset; use one of {', '.join(X264_PRESETS)}.")
        self._video_options = {"crf": str(int(crf)), "preset": preset, "bf": "0"}  # bf=0: see _open_clip
        start = Fraction(0) if append_to is None else Fraction(append_to.frames) / self.fps
        self._audio = None if audio is None else _AudioTrack(audio, sample_rate, start)
        self._max_clip_frames = max(1, int(self.fps * MAX_SECONDS_PER_FRAGMENT))

        if not self.path.parent.is_dir():
            raise InputError(
                f"Cannot write {self.path}: the folder {self.path.parent} does not exist; create it first."
            )
        if not os.access(self.path.parent, os.W_OK) or self.path.is_dir():
            raise InputError(f"Cannot write {self.path} (not writable); choose a writable output path.")
        # The first fragment goes to a hidden file that is renamed into place once it is whole.
        self._partial = self.path.with_name(f".{self.path.name}.partial")
        self._file = None

        self._frames_written = 0
        self._fragments_written = 0
        self._clip = None  # the in-memory muxer of the clip being built
        self._closed = False
        if append_to is not None:
            self._reopen(append_to)

    # -- public API -----------------------------------------------------------------------
    @property
    def frames_written(self) -> int:
        """Frames accepted so far (those of an unfinished clip included)."""
        return self._frames_written

    @property
    def written(self) -> WrittenPart:
        """What is on disk, right after a clip boundary (for `append_to`)."""
        size = 0 if self._file is None else self._file.tell()
        return WrittenPart(self._frames_written, self._fragments_written, size)

    def write_frames(self, frames, clip_boundary: bool = True) -> None:
        """Encodes frames [N, H, W, 3] (uint8 0..255, or float 0..1 as in ComfyUI's IMAGE).

        With `clip_boundary` (the default) the frames end a clip: the clip and its audio are
        on disk when this returns. Pass False to send a clip in several pieces.
        """
        self._check_open()
        shape = tuple(frames.shape)
        if len(shape) != 4 or shape[1:] != (self.height, self.width, 3):
            raise InputError(
                f"frames have shape {list(shape)}; this writer takes [N, {self.height}, {self.width}, 3] "
                f"(N frames of {self.width}x{self.height} RGB). Resize the frames or open the writer with their size."
            )
        for index in range(shape[0]):
            self._encode_frame(_rgb_uint8(frames[index]))
            if self._clip.frames >= self._max_clip_frames:
                self.flush_clip()
        if clip_boundary:
            self.flush_clip()

    def flush_clip(self) -> None:
        """Ends the current clip: its frames and audio are written and synced to disk."""
        self._check_open()
        if self._clip is None:
            return
        clip, self._clip = self._clip, None
        for packet in clip.video.encode(None):
            clip.container.mux(packet)
        if self._audio is not None:
            clip_end = Fraction(self._frames_written) / self.fps
            for packet in self._audio.packets_before(clip_end):
                packet.stream = clip.audio
                clip.container.mux(packet)
        clip.container.close()

        wanted = _FRAGMENT_BOXES | (_HEADER_BOXES if self._fragments_written == 0 else set())
        boxes = [(kind, data) for kind, data in _mp4_boxes(clip.buffer.getvalue()) if kind in wanted]
        data = b"".join(data for _, data in boxes)
        if self._file is None:
            self._create_file(data)
        else:
            self._file.write(data)
            self._file.flush()
            os.fsync(self._file.fileno())
        self._fragments_written += sum(kind == b"moof" for kind, _ in boxes)

    def close(self) -> None:
        """Finishes the clip in progress and closes the file. A run with no frames leaves no file."""
        if self._closed:
            return
        try:
            self.flush_clip()
        finally:
            self._closed = True
            if self._file is not None:
                self._file.close()
            self._partial.unlink(missing_ok=True)

    def __enter__(self) -> StreamingVideoWriter:
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc is None:
            self.close()
            return
        try:
            self.close()
        except Exception as close_error:  # keep the original error in front of the user
            if hasattr(exc, "add_note"):  # Python 3.11+
                exc.add_note(f"The video writer could not finish its last clip: {close_error}")

    # -- internals ------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"The video writer for {self.path} is closed.")

    def _create_file(self, first: bytes) -> None:
        """Writes the header and first fragment to the hidden file, syncs it, renames it into
        place and keeps it open for the fragments that follow."""
        try:
            with open(self._partial, "wb") as file:
                file.write(first)
                file.flush()
                os.fsync(file.fileno())
            os.replace(self._partial, self.path)
            self._file = open(self.path, "ab")
        except OSError as err:
            self._partial.unlink(missing_ok=True)
            raise InputError(
                f"Cannot write {self.path} ({err.strerror}); choose a writable output path with free space."
            ) from None

    def _reopen(self, part: WrittenPart) -> None:
        if not self.path.is_file() or self.path.stat().st_size < part.size or part.fragments < 1:
            raise InputError(
                f"Cannot continue {self.path}: it is missing or shorter than the {part.size} bytes "
                "its run wrote; turn resume off to start a new video."
            )
        self._file = open(self.path, "r+b")
        self._file.truncate(part.size)
        self._file.seek(part.size)
        self._frames_written, self._fragments_written = part.frames, part.fragments

    @property
    def created(self) -> bool:
        """Whether the file exists yet (it does once the first clip is on disk)."""
        return self._file is not None

    def _encode_frame(self, rgb: np.ndarray) -> None:
        if self._clip is None:
            self._clip = self._open_clip()
        frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
        frame = frame.reformat(format="yuv420p", dst_colorspace="ITU709")
        frame.pts = self._frames_written
        frame.time_base = 1 / self.fps
        for packet in self._clip.video.encode(frame):
            self._clip.container.mux(packet)
        self._clip.frames += 1
        self._frames_written += 1

    def _open_clip(self) -> _ClipMuxer:
        buffer = io.BytesIO()
        options = dict(_MUXER_OPTIONS, fragment_index=str(self._fragments_written + 1))
        container = av.open(buffer, "w", format="mp4", options=options)
        # A fresh encoder per clip: its first frame is a keyframe and flushing it at the clip's
        # end costs nothing. No B-frames, so no clip's decode times reach back into the last one.
        video = container.add_stream("libx264", rate=self.fps, options=self._video_options)
        video.width, video.height, video.pix_fmt = self.width, self.height, "yuv420p"
        video.codec_context.time_base = 1 / self.fps
        ctx = video.codec_context
        ctx.colorspace = ctx.color_primaries = ctx.color_trc = _BT709
        ctx.color_range = _LIMITED_RANGE
        audio = None
        if self._audio is not None:
            # Its own encoder only describes the track in the header; the packets come from the
            # writer's long-lived encoder.
            audio = self._audio.add_stream_to(container)
        return _ClipMuxer(buffer, container, video, audio)


@dataclass(frozen=True)
class WrittenPart:
    """A prefix of an mp4 that ends on a clip: `size` bytes holding `frames` frames in
    `fragments` fragments."""

    frames: int
    fragments: int
    size: int


class _ClipMuxer:
    """One clip's in-memory MP4 muxer and its streams."""

    def __init__(self, buffer: io.BytesIO, container, video, audio):
        self.buffer, self.container, self.video, self.audio = buffer, container, video, audio
        self.frames = 0


class _AudioTrack:
    """Turns the run's waveform into AAC packets on the file's timeline, on demand.

    Packet timestamps count from 0 in 48 kHz samples. The encoder's first packet decodes to
    its priming samples; skipping as many samples of the source makes every later sample play
    at its true time without an edit list.

    `start_s` > 0 continues a file whose audio stopped at the first packet starting at or after
    it: the encoder starts `WARMUP_PACKETS` packets earlier and those (and its priming packet)
    are dropped, so the first new packet overlaps the last kept one as a continuous encoder's
    would, and every sample keeps its time.
    """

    WARMUP_PACKETS = 2

    def __init__(self, waveform, sample_rate: int | None, start_s: Fraction = Fraction(0)):
        self._source = _checked_waveform(waveform)
        if sample_rate is None or int(sample_rate) <= 0:
            raise InputError(
                f"sample_rate={sample_rate} is not usable; pass the audio's sample rate in Hz (e.g. 16000)."
            )
        self._source_rate = int(sample_rate)
        self._layout = "mono" if self._source.shape[0] == 1 else "stereo"
        self._encoder = _open_aac_encoder(self._layout)
        self._frame_size = self._encoder.frame_size
        self._resampler = None
        if self._source_rate != AUDIO_SAMPLE_RATE:
            self._resampler = av.AudioResampler(format="fltp", layout=self._layout, rate=AUDIO_SAMPLE_RATE)
        self._source_read = 0
        self._source_done = False
        self._skip = _aac_priming_samples(self._layout)
        self._unencoded = np.zeros((self._source.shape[0], 0), np.float32)
        self._samples_encoded = 0
        self._packets_made = 0
        self._drop = 0  # packets of a continuing encoder that only lead up to the first kept one
        self._pending: collections.deque = collections.deque()
        if start_s > 0:
            first = math.ceil(start_s * AUDIO_SAMPLE_RATE / self._frame_size)  # the first packet not yet written
            warmup = min(self.WARMUP_PACKETS, first - 1)
            self._packets_made = first - 1 - warmup
            self._skip += self._packets_made * self._frame_size
            self._drop = 1 + warmup

    def add_stream_to(self, container):
        return container.add_stream("aac", rate=AUDIO_SAMPLE_RATE, layout=self._layout, bit_rate=AUDIO_BIT_RATE)

    def packets_before(self, end_s: Fraction) -> list:
        """All packets that start before `end_s` and were not handed out yet."""
        end_sample = end_s * AUDIO_SAMPLE_RATE
        # Packets come out in order, so once one starts at or after the end, all before it are out.
        while not self._pending or self._pending[-1].pts < end_sample:
            self._encode_one_frame()
        packets = []
        while self._pending and self._pending[0].pts < end_sample:
            packets.append(self._pending.popleft())
        return packets

    def _encode_one_frame(self) -> None:
        while self._unencoded.shape[1] < self._frame_size:
            self._unencoded = np.concatenate([self._unencoded, self._next_samples()], axis=1)
        samples = np.ascontiguousarray(self._unencoded[:, : self._frame_size])
        self._unencoded = self._unencoded[:, self._frame_size :]
        frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout=self._layout)
        frame.sample_rate = AUDIO_SAMPLE_RATE
        frame.time_base = Fraction(1, AUDIO_SAMPLE_RATE)
        frame.pts = self._samples_encoded
        self._samples_encoded += self._frame_size
        for packet in self._encoder.encode(frame):
            if self._drop:
                self._drop -= 1
                self._packets_made += 1
                continue
            packet.pts = packet.dts = self._packets_made * self._frame_size
            packet.time_base = Fraction(1, AUDIO_SAMPLE_RATE)
            self._packets_made += 1
            self._pending.append(packet)

    def _next_samples(self) -> np.ndarray:
        """The next stretch of 48 kHz audio: the source, then silence once it has run out."""
        channels = self._source.shape[0]
        if self._source_done:
            samples = np.zeros((channels, max(self._frame_size, min(self._skip, AUDIO_SAMPLE_RATE))), np.float32)
        else:
            chunk_length = max(1, self._source_rate // 10)
            chunk = self._source[:, self._source_read : self._source_read + chunk_length]
            self._source_read += chunk.shape[1]
            if chunk.shape[1] < chunk_length:
                self._source_done = True
            samples = self._resampled(chunk) if self._resampler is not None else np.array(chunk, np.float32)
        if self._skip:
            dropped = min(self._skip, samples.shape[1])
            samples, self._skip = samples[:, dropped:], self._skip - dropped
        return samples

    def _resampled(self, chunk: np.ndarray) -> np.ndarray:
        outputs = []
        if chunk.shape[1]:
            samples = np.ascontiguousarray(chunk, np.float32)
            frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout=self._layout)
            frame.sample_rate = self._source_rate
            frame.time_base = Fraction(1, self._source_rate)
            frame.pts = self._source_read - chunk.shape[1]
            outputs = self._resampler.resample(frame)
        if self._source_done:
            outputs = list(outputs) + list(self._resampler.resample(None))  # drain its filter delay
        arrays = [frame.to_ndarray() for frame in outputs]
        return np.concatenate(arrays, axis=1) if arrays else np.zeros((chunk.shape[0], 0), np.float32)


def read_video_info(path: str | os.PathLike) -> dict:
    """Decodes a video file and reports what a player would get.

    Returns dict(frames, fps, width, height, audio_duration_s, audio_sample_rate); the audio
    fields are 0.0 and None when the file has no audio.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"No video file at {path}; check the path.")
    try:
        return _decoded_info(path)
    except av.error.FFmpegError as err:
        raise InputError(f"{path} is not a readable video ({err}); it may be empty or damaged.") from None


def _decoded_info(path: Path) -> dict:
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise InputError(f"{path} holds no video stream; pass an .mp4 written by the video writer.")
        video = container.streams.video[0]
        audio = container.streams.audio[0] if container.streams.audio else None
        frames, audio_samples = 0, 0
        for frame in container.decode(*([video] + ([audio] if audio else []))):
            if isinstance(frame, av.VideoFrame):
                frames += 1
            else:
                audio_samples += frame.samples
        rate = video.guessed_rate or video.average_rate
        return {
            "frames": frames,
            "fps": float(rate) if rate else 0.0,
            "width": video.codec_context.width,
            "height": video.codec_context.height,
            "audio_duration_s": audio_samples / audio.sample_rate if audio else 0.0,
            "audio_sample_rate": audio.sample_rate if audio else None,
        }


# -- helpers -------------------------------------------------------------------------------
def _checked_fps(fps) -> Fraction:
    try:
        value = Fraction(fps).limit_denominator(1_000_000)
    except (TypeError, ValueError):
        value = Fraction(0)
    if value <= 0:
        raise InputError(f"fps={fps!r} is not a positive number; LiveAvatar renders at 25.")
    return value


def _checked_size(width, height) -> tuple[int, int]:
    width, height = int(width), int(height)
    if width <= 0 or height <= 0:
        raise InputError(f"Video size {width}x{height} is empty; pass the frames' width and height.")
    if width % 2 or height % 2:
        even = f"{width - width % 2}x{height - height % 2}"
        raise InputError(
            f"Video size {width}x{height} has an odd side; H.264 in yuv420p needs even width and height. "
            f"Crop or resize the frames to an even size such as {even}."
        )
    return width, height


def _checked_waveform(waveform) -> np.ndarray:
    if hasattr(waveform, "detach"):  # a torch tensor
        waveform = waveform.detach().cpu().float().numpy()
    samples = np.asarray(waveform, dtype=np.float32)
    if samples.ndim == 3 and samples.shape[0] == 1:
        samples = samples[0]  # a batch of one, as in ComfyUI's AUDIO
    if samples.ndim == 1:
        samples = samples[None]
    if samples.ndim != 2 or samples.shape[0] not in (1, 2):
        raise InputError(
            f"audio has shape {list(np.shape(waveform))}; pass a waveform [channels, samples] with 1 or 2 "
            "channels (mix multichannel audio down to stereo)."
        )
    return samples


def _rgb_uint8(frame) -> np.ndarray:
    """One frame [H, W, 3] as contiguous uint8; floats are read as 0..1."""
    if hasattr(frame, "detach"):  # a torch tensor; float16/bfloat16 have no numpy twin
        frame = frame.detach().cpu()
        frame = frame.float().numpy() if frame.is_floating_point() else frame.numpy()
    frame = np.asarray(frame)
    if frame.dtype == np.uint8:
        return np.ascontiguousarray(frame)
    if np.issubdtype(frame.dtype, np.floating):
        return (np.clip(frame, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    raise InputError(f"frames have dtype {frame.dtype}; pass uint8 (0..255) or float (0..1) images.")


def _open_aac_encoder(layout: str):
    encoder = av.CodecContext.create("aac", "w")
    encoder.sample_rate = AUDIO_SAMPLE_RATE
    encoder.layout = layout
    encoder.format = "fltp"
    encoder.bit_rate = AUDIO_BIT_RATE
    encoder.time_base = Fraction(1, AUDIO_SAMPLE_RATE)
    encoder.open()
    return encoder


def _aac_priming_samples(layout: str) -> int:
    """How many samples the AAC encoder puts before the first input sample (its first pts < 0)."""
    probe = _open_aac_encoder(layout)
    silence = av.AudioFrame.from_ndarray(
        np.zeros((1 if layout == "mono" else 2, probe.frame_size), np.float32), format="fltp", layout=layout
    )
    silence.sample_rate, silence.time_base, silence.pts = AUDIO_SAMPLE_RATE, Fraction(1, AUDIO_SAMPLE_RATE), 0
    packets = list(probe.encode(silence)) + list(probe.encode(None))
    return max(0, -min(packet.pts for packet in packets))


def _mp4_boxes(data: bytes) -> list[tuple[bytes, bytes]]:
    """Splits an MP4 into its top-level boxes: [(type, whole box bytes)]."""
    boxes, position = [], 0
    while position + 8 <= len(data):
        size, kind = struct.unpack_from(">I4s", data, position)
        if size == 1:  # 64-bit size follows the type
            size = struct.unpack_from(">Q", data, position + 8)[0]
        elif size == 0:  # runs to the end of the file
            size = len(data) - position
        boxes.append((kind, data[position : position + size]))
        position += size
    return boxes
