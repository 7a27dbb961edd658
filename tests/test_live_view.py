"""Long runs in a real ComfyUI server: the Long + upscale workflow over the HTTP API (output size,
memory flat over clips), and the live view played in headless Chromium while the run renders,
ending cleanly when the run finishes or is cancelled."""

from __future__ import annotations

import copy
import json
import os
import statistics
import threading
import time
import urllib.request

import av
import pytest
from browser import Browser, find_chromium
from build_workflows import API_DIR
from comfyui_client import free_port

from conftest import TINY_UPSCALER, WIDGET_FOR_FOLDER, serve_small_models
from liveavatar_core.default_models import DEFAULT_FILES
from liveavatar_core.video_writer import read_video_info

pytestmark = [pytest.mark.server, pytest.mark.slow]

# The Long preset's graph with short clips and one step, so many clips stay cheap on a CPU.
CLIP_FRAMES = 8  # 2 latent frames: one block a clip
STEPS_PER_CLIP = 1


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("comfyui-live")
    yield from serve_small_models(base)


@pytest.fixture(scope="module")
def browser():
    chromium = find_chromium()
    if chromium is None:
        if os.environ.get("LIVEAVATAR_REQUIRE_BROWSER"):
            pytest.fail("Chromium is not installed and LIVEAVATAR_REQUIRE_BROWSER is set.")
        pytest.skip("Chromium is not installed (Debian: apt-get install chromium); the live view test needs it.")
    running = Browser(chromium, free_port())
    try:
        yield running
    finally:
        running.close()


def long_upscale(num_clip: int, size: str = "64*64", rescale: float = 4.0, prefix: str = "long") -> dict:
    """The Long + upscale workflow on the embedded small model and the tiny upscaler, every clip
    rendered (the example speech is 4 s: past it, silence)."""
    prompt = copy.deepcopy(json.loads((API_DIR / "liveavatar_long_upscale_api.json").read_text()))
    nodes = {node["class_type"]: node["inputs"] for node in prompt.values()}
    for folder, widget in WIDGET_FOR_FOLDER.items():
        nodes["LoadLiveAvatarModel"][widget] = DEFAULT_FILES[folder]
    nodes["UpscaleModelLoader"]["model_name"] = TINY_UPSCALER
    nodes["LiveAvatarStreamUpscale"]["rescale_factor"] = rescale
    nodes["LiveAvatarSampler"].update(
        num_clip=num_clip, size=size, trim_to_audio=False, infer_frames=CLIP_FRAMES, sample_steps=STEPS_PER_CLIP
    )
    nodes["EncodeAudio"]["infer_frames"] = CLIP_FRAMES
    nodes["OnlineVAEDecode"]["filename_prefix"] = f"{prefix}/avatar"
    return prompt


def resident_mb(pid: int) -> float:
    with open(f"/proc/{pid}/statm") as statm:
        return int(statm.read().split()[1]) * 4096 / 2**20


def clip_of(message) -> int | None:
    """How many clips are finished, from Online VAE Decode's progress (counted in DiT steps)."""
    if message.get("type") == "progress" and message["data"].get("node") == "7":
        return message["data"]["value"] // STEPS_PER_CLIP
    return None


def mp4_of(server, execution) -> str:
    saved = execution.outputs("7")["images"][0]
    return str(server.base / "output" / saved["subfolder"] / saved["filename"])


def text(server, path: str) -> str:
    with urllib.request.urlopen(server.url + path, timeout=30) as response:
        return response.read().decode()


def test_long_upscale_workflow_writes_the_upscaled_mp4_with_flat_memory(server):
    clips = 20
    rss_after_clip: dict[int, float] = {}

    def on_message(message):
        clip = clip_of(message)
        if clip is not None and clip not in rss_after_clip:
            rss_after_clip[clip] = resident_mb(server.process.pid)

    execution = server.run(long_upscale(clips), on_message=on_message)
    assert execution.ok, execution.error()
    info = read_video_info(mp4_of(server, execution))
    frames = clips * CLIP_FRAMES - 3
    assert (info["width"], info["height"], info["frames"]) == (512, 512, frames)  # 64 * 2x model * 4
    assert abs(info["audio_duration_s"] - frames / 25) <= 1 / 25
    # RSS rises over the first clips (allocator warm-up, caches filling) and then wobbles by tens of
    # MB as blocks are made and freed, so a peak-to-peak comparison is noise. The trend after the
    # warm-up is not: keeping each clip's upscaled frames would add per_clip MB a clip.
    warm_up = 6
    done = range(warm_up + 1, clips + 1)
    rss = [rss_after_clip[clip] for clip in done]
    growth_per_clip = statistics.linear_regression(list(done), rss).slope
    per_clip = CLIP_FRAMES * 512 * 512 * 3 * 4 / 2**20  # what keeping one clip's frames would take
    print(f"server RSS after clips {done.start}-{clips}: {[round(r) for r in rss]} MB")
    assert growth_per_clip < per_clip / 3, (
        f"the server grows by {growth_per_clip:.1f} MB a clip (one clip's frames are {per_clip:.0f} MB)"
    )


def page_state(browser) -> dict:
    return browser.evaluate("""(() => { const v = document.querySelector('video'); const l = window.liveAvatarLive;
        return {id: l.id, state: l.state, appended: l.appended, ended: l.ended, error: l.error,
                time: v.currentTime, videoEnded: v.ended, buffered: v.buffered.length ? v.buffered.end(0) : 0}; })()""")


def start_watching(server, browser, prompt: dict):
    """Opens the live page on the newest render before the run is queued: the page follows the
    new run once it starts. Returns the websocket, the prompt id and the new run's id."""
    before = {run["id"] for run in server.get("/liveavatar/live")}
    browser.open(f"{server.url}/liveavatar/live/latest/")
    browser.wait_for("window.liveAvatarLive", timeout=60)
    ws = server.connect()
    prompt_id = server.queue(prompt)
    deadline = time.monotonic() + 300
    while not (new := [run for run in server.get("/liveavatar/live") if run["id"] not in before]):
        assert time.monotonic() < deadline, "the run never appeared in /liveavatar/live"
        time.sleep(0.2)
    return ws, prompt_id, new[0]["id"]


def test_live_view_plays_while_the_run_renders_and_ends_with_it(server, browser):
    ws, prompt_id, run_id = start_watching(server, browser, long_upscale(16, rescale=1.0, prefix="live"))
    outcome: dict = {}
    waiter = threading.Thread(target=lambda: outcome.update(done=server.wait(ws, prompt_id)), daemon=True)
    waiter.start()
    on_disk: list[float] = []  # when each clip's fragment was first listed, ms

    def watch_disk():
        while "done" not in outcome:
            listed = server.get(f"/liveavatar/live/{run_id}/segments.json")["segments"]
            on_disk.extend([time.time() * 1000] * (len(listed) - len(on_disk)))
            time.sleep(0.1)

    threading.Thread(target=watch_disk, daemon=True).start()
    try:
        # Playing while the run is still going: the position advances between two looks.
        browser.wait_for(
            f"window.liveAvatarLive.id === '{run_id}' && window.liveAvatarLive.appended >= 1 && "
            "document.querySelector('video').currentTime > 0",
            timeout=300,
        )
        first = page_state(browser)
        browser.wait_for(f"document.querySelector('video').currentTime > {first['time']}", timeout=120)
        second = page_state(browser)
        run = server.get(f"/liveavatar/live/{first['id']}/segments.json")
        assert "done" not in outcome and run["state"] == "running", "the run ended before the page played"
        assert second["time"] > first["time"] and not second["ended"]
        behind = sum(s[2] for s in run["segments"]) / run["fps"] - second["time"]
        print(f"live view: {second['time']:.2f} s played, {behind:.2f} s of written video ahead of it")
        waiter.join(600)
        assert outcome["done"].ok, outcome["done"].error()
        browser.wait_for("window.liveAvatarLive.ended && document.querySelector('video').ended", timeout=120)
    finally:
        ws.close()
    final = page_state(browser)
    assert final["id"] == run_id and final["state"] == "finished" and final["error"] is None
    appended_at = browser.evaluate("window.liveAvatarLive.appendedAt")
    delays = [next(at for count, at in appended_at if count > index) - seen for index, seen in enumerate(on_disk)]
    print(
        f"live view: clips in the page {statistics.median(delays):.0f} ms (median), {max(delays):.0f} ms (max) "
        "after their fragment was on disk"
    )
    mp4 = mp4_of(server, outcome["done"])
    frames = read_video_info(mp4)["frames"]
    assert final["time"] == pytest.approx(frames / 25, abs=0.1)  # played to the last frame
    playlist = text(server, f"/liveavatar/live/{final['id']}/index.m3u8")
    assert playlist.rstrip().endswith("#EXT-X-ENDLIST") and playlist.count("#EXTINF") == 16
    # What VLC and ffplay read (FFmpeg's HLS demuxer): the whole video with its sound.
    with av.open(f"{server.url}/liveavatar/live/{final['id']}/index.m3u8") as hls:
        decoded = sum(1 for _ in hls.decode(video=0))
    assert decoded == frames


def test_live_view_ends_cleanly_when_the_run_is_cancelled(server, browser):
    ws, prompt_id, run_id = start_watching(server, browser, long_upscale(200, rescale=1.0, prefix="cancelled"))
    try:
        browser.wait_for(f"window.liveAvatarLive.id === '{run_id}' && window.liveAvatarLive.appended >= 2", timeout=300)
        server.interrupt()
        execution = server.wait(ws, prompt_id)
    finally:
        ws.close()
    assert execution.outcome == "execution_interrupted"
    browser.wait_for("window.liveAvatarLive.ended && document.querySelector('video').ended", timeout=120)
    final = page_state(browser)
    assert final["id"] == run_id and final["state"] == "cancelled" and final["error"] is None
    run = server.get(f"/liveavatar/live/{final['id']}/segments.json")
    assert run["state"] == "cancelled" and 2 <= len(run["segments"]) < 200
    playlist = text(server, f"/liveavatar/live/{final['id']}/index.m3u8")
    assert playlist.rstrip().endswith("#EXT-X-ENDLIST") and playlist.count("#EXTINF") == len(run["segments"])
    assert final["time"] == pytest.approx(sum(s[2] for s in run["segments"]) / 25, abs=0.1)
    listed = server.get("/liveavatar/live")
    assert listed[0]["id"] == final["id"] and listed[0]["state"] == "cancelled"
