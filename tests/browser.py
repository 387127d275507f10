"""A headless Chromium driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``:
JSON messages separated by NUL bytes on file descriptors 3 and 4) — no websocket, no driver, no
extra package. Records console errors, uncaught exceptions, failed loads and log errors of every
page it visits.

    with Browser.launch() as b:
        b.goto("file:///…/index.html")
        b.evaluate("document.title")
        assert not b.errors
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import subprocess
import tempfile
import threading
import time
from typing import Any

__all__ = ["Browser", "find_chromium"]

_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str | None:
    for name in _NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


class Browser:
    def __init__(self, proc: subprocess.Popen, send_fd: int, recv_fd: int, profile: str) -> None:
        self.proc, self._send, self._recv, self._profile = proc, send_fd, recv_fd, profile
        self._id = 0
        self._replies: dict[int, dict] = {}
        self._events: queue.Queue = queue.Queue()
        self._lock = threading.Condition()
        self.errors: list[str] = []
        self.session: str | None = None
        threading.Thread(target=self._reader, daemon=True).start()

    @classmethod
    def launch(cls, binary: str | None = None) -> Browser:
        binary = binary or find_chromium()
        if binary is None:
            raise FileNotFoundError("chromium not found")
        to_chrome_r, to_chrome_w = os.pipe()
        from_chrome_r, from_chrome_w = os.pipe()
        profile = tempfile.mkdtemp(prefix="convlens-chromium-")

        def child_fds() -> None:  # chromium reads commands on fd 3, writes replies on fd 4
            a, b = os.dup(to_chrome_r), os.dup(from_chrome_w)  # neither can be clobbered below
            os.dup2(a, 3)
            os.dup2(b, 4)

        proc = subprocess.Popen(
            [binary, "--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe",
             "--no-first-run", "--no-default-browser-check", "--disable-extensions",
             f"--user-data-dir={profile}", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            preexec_fn=child_fds, close_fds=False,
        )  # fmt: skip
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        b = cls(proc, to_chrome_w, from_chrome_r, profile)
        target = b.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        b.session = b.call("Target.attachToTarget", {"targetId": target, "flatten": True})[
            "sessionId"
        ]
        for domain in ("Page", "Runtime", "Log", "Network"):
            b.call(f"{domain}.enable")
        return b

    # -- protocol ------------------------------------------------------------------------------
    def _reader(self) -> None:
        buf = b""
        while True:
            try:
                chunk = os.read(self._recv, 1 << 16)
            except OSError:
                return
            if not chunk:
                return
            buf += chunk
            while b"\0" in buf:
                raw, buf = buf.split(b"\0", 1)
                msg = json.loads(raw)
                if "id" in msg:
                    with self._lock:
                        self._replies[msg["id"]] = msg
                        self._lock.notify_all()
                else:
                    self._on_event(msg)

    def _on_event(self, msg: dict) -> None:
        m, p = msg.get("method"), msg.get("params", {})
        if m == "Runtime.exceptionThrown":
            d = p.get("exceptionDetails", {})
            self.errors.append(
                f"exception: {d.get('text')} {d.get('exception', {}).get('description', '')}"
            )
        elif m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
            self.errors.append("console: " + " ".join(str(a.get("value", a.get("description")))
                                                     for a in p.get("args", [])))  # fmt: skip
        elif m == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
            e = p["entry"]
            self.errors.append(f"log: {e.get('text')} {e.get('url', '')}")
        elif m == "Network.loadingFailed" and not p.get("canceled"):
            self.errors.append(f"load failed: {p.get('errorText')} ({p.get('type')})")
        self._events.put(msg)

    def call(self, method: str, params: dict | None = None, timeout: float = 30) -> dict:
        self._id += 1
        i = self._id
        msg: dict[str, Any] = {"id": i, "method": method, "params": params or {}}
        if self.session and not method.startswith("Target."):
            msg["sessionId"] = self.session
        os.write(self._send, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        with self._lock:
            while i not in self._replies:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{method}: no reply from chromium in {timeout} s")
                self._lock.wait(left)
            reply = self._replies.pop(i)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    def wait_event(self, method: str, timeout: float = 30) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no {method} from chromium in {timeout} s")
            try:
                msg = self._events.get(timeout=left)
            except queue.Empty:
                continue
            if msg.get("method") == method:
                return msg.get("params", {})

    # -- pages ---------------------------------------------------------------------------------
    def _drain(self) -> None:
        while not self._events.empty():
            self._events.get_nowait()

    def goto(self, url: str) -> None:
        self._drain()
        self.call("Page.navigate", {"url": url})
        self.wait_event("Page.loadEventFired")

    def click(self, selector: str) -> str:
        """Click the first element matching ``selector`` (a link), wait for the next page; returns
        its URL."""
        self._drain()
        ok = self.evaluate(f"(function(){{var a=document.querySelector({json.dumps(selector)});"
                           "if(!a){return false;} a.click(); return true;})()")  # fmt: skip
        if not ok:
            raise AssertionError(f"no element {selector!r} on {self.url()}")
        self.wait_event("Page.loadEventFired")
        return self.url()

    def evaluate(self, expression: str) -> Any:
        r = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                           "awaitPromise": True})  # fmt: skip
        if "exceptionDetails" in r:
            raise RuntimeError(f"{expression[:60]}…: {r['exceptionDetails'].get('text')}")
        return r["result"].get("value")

    def url(self) -> str:
        return self.evaluate("window.location.href")

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=5)
        except Exception:  # noqa: BLE001 - it may already be gone
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for fd in (self._send, self._recv):
            try:
                os.close(fd)
            except OSError:
                pass
        shutil.rmtree(self._profile, ignore_errors=True)

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
