"""Device and interconnect catalogues for the step-time model (`bigbatch.timing`), each figure with its datasheet.

Peaks are dense (no structured sparsity): NVIDIA's datasheets print the tensor-core figures "with sparsity", twice
the dense ones, and mark them with a footnote. fp32 training in PyTorch runs plain fp32 matmuls (TF32 is off by
default for matmuls since torch 1.12), so the fp32 peak is the non-tensor FP32 figure. NVLink figures are the
datasheets' totals over both directions; a ring sends in one direction at a time, so the model uses half.

`cpu` is not in the table: `measure_cpu` probes this machine's matmul FLOP/s and memory bandwidth on the spot.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import time
from dataclasses import dataclass

from bigbatch.config import ConfigError

TB = 1e12
GB = 1e9

A100_DATASHEET = ("NVIDIA A100 Tensor Core GPU datasheet (nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf): "
                  "BF16/FP16 tensor 312 TFLOPS (624 with sparsity), FP32 19.5 TFLOPS, HBM2 1,555 GB/s (40GB), "
                  "HBM2e 2,039 GB/s (80GB SXM), NVLink 600 GB/s")
H100_DATASHEET = ("NVIDIA H100 Tensor Core GPU datasheet (H100 SXM column): BF16/FP16 tensor 1,979 TFLOPS with "
                  "sparsity (989 dense), FP32 67 TFLOPS, 80 GB HBM3 at 3.35 TB/s, NVLink 900 GB/s")
H200_DATASHEET = ("NVIDIA H200 Tensor Core GPU datasheet (H200 SXM column): BF16/FP16 tensor 1,979 TFLOPS with "
                  "sparsity (989 dense), FP32 67 TFLOPS, 141 GB HBM3e at 4.8 TB/s, NVLink 900 GB/s")
B200_DATASHEET = ("NVIDIA HGX B200 datasheet (8 GPUs; per GPU = /8): FP16/BF16 tensor 36 PFLOPS with sparsity "
                  "(2.25 PFLOPS dense per GPU), FP32 600 TFLOPS (75 per GPU), 1.44 TB HBM3e (180 GB per GPU) at "
                  "64 TB/s (8 TB/s per GPU), fifth-generation NVLink 1.8 TB/s per GPU")

# The achievable share of the dense peak a training step reaches in its matmuls, fitted by bench/plan_vs_published.py
# (geometric mean of predicted / published = 1 on the rows it marks `calibrate`; every other row is held out):
# A100 on NVIDIA DeepLearningExamples' BERT-large LAMB pretraining on one A100 80GB (seq 128 and 512); H100 on
# llm-foundry's MPT-1b and MPT-7b on 8 H100 80GB. H200 and B200 carry H100's factor: nothing published here
# calibrates them.
A100_EFFICIENCY = 0.554
H100_EFFICIENCY = 0.443
A100_CALIBRATION = "calibrated on NVIDIA's BERT-large figures on one A100 80GB (bench/plan_vs_published.py)"
H100_CALIBRATION = "calibrated on llm-foundry's MPT-1b/7b on 8 H100 80GB (bench/plan_vs_published.py)"


@dataclass(frozen=True)
class Device:
    name: str
    peak_flops: dict[str, float]  # precision (fp32, fp16, bf16) -> dense FLOP/s
    memory_bandwidth: float  # bytes/s of HBM (or DRAM)
    memory_bytes: int
    intra_node_bandwidth: float  # bytes/s one GPU sends in one direction over NVLink (or shared memory)
    interconnect: str  # the default inter-node network, a key of INTERCONNECTS
    efficiency: float  # achievable share of the peak in the matmuls
    efficiency_source: str
    source: str


@dataclass(frozen=True)
class Interconnect:
    name: str
    bandwidth: float  # bytes/s in one direction
    per: str  # "gpu": each GPU has its own link (one NIC per GPU, rail-optimised); "node": the node's GPUs share it
    latency: float  # seconds per hop of a collective
    source: str


def _gpu(name: str, half: float, fp32: float, hbm: float, memory_gb: float, nvlink_total: float, network: str,
         source: str) -> Device:
    if name.startswith("A100"):
        efficiency, how = A100_EFFICIENCY, A100_CALIBRATION
    else:
        how = H100_CALIBRATION if name.startswith("H100") else f"H100's, {H100_CALIBRATION}; not {name}'s own"
        efficiency = H100_EFFICIENCY
    return Device(name, {"fp32": fp32, "fp16": half, "bf16": half}, hbm, int(memory_gb * GB), nvlink_total / 2,
                  network, efficiency, how, source)


DEVICES: dict[str, Device] = {
    "A100-40GB": _gpu("A100-40GB", 312 * TB, 19.5 * TB, 1555 * GB, 40, 600 * GB, "hdr200", A100_DATASHEET),
    "A100-80GB": _gpu("A100-80GB", 312 * TB, 19.5 * TB, 2039 * GB, 80, 600 * GB, "hdr200", A100_DATASHEET),
    "H100-SXM": _gpu("H100-SXM", 989 * TB, 67 * TB, 3350 * GB, 80, 900 * GB, "ndr400", H100_DATASHEET),
    "H200": _gpu("H200", 989 * TB, 67 * TB, 4800 * GB, 141, 900 * GB, "ndr400", H200_DATASHEET),
    "B200": _gpu("B200", 2250 * TB, 75 * TB, 8000 * GB, 180, 1800 * GB, "ndr400", B200_DATASHEET),
}
DEVICE_NAMES = (*DEVICES, "cpu")

INTERCONNECTS: dict[str, Interconnect] = {
    "hdr200": Interconnect("hdr200", 200e9 / 8, "gpu", 5e-6,
                           "NVIDIA DGX A100 datasheet: 8x single-port ConnectX-6 VPI, 200 Gb/s HDR InfiniBand, one "
                           "per GPU"),
    "ndr400": Interconnect("ndr400", 400e9 / 8, "gpu", 5e-6,
                           "NVIDIA DGX H100 (and DGX B200) datasheet: 8x single-port ConnectX-7 VPI, up to 400 Gb/s "
                           "NDR InfiniBand, one per GPU"),
    "eth100": Interconnect("eth100", 100e9 / 8, "node", 20e-6,
                           "IEEE 802.3 100 Gb/s Ethernet, one port per node shared by its GPUs"),
    "eth25": Interconnect("eth25", 25e9 / 8, "node", 30e-6,
                          "IEEE 802.3 25 Gb/s Ethernet, one port per node shared by its GPUs"),
    # the demo's ranks share one machine: gloo copies through memory. Never crossed with one node.
    "loopback": Interconnect("loopback", 1e9, "node", 50e-6, "a single machine: no inter-node network"),
}


def lookup(kind: str, name: str, table: dict) -> object:
    if name not in table:
        hint = difflib.get_close_matches(name, table, n=1, cutoff=0.4)
        extra = f" (did you mean {hint[0]!r}?)" if hint else ""
        names = DEVICE_NAMES if kind == "--gpu" else tuple(table)
        raise ConfigError(f"{kind}={name!r} is not in the catalogue{extra}; pick one of {', '.join(names)}.")
    return table[name]


@dataclass(frozen=True)
class CpuProbe:
    """What `measure_cpu` measured on one rank's share of this machine."""

    flops: float  # fp32 matmul FLOP/s
    bandwidth: float  # bytes/s of a large copy (read + write)
    threads: int
    seconds: float  # how long the probe took


def probe_cpu(threads: int, matmul: int = 512, copy_bytes: int = 64 << 20, budget_s: float = 0.5) -> CpuProbe:
    """fp32 matmul FLOP/s (square `matmul`-sized) and copy bandwidth on `threads` threads, best of repeats within
    `budget_s` each. The best, not the mean: on a shared machine the slow repeats measure the neighbours."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    start = time.perf_counter()
    try:
        a, b = torch.randn(matmul, matmul), torch.randn(matmul, matmul)
        best_mm = _best(lambda: torch.mm(a, b), budget_s)
        src = torch.empty(copy_bytes // 4)
        src.fill_(1.0)
        dst = torch.empty_like(src)
        best_copy = _best(lambda: dst.copy_(src), budget_s)
    finally:
        torch.set_num_threads(old)
    return CpuProbe(2 * matmul**3 / best_mm, 2 * copy_bytes / best_copy, threads, time.perf_counter() - start)


def _best(fn, budget_s: float) -> float:
    fn()  # warm-up: first touch, thread pool start
    best, end = float("inf"), time.perf_counter() + budget_s
    while True:
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
        if time.perf_counter() > end:
            return best


def cpu_device(probe: CpuProbe, memory_bytes: int, efficiency: float = 1.0) -> Device:
    """The `cpu` device from a probe: every precision at the fp32 matmul rate (CPUs have no faster 16-bit matmul
    here), the copy bandwidth for memory and for the ranks' shared-memory collectives."""
    return Device("cpu", {p: probe.flops for p in ("fp32", "fp16", "bf16")}, probe.bandwidth, memory_bytes,
                  probe.bandwidth / 2, "loopback", efficiency,
                  "measured matmul rate at the model's own shapes is the peak; 1.0 unless --efficiency",
                  f"measured now: {probe.flops / 1e9:.1f} GFLOP/s fp32 matmul, {probe.bandwidth / 1e9:.1f} GB/s "
                  f"copy, {probe.threads} thread(s) per rank, in {probe.seconds:.1f} s")


def measure_cpu(ranks_per_node: int, probe_fn=probe_cpu) -> Device:
    """The `cpu` device measured on the spot for `ranks_per_node` ranks sharing this machine's cores."""
    cores = os.cpu_count() or 1
    threads = max(1, cores // ranks_per_node)
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // ranks_per_node
    return cpu_device(probe_fn(threads), memory)


def device(name: str, ranks_per_node: int = 1, *, peak_tflops: float | None = None,
           memory_bandwidth_gbps: float | None = None, intra_node_gbps: float | None = None,
           efficiency: float | None = None) -> Device:
    """A catalogue device (or the measured cpu) with the command line's overrides applied."""
    dev = measure_cpu(ranks_per_node) if name == "cpu" else lookup("--gpu", name, DEVICES)
    for key, value in (("--peak-tflops", peak_tflops), ("--memory-bandwidth", memory_bandwidth_gbps),
                       ("--intra-node-bandwidth", intra_node_gbps), ("--efficiency", efficiency)):
        if value is not None and not value > 0:
            raise ConfigError(f"{key}={value} must be a positive number; give it in the unit `bigbatch plan --help` "
                              "names, or leave it out for the catalogue's figure.")
    if efficiency is not None and efficiency > 1:
        raise ConfigError(f"--efficiency={efficiency} is above 1; it is the share of the peak reached, in (0, 1].")
    changes: dict[str, object] = {}
    if peak_tflops:
        changes["peak_flops"] = {p: peak_tflops * TB for p in dev.peak_flops}
    if memory_bandwidth_gbps:
        changes["memory_bandwidth"] = memory_bandwidth_gbps * GB
    if intra_node_gbps:
        changes["intra_node_bandwidth"] = intra_node_gbps * GB
    if efficiency:
        changes["efficiency"], changes["efficiency_source"] = efficiency, "--efficiency"
    return dataclasses.replace(dev, **changes)


def interconnect(name: str, inter_node_gbps: float | None = None) -> Interconnect:
    net = lookup("--interconnect", name, INTERCONNECTS)
    if inter_node_gbps is not None:
        if not inter_node_gbps > 0:
            raise ConfigError(f"--inter-node-bandwidth={inter_node_gbps} must be a positive number of GB/s.")
        net = dataclasses.replace(net, bandwidth=inter_node_gbps * GB, source="--inter-node-bandwidth")
    return net
