"""A thread that notices when the engine's event loop is held up, and says where.

The engine's loop is what answers the gateways: held up for `ENGINE_TIMEOUT_S`
(5 s), its gateways judge it silent and fail its requests. A loop held up that
long is a bug somewhere (a synchronous step in vLLM or in ours), and without
the stack it was stuck in, one that cannot be found. The thread wakes every
`CHECK_S`; when the loop's last beat is older than `HELD_UP_S`, it logs the
loop thread's stack once, and when the loop runs again, for how long it was
held. Its own lateness is reported beside: a process that was not scheduled at
all (the machine's CPU taken, or the process stopped) shows as late too.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import time
import traceback

log = logging.getLogger("engine.watchdog")

BEAT_S = 0.25
CHECK_S = 0.5
HELD_UP_S = 2.0


class LoopWatchdog:
    def __init__(self, loop: asyncio.AbstractEventLoop, held_up_s: float = HELD_UP_S) -> None:
        self.loop = loop
        self.held_up_s = held_up_s
        self.beat = time.monotonic()
        self._loop_thread = threading.get_ident()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="loop-watchdog", daemon=True)

    def start(self) -> None:
        self.loop.call_soon(self._on_beat)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _on_beat(self) -> None:
        self.beat = time.monotonic()
        if not self._stop.is_set():
            self.loop.call_later(BEAT_S, self._on_beat)

    def _watch(self) -> None:
        reported = 0.0  # the beat a held-up loop was reported at
        due = time.monotonic() + CHECK_S
        while not self._stop.wait(max(0.0, due - time.monotonic())):
            now = time.monotonic()
            late, due = now - due, now + CHECK_S
            beat = self.beat
            if now - beat > self.held_up_s and reported != beat:
                reported = beat
                frame = sys._current_frames().get(self._loop_thread)
                stack = "".join(traceback.format_stack(frame)) if frame is not None else "(no frame)\n"
                log.warning("the event loop has not run for %.1f s (this watchdog itself woke %.1f s late); "
                            "it is at:\n%s", now - beat, late, stack.rstrip())
            elif reported and reported != beat:
                log.warning("the event loop runs again, after %.1f s held up", beat - reported)
                reported = 0.0
