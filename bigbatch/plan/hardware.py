"""Device and interconnect catalogues for the step-time model (`bigbatch.plan.timing`), each figure with its datasheet.

Peaks are dense (no structured sparsity): NVIDIA's datasheets print the tensor-core figures "with sparsity", twice
the dense ones, and mark them with a footnote. fp32 training in PyTorch runs plain fp32 matmuls (TF32 is off by
default for matmuls since torch 1.12), so the fp32 peak is the non-tensor FP32 figure. NVLink figures are the
datasheets' totals over both directions; a ring sends in one direction at a time, so the model uses half.

`cpu` is not in the table: `measure_cpu` probes this machine on the spot, at the recipe's own shapes: matmul and
attention FLOP/s, the time of an elementwise pass, and copy bandwidth.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import statistics
import time
from dataclasses import dataclass
from typing import Callable

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
    # Measured devices only (cpu), where the efficiency factor would not carry over from one shape to another:
    attention_flops: float = 0.0  # FLOP/s of fused attention (SDPA) at the model's heads; 0: peak x efficiency
    elementwise_s: float = 0.0  # seconds per element of one elementwise pass (LayerNorm, GELU, adds); 0: absorbed


@dataclass(frozen=True)
class Interconnect:
    name: str
    bandwidth: float  # bytes/s in one direction
    per: str  # "gpu": each GPU has its own link (one NIC per GPU, rail-optimised); "node": the node's GPUs share it
    latency: float  # seconds per hop of a collective
    source: str


# What the device reports, not the datasheet's decimal "80 GB": cudaDeviceProp.totalGlobalMem, which torch's
# total_memory and nvidia-smi's memory.total (in MiB) both read; the datasheet's figure counts memory the driver keeps.
MiB = 2**20
CAPACITIES = {  # MiB, and where the figure is printed
    "A100-40GB": (40_339, "deviceQuery on an A100-SXM4-40GB: 40339 MBytes (42298834944 bytes), "
                          "github.com/bottlerocket-os/bottlerocket/pull/3873"),
    "A100-80GB": (81_252, "nvidia-smi on A100-SXM-80GB: 81252MiB, github.com/keyu-tian/SparK/issues/8"),
    "H100-SXM": (81_559, "nvidia-smi on an H100 SXM 80GB (NVIDIA H100 80GB HBM3): 81559MiB"),
    "H200": (143_771, "nvidia-smi on an H200 SXM (700 W): 143771MiB, as in public nvidia-smi logs"),
    "B200": (183_359, "nvidia-smi on a B200: 183359MiB, github.com/NVIDIA/TensorRT-LLM/issues/10278"),
}


def _gpu(name: str, half: float, fp32: float, hbm: float, nvlink_total: float, network: str, source: str) -> Device:
    if name.startswith("A100"):
        efficiency, how = A100_EFFICIENCY, A100_CALIBRATION
    else:
        how = H100_CALIBRATION if name.startswith("H100") else f"H100's, {H100_CALIBRATION}; not {name}'s own"
        efficiency = H100_EFFICIENCY
    mib, where = CAPACITIES[name]
    return Device(name, {"fp32": fp32, "fp16": half, "bf16": half}, hbm, mib * MiB, nvlink_total / 2,
                  network, efficiency, how, f"{source}; memory {where}")


DEVICES: dict[str, Device] = {
    "A100-40GB": _gpu("A100-40GB", 312 * TB, 19.5 * TB, 1555 * GB, 600 * GB, "hdr200", A100_DATASHEET),
    "A100-80GB": _gpu("A100-80GB", 312 * TB, 19.5 * TB, 2039 * GB, 600 * GB, "hdr200", A100_DATASHEET),
    "H100-SXM": _gpu("H100-SXM", 989 * TB, 67 * TB, 3350 * GB, 900 * GB, "ndr400", H100_DATASHEET),
    "H200": _gpu("H200", 989 * TB, 67 * TB, 4800 * GB, 900 * GB, "ndr400", H200_DATASHEET),
    "B200": _gpu("B200", 2250 * TB, 75 * TB, 8000 * GB, 1800 * GB, "ndr400", B200_DATASHEET),
}
DEVICE_NAMES = (*DEVICES, "cpu")
# the device `bigbatch plan` times on without --gpu, and `auto` ranks on where CUDA names no catalogue entry: the one
# the calibration rows ran on
DEFAULT_GPU = "A100-80GB"


def parse_memory(text: str) -> int:
    """`80GB` (10^9 bytes), `80GiB` (2^30 bytes), `80` (GiB), or a card of the catalogue (`A100-80GB`: what the
    device reports, CAPACITIES) -> bytes."""
    if text.strip() in CAPACITIES:
        return CAPACITIES[text.strip()][0] * MiB
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*(gb|gib)?\s*", text, re.IGNORECASE)
    if not match or float(match.group(1)) <= 0:
        raise ConfigError(f"--gpu-memory={text!r} is not a positive memory size; write it as 80GB, 80GiB, 80 (GiB) "
                          f"or a card: {', '.join(CAPACITIES)}.")
    unit = 10**9 if (match.group(2) or "").lower() == "gb" else 2**30
    return int(float(match.group(1)) * unit)


def catalogue_name(cuda_name: str) -> str | None:
    """The catalogue entry of the GPU `torch.cuda.get_device_name()` calls `cuda_name`; None when none matches."""
    return next((name for pattern, name in CUDA_NAMES if re.search(pattern, cuda_name)), None)

# torch.cuda.get_device_name() of the catalogue's GPUs. The A100's PCIe cards share its SXM peaks (the datasheet's
# one column of FLOPS); H100 PCIe and NVL and H200 NVL have lower peaks than the SXM entries here, so match none.
CUDA_NAMES = ((r"A100\b.*\b40GB", "A100-40GB"), (r"A100\b.*\b80GB", "A100-80GB"), (r"H100 80GB HBM3$", "H100-SXM"),
              (r"H200$", "H200"), (r"B200$", "B200"))


def cuda_peak_flops(cuda_name: str, precision: str) -> float | None:
    """The catalogue's dense peak FLOP/s in `precision` (fp32, fp16, bf16) of the GPU that
    `torch.cuda.get_device_name()` calls `cuda_name` ("NVIDIA H100 80GB HBM3"); None for any other name, cpu too."""
    name = catalogue_name(cuda_name)
    return DEVICES[name].peak_flops[precision] if name else None


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
    """`table[name]`; ConfigError naming the flag `kind`, the closest name and every choice otherwise."""
    if name not in table:
        hint = difflib.get_close_matches(name, table, n=1, cutoff=0.4)
        extra = f" (did you mean {hint[0]!r}?)" if hint else ""
        names = DEVICE_NAMES if kind == "--gpu" else tuple(table)
        raise ConfigError(f"{kind}={name!r} is not in the catalogue{extra}; pick one of {', '.join(names)}.")
    return table[name]


@dataclass(frozen=True)
class CpuShapes:
    """The model shapes the cpu probe measures at: tokens of a micro-batch, widths, heads, sequence length."""

    tokens: int = 4096
    hidden: int = 512
    ffn: int = 2048
    heads: int = 8
    seq: int = 512


@dataclass(frozen=True)
class CpuProbe:
    """What `probe_cpu` measured on one rank's share of this machine."""

    flops: float  # fp32 matmul FLOP/s at the model's Linear shape
    attention_flops: float  # fp32 SDPA forward + backward FLOP/s at the model's heads and sequence length
    elementwise_s: float  # seconds per element of one pass of LayerNorm, GELU, softmax or an add (forward+backward)
    bandwidth: float  # bytes/s of a large copy (read + write)
    threads: int
    seconds: float  # how long the probe took


def probe_cpu(threads: int, shapes: CpuShapes = CpuShapes(), budget_s: float = 0.3, copy_bytes: int = 64 << 20,
              ranks: int = 1) -> CpuProbe:
    """Each figure the median of the repeats that fit in `budget_s` (at least 3), on `threads` threads, while
    `ranks` copies run at once (one per rank sharing the machine: they contend for cores, caches and memory as the
    ranks will). Tokens are capped (4,096, and about 1 GFLOP a GEMM) so the probe takes about a second whatever the
    model."""
    import torch
    import torch.nn.functional as F

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    start = time.perf_counter()
    h = shapes.hidden
    t = max(64, min(shapes.tokens, 4096, int(1e9 // (2 * h * shapes.ffn))))  # at most ~1 GFLOP a GEMM
    d = h // shapes.heads
    batch = max(1, t // shapes.seq)

    def workloads() -> dict[str, Callable[[], object]]:
        a, w, g = torch.randn(t, h), torch.randn(h, shapes.ffn), torch.randn(t, shapes.ffn)
        q, k, v = (torch.randn(batch, shapes.heads, shapes.seq, d, requires_grad=True) for _ in range(3))
        x = torch.randn(t, h, requires_grad=True)
        src = torch.empty(copy_bytes // 4)
        src.fill_(1.0)
        dst = torch.empty_like(src)
        # a Linear's three GEMMs in training: forward, the input's gradient, the weight's gradient
        return {"mm": lambda: (torch.mm(a, w), torch.mm(g, w.t()), torch.mm(a.t(), g)),
                "attention": lambda: F.scaled_dot_product_attention(q, k, v).sum().backward(),
                # 4 passes forward (LayerNorm, GELU, softmax, add), each with its backward
                "chain": lambda: (torch.softmax(F.gelu(F.layer_norm(x, (h,))), -1) + x).sum().backward(),
                "copy": lambda: dst.copy_(src)}

    copies = [workloads() for _ in range(ranks)]
    try:
        best = {name: _median([c[name] for c in copies], budget_s) for name in copies[0]}
    finally:
        torch.set_num_threads(old)
    return CpuProbe(3 * 2 * t * h * shapes.ffn / best["mm"], 3 * 4 * batch * shapes.heads * shapes.seq**2 * d
                    / best["attention"], best["chain"] / (4 * 3 * t * h), 2 * copy_bytes / best["copy"], threads,
                    time.perf_counter() - start)


def _median(fns: list[Callable[[], object]], budget_s: float) -> float:
    """The median wall time of running every fn at once, one Python thread each (torch releases the GIL): the
    median, as the step times it predicts are medians on a machine that others share."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(len(fns)) as pool:
        def once() -> float:
            t = time.perf_counter()
            for future in [pool.submit(fn) for fn in fns]:
                future.result()
            return time.perf_counter() - t

        once()  # warm-up: first touch, thread pool start
        times, end = [], time.perf_counter() + budget_s
        while len(times) < 3 or time.perf_counter() < end:
            times.append(once())
        return statistics.median(times)


def cpu_device(probe: CpuProbe, memory_bytes: int) -> Device:
    """The `cpu` device from a probe: every precision at the fp32 matmul rate (no faster 16-bit matmul assumed),
    the copy bandwidth for memory and for the ranks' shared-memory collectives."""
    return Device("cpu", {p: probe.flops for p in ("fp32", "fp16", "bf16")}, probe.bandwidth, memory_bytes,
                  probe.bandwidth / 2, "loopback", 1.0,
                  "1.0: the probe measured the matmuls, attention and elementwise passes at the model's own shapes",
                  f"measured now on {probe.threads} thread(s) per rank in {probe.seconds:.1f} s: "
                  f"{probe.flops / 1e9:.1f} GFLOP/s matmul, {probe.attention_flops / 1e9:.1f} GFLOP/s attention, "
                  f"{probe.elementwise_s * 1e9:.2f} ns per elementwise pass per element, "
                  f"{probe.bandwidth / 1e9:.1f} GB/s copy",
                  attention_flops=probe.attention_flops, elementwise_s=probe.elementwise_s)


def measure_cpu(ranks_per_node: int, shapes: CpuShapes = CpuShapes(),
                probe_fn: Callable[..., CpuProbe] = probe_cpu) -> Device:
    """The `cpu` device measured on the spot for `ranks_per_node` ranks sharing this machine's cores."""
    cores = os.cpu_count() or 1
    threads = max(1, cores // ranks_per_node)
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // ranks_per_node
    return cpu_device(probe_fn(threads, shapes, ranks=ranks_per_node), memory)


def device(name: str, ranks_per_node: int = 1, *, peak_tflops: float | None = None,
           memory_bandwidth_gbps: float | None = None, intra_node_gbps: float | None = None,
           efficiency: float | None = None, shapes: CpuShapes = CpuShapes()) -> Device:
    """A catalogue device (or the cpu, measured at `shapes`) with the command line's overrides applied."""
    dev = measure_cpu(ranks_per_node, shapes) if name == "cpu" else lookup("--gpu", name, DEVICES)
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
    """A catalogue network, its bandwidth replaced by --inter-node-bandwidth when given."""
    net = lookup("--interconnect", name, INTERCONNECTS)
    if inter_node_gbps is not None:
        if not inter_node_gbps > 0:
            raise ConfigError(f"--inter-node-bandwidth={inter_node_gbps} must be a positive number of GB/s.")
        net = dataclasses.replace(net, bandwidth=inter_node_gbps * GB, source="--inter-node-bandwidth")
    return net
