"""Helpers the benchmarks share: the servers they start, the streams they read."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path


def sse_payloads(buf: bytes) -> tuple[list[bytes], bytes]:
    """The `data:` payloads of the whole server-sent events in `buf`, and the
    unfinished rest to keep for the next read."""
    *events, rest = buf.split(b"\n\n")
    return [ev[6:] for ev in events], rest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 900) -> None:
    """Until GET `url` answers 200; fails if `proc` exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} not ready after {timeout:.0f} s")


def stop(procs: list[subprocess.Popen], timeout: float = 60) -> None:
    """SIGTERM to each (in the order given), then wait; kill what does not stop."""
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()


def report(result: dict, out: str) -> None:
    """Write the figures to `out` and print them as one JSON line."""
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
