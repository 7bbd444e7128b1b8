"""LAMB and LARS under fp16 (dynamic loss scaling) and bf16, ZeRO 0-3, against the fp32 single-process run.

One 2-rank launch runs the whole matrix (see tests/workers/mixed_precision.py). fp16 runs on the CPU only because
the worker patches the accelerator to report fp16 support: a test-only shim, never used by the product.
"""

from __future__ import annotations

import pytest

from conftest import WORKERS, deepspeed_launch, read_json

pytestmark = [pytest.mark.multiproc, pytest.mark.slow]


def test_trust_ratios_use_fp32_masters_and_unscaled_gradients(tmp_path):
    out = tmp_path / "result.json"
    deepspeed_launch([str(WORKERS / "mixed_precision.py"), "--out", str(out)], world=2)
    result = read_json(out)
    cases = result["cases"]
    assert len(cases) == 2 * 9
    # Stage 0 in 16 bits is refused with a sentence that names the fix (see bigbatch.engine.refuse_16bit_stage0).
    refused = [c for c in cases if c["refused"]]
    assert {(c["optimizer"], c["precision"], c["stage"]) for c in refused} == {
        (o, p, 0) for o in ("lamb", "lars") for p in ("fp16", "bf16")}
    assert all("zero_optimization.stage" in c["refused"] for c in refused)
    ran = [c for c in cases if not c["refused"]]
    wrappers = {(c["precision"], c["stage"], c["wrapper"]) for c in ran}
    # the layouts the optimizer has to understand: DeepSpeed's flat ZeRO partitions at 1-3 and the BF16_Optimizer's
    assert ("bf16", 1, "BF16_Optimizer") in wrappers and ("fp16", 3, "DeepSpeedZeroOptimizer_Stage3") in wrappers
    for c in ran:
        label = f"{c['optimizer']} {c['precision']} stage {c['stage']} ({c['wrapper']})"
        assert c["skipped"] == 0, f"{label}: an overflow skipped a step, the comparison would be off by a step"
        assert c["names_match"], label
        # First-step trust ratios against fp32: 16-bit rounding only (measured 1e-4 fp16, 1e-3 bf16). A ratio
        # taken on loss-scaled gradients would be off by the scale (256x for LARS).
        assert c["ratio_deviation"] < (1e-3 if c["precision"] == "fp16" else 5e-3), label
        # Only the partitioning differs between stages of one precision (measured: bitwise equal).
        assert c["cross_stage_deviation"] < 1e-6, label
        # After 4 steps, against fp32. bf16 is loose: LAMB's first steps are sign-like, and an element whose
        # gradient is near 0 can flip sign under 8-bit mantissas (measured 0.125 LAMB, 0.015 LARS; fp16 0.002).
        assert c["deviation"] < (1e-2 if c["precision"] == "fp16" else 0.25), label
