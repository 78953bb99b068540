"""The gateway side must never pull in torch, vllm or transformers."""

import subprocess
import sys

from support import ROOT


def test_gateway_imports_no_heavy_packages():
    """Every module of the gateway (and the wire), imported in one process."""
    code = (
        "import importlib, pkgutil, sys, runpod, vllm_gateway.gateway, vllm_gateway.protocol;"
        "[importlib.import_module(m.name) for pkg in (vllm_gateway.gateway, vllm_gateway.protocol)"
        " for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + '.')];"
        "heavy = [m for m in ('torch', 'vllm', 'transformers') if m in sys.modules];"
        "print(heavy); sys.exit(1 if heavy else 0)"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_pip_check_reports_only_documented_gaps():
    r = subprocess.run([sys.executable, "deploy/pip_check.py"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
