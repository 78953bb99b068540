"""Integration: `vllm-gateway serve` with two real CPU engines (one core each):
routing over both, an engine killed mid-stream, its restart, and a graceful drain."""

from __future__ import annotations

import os
import signal
import threading
import time

import httpx
import psutil
import pytest

from support import MODEL, Proc, Stream, child_env, free_port, health, scrape, value, wait_healthy, wait_until


@pytest.fixture(scope="module")
def two_engines(run_dir):
    port = free_port()
    proc = Proc("serve-two-engines", ["vllm_gateway.gateway", "serve", "--port", str(port), "--max-model-len", "1024"],
                child_env(NUM_ENGINES="2", DRAIN_TIMEOUT_S="120", ROUTING="prefix", ROUTING_BALANCE_ABS="2"), run_dir)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, [proc], 900)
    wait_until(lambda: all(e["ready"] for e in health(url)[1]["engines"]), 600, "both engines", proc)
    yield url, proc
    proc.stop(signal.SIGKILL)


def test_engines_bound_to_their_own_cores(two_engines):
    url, proc = two_engines
    _, h = health(url)
    pids = [e["pid"] for e in h["engines"]]
    assert len(pids) == 2 and all(e["ready"] for e in h["engines"])
    if len(os.sched_getaffinity(0)) >= 2:
        cores = [os.sched_getaffinity(pid) for pid in pids]
        assert not (cores[0] & cores[1]), cores


def both_ready(url: str, proc: Proc) -> dict:
    """Each test starts from two ready, idle engines, whatever the one before left
    (a test that failed with streams held open leaves them running: counted on
    the engines, they would fail the next test's counts too)."""
    return wait_until(lambda: (lambda s, h: s == 200 and all(e["ready"] and not e["in_flight"] for e in h["engines"])
                               and h)(*health(url)), 300, "both engines ready and idle", proc)


def metric(url: str, name: str, **labels: str) -> float:
    return value(scrape(url), name, **labels)


def routed(url: str) -> list[int]:
    return [e["routed"] for e in health(url)[1]["engines"]]


TENANT = "You are the support assistant of Example Corp. Answer briefly and politely. " * 10


def test_prefix_routing_keeps_a_prefix_on_its_engine_and_spills_over(two_engines):
    url, proc = two_engines
    both_ready(url, proc)
    # One after another: the prefix stays on the engine that served it first,
    # and vLLM serves it from that engine's prefix cache.
    before, hits_before = routed(url), [metric(url, "vllm:prefix_cache_hits_total", engine=str(i)) for i in (0, 1)]
    for i in range(4):
        r = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": TENANT + f"Question {i}: why?",
                                                      "max_tokens": 2}, timeout=120)
        assert r.status_code == 200, r.text
    sent = [a - b for a, b in zip(routed(url), before)]
    assert sorted(sent) == [0, 4], sent
    home = sent.index(4)
    hits = wait_until(lambda: (lambda h: h >= hits_before[home] + 3 * 64 and h)(
        metric(url, "vllm:prefix_cache_hits_total", engine=str(home))), 10, "prefix cache hits reported", proc)
    assert hits - hits_before[home] <= 4 * 200  # not more than the prompts held
    assert metric(url, "vllm:prefix_cache_hits_total", engine=str(1 - home)) == hits_before[1 - home]

    # Held open, the prefix's streams load its engine past ROUTING_BALANCE_ABS=2:
    # the fourth spills over to the other engine, which then holds the prefix too.
    spills = metric(url, "vllm_gateway:routing_decisions_total", reason="spill")
    streams = []
    for i in range(5):
        streams.append(Stream(url, 400, TENANT + f"Story {i}:"))  # still running when the fifth starts
        wait_until(lambda: streams[-1].tokens >= 1, 120, "the stream to start", proc)
    in_flight = [e["in_flight"] for e in health(url)[1]["engines"]]
    assert in_flight[home] == 3 and in_flight[1 - home] == 2, (in_flight, streams, health(url)[1]["engines"])
    assert metric(url, "vllm_gateway:routing_decisions_total", reason="spill") == spills + 1
    for s in streams:
        s.join(300)
    assert all(s.intact for s in streams)


def test_kill_one_engine_mid_stream(two_engines):
    url, proc = two_engines
    both_ready(url, proc)
    streams = [Stream(url, 400) for _ in range(6)]
    # every stream under way, on both engines
    _, h = wait_until(lambda: all(s.tokens >= 2 for s in streams) and health(url), 300, "streams to start", proc)
    engines = h["engines"]
    assert all(e["in_flight"] >= 1 for e in engines), engines  # spread over both
    victim, survivor = engines
    victim_process = psutil.Process(victim["pid"])
    leftovers = victim_process.children(recursive=True)  # vLLM's engine core and workers
    assert leftovers
    gone_at: list[float] = []  # when the kernel has torn the killed process down

    def watch_teardown() -> None:
        try:
            while victim_process.is_running() and victim_process.status() != psutil.STATUS_ZOMBIE:
                time.sleep(0.01)
        except psutil.NoSuchProcess:
            pass
        gone_at.append(time.monotonic())

    os.kill(victim["pid"], signal.SIGKILL)
    threading.Thread(target=watch_teardown, daemon=True).start()

    # The victim's streams end with an error event and [DONE] as soon as the kernel
    # has torn the killed process down (its socket closes), or ENGINE_TIMEOUT_S after
    # its last word, whichever comes first. Here two busy CPU engines share two
    # cores: the teardown took up to 1.3 s, and once, in this VM, 22 s (the heartbeat
    # timeout then failed the streams first). The one-second bound from the kill is
    # tests/integration/test_engine_death.py's, on a machine not saturated.
    wait_until(lambda: sum(s.failed for s in streams) >= victim["in_flight"], 60, "the victim's streams to fail", proc)
    wait_until(lambda: gone_at, 60, "the killed engine's teardown", proc)
    late = [s.error_at - gone_at[0] for s in streams if s.failed]
    assert all(t < 2.0 for t in late), late
    for s in streams:
        if s.failed:
            err = next(e for e in s.events if isinstance(e, dict) and "error" in e)["error"]
            assert err["type"] == "engine_unavailable", err

    # the gateway stays healthy and new requests go to the survivor
    status, h = health(url)
    assert status == 200 and [e["ready"] for e in h["engines"]] == [False, True], h
    r = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 3}, timeout=120)
    assert r.status_code == 200, r.text

    for s in streams:
        s.join(300)
    assert sum(s.failed for s in streams) == victim["in_flight"]
    assert sum(s.intact for s in streams) == survivor["in_flight"]
    assert all(s.tokens == 400 for s in streams if s.intact)

    # the launcher restarts the victim, and it rejoins routing
    def back():
        status, h = health(url)
        e = h["engines"][0]
        return status == 200 and e["ready"] and e["pid"] != victim["pid"] and h
    h = wait_until(back, 300, "the killed engine to come back", proc)
    # the dead engine's vLLM processes were reaped, not left holding its memory
    assert not [p for p in leftovers if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    before = h["engines"][0]["routed"]
    results = []
    threads = [threading.Thread(target=lambda: results.append(httpx.post(
        url + "/v1/completions", json={"model": MODEL, "prompt": "Hello", "max_tokens": 20, "ignore_eos": True},
        timeout=120).status_code)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [200] * 4
    assert health(url)[1]["engines"][0]["routed"] > before


def test_sigterm_during_a_restart_drains_then_exits_zero(two_engines):
    """SIGTERM while one engine is being restarted (dead, then loading) and the
    other serves a stream: the stream completes, new work gets 503, exit 0."""
    url, proc = two_engines
    h = both_ready(url, proc)
    victim, survivor = h["engines"]
    os.kill(victim["pid"], signal.SIGKILL)
    wait_until(lambda: not health(url)[1]["engines"][0]["ready"], 10, "the victim to leave routing", proc)

    def reloading():  # the launcher has started its replacement, which is loading
        pids = {victim["pid"], survivor["pid"]}
        found = []
        for c in psutil.Process(proc.popen.pid).children():
            try:
                if c.pid not in pids and "vllm_gateway.engine" in c.cmdline():
                    found.append(c)
            except psutil.Error:  # the victim, a zombie until the launcher reaps it
                pass
        return found
    wait_until(reloading, 30, "the victim's replacement to start", proc)
    stream = Stream(url, 150)
    wait_until(lambda: stream.tokens >= 2, 120, "the stream to start", proc)
    proc.popen.send_signal(signal.SIGTERM)

    def refused():
        r = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 2}, timeout=30)
        return r.status_code == 503 and r
    r = wait_until(refused, 10, "new requests to get 503", proc)
    assert r.json()["error"]["code"] == "shutting_down"
    assert httpx.get(url + "/health", timeout=5).status_code == 503

    stream.join(180)
    assert stream.intact and stream.tokens == 150, stream.events[-3:]
    assert proc.popen.wait(120) == 0, proc.tail()
    assert "Traceback" not in proc.log_path.read_text(), proc.tail(100)
