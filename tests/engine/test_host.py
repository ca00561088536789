"""The machine a run ran on, as its summary records it."""

from __future__ import annotations

import platform

import torch

from atlasfl.engine import host
from atlasfl.engine.host import cpu_model, host_facts

CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 9R14 96-Core Processor
flags\t\t: fpu avx512_bf16

processor\t: 1
model name\t: Some Other CPU
"""


def test_cpu_model_is_the_first_model_name():
    assert cpu_model(CPUINFO) == "AMD EPYC 9R14 96-Core Processor"
    assert cpu_model("processor\t: 0\nmodel name\t:   \n") is None  # empty value
    assert cpu_model("Hardware\t: BCM2835\n") is None


def test_host_facts_name_the_cpu_the_cores_and_the_threads(tmp_path, monkeypatch):
    info = tmp_path / "cpuinfo"
    info.write_text(CPUINFO)
    monkeypatch.setattr(host, "CPUINFO", info)
    monkeypatch.setattr(host.os, "sched_getaffinity", lambda pid: {0, 3, 5}, raising=False)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        facts = host_facts(torch.device("cpu"))
    finally:
        torch.set_num_threads(before)
    assert facts == {"cpu": "AMD EPYC 9R14 96-Core Processor", "cores": 3, "torch_threads": 3}


def test_host_facts_fall_back_to_the_platform_without_cpuinfo(tmp_path, monkeypatch):
    monkeypatch.setattr(host, "CPUINFO", tmp_path / "missing")
    assert host_facts(torch.device("cpu"))["cpu"] == (platform.processor()
                                                      or platform.machine())
