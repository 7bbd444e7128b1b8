"""Process-group helpers: one process works without a launcher, and the few collectives the loop needs."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path
from typing import Any

# torch loads on first use, not on import: the CLI imports this module, and `bigbatch check`, `plan` and a rank's
# signal handlers (bigbatch.run.preemption) come before torch's seconds of import time.


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_standalone = False  # True when ensure_env made up the world of one (no launcher)


def ensure_env() -> None:
    """Without a launcher (`python recipes/tiny.py`) fill in a world of one, so DeepSpeed's init just works."""
    global _standalone
    if "RANK" not in os.environ and "SLURM_PROCID" in os.environ and "MASTER_ADDR" in os.environ:
        # started by srun itself (DeepSpeed's --launcher slurm), which numbers tasks but sets no torch variables
        os.environ["RANK"] = os.environ["SLURM_PROCID"]
        os.environ["WORLD_SIZE"] = os.environ.get("SLURM_NTASKS", "1")
        os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        os.environ.setdefault("LOCAL_RANK", "0")
        return
    _standalone = "MASTER_PORT" not in os.environ
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init() -> tuple[int, int]:
    """Starts the process group through DeepSpeed (gloo on the CPU, nccl on GPUs); returns (rank, world)."""
    import deepspeed
    import torch.distributed as dist

    ensure_env()
    for attempt in range(5):
        try:
            deepspeed.init_distributed(verbose=False)
            break
        except dist.DistNetworkError:
            # The port picked free for a world of one was taken before the store bound it: pick another.
            if not _standalone or attempt == 4:
                raise
            os.environ["MASTER_PORT"] = str(free_port())
    return dist.get_rank(), dist.get_world_size()


def shutdown() -> None:
    """Tears the process group down before the interpreter exits. Left to interpreter exit, a rank's gloo threads
    can abort it ("terminate called without an active exception"), which the launcher reports as a failed run."""
    if "torch.distributed" not in sys.modules:  # nothing started a group (`bigbatch plan`): torch need not load
        return
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()  # every rank is past its last collective: the shared buffers below are no longer read
        _unlink_cpu_comm_buffer(dist.get_rank())
        dist.destroy_process_group()


def _unlink_cpu_comm_buffer(rank: int) -> None:
    """DeepSpeed's CPU all-reduce (its shm comm op) maps a 66 MB buffer per rank from /dev/shm, named
    deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>, and never unlinks it: every CPU launch would
    leave its ranks' buffers in memory until the machine restarts (262 of them, 17 GiB, filled this machine's RAM).
    Each rank removes its own name at shutdown; the mappings stay valid until the processes exit."""
    name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{rank}")
    Path("/dev/shm", name).unlink(missing_ok=True)


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def sum_across_ranks(values: list[float]) -> list[float]:
    """One all-reduce of a few numbers, on the accelerator's device (NCCL reduces no CPU tensor); without a process
    group (a caller in one process), the numbers themselves, as `barrier` is then nothing."""
    return _all_reduce(values, "sum")


def min_across_ranks(value: int) -> int:
    """The least of every rank's `value` (one all-reduce MIN); without a process group, `value` itself. In float64,
    exact for integers below 2**53 (bytes of memory)."""
    return int(_all_reduce([float(value)], "min")[0])


def _all_reduce(values: list[float], op: str) -> list[float]:
    import torch
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    if not dist.is_initialized():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=get_accelerator().current_device_name())
    dist.all_reduce(t, op=dist.ReduceOp.MIN if op == "min" else dist.ReduceOp.SUM)
    return t.tolist()


def broadcast(obj: Any, src: int = 0) -> Any:
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(obj: Any) -> list[Any]:
    import torch.distributed as dist

    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
