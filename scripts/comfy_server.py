"""Start and stop a real ComfyUI server with this pack in its custom_nodes, and run prompts on it.

Used by the end-to-end tests and by demo.sh. Standard library only (the server is a subprocess).
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Optional

PACK_DIR = Path(__file__).resolve().parents[1]
PACK_NAME = "comfyui-concept-erasure"
# A returning user's settings. On a fresh user the new frontend opens its template browser, and frontend 1.27
# throws at start-up while it registers the canvas navigation settings (it sets two before they exist). The
# minimap is closed so that screenshots show the whole graph.
FRONTEND_SETTINGS = {"Comfy.TutorialCompleted": True, "Comfy.Canvas.NavigationMode": "legacy",
                     "Comfy.Canvas.LeftMouseClickBehavior": "panning", "Comfy.Canvas.MouseWheelScroll": "zoom",
                     "Comfy.Minimap.Visible": False}


class ServerError(RuntimeError):
    """The server did not start, rejected a prompt, or a prompt failed; the message ends with its log."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare_base(base: Path, pack_dir: Path = PACK_DIR) -> Path:
    """A ComfyUI base folder (the fork's --cwd, upstream's --base-directory) with the pack linked into
    custom_nodes."""
    base = Path(base)
    for sub in ("custom_nodes", "models/checkpoints", "models/concept_erasure", "input", "output", "user/default"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    settings = base / "user" / "default" / "comfy.settings.json"
    if not settings.exists():
        settings.write_text(json.dumps(FRONTEND_SETTINGS, indent=2))
    link = base / "custom_nodes" / PACK_NAME
    if link.is_symlink() and link.resolve() != Path(pack_dir).resolve():
        link.unlink()
    if not link.exists():
        try:
            link.symlink_to(Path(pack_dir).resolve(), target_is_directory=True)
        except OSError:  # no symlinks here: copy the pack's code, as an install would lay it out
            shutil.copytree(pack_dir, link, ignore=shutil.ignore_patterns(
                ".*", "tests", "scripts", "workflows", "docs", "__pycache__"))
    return base


def upstream_main() -> Optional[Path]:
    """Upstream ComfyUI's main.py when this Python imports upstream's `comfy` (its source folder on the path),
    else None: the PyPI fork, whose entry point is comfy.cmd.main."""
    spec = importlib.util.find_spec("comfy")
    if spec is None or not spec.submodule_search_locations:
        raise ServerError("ComfyUI is not importable from this Python (neither the PyPI fork nor upstream's source "
                          "folder on PYTHONPATH)")
    main = Path(list(spec.submodule_search_locations)[0]).resolve().parent / "main.py"
    return main if main.is_file() else None


def _server_command(base: Path) -> list:
    main = upstream_main()
    if main is not None:
        # Its database defaults to user/ in the source folder; keep it with the rest of this base.
        return [sys.executable, str(main), "--base-directory", str(base),
                "--database-url", f"sqlite:///{Path(base).resolve() / 'user' / 'comfyui.db'}"]
    script = Path(sys.executable).with_name("comfyui")
    entry = [str(script)] if script.exists() else [
        sys.executable, "-c", "from comfy.cmd.main import entrypoint; entrypoint()"]
    return entry + ["--cwd", str(base), "--disable-known-models"]


def _die_with_parent() -> None:
    """In the server process (Linux): stop when the process that started it dies, e.g. a test run killed at its
    timeout, instead of training on in the background."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class ComfyServer:
    """`with ComfyServer(base) as server:` starts ComfyUI (the host this Python imports, see upstream_main) on
    127.0.0.1 and always stops it. front_end_root: a web frontend other than the one the host installed."""

    def __init__(self, base: Path, port: Optional[int] = None, threads: int = 1, extra_args=(),
                 front_end_root: Optional[Path] = None):
        self.base = Path(base)
        self.port = port or free_port()
        self.threads = threads
        self.extra_args = list(extra_args) + (["--front-end-root", str(front_end_root)] if front_end_root else [])
        self.log_path = self.base / "server.log"
        self.process: Optional[subprocess.Popen] = None
        self.client_id = uuid.uuid4().hex

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- life cycle -------------------------------------------------------------------------------------

    def start(self, ready_node: str = "CheckpointLoaderSimple", timeout: float = 180) -> "ComfyServer":
        env = dict(os.environ, OMP_NUM_THREADS=str(self.threads), MKL_NUM_THREADS=str(self.threads),
                   PYTHONUNBUFFERED="1")
        command = _server_command(self.base) + [
            "--cpu", "--listen", "127.0.0.1", "--port", str(self.port), "--disable-auto-launch",
            "--preview-method", "none"] + self.extra_args
        self._log = open(self.log_path, "ab")
        self.process = subprocess.Popen(command, cwd=self.base, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=_die_with_parent)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.stop()
                raise ServerError(f"ComfyUI exited with code {self.process.returncode} while starting"
                                  + self.log_tail())
            try:
                self.get_json(f"/object_info/{ready_node}", timeout=5)
                return self
            except (urllib.error.URLError, ConnectionError, TimeoutError, ServerError):
                time.sleep(0.5)
        self.stop()
        raise ServerError(f"ComfyUI did not answer /object_info/{ready_node} within {timeout:.0f} s" + self.log_tail())

    def stop(self, timeout: float = 20) -> None:
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            try:
                os.killpg(process.pid, signal.SIGTERM)
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout)
            except ProcessLookupError:
                pass
        log = getattr(self, "_log", None)
        if log is not None and not log.closed:
            log.close()

    def __enter__(self):
        return self.start() if self.process is None else self

    def __exit__(self, *exc):
        self.stop()

    def log_tail(self, lines: int = 60) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return ""
        return "\n--- ComfyUI log (last lines) ---\n" + "\n".join(text)

    # -- HTTP -------------------------------------------------------------------------------------------

    def _request(self, path: str, data=None, timeout: float = 30):
        body = None if data is None else json.dumps(data).encode()
        request = urllib.request.Request(self.url + path, data=body,
                                         headers={"Content-Type": "application/json"} if body else {})
        with urllib.request.urlopen(request, timeout=timeout) as response:
            raw = response.read()
        return json.loads(raw) if raw.strip() else None

    def get_json(self, path: str, timeout: float = 30):
        return self._request(path, timeout=timeout)

    def post_json(self, path: str, data, timeout: float = 30):
        return self._request(path, data=data, timeout=timeout)

    def object_info(self, node: Optional[str] = None) -> dict:
        return self.get_json("/object_info" + (f"/{urllib.parse.quote(node)}" if node else ""))

    # -- prompts ----------------------------------------------------------------------------------------

    def queue_prompt(self, prompt: dict) -> str:
        """POST /prompt; a prompt the server rejects raises ServerError with its node_errors."""
        try:
            answer = self.post_json("/prompt", {"prompt": prompt, "client_id": self.client_id})
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")
            raise ServerError(f"the server rejected the prompt ({e.code}): {detail}") from e
        return answer["prompt_id"]

    def history(self, prompt_id: Optional[str] = None) -> dict:
        return self.get_json("/history" + (f"/{prompt_id}" if prompt_id else ""))

    def wait(self, prompt_id: str, timeout: float = 600, poll: float = 0.5) -> dict:
        """The history entry once the prompt has finished (success or error)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            entry = self.history(prompt_id).get(prompt_id)
            if entry is not None:
                status = entry.get("status") or {}
                if status.get("completed") is not None or status.get("status_str") in ("success", "error"):
                    return entry
            if self.process is not None and self.process.poll() is not None:
                raise ServerError(f"ComfyUI exited (code {self.process.returncode}) while running {prompt_id}"
                                  + self.log_tail())
            time.sleep(poll)
        raise ServerError(f"prompt {prompt_id} did not finish within {timeout:.0f} s" + self.log_tail())

    def run(self, prompt: dict, timeout: float = 600) -> dict:
        """Queue a prompt, wait, and return its history entry; raise ServerError unless it succeeded."""
        prompt_id = self.queue_prompt(prompt)
        entry = self.wait(prompt_id, timeout)
        if entry["status"].get("status_str") != "success":
            raise ServerError(f"prompt {prompt_id} ended with {status_summary(entry)}" + self.log_tail())
        return entry

    def interrupt(self) -> None:
        self.post_json("/interrupt", {})


def status_summary(entry: dict) -> str:
    """'success', or the error and the node it came from, out of a history entry."""
    status = entry.get("status") or {}
    for kind, detail in status.get("messages", []):
        if kind in ("execution_error", "execution_interrupted"):
            where = f"{detail.get('node_type')} (node {detail.get('node_id')})"
            return f"{kind} in {where}: {detail.get('exception_message', '')}".strip()
    return str(status.get("status_str"))


def output_images(entry: dict, output_dir: Path) -> list:
    """Paths of the images a finished prompt saved (SaveImage's ui 'images' of type output)."""
    paths = []
    for node_output in entry.get("outputs", {}).values():
        for item in node_output.get("images", []):
            if item.get("type", "output") == "output":
                paths.append(Path(output_dir, item.get("subfolder", ""), item["filename"]))
    return paths
