"""The live view's reading of an mp4 being written: only whole clips are listed, the HLS playlist
is what FFmpeg plays, and a run's end (finished, cancelled, failed) ends its playlist."""

from __future__ import annotations

import av
import numpy as np
import pytest

from liveavatar_core.errors import InputError
from liveavatar_core.live_view import (
    CANCELLED,
    FAILED,
    FINISHED,
    RUNNING,
    LiveRuns,
    hls_playlist,
    read_layout,
    segment_list,
    watched,
)
from liveavatar_core.streaming import GenerationCancelled
from liveavatar_core.video_writer import StreamingVideoWriter

FPS, SIZE, CLIP = 25, 64, 12


def write_clips(path, clips: int) -> None:
    audio = np.random.default_rng(0).uniform(-0.3, 0.3, (1, 16000 * 2)).astype(np.float32)
    with StreamingVideoWriter(path, FPS, SIZE, SIZE, audio=audio, sample_rate=16000) as writer:
        for index in range(clips):
            writer.write_frames(np.full((CLIP, SIZE, SIZE, 3), index * 40, np.uint8))


def test_whole_clips_are_listed_and_a_clip_being_written_is_not(tmp_path):
    path = tmp_path / "a.mp4"
    write_clips(path, 3)
    layout = read_layout(path)
    assert layout.header[0] == 0 and [s.frames for s in layout.segments] == [CLIP] * 3
    assert layout.codecs.startswith("avc1.") and layout.codecs.endswith(",mp4a.40.2")
    data = path.read_bytes()
    last = layout.segments[-1]
    (tmp_path / "growing.mp4").write_bytes(data[: last.offset + last.size // 2])  # mid-way through clip 3
    assert read_layout(tmp_path / "growing.mp4").segments == layout.segments[:2]
    (tmp_path / "header.mp4").write_bytes(data[: layout.header[1] - 10])
    assert read_layout(tmp_path / "header.mp4").header is None
    assert read_layout(tmp_path / "missing.mp4").header is None


def test_the_playlist_plays_in_ffmpeg_and_ends_only_with_the_run(tmp_path):
    path = tmp_path / "a.mp4"
    write_clips(path, 3)
    runs = LiveRuns()
    run = runs.start(path, FPS, SIZE, SIZE)
    playlist = tmp_path / "index.m3u8"
    playlist.write_text(hls_playlist(run, media_uri=path.name))
    assert "#EXT-X-ENDLIST" not in playlist.read_text()
    assert playlist.read_text().count("#EXTINF:0.480,") == 3
    runs.end(run, FINISHED)
    text = hls_playlist(run, media_uri=path.name)
    assert text.rstrip().endswith("#EXT-X-ENDLIST")
    playlist.write_text(text)
    with av.open(str(playlist), options={"allowed_extensions": "ALL"}) as hls:
        frames = [frame.to_ndarray(format="rgb24")[0, 0, 0] for frame in hls.decode(video=0)]
    assert len(frames) == 3 * CLIP
    assert [round(int(frames[i]) / 40) for i in (0, CLIP, 2 * CLIP)] == [0, 1, 2]  # in order, none lost
    assert segment_list(run)["state"] == FINISHED and len(segment_list(run)["segments"]) == 3


class HostInterrupt(Exception):
    """What a host such as ComfyUI raises on Cancel from its own progress bar."""


@pytest.mark.parametrize(
    "error, state",
    [
        (None, FINISHED),
        (GenerationCancelled(), CANCELLED),
        (HostInterrupt(), CANCELLED),
        (InputError("disk full"), FAILED),
    ],
)
def test_a_watched_render_is_marked_by_how_it_ended(tmp_path, error, state):
    runs = LiveRuns()

    def render():
        with watched(tmp_path / "a.mp4", FPS, SIZE, SIZE, runs, cancel_errors=(HostInterrupt,)) as run:
            assert runs.get("latest") is run and run.state == RUNNING
            if error is not None:
                raise error

    if error is None:
        render()
    else:
        with pytest.raises(type(error)):
            render()
    assert runs.get("latest").state == state


def test_latest_is_the_newest_run_and_old_finished_runs_are_forgotten(tmp_path):
    runs = LiveRuns(kept=2)
    first = runs.start(tmp_path / "1.mp4", FPS, SIZE, SIZE)
    runs.end(first, FINISHED)
    second = runs.start(tmp_path / "2.mp4", FPS, SIZE, SIZE)
    third = runs.start(tmp_path / "3.mp4", FPS, SIZE, SIZE)
    assert runs.get("latest") is third and runs.get(first.id) is None and runs.get(second.id) is second
    assert runs.get("no-such-run") is None
