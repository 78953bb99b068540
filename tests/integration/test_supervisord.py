"""The multi-GPU box of deploy/supervisord.conf under a real `supervisord` (PyPI
`supervisor`), the shipped file adjusted only where this machine differs: paths
(this checkout's venv, a temporary folder for logs and sockets, a free port on
loopback), tensor parallel 1 (a CPU engine), and two of the four engines (the
CPU's memory): engine-2 is given a bad setting instead (it must exit 2 and stay
down), engine-3 is not started.

An engine killed is restarted by supervisord while the gateway routes around it;
`supervisorctl stop all` (which signals every program at once) and supervisord's
own shutdown (the engines first, then the gateway) lose no request: the gateway
and each engine drain what they run."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import httpx
import pytest

from support import MODEL, ROOT, Proc, Stream, child_env, free_port, health, wait_until

CONF = ROOT / "deploy" / "supervisord.conf"


@pytest.fixture(scope="module")
def box(run_dir):
    folder = run_dir / "supervisord"
    folder.mkdir()
    port = free_port()
    text = CONF.read_text()
    text = text.replace("/opt/venv/bin/vllm-gateway", str(os.path.join(os.path.dirname(sys.executable), "vllm-gateway")))
    text = text.replace("/var/log/", f"{folder}/").replace("/run/", f"{folder}/")
    text = text.replace("--host 0.0.0.0 --port 8000", f"--host 127.0.0.1 --port {port}")
    text = text.replace('TENSOR_PARALLEL_SIZE="2"', 'TENSOR_PARALLEL_SIZE="1"')
    text = text.replace('environment=CUDA_VISIBLE_DEVICES="4,5",TENSOR_PARALLEL_SIZE="1"',
                        'environment=CUDA_VISIBLE_DEVICES="4,5",TENSOR_PARALLEL_SIZE="1",MAX_MODEL_LEN="lots"')
    text = text.replace("--engine-id 3\n", "--engine-id 3\nautostart=false\n")
    conf = folder / "supervisord.conf"
    conf.write_text(text)
    env = child_env(MAX_MODEL_LEN="1024")
    proc = Proc("supervisord", ["supervisor.supervisord", "-c", str(conf)], env, run_dir)
    url = f"http://127.0.0.1:{port}"
    box = Box(proc, conf, url, folder, env)
    try:
        wait_until(lambda: box.engines_ready() == 2, 600, "two engines ready", proc)
        yield box
    finally:
        if proc.alive():
            proc.stop(signal.SIGTERM, timeout=120)


class Box:
    def __init__(self, proc: Proc, conf, url: str, folder, env: dict[str, str]) -> None:
        self.proc, self.conf, self.url, self.folder, self.env = proc, conf, url, folder, env

    def ctl(self, *args: str) -> str:
        r = subprocess.run([sys.executable, "-m", "supervisor.supervisorctl", "-c", str(self.conf), *args],
                           capture_output=True, text=True, env=self.env, timeout=180)
        return r.stdout + r.stderr

    def status(self) -> dict[str, tuple[str, str]]:
        """name -> (state, the rest of its line)."""
        out = {}
        for line in self.ctl("status").splitlines():
            parts = line.split(None, 2)
            if len(parts) >= 2:
                out[parts[0]] = (parts[1], parts[2] if len(parts) > 2 else "")
        return out

    def engines_ready(self) -> int:
        try:
            code, body = health(self.url)
        except httpx.HTTPError:
            return 0
        return sum(1 for e in body["engines"] if e["ready"])

    def log(self) -> str:
        return (self.folder / "vllm-gateway-supervisord.log").read_text()


def ask(url: str) -> int:
    return httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 2}, timeout=60).status_code


def test_a_bad_setting_stays_down(box):
    """Exit 2 is final: no restart loop (supervisord reports it EXITED, started once)."""
    wait_until(lambda: box.status().get("engine-2", ("",))[0] == "EXITED", 120, "engine-2 to exit", box.proc)
    time.sleep(3)
    assert box.status()["engine-2"][0] == "EXITED", box.status()
    assert box.log().count("spawned: 'engine-2'") == 1, box.log()
    assert "MAX_MODEL_LEN" in (box.folder / "vllm-gateway-engine-2.log").read_text()
    assert box.status()["engine-3"][0] == "STOPPED"


def test_served_and_an_engine_killed_is_restarted_while_the_other_serves(box):
    assert ask(box.url) == 200
    before = box.status()["engine-0"]
    pid = int(re.search(r"pid (\d+)", before[1]).group(1))
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: box.engines_ready() < 2, 30, "the gateway to see engine-0 gone", box.proc)
    for _ in range(3):  # routed to engine-1 meanwhile
        assert ask(box.url) == 200
    wait_until(lambda: box.engines_ready() == 2, 600, "engine-0 restarted and ready again", box.proc)
    after = box.status()["engine-0"]
    assert after[0] == "RUNNING" and f"pid {pid}," not in after[1], after
    assert ask(box.url) == 200


def test_stop_all_drains_the_gateway_and_the_engines(box):
    stream = Stream(box.url, 300)
    wait_until(lambda: stream.tokens > 0 or not stream.is_alive(), 120, "the stream under way", box.proc)
    out = box.ctl("stop", "all")
    stream.join(120)
    assert stream.intact, stream
    log = box.log()
    for name in ("gateway", "engine-0", "engine-1"):
        assert f"stopped: {name} (exit status 0)" in log, log[-2000:]
    assert "ERROR" not in out, out


def test_supervisord_stopped_itself_loses_no_request(box):
    """supervisord's own shutdown stops the engines first (highest priority
    number first), one after the other: each drains what it runs while the
    gateway routes new requests to the others."""
    box.ctl("start", "engine-0", "engine-1", "gateway")
    wait_until(lambda: box.engines_ready() == 2, 600, "the box up again", box.proc)
    stream = Stream(box.url, 300)
    wait_until(lambda: stream.tokens > 0 or not stream.is_alive(), 120, "the stream under way", box.proc)
    code = box.proc.stop(signal.SIGTERM, timeout=150)
    stream.join(60)
    assert stream.intact, stream
    assert code == 0, box.proc.tail()
    log = box.log()
    assert "draining" in (box.folder / "vllm-gateway-engine-0.log").read_text() + \
        (box.folder / "vllm-gateway-engine-1.log").read_text()
    assert "stopped: engine-0" in log and "stopped: gateway" in log
