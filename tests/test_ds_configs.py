"""Every shipped ds_configs/ combination (ZeRO 0-3 x fp32/fp16/bf16 x activation checkpointing on/off) trains, 16 bits
as the same configuration does in fp32."""

from __future__ import annotations

import pytest

from bigbatch.plan.memory import model_state_bytes

from conftest import WORKERS, deepspeed_launch, read_json

pytestmark = [pytest.mark.multiproc, pytest.mark.slow]


# 16 bits against fp32, LAMB, after 3 steps: about 3x what was measured on 2 ranks. The parameters' distance from the
# fp32 run in units of the fp32 run's whole update (fp16 1.1e-2, bf16 9.0e-2; a step lost measures 0.32, DeepSpeed's
# unscale switched off 0.28), and the largest difference of a step's loss (fp16 4.5e-5, bf16 5.4e-4).
FP32_DEVIATION = {"fp16": 3.5e-2, "bf16": 0.25}
FP32_LOSS_DEVIATION = {"fp16": 1.5e-4, "bf16": 1.6e-3}


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("ds-configs") / "result.json"
    deepspeed_launch([str(WORKERS / "ds_configs_matrix.py"), "--out", str(out)], world=2)
    return read_json(out)


def test_every_shipped_combination_runs_three_steps(result):
    # every shipped file takes part in the matrix
    used = {c for case in result["cases"] for c in case["configs"]}
    assert used == set(result["shipped"]), f"shipped but never run: {set(result['shipped']) - used}"
    runs = [c for c in result["cases"] if "refused" not in c]
    assert len(runs) == 4 * 3 * 2 - 2 * 2  # every stage x precision x checkpointing, less 16 bits at stage 0
    for c in runs:
        label = f"{'+'.join(c['configs'])} ({c['optimizer']}, {c['wrapper']})"
        stage = int(c["configs"][0][len("zero"):-len(".json")])
        assert c["stage"] == stage, label
        assert c["fp16"] == ("fp16.json" in c["configs"]) and c["bf16"] == ("bf16.json" in c["configs"]), label
        assert c["checkpointing"] == ("act_ckpt.json" in c["configs"]), label
        assert c["finite"], f"{label}: loss {c['losses']}"
        # the planner's optimizer bytes (fp32 masters + moments) against what the real wrapper holds; the slack is
        # ZeRO's alignment padding of each partition, a few elements on this 24K-parameter model
        precision = next(p for p in ("fp32", "fp16", "bf16") if f"{p}.json" in c["configs"])
        planned = model_state_bytes(c["num_params"], stage, precision, c["optimizer"], result["world"])["optimizer"]
        assert c["optimizer_bytes"] == pytest.approx(planned, rel=0.03), label
        # every step updates every parameter (the fp32 masters: 16-bit weights round away a LayerNorm weight's update)
        assert c["skipped"] == 0 and c["moved"] == c["params"], label
        if precision != "fp32":  # the same configuration (stage, activation checkpointing) in fp32, same steps
            assert c["fp32_deviation"] < FP32_DEVIATION[precision], label
            assert c["fp32_loss_deviation"] < FP32_LOSS_DEVIATION[precision], label
    refused = [c for c in result["cases"] if "refused" in c]
    assert len(refused) == 2 * 2 * 2  # zero0 x {fp16, bf16} x {ckpt off, on} x {LAMB, AdamW}
    assert all(c["refused"] and "zero_optimization.stage >= 1, not 0" in c["refused"] for c in refused), refused
    assert {c["optimizer"] for c in refused} == {"lamb", "adamw"}
    assert not any(c.get("wrapper") == "FP16_UnfusedOptimizer" for c in result["cases"])
