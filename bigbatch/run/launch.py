"""What the launcher and SLURM tell a process, read without torch: `python -m bigbatch` consults it before anything
heavy loads (see `bigbatch.run.preemption`)."""

from __future__ import annotations

import os


def drop_local_rank(argv: list[str]) -> list[str]:
    """The deepspeed launcher puts --local_rank=N (or --local_rank N) before the subcommand; LOCAL_RANK in the
    environment says the same, so the argument is dropped."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg.startswith(("--local_rank=", "--local-rank=")):
            continue
        elif arg in ("--local_rank", "--local-rank"):
            skip = True
        else:
            out.append(arg)
    return out


def slurm_restart() -> int:
    """How many times SLURM has requeued this job (0 outside SLURM)."""
    return int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)


def start_id() -> str:
    """This start's name as the SLURM template writes it into STOP (`<job id>.<restart count>`); '' outside SLURM."""
    job = os.environ.get("SLURM_JOB_ID", "")
    return f"{job}.{slurm_restart()}" if job else ""
