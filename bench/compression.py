"""Compression (issue 22): held-out loss, size and CPU latency of a pruned and quantized model, side by side.

    .venv/bin/python bench/compression.py --run <a finished bigbatch run>   # writes bench/results/compression-<host>.*

`bigbatch compress` on one run for each pruning kind (unstructured: global over the Linear weights; heads: whole
attention heads removed) and sparsity, with and without --recover, crossed with --quantize none and int8-dynamic. Each
cell is its own compress call, so "before" is the same model every time; the table gives the after figures and, once,
the before.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bigbatch.cli import main as bigbatch  # noqa: E402

from common import RESULTS, machine  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--run", type=Path, required=True)
    p.add_argument("--work", type=Path, default=Path("/tmp/bigbatch-bench-compression"))
    p.add_argument("--sparsities", default="0,0.3,0.5,0.7")
    p.add_argument("--recover", type=int, default=5)
    p.add_argument("--kinds", default="unstructured,heads")
    args = p.parse_args()
    rows = []
    for kind in args.kinds.split(","):
        for sparsity in [float(s) for s in args.sparsities.split(",") if float(s) or kind == "unstructured"]:
            for recover in ([0, args.recover] if sparsity else [0]):
                for quantize in ("none", "int8-dynamic"):
                    rows.append(cell(args, kind, sparsity, recover, quantize))
    # the control for recovery: the same steps from the unpruned model (a sparsity that rounds to no weight)
    rows.append(cell(args, "unstructured", 1e-9, args.recover, "none"))
    write(rows)


def cell(args: argparse.Namespace, kind: str, sparsity: float, recover: int, quantize: str) -> dict:
    """One compress call's report (read back when the work directory already holds it)."""
    out = args.work / f"{kind}-s{sparsity}-r{recover}-{quantize}"
    argv = ["compress", str(args.run), "--out", str(out), "--overwrite", "--prune", str(sparsity), "--prune-kind",
            kind, "--quantize", quantize, *(["--recover", str(recover)] if recover else [])]
    if not (out / "compression.json").is_file() and bigbatch(argv) != 0:
        raise SystemExit(f"{' '.join(argv)} failed")
    return json.loads((out / "compression.json").read_text())


def write(rows: list[dict]) -> None:
    host = socket.gethostname()
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"compression-{host}.json").write_text(json.dumps({"machine": machine(), "rows": rows}, indent=1))
    b = rows[0]["before"]
    lines = [f"# Compression ({machine()['cpu']}, {machine()['cores']} cores)", "",
             f"Before: held-out loss {b['eval_loss']:.4f}, {b['parameters']:,} parameters, {b['bytes_on_disk']:,} "
             f"bytes on disk, {b['latency_s_per_batch'] * 1e3:.1f} ms per batch of {rows[0]['latency_batch']}.", "",
             "| pruned | sparsity | recover steps | quantize | held-out loss | params | non-zero params | "
             "Linear bytes | bytes on disk | ms / batch |", "|" + " --- |" * 10]
    for r in rows:
        a = r["after"]
        lines.append(f"| {r['prune_kind']} | {r['prune']} | {r['recover']} | {r['quantize']} | {a['eval_loss']:.4f} | "
                     f"{a['parameters']:,} | "
                     f"{a['nonzero_parameters']:,} | {a['linear_weight_bytes']:,} | {a['bytes_on_disk']:,} | "
                     f"{a['latency_s_per_batch'] * 1e3:.1f} |")
    (RESULTS / f"compression-{host}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
