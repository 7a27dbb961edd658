"""The shipped workflows in the real ComfyUI canvas: headless Chromium opens the page, loads each
UI workflow through the page's app object, and the graph it builds must be ours, unchanged.
Screenshots are kept in test-artifacts/ for a person to look at."""

from __future__ import annotations

import json
import os

import pytest
from browser import Browser, find_chromium
from build_workflows import PRESETS, UI_DIR
from comfyui_client import ComfyUIServer, free_port

from conftest import ROOT

pytestmark = [pytest.mark.server, pytest.mark.slow]
ARTIFACTS = ROOT / "test-artifacts"


@pytest.fixture(scope="module")
def canvas(tmp_path_factory):
    chromium = find_chromium()
    if chromium is None:
        if os.environ.get("LIVEAVATAR_REQUIRE_BROWSER"):
            pytest.fail("Chromium is not installed and LIVEAVATAR_REQUIRE_BROWSER is set.")
        pytest.skip("Chromium is not installed (Debian: apt-get install chromium); the canvas test needs it.")
    with ComfyUIServer(tmp_path_factory.mktemp("comfyui-canvas")) as server:
        browser = Browser(chromium, free_port())
        try:
            browser.open(server.url)
            browser.wait_for("window.app && window.app.graph && window.LiteGraph", timeout=120)
            yield browser
        finally:
            browser.close()


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.title)
def test_workflow_opens_in_the_canvas_unchanged(canvas, preset):
    workflow = json.loads((UI_DIR / f"{preset.name}.json").read_text())
    canvas.console.clear()
    loaded = canvas.evaluate(
        f"""(async () => {{
            await window.app.loadGraphData({json.dumps(workflow)});
            await new Promise(r => setTimeout(r, 500));
            const graph = window.app.graph.serialize();
            return graph.nodes.map(n => ({{id: n.id, type: n.type, widgets: n.widgets_values ?? [],
                                           known: !!window.LiteGraph.registered_node_types[n.type]}}));
        }})()"""
    )
    ARTIFACTS.mkdir(exist_ok=True)
    canvas.screenshot(ARTIFACTS / f"canvas_{preset.name}.png")
    by_id = {node["id"]: node for node in loaded}
    for node in workflow["nodes"]:
        got = by_id[node["id"]]
        assert got["type"] == node["type"] and got["known"], f"{node['type']} is missing in the canvas"
        assert got["widgets"] == node["widgets_values"], f"{node['type']}: widgets shifted"
    problems = [line for line in canvas.console if "missing" in line.lower() or "LiveAvatar" in line]
    assert not problems, problems
