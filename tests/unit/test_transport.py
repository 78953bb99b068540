"""Unit: securing the gateway-engine sockets (real ZeroMQ sockets, CURVE, ZAP)."""

import subprocess
import sys

import pytest
import zmq

from support import ROOT, child_env, free_port
from vllm_gateway.protocol.messages import Hello, decode_gateway_message, encode
from vllm_gateway.protocol.transport import InsecureEndpoint, create_keys, is_loopback, secure_client, secure_server, server_keys


@pytest.mark.parametrize("endpoint,local", [
    ("ipc:///tmp/x", True), ("tcp://127.0.0.1:5555", True), ("tcp://localhost:1", True), ("tcp://[::1]:1", True),
    ("tcp://0.0.0.0:5555", False), ("tcp://10.0.0.5:5555", False), ("tcp://eth0:5555", False), ("tcp://*:5555", False),
])
def test_loopback(endpoint, local):
    assert is_loopback(endpoint) is local


def test_no_unauthenticated_bind_beyond_loopback(tmp_path):
    assert server_keys("tcp://127.0.0.1:5555", {}) is None
    with pytest.raises(InsecureEndpoint, match="refusing to bind"):
        server_keys("tcp://0.0.0.0:5555", {})
    _, secret = create_keys(str(tmp_path), "engine")
    with pytest.raises(InsecureEndpoint, match="AUTHORIZED"):
        server_keys("tcp://0.0.0.0:5555", {"ENGINE_CURVE_SECRET_KEY_FILE": secret})


def test_engine_refuses_public_bind_before_loading_anything():
    r = subprocess.run([sys.executable, "-m", "vllm_gateway.engine", "--endpoint", "tcp://0.0.0.0:5999"], cwd=ROOT,
                       env=child_env(), capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "refusing to bind tcp://0.0.0.0:5999" in r.stderr, r.stderr


def test_curve_admits_only_authorized_gateways(tmp_path):
    keys, authorized = tmp_path / "keys", tmp_path / "authorized"
    authorized.mkdir()
    _, engine_secret = create_keys(str(keys), "engine")
    gw_public, gw_secret = create_keys(str(keys), "gateway")
    _, intruder_secret = create_keys(str(keys), "intruder")
    (authorized / "gateway.key").write_bytes(open(gw_public, "rb").read())
    endpoint = f"tcp://127.0.0.1:{free_port()}"

    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    auth = secure_server(router, server_keys(endpoint, {
        "ENGINE_CURVE_SECRET_KEY_FILE": engine_secret, "ENGINE_CURVE_AUTHORIZED_KEYS": str(authorized)}))
    router.bind(endpoint)

    def dealer(env):
        d = ctx.socket(zmq.DEALER)
        d.setsockopt(zmq.LINGER, 0)
        secure_client(d, env)
        d.connect(endpoint)
        return d

    engine_public = str(keys / "engine.key")
    try:
        good = dealer({"ENGINE_CURVE_PUBLIC_KEY_FILE": engine_public, "GATEWAY_CURVE_SECRET_KEY_FILE": gw_secret})
        good.send(encode(Hello("good")))
        assert router.poll(5000), "the authorized gateway was not heard"
        ident, payload = router.recv_multipart()
        assert decode_gateway_message(payload) == Hello("good")
        router.send_multipart([ident, b"reply"])
        assert good.poll(5000) and good.recv() == b"reply"

        intruder = dealer({"ENGINE_CURVE_PUBLIC_KEY_FILE": engine_public, "GATEWAY_CURVE_SECRET_KEY_FILE": intruder_secret})
        plain = dealer({})
        intruder.send(encode(Hello("intruder")))
        plain.send(encode(Hello("plain")))
        assert not router.poll(1500), "an unauthorized peer got through"
        for s in (good, intruder, plain):
            s.close(0)
    finally:
        auth.stop()
        router.close(0)
        ctx.term()
