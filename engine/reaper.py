"""Nothing of an engine outlives it, even when it is killed outright.

vLLM runs the model in processes of its own (the engine core, its workers, a
resource tracker), started with `spawn` on CPU and `fork` on GPU. Were the engine
killed with SIGKILL (by an operator, the OOM killer), they would run on, holding
the model's memory (on a GPU, the GPU's), wherever nothing reaps the process
group: a shell, supervisord after a crash, a test.

So the engine, when it leads its process group (as under supervisord, systemd, a
shell's job control or our launcher), forks a small reaper before it loads
anything. The kernel tells the reaper when the engine dies (PR_SET_PDEATHSIG),
and the reaper then kills what is left of the group. It ignores the SIGTERM and
SIGINT meant for the engine (a group-wide stop or Ctrl-C), so that it outlives it.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal

log = logging.getLogger("engine.reaper")

PR_SET_PDEATHSIG = 1


def start() -> int | None:
    """Fork the reaper; its pid, or None when this process does not lead its
    process group (killing the group would then reach beyond the engine) or the
    platform has no PR_SET_PDEATHSIG."""
    if os.getpgrp() != os.getpid():
        log.warning("not the leader of a process group: if this engine is killed outright, vLLM's processes "
                    "may outlive it (start it in a process group of its own, as supervisord and systemd do)")
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    engine = os.getpid()
    pid = os.fork()
    if pid:
        return pid
    # The reaper: no return from here.
    try:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        prctl(PR_SET_PDEATHSIG, signal.SIGUSR1)
        if os.getppid() == engine:  # else the engine died before the request took effect
            signal.sigwait({signal.SIGUSR1})
        os.killpg(engine, signal.SIGKILL)  # the engine's group: its pgid is its pid
    finally:
        os._exit(0)
