"""How the sockets between gateways and engines are secured.

On one host engines listen on ipc:// sockets (file permissions guard them) or on
loopback tcp://. Across hosts an engine binds tcp:// only with ZeroMQ CURVE:
traffic is encrypted and only gateways whose public keys are in the engine's
authorized folder may connect. An engine refuses to bind anything else beyond
loopback.

Keys are ZeroMQ certificate files (`vllm-gateway keys DIR` makes them):

| Variable | Side | What |
|---|---|---|
| `ENGINE_CURVE_SECRET_KEY_FILE` | engine | the engine's certificate with its secret key |
| `ENGINE_CURVE_AUTHORIZED_KEYS` | engine | folder of the gateways' public certificates (`*.key`) |
| `ENGINE_CURVE_PUBLIC_KEY_FILE` | gateway | the engine's public certificate |
| `GATEWAY_CURVE_SECRET_KEY_FILE` | gateway | the gateway's certificate with its secret key |
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from pathlib import Path

import zmq
import zmq.asyncio
import zmq.auth


class InsecureEndpoint(ValueError):
    pass


def is_loopback(endpoint: str) -> bool:
    """ipc:// and inproc:// never leave the host; tcp:// only to loopback addresses."""
    if not endpoint.startswith("tcp://"):
        return True
    host = endpoint[len("tcp://"):].rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name or an interface name: assume it is reachable


def _keys(path: str) -> tuple[bytes, bytes]:
    public, secret = zmq.auth.load_certificate(path)
    if secret is None:
        raise InsecureEndpoint(f"{path} holds no secret key (use the *.key_secret file)")
    return public, secret


class ServerKeys:
    def __init__(self, public: bytes, secret: bytes, authorized: str) -> None:
        self.public = public
        self.secret = secret
        self.authorized = authorized


def server_keys(endpoint: str, env: Mapping[str, str] = os.environ) -> ServerKeys | None:
    """The engine's CURVE keys, or None without CURVE; raises `InsecureEndpoint`
    for a bind beyond loopback without them, or for incomplete settings."""
    key_file = env.get("ENGINE_CURVE_SECRET_KEY_FILE")
    if not key_file:
        if not is_loopback(endpoint):
            raise InsecureEndpoint(
                f"refusing to bind {endpoint} without authentication: set ENGINE_CURVE_SECRET_KEY_FILE "
                "and ENGINE_CURVE_AUTHORIZED_KEYS (see `vllm-gateway keys`), or bind to 127.0.0.1 / ipc://"
            )
        return None
    authorized = env.get("ENGINE_CURVE_AUTHORIZED_KEYS")
    if not authorized or not Path(authorized).is_dir():
        raise InsecureEndpoint("ENGINE_CURVE_AUTHORIZED_KEYS must name a folder of the gateways' public keys")
    public, secret = _keys(key_file)
    return ServerKeys(public, secret, authorized)


def secure_server(sock: zmq.Socket, keys: ServerKeys | None):
    """Configure an engine's socket before it binds. Returns the running ZAP
    authenticator (stop it on close), or None without CURVE."""
    if keys is None:
        return None
    ctx = sock.context
    if isinstance(ctx, zmq.asyncio.Context):
        from zmq.auth.asyncio import AsyncioAuthenticator as Authenticator
    else:
        from zmq.auth.thread import ThreadAuthenticator as Authenticator
    auth = Authenticator(ctx)
    auth.start()
    auth.configure_curve(domain="*", location=keys.authorized)
    sock.curve_secretkey = keys.secret
    sock.curve_publickey = keys.public
    sock.curve_server = True
    return auth


def secure_client(sock: zmq.Socket, env: Mapping[str, str] = os.environ) -> None:
    """Configure a gateway's socket before it connects: CURVE when the engine's
    public key is configured, plain otherwise."""
    server_key_file = env.get("ENGINE_CURVE_PUBLIC_KEY_FILE")
    if not server_key_file:
        return
    own = env.get("GATEWAY_CURVE_SECRET_KEY_FILE")
    if not own:
        raise InsecureEndpoint("ENGINE_CURVE_PUBLIC_KEY_FILE is set but GATEWAY_CURVE_SECRET_KEY_FILE is not")
    public, secret = _keys(own)
    sock.curve_serverkey = zmq.auth.load_certificate(server_key_file)[0]
    sock.curve_publickey = public
    sock.curve_secretkey = secret


ALLOW_PLAINTEXT = "ENGINE_ALLOW_PLAINTEXT"


def check_client_endpoints(endpoints: list[str], env: Mapping[str, str] = os.environ) -> None:
    """A gateway talks plaintext only to engines on this host (ipc://, loopback
    tcp://): beyond it, CURVE (ENGINE_CURVE_PUBLIC_KEY_FILE), or the explicit
    ENGINE_ALLOW_PLAINTEXT=1 of a network the operator trusts."""
    if env.get("ENGINE_CURVE_PUBLIC_KEY_FILE") or env.get(ALLOW_PLAINTEXT, "").strip().lower() in ("1", "true", "yes", "on"):
        return
    remote = [ep for ep in endpoints if not is_loopback(ep)]
    if remote:
        raise InsecureEndpoint(
            f"refusing to talk plaintext to {', '.join(remote)} (beyond this host): configure CURVE "
            f"(ENGINE_CURVE_PUBLIC_KEY_FILE and GATEWAY_CURVE_SECRET_KEY_FILE), or set {ALLOW_PLAINTEXT}=1 on a "
            "network you trust")


def create_keys(directory: str, name: str) -> tuple[str, str]:
    """Write `name.key` (public) and `name.key_secret` into `directory`."""
    os.makedirs(directory, exist_ok=True)
    public, secret = zmq.auth.create_certificates(directory, name)
    os.chmod(secret, 0o600)
    return public, secret
