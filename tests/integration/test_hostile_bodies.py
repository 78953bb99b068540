"""Hostile request bodies against the real gateway and engine: each gets a fast 4xx
OpenAI error object (never a 5xx, a hang or a crash), memory stays bounded, and
the server answers normally afterwards."""

from __future__ import annotations

import json
import socket
import time
from urllib.parse import urlparse

import psutil
import pytest

from support import BODY_TIMEOUT_S, MODEL

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
USER = [{"role": "user", "content": "Hi"}]
BIG = 123456789012345678901234567890  # beyond 64 bits


def post(http, path: str, body: bytes | str | dict, content_type: str | None = "application/json"):
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    headers = {"content-type": content_type} if content_type else {}
    started = time.monotonic()
    r = http.post(path, content=data, headers=headers)
    return r, time.monotonic() - started


def refused(http, path, body, status=400, content_type="application/json", within_s=5.0) -> dict:
    r, took = post(http, path, body, content_type)
    assert r.status_code == status, r.text[:500]
    assert took < within_s, f"{took:.1f} s"
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"] and err["type"]
    return err


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.mark.parametrize("path,body,param", [
    # nesting far beyond the decoder's recursion limit, where free-form values are allowed
    (CHAT, '{"messages": [{"role": "user", "content": "x"}], "chat_template_kwargs": {"a": %s}}' % nested(100_000), None),
    (CHAT, '{"messages": [{"role": "user", "content": "x", "tool_calls": [%s]}]}' % nested(50_000), None),
    (COMPLETIONS, '{"prompt": %s}' % nested(100_000), None),
    # huge arrays
    (CHAT, {"messages": USER, "stop": ["a"] * 1_000_000}, "stop"),
    (CHAT, {"messages": USER, "stop_token_ids": [1] * 1_000_000}, "stop_token_ids"),
    (COMPLETIONS, {"prompt": [1] * 1_000_000}, "prompt"),
    (COMPLETIONS, {"prompt": ["x"] * 100_000}, "prompt"),
    (CHAT, {"messages": USER * 100_000}, "messages"),
    # numbers beyond 64 bits
    (CHAT, {"messages": USER, "seed": BIG}, "seed"),
    (CHAT, {"messages": USER, "max_tokens": BIG}, "max_tokens"),
    (CHAT, {"messages": USER, "min_tokens": BIG}, "min_tokens"),
    (CHAT, {"messages": USER, "stop_token_ids": [BIG]}, "stop_token_ids"),
    (CHAT, {"messages": USER, "logit_bias": {str(BIG): 1}}, "logit_bias"),
    (COMPLETIONS, {"prompt": [BIG]}, "prompt"),
    (COMPLETIONS, {"prompt": [[1, -BIG]]}, "prompt"),
    (CHAT, {"messages": [{"role": "assistant", "content": "x", "tool_calls": [{"id": BIG}]}, *USER]}, "messages"),
    (CHAT, '{"messages": [{"role": "user", "content": "x"}], "temperature": 1e400}', "temperature"),
])
def test_hostile_values_get_a_fast_400(http, path, body, param):
    err = refused(http, path, body)
    if param is not None:
        assert err["param"] is not None and err["param"].split(".")[0].split("[")[0] == param, err


def test_an_unknown_field_with_a_huge_integer_is_ignored(http):
    # vLLM drops unknown message fields; so do we (they used to reach the wire and fail with a 500).
    r, _ = post(http, CHAT, {"messages": [{"role": "user", "content": "Hi", "x": BIG}], "max_tokens": 2, "x": BIG})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("raw", [
    b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}',  # invalid UTF-8
    b'{"messages": [{"role": "user", "content": "\xed\xa0\x80"}]}',  # a surrogate encoded as UTF-8
    b'{"messages": [{"role": "user", "content": "\\ud800"}]}',  # a lone surrogate escape
    b'{"messages": [{"role": "user", "content": "a\x00b"}]}',  # a raw NUL inside a string
    b'\x00' * 64,
    b"",
    b"null",
    b"{",
    b'{"messages": [{"role": "user", "content": "x"}]}' + b" " * 10 + b"}",
])
def test_malformed_bytes_get_400(http, raw):
    refused(http, CHAT, raw)


def test_nul_escapes_are_text(http):
    r, _ = post(http, CHAT, {"messages": [{"role": "user", "content": "a\u0000b"}], "max_tokens": 2})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded", "multipart/form-data"])
def test_wrong_or_missing_content_type_415(http, content_type):
    err = refused(http, CHAT, {"messages": USER, "max_tokens": 2}, 415, content_type)
    assert err["param"] == "Content-Type"


def test_content_type_with_parameters_is_json(http):
    r, _ = post(http, CHAT, {"messages": USER, "max_tokens": 2}, "Application/JSON; charset=utf-8")
    assert r.status_code == 200, r.text


def _raw_request(url: str, head: bytes, body: bytes, wait_s: float) -> tuple[bytes, float]:
    u = urlparse(url)
    with socket.create_connection((u.hostname, u.port), timeout=wait_s) as s:
        started = time.monotonic()
        s.sendall(head + body)
        chunks = []
        while True:
            try:
                chunk = s.recv(65536)
            except socket.timeout:
                break
            if not chunk:
                break
            chunks.append(chunk)
            if b"\r\n\r\n" in b"".join(chunks) and b'"error"' in b"".join(chunks):
                break
        return b"".join(chunks), time.monotonic() - started


def test_a_body_that_never_finishes_gets_408(gateway_url):
    body = b'{"messages": [{"role": "user", "content": "'
    head = (f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body) + 1000}\r\n\r\n").encode()
    answer, took = _raw_request(gateway_url, head, body, BODY_TIMEOUT_S + 10)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert BODY_TIMEOUT_S - 0.5 <= took < BODY_TIMEOUT_S + 3, took
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "request_timeout"


def test_memory_stays_bounded_and_server_healthy(gateway, http):
    url, proc = gateway
    rss = psutil.Process(proc.popen.pid).memory_info().rss
    for _ in range(3):
        refused(http, CHAT, {"messages": USER, "stop": ["a"] * 1_000_000})
        refused(http, COMPLETIONS, {"prompt": [1] * 1_000_000})
        refused(http, CHAT, {"messages": USER * 100_000})
        refused(http, CHAT, b"x" * (17 * 1024 * 1024), 413)
    grown = psutil.Process(proc.popen.pid).memory_info().rss - rss
    assert grown < 64 * 2**20, f"RSS grew by {grown / 2**20:.0f} MiB"
    assert http.get("/health").status_code == 200
    r, _ = post(http, CHAT, {"model": MODEL, "messages": USER, "max_tokens": 3})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
