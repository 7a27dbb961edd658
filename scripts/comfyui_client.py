"""Start a real ComfyUI with this pack and drive it over its HTTP API and websocket.

Used by the demo command and the tests. ComfyUI runs as a separate process on loopback, in a
base folder of its own (custom_nodes/, models/, input/, output/, user/), exactly as a user's
install would, with this pack linked into custom_nodes/.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMFYUI_DIR = Path(os.environ.get("LIVEAVATAR_COMFYUI", ROOT / ".venv" / "ComfyUI"))
PACK_NAME = "ComfyUI-LiveAvatar"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare_base(base: Path) -> Path:
    """Makes a ComfyUI base folder with this pack installed and the canvas's first-run tour off."""
    for sub in ("custom_nodes", "models", "input", "output", "user/default"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    link = base / "custom_nodes" / PACK_NAME
    if not link.exists():
        link.symlink_to(ROOT, target_is_directory=True)
    settings = base / "user" / "default" / "comfy.settings.json"
    if not settings.exists():
        settings.write_text(json.dumps({"Comfy.TutorialCompleted": True}))
    return base


def copy_example_media(base: Path) -> None:
    """The presets' example portrait and speech into the base folder's input/ (as users do)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from liveavatar_core.example_media import copy_example_media as copy_into

    copy_into(base / "input")


class ComfyUIServer:
    """A ComfyUI process; use as a context manager (the process ends on exit)."""

    def __init__(self, base: Path, port: int | None = None, cpu: bool = True, log: Path | None = None):
        self.base = prepare_base(Path(base))
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log or self.base / "comfyui.log"
        self.cpu = cpu
        self.process: subprocess.Popen | None = None
        self.client_id = uuid.uuid4().hex

    def start(self, timeout: float = 180) -> ComfyUIServer:
        if not (COMFYUI_DIR / "main.py").exists():
            raise RuntimeError(f"ComfyUI not found at {COMFYUI_DIR}; run scripts/setup_env.sh first.")
        command = [
            sys.executable,
            str(COMFYUI_DIR / "main.py"),
            "--listen",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--disable-auto-launch",
            "--base-directory",
            str(self.base),
            "--database-url",
            f"sqlite:///{self.base / 'user' / 'comfyui.db'}",
        ]
        if self.cpu:
            command.append("--cpu")
        self._log = open(self.log_path, "ab")
        self.process = subprocess.Popen(command, cwd=COMFYUI_DIR, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with code {self.process.returncode}:\n{self.log()[-4000:]}")
            try:
                self.get("/system_stats")
                return self
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"ComfyUI did not answer within {timeout:.0f} s:\n{self.log()[-4000:]}")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if getattr(self, "_log", None):
            self._log.close()

    def __enter__(self) -> ComfyUIServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    # -- HTTP ---------------------------------------------------------------------------
    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=30) as response:
            return json.loads(response.read())

    def post(self, path: str, body: dict | None = None):
        data = json.dumps(body or {}).encode()
        request = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                text = response.read()
                return json.loads(text) if text else {}
        except urllib.error.HTTPError as err:
            raise PromptRejected(err.code, json.loads(err.read() or b"{}")) from None

    def object_info(self) -> dict:
        return self.get("/object_info")

    def connect(self):
        """A websocket on which this client's progress and execution messages arrive."""
        import websocket

        ws = websocket.WebSocket()
        ws.connect(f"ws://127.0.0.1:{self.port}/ws?clientId={self.client_id}", timeout=30)
        return ws

    def queue(self, prompt: dict) -> str:
        return self.post("/prompt", {"prompt": prompt, "client_id": self.client_id})["prompt_id"]

    def run(self, prompt: dict, timeout: float = 900, on_message=None) -> Execution:
        """Queues `prompt` and waits for it to end; returns every message it produced."""
        ws = self.connect()
        try:
            prompt_id = self.queue(prompt)
            return self.wait(ws, prompt_id, timeout, on_message)
        finally:
            ws.close()

    def wait(self, ws, prompt_id: str, timeout: float = 900, on_message=None) -> Execution:
        messages = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ws.settimeout(max(1.0, deadline - time.monotonic()))
            raw = ws.recv()
            if isinstance(raw, bytes):  # preview images
                messages.append({"type": "binary", "size": len(raw)})
                continue
            message = json.loads(raw)
            messages.append(message)
            if on_message is not None:
                on_message(message)
            data = message.get("data", {})
            if data.get("prompt_id") != prompt_id:
                continue
            if message["type"] in ("execution_success", "execution_error", "execution_interrupted"):
                return Execution(prompt_id, message["type"], messages, self.history(prompt_id))
        raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout:.0f} s")

    def history(self, prompt_id: str, timeout: float = 30) -> dict:
        """The prompt's history entry; ComfyUI records it just after announcing the end."""
        deadline = time.monotonic() + timeout
        while True:
            entry = self.get(f"/history/{prompt_id}").get(prompt_id)
            if entry or time.monotonic() > deadline:
                return entry or {}
            time.sleep(0.1)

    def interrupt(self) -> None:
        self.post("/interrupt")


class PromptRejected(Exception):
    def __init__(self, status: int, body: dict):
        super().__init__(f"HTTP {status}: {json.dumps(body)[:2000]}")
        self.status, self.body = status, body


class Execution:
    def __init__(self, prompt_id: str, outcome: str, messages: list[dict], history: dict):
        self.prompt_id, self.outcome, self.messages, self.history = prompt_id, outcome, messages, history

    @property
    def ok(self) -> bool:
        return self.outcome == "execution_success"

    def error(self) -> dict:
        return next((m["data"] for m in self.messages if m.get("type") == "execution_error"), {})

    def progress_nodes(self) -> set[str]:
        return {m["data"].get("node") for m in self.messages if m.get("type") == "progress"}

    def outputs(self, node_id: str) -> dict:
        return self.history.get("outputs", {}).get(node_id, {})
