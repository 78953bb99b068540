"""Unit: the deployment files say what the README says they do."""

import configparser
import re

from support import ROOT


def test_supervisord_runs_four_tp2_engines_and_one_gateway():
    conf = configparser.RawConfigParser()
    conf.read(ROOT / "deploy" / "supervisord.conf")
    engines = [s for s in conf.sections() if s.startswith("program:engine-")]
    assert len(engines) == 4
    gpus, endpoints = [], []
    for section in engines:
        env = dict(re.findall(r'(\w+)="([^"]*)"', conf.get(section, "environment")))
        assert env["TENSOR_PARALLEL_SIZE"] == "2"
        gpus += env["CUDA_VISIBLE_DEVICES"].split(",")
        endpoints.append(re.search(r"--endpoint (\S+)", conf.get(section, "command")).group(1))
        # exit 2 (a bad setting) is final, any other end restarted; engines stop
        # after the gateway under `stop all` (lowest priority first), and drain
        # within supervisord's patience when stopped first
        assert conf.get(section, "autorestart") == "unexpected" and conf.get(section, "exitcodes") == "0,2"
        assert int(conf.get(section, "priority")) > int(conf.get("program:gateway", "priority"))
        assert int(conf.get(section, "stopwaitsecs")) > 30  # ENGINE_DRAIN_TIMEOUT_S's default
    assert sorted(gpus) == [str(i) for i in range(8)]  # every GPU, each in one engine
    gateway = conf.get("program:gateway", "command")
    assert re.search(r"--engine-endpoints (\S+)", gateway).group(1).split(",") == endpoints
    drain = int(re.search(r'DRAIN_TIMEOUT_S="(\d+)"', conf.get("program:gateway", "environment")).group(1))
    assert int(conf.get("program:gateway", "stopwaitsecs")) > drain
    assert int(conf.get("supervisord", "minfds")) >= 4096


def test_systemd_units_match():
    engine = (ROOT / "deploy" / "systemd" / "vllm-gateway-engine@.service").read_text()
    http = (ROOT / "deploy" / "systemd" / "vllm-gateway-http.service").read_text()
    assert "--endpoint ipc:///run/vllm-gateway/engine-%i" in engine and "Restart=always" in engine
    endpoints = re.search(r"ENGINE_ENDPOINTS=(\S+)", http).group(1).split(",")
    assert endpoints == [f"ipc:///run/vllm-gateway/engine-{i}" for i in range(4)]
    drain = int(re.search(r"DRAIN_TIMEOUT_S=(\d+)", http).group(1))
    assert int(re.search(r"TimeoutStopSec=(\d+)", http).group(1)) > drain
