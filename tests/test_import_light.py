"""The gateway side must never pull in torch, vllm or transformers."""

import subprocess
import sys

from conftest import ROOT


def test_gateway_imports_no_heavy_packages():
    code = (
        "import sys, gateway, gateway.supervisor.cli, gateway.openai.app, gateway.engines.client, gateway.supervisor.launcher, gateway.runpod.worker, gateway.metrics, gateway.openai.calls, gateway.openai.schemas, gateway.runpod.schemas, protocol.transport, protocol.metrics, runpod;"
        "heavy = [m for m in ('torch', 'vllm', 'transformers') if m in sys.modules];"
        "print(heavy); sys.exit(1 if heavy else 0)"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_pip_check_reports_only_documented_gaps():
    r = subprocess.run([sys.executable, "deploy/pip_check.py"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
