"""The engine's per-request metrics when it reads the engine core's timestamps
itself (vLLM's per-iteration stats off): the same histograms as from vLLM's
request stats."""

from __future__ import annotations

import enum
from types import SimpleNamespace

from vllm_gateway.engine.stats import CoreTimes, RequestStats, StepClock
from vllm_gateway.protocol.metrics import EngineMetrics


class Kind(enum.IntEnum):  # vLLM's EngineCoreEventType, as far as these tests go
    QUEUED = 1
    SCHEDULED = 2
    PREEMPTED = 3


def event(kind: Kind, ts: float) -> SimpleNamespace:
    return SimpleNamespace(type=kind, timestamp=ts)


def counts(m: EngineMetrics, name: str) -> tuple[int, float]:
    h = m.histograms[name]
    return h.count, round(h.sum, 6)


def test_core_timestamps_give_queue_prefill_decode_and_inference_times():
    m = EngineMetrics.new("0", "m", 2048)
    clock = StepClock()
    stats = RequestStats(m, clock)
    core = stats.core = CoreTimes()
    kinds = (Kind.QUEUED, Kind.SCHEDULED, Kind.PREEMPTED)
    # The first output comes with its events, at step time 10.5.
    clock.now = 10.5
    core.on_events([event(Kind.QUEUED, 10.0), event(Kind.SCHEDULED, 10.25)], clock.now, *kinds)
    stats.on_output(5, 1)
    # A preemption, a later schedule (not counted), then the last output at 12.5.
    clock.now = 11.0
    core.on_events([event(Kind.PREEMPTED, 10.9), event(Kind.SCHEDULED, 10.95)], clock.now, *kinds)
    stats.on_output(5, 1)
    clock.now = 12.5
    stats.on_output(5, 1)
    stats.on_finish(["length"], None)
    assert counts(m, "request_queue_time_seconds") == (1, 0.25)
    assert counts(m, "request_prefill_time_seconds") == (1, 0.25)
    assert counts(m, "request_decode_time_seconds") == (1, 2.0)
    assert counts(m, "request_inference_time_seconds") == (1, 2.25)
    assert m.preemptions == 1 and m.generation_tokens == 3


def test_an_output_handed_over_late_is_not_stamped_before_its_first():
    """An output that came while the request was being attached is handed over
    later, in another step: a one-output request still has a decode time of 0."""
    m = EngineMetrics.new("0", "m", 2048)
    clock = StepClock()
    stats = RequestStats(m, clock)
    core = stats.core = CoreTimes()
    core.on_events([event(Kind.QUEUED, 5.0), event(Kind.SCHEDULED, 5.5)], 6.0, Kind.QUEUED, Kind.SCHEDULED,
                   Kind.PREEMPTED)
    clock.now = 4.0  # a step of other requests, stamped before this one's
    stats.on_output(3, 1)
    stats.on_finish(["length"], None)
    assert counts(m, "request_decode_time_seconds") == (1, 0.0)
    assert counts(m, "request_prefill_time_seconds") == (1, 0.5)


def test_with_vllms_request_stats_those_are_read():
    m = EngineMetrics.new("0", "m", 2048)
    stats = RequestStats(m)
    stats.on_output(3, 1)
    stats.on_finish(["stop"], SimpleNamespace(queued_ts=1.0, scheduled_ts=1.5, first_token_ts=2.0, last_token_ts=4.0,
                                              num_preemptions=2))
    assert counts(m, "request_queue_time_seconds") == (1, 0.5)
    assert counts(m, "request_decode_time_seconds") == (1, 2.0)
    assert m.preemptions == 2
