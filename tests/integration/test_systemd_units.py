"""The systemd units (deploy/systemd), proven by the program that reads them:
`systemd-analyze verify` on them (paths adjusted to this checkout's venv only),
with no warning at all; and the ordering and limits a multi-GPU box needs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from support import ROOT

UNITS = ROOT / "deploy" / "systemd"


def _read(path: Path) -> dict[str, list[str]]:
    """key -> every value it is given (a unit may repeat a key)."""
    out: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if "=" in line and not line.lstrip().startswith(("#", "[")):
            key, value = line.split("=", 1)
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def test_systemd_analyze_verifies_the_units_without_a_warning(tmp_path):
    analyze = shutil.which("systemd-analyze")
    assert analyze is not None, "systemd-analyze is needed to verify the units"
    binary = Path(sys.executable).parent / "vllm-gateway"
    for unit in UNITS.glob("*.service"):
        (tmp_path / unit.name).write_text(unit.read_text().replace("/opt/venv/bin/vllm-gateway", str(binary)))
    env = dict(os.environ, SYSTEMD_UNIT_PATH=f"{tmp_path}:")  # the engines' instances resolve from here
    units = [str(tmp_path / "vllm-gateway-http.service"), str(tmp_path / "vllm-gateway-engine@0.service"),
             str(tmp_path / "vllm-gateway-engine@.service")]
    r = subprocess.run([analyze, "verify", *units], capture_output=True, text=True, env=env, cwd=tmp_path)
    said = [line for line in (r.stdout + r.stderr).splitlines() if "vllm-gateway" in line]
    assert r.returncode == 0 and not said, r.stdout + r.stderr


def test_the_gateway_starts_after_its_engines_and_stops_before_them():
    gateway, engine = _read(UNITS / "vllm-gateway-http.service"), _read(UNITS / "vllm-gateway-engine@.service")
    endpoints = [e for env in gateway["Environment"] if env.startswith("ENGINE_ENDPOINTS=")
                 for e in env.split("=", 1)[1].split(",")]
    after = " ".join(gateway["After"]).split()
    assert [f"vllm-gateway-engine@{i}.service" for i in range(len(endpoints))] == [u for u in after if "@" in u]
    assert set(after) <= set(" ".join(gateway["Wants"]).split())
    for unit in (gateway, engine):
        assert "network-online.target" in " ".join(unit["Wants"]) and "network-online.target" in " ".join(unit["After"])
        assert unit["RestartPreventExitStatus"] == ["2"]  # a bad setting is not restarted for ever
        assert int(unit["LimitNOFILE"][0]) >= 4096  # a thousand streams
    assert any(f.lstrip("-").startswith("/etc/vllm-gateway/") for f in gateway["EnvironmentFile"])
    assert not any(k in " ".join(gateway.get("Environment", [])) for k in ("API_KEY", "HF_TOKEN"))
    # the drain fits in the stop time
    drain = int(next(e.split("=", 1)[1] for e in gateway["Environment"] if e.startswith("DRAIN_TIMEOUT_S=")))
    assert int(gateway["TimeoutStopSec"][0]) > drain
