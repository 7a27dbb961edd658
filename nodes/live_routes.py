"""The live view's HTTP routes on ComfyUI's own server (`PromptServer.instance.routes`).

/liveavatar/live                     the renders that can be watched (JSON, newest first)
/liveavatar/live/<id>/               a page that plays one while it renders (<id> or 'latest')
/liveavatar/live/<id>/index.m3u8     its HLS playlist, for VLC, ffplay, Safari
/liveavatar/live/<id>/segments.json  its header and whole clips, for the page's player
/liveavatar/live/<id>/video.mp4      the mp4 being written (byte ranges)
"""

from __future__ import annotations

import sys
from pathlib import Path

from liveavatar_core.live_view import LIVE_RUNS, hls_playlist, segment_list

PAGE = Path(__file__).resolve().parents[1] / "web" / "live.html"
PREFIX = "/liveavatar/live"
NO_STORE = {"Cache-Control": "no-store"}


def live_url(run_id: str) -> str:
    return f"{PREFIX}/{run_id}/"


def add_routes() -> bool:
    """Adds the routes to the running ComfyUI server; False where there is none (e.g. in tests
    that import the nodes without a server)."""
    server = sys.modules.get("server")  # ComfyUI's, imported before it loads node packs
    routes = getattr(getattr(getattr(server, "PromptServer", None), "instance", None), "routes", None)
    if routes is None:
        return False
    from aiohttp import web

    def run_or_404(request):
        run = LIVE_RUNS.get(request.match_info["run"])
        if run is None:
            raise web.HTTPNotFound(text="No such LiveAvatar render (yet): start one, or see /liveavatar/live.")
        return run

    @routes.get(PREFIX)
    async def runs(request):
        return web.json_response([run.describe() for run in reversed(LIVE_RUNS.all())], headers=NO_STORE)

    @routes.get(PREFIX + "/{run}")
    async def page_redirect(request):
        raise web.HTTPFound(live_url(request.match_info["run"]))

    @routes.get(PREFIX + "/{run}/")
    async def page(request):
        # served for 'latest' before any render too: the page waits for one
        return web.FileResponse(PAGE, headers=NO_STORE)

    @routes.get(PREFIX + "/{run}/index.m3u8")
    async def playlist(request):
        run = run_or_404(request)
        return web.Response(
            text=hls_playlist(run, f"{PREFIX}/{run.id}/video.mp4"),
            content_type="application/vnd.apple.mpegurl",
            headers=NO_STORE,
        )

    @routes.get(PREFIX + "/{run}/segments.json")
    async def segments(request):
        return web.json_response(segment_list(run_or_404(request)), headers=NO_STORE)

    @routes.get(PREFIX + "/{run}/video.mp4")
    async def video(request):
        run = run_or_404(request)
        if not run.path.is_file():
            raise web.HTTPNotFound(text="The first clip is not written yet.")
        return web.FileResponse(run.path, headers=NO_STORE)  # answers Range requests itself

    return True


def cancel_errors() -> tuple[type[BaseException], ...]:
    """What ComfyUI raises when the user presses Cancel (its progress bar raises it too)."""
    import comfy.model_management

    return (comfy.model_management.InterruptProcessingException,)


def announce(run_id: str) -> None:
    """Shows the live view's address on the running node (as text under it)."""
    try:
        server = sys.modules["server"].PromptServer.instance
        if server.last_node_id is not None:
            server.send_progress_text(f"Live view: {live_url(run_id)}", server.last_node_id, server.client_id)
    except Exception:  # a courtesy: the render matters more
        pass
