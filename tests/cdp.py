"""Drive Debian's headless Chromium through the DevTools protocol over a pipe (``--remote-debugging-pipe``).

No WebSocket client and no download: Chromium reads commands on fd 3 and writes replies on fd 4, one JSON
message per NUL-terminated frame. Enough for the report test: open a page with JavaScript disabled and the
network offline, record every request it makes, take a full-page screenshot and query the DOM.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from fedsecure.reports.report_files import CHROMIUM_FLAGS, find_chromium


class Browser:
    def __init__(self, timeout: float = 60.0) -> None:
        exe = find_chromium()
        if exe is None:
            raise RuntimeError("no chromium")
        self.timeout = timeout
        self.profile = tempfile.TemporaryDirectory(prefix="fedsecure-cdp-")
        cmd_r, self._cmd_w = os.pipe()
        self._out_r, out_w = os.pipe()

        def fds() -> None:  # runs in the child: its fd 3 reads our commands, its fd 4 carries its replies
            a, b = fcntl.fcntl(cmd_r, fcntl.F_DUPFD, 10), fcntl.fcntl(out_w, fcntl.F_DUPFD, 10)
            os.dup2(a, 3)
            os.dup2(b, 4)
            os.set_inheritable(3, True)
            os.set_inheritable(4, True)

        self.proc = subprocess.Popen([exe, *CHROMIUM_FLAGS, "--remote-debugging-pipe",
                                      f"--user-data-dir={self.profile.name}", "about:blank"],
                                     preexec_fn=fds, close_fds=False, stdout=subprocess.DEVNULL,
                                     stderr=open(os.environ.get("CDP_LOG", os.devnull), "wb"))
        os.close(cmd_r)
        os.close(out_w)
        self._id = 0
        self._buf = b""
        self.events: list[dict[str, Any]] = []

    def _read(self) -> dict[str, Any]:
        deadline = time.monotonic() + self.timeout
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._out_r], [], [], left)[0]:
                raise TimeoutError("chromium did not answer")
            chunk = os.read(self._out_r, 1 << 20)
            if not chunk:
                raise RuntimeError("chromium closed the pipe")
            self._buf += chunk
        frame, self._buf = self._buf.split(b"\0", 1)
        return json.loads(frame)

    def send(self, method: str, params: dict[str, Any] | None = None, session: str | None = None) -> dict[str, Any]:
        self._id += 1
        msg: dict[str, Any] = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._cmd_w, json.dumps(msg).encode() + b"\0")
        while True:
            reply = self._read()
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_event(self, method: str, session: str) -> dict[str, Any]:
        for e in self.events:
            if e.get("method") == method and e.get("sessionId") == session:
                return e
        while True:
            e = self._read()
            self.events.append(e)
            if e.get("method") == method and e.get("sessionId") == session:
                return e

    def close(self) -> None:
        try:
            self.send("Browser.close")
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._cmd_w)
        os.close(self._out_r)
        self.profile.cleanup()


def render(page: Path, screenshot: Path, selectors: list[str], width: int = 1200) -> dict[str, Any]:
    """Open ``page`` (no script, offline), save a full-page PNG, and return the requests made, the page title
    and, per selector, how many elements match."""
    b = Browser()
    try:
        target = b.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        s = b.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        b.send("Emulation.setScriptExecutionDisabled", {"value": True}, s)
        b.send("Network.enable", {}, s)
        b.send("Network.emulateNetworkConditions", {"offline": True, "latency": 0, "downloadThroughput": -1,
                                                    "uploadThroughput": -1}, s)
        b.send("Emulation.setDeviceMetricsOverride", {"width": width, "height": 900, "deviceScaleFactor": 1,
                                                      "mobile": False}, s)
        b.send("Page.enable", {}, s)
        b.send("Page.navigate", {"url": page.resolve().as_uri()}, s)
        b.wait_event("Page.loadEventFired", s)
        shot = b.send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True}, s)
        screenshot.write_bytes(base64.b64decode(shot["data"]))
        root = b.send("DOM.getDocument", {"depth": 0}, s)["root"]["nodeId"]
        counts = {sel: len(b.send("DOM.querySelectorAll", {"nodeId": root, "selector": sel}, s)["nodeIds"])
                  for sel in selectors}
        title_node = b.send("DOM.querySelector", {"nodeId": root, "selector": "title"}, s)["nodeId"]
        title = b.send("DOM.getOuterHTML", {"nodeId": title_node}, s)["outerHTML"]
        requests = [e["params"]["request"]["url"] for e in b.events
                    if e.get("method") == "Network.requestWillBeSent" and e.get("sessionId") == s]
        return {"counts": counts, "title": title, "requests": requests}
    finally:
        b.close()
