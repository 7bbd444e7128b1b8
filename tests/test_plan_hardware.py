"""bigbatch/plan/hardware.py: the catalogue's sources and fitted factors, its overrides and the cpu probe."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bigbatch.plan import hardware


def test_cpu_probe_measures_something_quickly():
    p = hardware.probe_cpu(1, hardware.CpuShapes(256, 32, 64, 2, 64), budget_s=0.02, copy_bytes=1 << 20, ranks=2)
    assert p.flops > 1e8 and p.attention_flops > 1e7 and 0 < p.elementwise_s < 1e-6 and p.bandwidth > 1e8
    assert p.seconds < 2


def test_overrides_replace_catalogue_figures():
    dev = hardware.device("H100-SXM", peak_tflops=500, memory_bandwidth_gbps=1000, intra_node_gbps=100,
                          efficiency=0.4)
    assert (dev.peak_flops["bf16"], dev.memory_bandwidth, dev.intra_node_bandwidth, dev.efficiency) == \
        (500e12, 1000e9, 100e9, 0.4)
    assert hardware.interconnect("ndr400", inter_node_gbps=10).bandwidth == 10e9


def test_every_catalogue_entry_cites_its_source():
    for dev in hardware.DEVICES.values():
        assert "datasheet" in dev.source and dev.efficiency_source
    for net in hardware.INTERCONNECTS.values():
        assert net.source


def test_catalogue_efficiencies_are_the_benchmarks_fitted_values():
    # bench/plan_vs_published.py fits them on its `calibrate` rows; the committed result must agree with the code
    fitted = json.loads((Path(__file__).resolve().parent.parent / "bench/results/plan_vs_published.json")
                        .read_text())["fitted"]
    assert hardware.DEVICES["A100-80GB"].efficiency == pytest.approx(fitted["A100"], abs=5e-4)
    assert hardware.DEVICES["H100-SXM"].efficiency == pytest.approx(fitted["H100"], abs=5e-4)
    assert hardware.DEVICES["B200"].efficiency == hardware.DEVICES["H100-SXM"].efficiency
