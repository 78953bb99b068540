"""A small local stand-in for RunPod's job queue, for the real RunPod SDK worker loop.

It serves the URLs the SDK derives from `RUNPOD_WEBHOOK_GET_JOB`,
`RUNPOD_WEBHOOK_POST_STREAM`, `RUNPOD_WEBHOOK_POST_OUTPUT` and
`RUNPOD_WEBHOOK_PING`: job-take (single and batch), the job-stop long-poll, stream
and result posts, and pings; and records everything the worker posted. Loopback only.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

LONG_POLL_S = 1.0


class JobQueue:
    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.pending: deque[dict] = deque()
        self.to_stop: list[str] = []
        self.taken: dict[str, float] = {}
        self.stream: dict[str, list] = {}
        self.done: dict[str, dict] = {}
        self.pings: list[dict] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def env(self) -> dict[str, str]:
        """The environment RunPod gives a worker, pointed at this queue."""
        b = self.base
        return {
            "RUNPOD_WEBHOOK_GET_JOB": f"{b}/v2/ep/job-take/$ID?gpu=cpu",
            "RUNPOD_WEBHOOK_POST_OUTPUT": f"{b}/v2/ep/job-done/$RUNPOD_POD_ID/$ID?gpu=cpu",
            "RUNPOD_WEBHOOK_POST_STREAM": f"{b}/v2/ep/job-stream/$RUNPOD_POD_ID/$ID?gpu=cpu",
            "RUNPOD_WEBHOOK_PING": f"{b}/ping/$RUNPOD_POD_ID?gpu=cpu",
            "RUNPOD_PING_INTERVAL": "1000",
            "RUNPOD_AI_API_KEY": "test-key",
            "RUNPOD_POD_ID": "test-worker",
            # The SDK's start-up checks would dial 8.8.8.8 and look for NVIDIA GPUs.
            "RUNPOD_SKIP_AUTO_SYSTEM_CHECKS": "true",
            "RUNPOD_SKIP_GPU_CHECK": "true",
        }

    # ------------------------------------------------------------------ test side

    def submit(self, job_input: dict) -> str:
        job_id = f"job-{uuid.uuid4().hex[:8]}"
        with self.cond:
            self.pending.append({"id": job_id, "input": job_input})
            self.cond.notify_all()
        return job_id

    def stop(self, job_id: str) -> None:
        with self.cond:
            self.to_stop.append(job_id)
            self.cond.notify_all()

    def wait_done(self, job_id: str, timeout: float = 120) -> dict:
        deadline = time.monotonic() + timeout
        with self.cond:
            while job_id not in self.done:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"job {job_id} not done after {timeout} s")
                self.cond.wait(left)
            return self.done[job_id]

    def wait_stream(self, job_id: str, count: int = 1, timeout: float = 60) -> list:
        deadline = time.monotonic() + timeout
        with self.cond:
            while len(self.stream.get(job_id, [])) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"job {job_id}: fewer than {count} stream posts after {timeout} s")
                self.cond.wait(left)
            return list(self.stream[job_id])

    def run(self, job_input: dict, timeout: float = 120) -> tuple[list, dict]:
        """Submit a job and wait for it: (stream outputs, final result)."""
        job_id = self.submit(job_input)
        result = self.wait_done(job_id, timeout)
        return [s["output"] for s in self.stream.get(job_id, [])], result

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    # ---------------------------------------------------------------- worker side

    def _take(self, n: int) -> list[dict]:
        deadline = time.monotonic() + LONG_POLL_S
        with self.cond:
            while not self.pending and time.monotonic() < deadline:
                self.cond.wait(deadline - time.monotonic())
            jobs = []
            while self.pending and len(jobs) < n:
                job = self.pending.popleft()
                self.taken[job["id"]] = time.monotonic()
                jobs.append(job)
            self.in_flight += len(jobs)
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            return jobs

    def _stops(self) -> list[str]:
        deadline = time.monotonic() + LONG_POLL_S
        with self.cond:
            while not self.to_stop and time.monotonic() < deadline:
                self.cond.wait(deadline - time.monotonic())
            ids, self.to_stop = self.to_stop, []
            return ids

    def _posted(self, kind: str, job_id: str, body: dict) -> None:
        with self.cond:
            if kind == "job-stream":
                self.stream.setdefault(job_id, []).append(body)
            else:
                self.done[job_id] = body
                self.in_flight -= 1
            self.cond.notify_all()


def _handler(q: JobQueue):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def _json(self, obj, status: int = 200) -> None:
            data = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _empty(self) -> None:
            self.send_response(204)
            self.end_headers()

        def do_GET(self) -> None:
            url = urlparse(self.path)
            parts = url.path.strip("/").split("/")
            query = parse_qs(url.query)
            if parts[0] == "ping":
                q.pings.append(query)
                return self._json({})
            kind = parts[2]
            if kind == "job-take":
                jobs = q._take(1)
                return self._json(jobs[0]) if jobs else self._empty()
            if kind == "job-take-batch":
                jobs = q._take(int(query.get("batch_size", ["1"])[0]))
                return self._json(jobs) if jobs else self._empty()
            if kind == "job-stop":
                ids = q._stops()
                return self._json({"jobsToStop": ids}) if ids else self._empty()
            self._json({"error": "not found"}, 404)

        def do_POST(self) -> None:
            url = urlparse(self.path)
            parts = url.path.strip("/").split("/")
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))) or b"{}")
            q._posted(parts[2], parts[4], body)
            self._json({})

    return Handler
