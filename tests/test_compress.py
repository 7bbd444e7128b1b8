"""`bigbatch compress` (bigbatch/run/compress.py, bigbatch/models/compression.py): pruning as asked, neuron pruning
against a smaller model built by hand, int8 sizes and agreement with fp32, the written model loading back with the same
logits, and bad input as one sentence with nothing written."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from bigbatch.cli import main
from bigbatch.config import ConfigError, ModelConfig
from bigbatch.models.build import build_model
from bigbatch.models.compression import prunable_linears, prune_heads, prune_neurons, prune_unstructured
from bigbatch.models.shrink import HEADS_KEY, from_pretrained
from bigbatch.run.metrics import read_metrics

CFG = ModelConfig(hidden_size=16, num_layers=2, num_heads=2, intermediate_size=40, max_position=16, dropout=0.0)


def _model(arch: str, intermediate: int = 40):
    torch.manual_seed(0)
    return build_model(dataclasses.replace(CFG, arch=arch, intermediate_size=intermediate), 60, pad_id=0).hf.eval()


@pytest.mark.parametrize("sparsity", [0.0001, 0.3, 0.5, 0.9])
def test_unstructured_pruning_removes_the_share_asked_of_the_linear_weights(sparsity):
    hf = _model("bert")
    weights = [m.weight for _, m in prunable_linears(hf)]
    total = sum(w.numel() for w in weights)
    smallest = torch.cat([w.detach().abs().flatten() for w in weights]).sort().values
    embedding = hf.get_input_embeddings().weight.detach().clone()
    prune_unstructured(hf, sparsity)
    zeros = sum(int((w == 0).sum()) for w in [m.weight for _, m in prunable_linears(hf)])
    assert abs(zeros - sparsity * total) <= 1
    kept = torch.cat([m.weight.detach().abs().flatten() for _, m in prunable_linears(hf)])
    if zeros:
        assert kept[kept > 0].min() >= smallest[zeros - 1]  # the smallest magnitudes went, globally
    assert torch.equal(hf.get_input_embeddings().weight, embedding)  # the tied output projection: untouched


@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama"])
def test_neuron_pruning_shrinks_the_mlp_and_matches_a_smaller_model_built_by_hand(arch, tmp_path):
    big = _model(arch)
    original = {k: v.clone() for k, v in big.state_dict().items()}
    kept = prune_neurons(big, arch, 0.5)
    assert [len(k) for k in kept] == [20, 20]
    small = _model(arch, intermediate=20)
    state = {}
    for name in small.state_dict():
        w, layer = original[name], next((i for i in range(2) if f".{i}." in name), None)
        k = kept[layer] if layer is not None else None
        if any(s in name for s in ("intermediate.dense", "gate_proj", "up_proj")):
            w = w[k]
        elif any(s in name for s in ("output.dense.weight", "down_proj")) and "attention" not in name:
            w = w[:, k]
        elif "mlp.c_fc" in name:  # GPT-2's Conv1D: [in, out]
            w = w[..., k]
        elif "mlp.c_proj.weight" in name:
            w = w[k]
        state[name] = w
    small.load_state_dict(state)
    assert sum(p.numel() for p in big.parameters()) == sum(p.numel() for p in small.parameters())
    ids = torch.randint(5, 60, (2, 12))
    with torch.no_grad():
        assert torch.allclose(big(input_ids=ids).logits, small(input_ids=ids).logits, atol=1e-6)
    big.save_pretrained(tmp_path)  # its config describes it: a user's from_pretrained loads it
    loaded = type(big).from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, big(input_ids=ids).logits)


HEADS = ModelConfig(hidden_size=32, num_layers=3, num_heads=4, intermediate_size=40, max_position=16, dropout=0.0)


def _span(start: int, width: int) -> range:
    return range(start, start + width)


def _attention_blocks(hf, arch: str, layer: int, d: int, group: int, n: int) -> dict[int, list]:
    """By hand, per unit u of one layer (a head; Llama: a key-value group): (parameter name, dim, indices) of its
    rows in the query, key and value weights and biases and its columns in the output projection."""
    if arch == "bert":
        p = f"bert.encoder.layer.{layer}.attention."
        ins = [p + f"self.{m}.{t}" for m in ("query", "key", "value") for t in ("weight", "bias")]
        return {u: [(name, 0, _span(u * d, d)) for name in ins] + [(p + "output.dense.weight", 1, _span(u * d, d))]
                for u in range(n)}
    if arch == "gpt2":  # Conv1D weight [in, out]; c_attn's outputs: q of every head, then k, then v
        p = f"transformer.h.{layer}.attn."
        return {u: [(p + f"c_attn.{t}", 1 if t == "weight" else 0, _span(k * n * d + u * d, d))
                    for t in ("weight", "bias") for k in range(3)] + [(p + "c_proj.weight", 0, _span(u * d, d))]
                for u in range(n)}
    p = f"model.layers.{layer}.self_attn."
    return {u: [(p + "q_proj.weight", 0, _span(u * group * d, group * d)), (p + "k_proj.weight", 0, _span(u * d, d)),
                (p + "v_proj.weight", 0, _span(u * d, d)), (p + "o_proj.weight", 1, _span(u * group * d, group * d))]
            for u in range(n)}


@pytest.mark.parametrize("arch,kv", [("bert", 0), ("gpt2", 0), ("llama", 0), ("llama", 2)])
def test_head_pruning_removes_the_weakest_heads_globally_and_matches_smaller_and_masked_models(arch, kv, tmp_path):
    import transformers

    cfg = dataclasses.replace(HEADS, arch=arch, num_kv_heads=kv)
    torch.manual_seed(0)
    big = build_model(cfg, 60, pad_id=0).hf.eval()
    original = {k: v.clone() for k, v in big.state_dict().items()}
    group = 4 // (kv or 4)
    n, d = 4 // group, 8
    blocks = [_attention_blocks(big, arch, layer, d, group, n) for layer in range(3)]
    norms = [[sum(float(original[name].index_select(dim, torch.tensor(list(idx))).pow(2).sum())
                  for name, dim, idx in blocks[layer][u] if name.endswith("weight")) for u in range(n)]
             for layer in range(3)]
    # by hand: each layer's strongest unit stays; of the rest, the round(0.5 * 3n) weakest over all layers go
    rest = sorted((norms[layer][u], layer, u) for layer in range(3) for u in range(n)
                  if norms[layer][u] < max(norms[layer]))
    gone = {(layer, u) for _, layer, u in rest[:round(0.5 * 3 * n)]}
    kept = prune_heads(big, arch, 0.5)
    assert [k.tolist() for k in kept] == [[u for u in range(n) if (layer, u) not in gone] for layer in range(3)]
    assert sum(len(k) for k in kept) == 3 * n - round(0.5 * 3 * n) and min(len(k) for k in kept) >= 1
    heads = [len(k) * group for k in kept]
    assert getattr(big.config, HEADS_KEY) == heads

    small = build_model(dataclasses.replace(cfg, heads_per_layer=tuple(heads)), 60, pad_id=0).hf.eval()
    state = dict(original)
    masked = {k: v.clone() for k, v in original.items()}
    for layer in range(3):
        rows: dict[str, list[int]] = {}  # a name's entries in order: GPT-2's q of the kept heads, then k, then v
        for j, (name, dim, _) in enumerate(blocks[layer][0]):
            rows.setdefault(name, []).extend(i for u in kept[layer].tolist() for i in blocks[layer][u][j][2])
            state[name] = original[name].index_select(dim, torch.tensor(rows[name]))
        for u in range(n):  # the removed heads' share of the output projection zeroed in the full model
            if u not in kept[layer].tolist():
                name, dim, idx = blocks[layer][u][-1]
                masked[name].index_fill_(dim, torch.tensor(list(idx)), 0.0)
    assert {k: v.shape for k, v in big.state_dict().items()} == {k: v.shape for k, v in state.items()}
    small.load_state_dict(state)
    full = build_model(cfg, 60, pad_id=0).hf.eval()
    full.load_state_dict(masked)
    ids = torch.randint(5, 60, (2, 12))
    with torch.no_grad():
        got = big(input_ids=ids).logits
        assert torch.allclose(got, small(input_ids=ids).logits, atol=1e-6)
        assert torch.allclose(got, full(input_ids=ids).logits, atol=1e-5)
    big.save_pretrained(tmp_path)
    auto = transformers.AutoModelForMaskedLM if arch == "bert" else transformers.AutoModelForCausalLM
    loaded = from_pretrained(auto, tmp_path).eval()
    assert type(loaded).__mro__[1] is type(big)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, got)


def test_a_head_pruned_start_needs_its_heads_per_layer(tmp_path):
    from bigbatch.models.compression import start_from

    torch.manual_seed(0)
    pruned = build_model(HEADS, 60, pad_id=0)
    prune_heads(pruned.hf, "bert", 0.5)
    pruned.hf.save_pretrained(tmp_path)
    heads = tuple(getattr(pruned.hf.config, HEADS_KEY))
    with pytest.raises(ConfigError, match=rf"set --model.heads_per_layer={','.join(map(str, heads))} "):
        start_from(build_model(HEADS, 60, pad_id=0), str(tmp_path), hold_zeros=False)
    again = build_model(dataclasses.replace(HEADS, heads_per_layer=heads), 60, pad_id=0)
    assert start_from(again, str(tmp_path), hold_zeros=False) == 0
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), pruned.state_dict().values()))


def test_head_pruning_keeps_a_head_in_every_layer_or_refuses():
    torch.manual_seed(0)
    hf = build_model(HEADS, 60, pad_id=0).hf
    with pytest.raises(ConfigError, match=r"--prune 0.8 with --prune-kind heads would remove 10 of the 12 heads.*"
                                          r"give --prune <= 0.750"):
        prune_heads(hf, "bert", 0.8)
    assert [len(k) for k in prune_heads(hf, "bert", 0.75)] == [1, 1, 1]


@pytest.fixture(scope="module")
def run_dir(tiny_runs):
    return tiny_runs("bert", 0)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["int8-weight", "int8-dynamic"])
def test_int8_is_small_agrees_with_fp32_and_loads_back(run_dir, tmp_path, mode, capsys):
    import transformers

    from bigbatch.models.compression import torchao_config
    from bigbatch.run.compress import _eval_batches, open_source

    out = tmp_path / "out"
    assert main(["compress", str(run_dir), "--out", str(out), "--quantize", mode]) == 0
    screen = capsys.readouterr()
    assert "bytes on disk" in screen.out and "Failed to load" not in screen.out + screen.err
    report = json.loads((out / "compression.json").read_text())
    before, after = report["before"], report["after"]
    assert after["linear_weight_bytes"] <= 0.30 * before["linear_weight_bytes"]
    assert after["bytes_on_disk"] < before["bytes_on_disk"]
    model, recipe, _, _ = open_source(run_dir)
    fp32 = tmp_path / "fp32"
    model.hf.save_pretrained(fp32)
    again = transformers.AutoModelForMaskedLM.from_pretrained(fp32, quantization_config=torchao_config(mode)).eval()
    loaded = transformers.AutoModelForMaskedLM.from_pretrained(out).eval()
    worst = 1.0
    with torch.no_grad():
        for batch in _eval_batches(recipe, run_dir):
            ref = model.hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            got = loaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            assert torch.equal(got, again(input_ids=batch["input_ids"],
                                          attention_mask=batch["attention_mask"]).logits)
            worst = min(worst, float(torch.nn.functional.cosine_similarity(ref.flatten(), got.flatten(), dim=0)))
    print(f"{mode}: worst held-out batch logits cosine {worst:.6f}")
    assert worst >= 0.999  # measured worst: 0.999991 (int8-weight), 0.999975 (int8-dynamic); 1 - cos 40x below
    assert abs(after["eval_loss"] - before["eval_loss"]) < 0.05


@pytest.mark.slow
def test_pruned_and_quantized_report_counts_the_zeros(run_dir, tmp_path):
    out = tmp_path / "out"
    assert main(["compress", str(run_dir), "--out", str(out), "--prune", "0.5", "--quantize", "int8-dynamic"]) == 0
    report = json.loads((out / "compression.json").read_text())
    assert report["before"]["nonzero_parameters"] == report["before"]["parameters"]
    params, nonzero = report["after"]["parameters"], report["after"]["nonzero_parameters"]
    assert params == report["before"]["parameters"]  # unstructured pruning zeroes, it does not remove
    # half the untied Linear weights are zero (the embedding, norms and biases are not pruned)
    linear = report["before"]["linear_weight_bytes"] // 4
    assert params - nonzero == pytest.approx(0.5 * linear, abs=2)
    assert {"eval_loss", "latency_s_per_batch", "bytes_on_disk"} <= set(report["after"])


@pytest.mark.parametrize("argv,phrase", [
    (["--prune", "1.5"], "--prune 1.5 is not a sparsity"),
    (["--prune", "-0.1"], "--prune -0.1 is not a sparsity"),
    (["--prune-kind", "rows"], "--prune-kind 'rows'"),
    (["--quantize", "int4"], "--quantize 'int4'"),
])
def test_bad_arguments_are_one_sentence_and_exit_2_with_nothing_written(tmp_path, argv, phrase, capsys):
    out = tmp_path / "out"
    assert main(["compress", str(tmp_path), "--out", str(out), *argv]) == 2
    err = capsys.readouterr().err
    assert phrase in err and err.count("\n") == 1
    assert not out.exists()


def test_an_existing_out_or_a_source_that_is_no_run_is_refused(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["compress", str(tmp_path), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert main(["compress", str(tmp_path / "out"), "--out", str(tmp_path / "new"), "--overwrite"]) == 2
    assert "neither a bigbatch run" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()



def test_check_points_a_compression_training_config_to_these_commands(tmp_path, capsys):
    config = tmp_path / "ds.json"
    config.write_text(json.dumps({"train_batch_size": 8, "compression_training": {"weight_quantization": {}}}))
    assert main(["check", str(config)]) == 2
    found = [line for line in capsys.readouterr().out.splitlines() if "compression_training" in line]
    assert len(found) == 1
    assert "--distill.teacher=" in found[0] and "bigbatch compress" in found[0] and "--quantize" in found[0]


@pytest.mark.slow
def test_recovery_trains_through_the_trainer_and_keeps_the_zeros(run_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["compress", str(run_dir), "--out", str(out), "--prune", "0.5", "--recover", "2"]) == 0
    report = json.loads((out / "compression.json").read_text())
    linear = report["before"]["linear_weight_bytes"] // 4
    assert report["after"]["parameters"] - report["after"]["nonzero_parameters"] == pytest.approx(0.5 * linear, abs=2)
    recovery = out.with_name("out.recover")
    steps = [r["step"] for r in read_metrics(recovery / "metrics.jsonl") if "loss" in r]
    assert steps == [1, 2]
    assert json.loads((recovery / "recipe.json").read_text())["recipe"]["model"]["hold_zeros"] is True


@pytest.mark.slow
def test_head_pruning_through_compress_recovers_quantizes_and_loads_back(run_dir, tmp_path, capsys):
    import transformers

    from tests.conftest import held_out_loss

    out = tmp_path / "out"
    assert main(["compress", str(run_dir), "--out", str(out), "--prune", "0.5", "--prune-kind", "heads",
                 "--recover", "2"]) == 0
    report = json.loads((out / "compression.json").read_text())
    assert report["after"]["parameters"] < report["before"]["parameters"]
    recovery = json.loads((tmp_path / "out.recover" / "recipe.json").read_text())["recipe"]["model"]
    assert recovery["heads_per_layer"] == [1, 1] and recovery["hold_zeros"] is False
    steps = [r["step"] for r in read_metrics(tmp_path / "out.recover" / "metrics.jsonl") if "loss" in r]
    assert steps == [1, 2]
    loaded = from_pretrained(transformers.AutoModelForMaskedLM, out).eval()
    assert loaded.config.heads_per_layer == [1, 1]
    assert held_out_loss(loaded, run_dir) == pytest.approx(report["after"]["eval_loss"], rel=1e-5)
    # the recovery is a normal run: its export is the same head-pruned model
    assert main(["export", str(tmp_path / "out.recover"), "--out", str(tmp_path / "export")]) == 0
    exported = from_pretrained(transformers.AutoModelForMaskedLM, tmp_path / "export").eval()
    assert all(torch.equal(a, b) for a, b in zip(exported.state_dict().values(), loaded.state_dict().values()))

    quantized = tmp_path / "int8"
    assert main(["compress", str(run_dir), "--out", str(quantized), "--prune", "0.5", "--prune-kind", "heads",
                 "--quantize", "int8-dynamic"]) == 0
    report = json.loads((quantized / "compression.json").read_text())
    assert report["after"]["linear_weight_bytes"] < 0.3 * report["before"]["linear_weight_bytes"]
    loaded = from_pretrained(transformers.AutoModelForMaskedLM, quantized).eval()
    assert held_out_loss(loaded, run_dir) == pytest.approx(report["after"]["eval_loss"], rel=1e-5)
    assert main(["compress", str(run_dir), "--out", str(tmp_path / "no"), "--prune", "0.9", "--prune-kind",
                 "heads"]) == 2
    assert "each of the 2 layers keeps one" in capsys.readouterr().err and not (tmp_path / "no").exists()
