"""The streaming MP4 writer: what a player gets back, after a clean run and after a killed one."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from liveavatar_core.errors import InputError
from liveavatar_core.video_writer import StreamingVideoWriter, read_video_info

ROOT = Path(__file__).resolve().parents[1]
FPS = 25
CLIP = 48
WIDTH, HEIGHT = 64, 48
SAMPLE_RATE = 16_000


def sine(seconds: float, channels: int = 1, rate: int = SAMPLE_RATE) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return np.repeat((0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[None], channels, axis=0)


def clip_frames(index: int, width: int = WIDTH, height: int = HEIGHT) -> np.ndarray:
    """A moving gradient, different for every clip (uint8 [CLIP, H, W, 3])."""
    x = np.linspace(0, 255, width, dtype=np.float32)[None, None, :, None]
    shift = (np.arange(CLIP, dtype=np.float32) * 3 + index * 40)[:, None, None, None]
    frames = (x + shift) % 256 * np.ones((1, height, 1, 3), np.float32)
    return frames.astype(np.uint8)


def decoded_audio(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.concatenate([frame.to_ndarray()[0] for frame in container.decode(audio=0)])


def test_three_clips_play_back_with_matching_audio(tmp_path):
    path = tmp_path / "run.mp4"
    # The audio outlasts the video: the file's audio must stop with the last frame.
    with StreamingVideoWriter(path, FPS, WIDTH, HEIGHT, audio=sine(8.0), sample_rate=SAMPLE_RATE) as writer:
        for index in range(3):
            writer.write_frames(clip_frames(index))
        assert writer.frames_written == 3 * CLIP

    info = read_video_info(path)
    assert info["frames"] == 3 * CLIP
    assert info["fps"] == pytest.approx(FPS)
    assert (info["width"], info["height"]) == (WIDTH, HEIGHT)
    assert info["audio_duration_s"] == pytest.approx(3 * CLIP / FPS, abs=1 / FPS)


@pytest.mark.parametrize("with_audio", [True, False], ids=["audio", "no_audio"])
@pytest.mark.slow
def test_killed_run_keeps_every_finished_clip(tmp_path, with_audio):
    path = tmp_path / "killed.mp4"
    audio = f"audio=sine(8.0), sample_rate={SAMPLE_RATE}" if with_audio else "audio=None"
    script = textwrap.dedent(
        f"""
        import os, sys
        sys.path.insert(0, {str(ROOT)!r})
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_video_writer import clip_frames, sine
        from liveavatar_core.video_writer import StreamingVideoWriter

        writer = StreamingVideoWriter({str(path)!r}, {FPS}, {WIDTH}, {HEIGHT}, {audio})
        writer.write_frames(clip_frames(0))
        writer.write_frames(clip_frames(1))
        writer.write_frames(clip_frames(2)[:20], clip_boundary=False)  # a clip cut short
        os._exit(0)  # no close(), no cleanup: as if the process were killed
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)

    info = read_video_info(path)
    assert info["frames"] == 2 * CLIP
    expected_audio_s = 2 * CLIP / FPS if with_audio else 0.0
    assert info["audio_duration_s"] == pytest.approx(expected_audio_s, abs=1 / FPS)


def test_unreadable_file_is_reported_as_input_error(tmp_path):
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    with pytest.raises(InputError, match="empty.mp4"):
        read_video_info(empty)


def test_error_inside_the_block_keeps_what_was_written(tmp_path):
    path = tmp_path / "failed.mp4"
    with pytest.raises(ZeroDivisionError):
        with StreamingVideoWriter(path, FPS, WIDTH, HEIGHT, audio=sine(8.0), sample_rate=SAMPLE_RATE) as writer:
            writer.write_frames(clip_frames(0))
            writer.write_frames(clip_frames(1)[:10], clip_boundary=False)
            raise ZeroDivisionError("a failure in the middle of clip 1")
    info = read_video_info(path)
    assert info["frames"] == CLIP + 10
    assert info["audio_duration_s"] == pytest.approx((CLIP + 10) / FPS, abs=1 / FPS)


def test_audio_stays_in_sync_with_frames(tmp_path):
    path = tmp_path / "sync.mp4"
    audio = np.zeros((1, 4 * SAMPLE_RATE), np.float32)
    burst_at = SAMPLE_RATE  # a 50 ms tone starting at exactly 1.0 s
    audio[0, burst_at : burst_at + 800] = 0.8 * np.sin(2 * np.pi * 1000 * np.arange(800) / SAMPLE_RATE)
    with StreamingVideoWriter(path, FPS, WIDTH, HEIGHT, audio=audio, sample_rate=SAMPLE_RATE) as writer:
        writer.write_frames(clip_frames(0))

    played = decoded_audio(path)
    onset_s = np.argmax(np.abs(played) > 0.2) / 48_000
    assert onset_s == pytest.approx(1.0, abs=0.005)


@pytest.mark.parametrize("past_the_audio", [False, True], ids=["in-audio", "in-silence"])
def test_a_continued_file_equals_one_written_at_once(tmp_path, past_the_audio):
    """A resumed run reopens the file at the last whole clip (cutting a half-written one) and
    appends: the frames are the same, and the audio keeps its time across the seam."""
    audio = sine(2.5 if past_the_audio else 8.0)  # 2.5 s: the seam after clip 2 (3.84 s) falls in silence
    whole, resumed = tmp_path / "whole.mp4", tmp_path / "resumed.mp4"
    with StreamingVideoWriter(whole, FPS, WIDTH, HEIGHT, audio=audio, sample_rate=SAMPLE_RATE) as writer:
        for index in range(4):
            writer.write_frames(clip_frames(index))
    with StreamingVideoWriter(resumed, FPS, WIDTH, HEIGHT, audio=audio, sample_rate=SAMPLE_RATE) as writer:
        for index in range(2):
            writer.write_frames(clip_frames(index))
        written = writer.written
    with open(resumed, "ab") as file:
        file.write(b"\0\0\1\0moof" + bytes(300))  # a fragment cut short by a kill
    with StreamingVideoWriter(
        resumed, FPS, WIDTH, HEIGHT, audio=audio, sample_rate=SAMPLE_RATE, append_to=written
    ) as writer:
        for index in range(2, 4):
            writer.write_frames(clip_frames(index))
        assert writer.frames_written == 4 * CLIP

    def frames(path):
        with av.open(str(path)) as container:
            return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])

    assert np.array_equal(frames(resumed), frames(whole))
    played, reference = decoded_audio(resumed), decoded_audio(whole)
    assert played.shape == reference.shape
    seam = 2 * CLIP * 48_000 // FPS
    assert np.array_equal(played[: seam - 1024], reference[: seam - 1024])  # untouched before the seam
    # After it, a new AAC encoder's coding noise only, and no shift: the waveforms match best
    # at lag 0.
    assert np.abs(played - reference).max() < 0.02
    after = slice(seam, len(played) - 4096)
    if past_the_audio:
        assert np.abs(played[after]).max() < 1e-3  # the silence after the track
    else:
        errors = {lag: np.abs(played[after] - np.roll(reference, lag)[after]).mean() for lag in range(-3, 4)}
        assert min(errors, key=errors.get) == 0, errors


def test_short_audio_is_padded_with_silence(tmp_path):
    path = tmp_path / "short_audio.mp4"
    stereo_44k = sine(1.0, channels=2, rate=44_100)
    with StreamingVideoWriter(path, FPS, WIDTH, HEIGHT, audio=stereo_44k, sample_rate=44_100) as writer:
        writer.write_frames(clip_frames(0))
        writer.write_frames(clip_frames(1))

    info = read_video_info(path)
    assert info["audio_duration_s"] == pytest.approx(2 * CLIP / FPS, abs=1 / FPS)
    played = decoded_audio(path)
    assert np.abs(played[: 48_000 // 2]).max() > 0.2  # the tone plays first ...
    assert np.abs(played[int(1.2 * 48_000) :]).max() < 0.01  # ... then silence to the end


def test_video_without_audio(tmp_path):
    path = tmp_path / "silent.mp4"
    with StreamingVideoWriter(path, 16, WIDTH, HEIGHT) as writer:
        writer.write_frames(clip_frames(0))
    info = read_video_info(path)
    assert (info["frames"], info["fps"]) == (CLIP, 16)
    assert (info["audio_duration_s"], info["audio_sample_rate"]) == (0.0, None)


@pytest.mark.parametrize("make_frames", [np.asarray, torch.from_numpy], ids=["numpy", "torch"])
def test_float_frames_in_0_1_keep_their_colours(tmp_path, make_frames):
    path = tmp_path / "colours.mp4"
    orange = np.zeros((CLIP, HEIGHT, WIDTH, 3), np.float32)
    orange[..., 0], orange[..., 1] = 1.0, 0.5
    with StreamingVideoWriter(path, FPS, WIDTH, HEIGHT) as writer:
        writer.write_frames(make_frames(orange))
    with av.open(str(path)) as container:
        rgb = next(container.decode(video=0)).to_ndarray(format="rgb24")
    assert np.abs(rgb.astype(int) - [255, 128, 0]).max() <= 4


def test_odd_size_is_rejected_with_the_fix(tmp_path):
    path = tmp_path / "odd.mp4"
    with pytest.raises(InputError, match=r"65x48.*even.*64x48"):
        StreamingVideoWriter(path, FPS, 65, 48)
    assert not path.exists()


@pytest.mark.parametrize(
    ("setting", "message"),
    [({"fps": 0}, "fps=0"), ({"crf": 60}, "crf=60.*0 to 51"), ({"preset": "turbo"}, "'turbo'.*veryfast")],
)
def test_bad_settings_are_rejected_with_the_fix(tmp_path, setting, message):
    arguments = {"path": tmp_path / "bad.mp4", "fps": FPS, "width": WIDTH, "height": HEIGHT, **setting}
    with pytest.raises(InputError, match=message):
        StreamingVideoWriter(**arguments)


def test_frames_of_another_size_are_rejected(tmp_path):
    with StreamingVideoWriter(tmp_path / "size.mp4", FPS, WIDTH, HEIGHT) as writer:
        with pytest.raises(InputError, match=r"\[N, 48, 64, 3\]"):
            writer.write_frames(np.zeros((4, 32, 32, 3), np.uint8))


def test_more_than_two_audio_channels_are_rejected(tmp_path):
    with pytest.raises(InputError, match="stereo"):
        StreamingVideoWriter(
            tmp_path / "a.mp4", FPS, WIDTH, HEIGHT, audio=sine(1.0, channels=6), sample_rate=SAMPLE_RATE
        )


@pytest.mark.slow
def test_memory_does_not_grow_with_clips_written(tmp_path):
    def resident_mb() -> float:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * 4096 / 2**20

    width, height = 384, 256  # 14 MB of frames per clip: keeping them would show at once
    path = tmp_path / "long.mp4"
    with StreamingVideoWriter(path, FPS, width, height, audio=sine(60.0), sample_rate=SAMPLE_RATE) as writer:
        for index in range(5):
            writer.write_frames(clip_frames(index, width, height))
        settled = resident_mb()
        for index in range(5, 25):
            writer.write_frames(clip_frames(index, width, height))
        grown = resident_mb() - settled
    assert grown < 60, f"resident memory grew by {grown:.0f} MB over 20 clips"
    assert read_video_info(path)["frames"] == 25 * CLIP
