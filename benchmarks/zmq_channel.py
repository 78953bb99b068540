"""CPU per message received on a ZeroMQ DEALER in an asyncio (uvloop) process:
pyzmq's asyncio socket against `protocol.channel.Channel`, which both ends of the
gateway-engine link use. A forked sender pushes `--messages` small messages from
a ROUTER; the receiver's own CPU time (its event loop and ZeroMQ's I/O thread)
is divided by the count. Ends by printing one JSON line.

    .venv/bin/python benchmarks/zmq_channel.py
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import sys
import tempfile
import time

import uvloop
import zmq
import zmq.asyncio

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from protocol.channel import Channel  # noqa: E402


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def send_all(addr: str, n: int, size: int) -> None:
    sock = zmq.Context().socket(zmq.ROUTER)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.bind(addr)
    ident, _ = sock.recv_multipart()
    for i in range(n):
        sock.send_multipart([ident, b"x" * size])
        if i % 100 == 0:
            time.sleep(0.001)  # bursts of 100, as engine steps come
    time.sleep(1)


async def receive_asyncio(addr: str, n: int) -> float:
    sock = zmq.asyncio.Context().socket(zmq.DEALER)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.connect(addr)
    await sock.send(b"hi")
    await sock.recv()
    start = cpu_s()
    for _ in range(n - 1):
        await sock.recv()
    return cpu_s() - start


async def receive_channel(addr: str, n: int) -> float:
    sock = zmq.Context().socket(zmq.DEALER)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.connect(addr)
    done = asyncio.get_running_loop().create_future()
    seen = {"n": 0, "start": 0.0}

    def on_message(frames: list[bytes]) -> None:
        seen["n"] += 1
        if seen["n"] == 1:
            seen["start"] = cpu_s()
        elif seen["n"] == n:
            done.set_result(cpu_s() - seen["start"])

    channel = Channel(sock, on_message)
    channel.start()
    channel.send((b"hi",))
    return await done


def measure(kind: str, n: int, size: int) -> float:
    addr = f"ipc://{tempfile.mkdtemp()}/{kind}"
    pid = os.fork()
    if pid == 0:
        send_all(addr, n, size)
        os._exit(0)
    uvloop.install()
    receive = receive_asyncio if kind == "asyncio" else receive_channel
    spent = asyncio.run(receive(addr, n))
    os.waitpid(pid, 0)
    return spent / (n - 1) * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--messages", type=int, default=50_000)
    p.add_argument("--size", type=int, default=200)
    a = p.parse_args()
    result = {kind + "_us_per_message": round(measure(kind, a.messages, a.size), 2) for kind in ("asyncio", "channel")}
    print(json.dumps({"messages": a.messages, "size": a.size, **result}))


if __name__ == "__main__":
    main()
