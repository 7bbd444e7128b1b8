"""`bigbatch check`: every problem of a DeepSpeed JSON, one sentence each, exit 2; clean configs exit 0."""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bigbatch.cli import main
from bigbatch.config.dsconfig import DS_CONFIGS


@pytest.mark.parametrize("name", sorted(p.name for p in DS_CONFIGS.glob("*.json")))
def test_every_shipped_fragment_passes_on_its_own(name, capsys):
    assert main(["check", str(DS_CONFIGS / name)]) == 0
    out, err = capsys.readouterr()
    assert re.search(r": 0 error\(s\), \d+ note\(s\)\n$", err) and "error:" not in out
    # absent batch keys are filled in by the recipe: a note, not an error
    assert "no batch sizes given" in out


def test_bad_file_and_arguments(tmp_path, capsys):
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    assert main(["check", str(broken)]) == 2
    assert "is not valid JSON" in capsys.readouterr().err
    assert main(["check", "tiny", "--world", "0"]) == 2
    assert "--world=0 must be at least 1" in capsys.readouterr().err
    assert main(["check", str(tmp_path / "nope.json")]) == 2
    assert "nope.json is not a file; give the path of a DeepSpeed JSON" in capsys.readouterr().err


# Corpora of real-world and broken configs: `public` resembles DeepSpeedExamples' (bing_bert's 64K LAMB, cifar,
# Megatron-LM, Hugging Face "auto" files, 1-bit Adam, compression, MoQ, curriculum); `broken` is malformed on purpose.
# expected.json says, for every file, the exit code and sentences the output must hold.
CORPORA = [Path(__file__).parent / "data" / d for d in ("ds_configs_public", "ds_configs_broken")]
SUMMARY = re.compile(r".*: \d+ error\(s\), \d+ note\(s\)$")


def check_output(argv):
    """bigbatch check in this process: (exit code, stdout, stderr), whatever happens."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["check", *argv])
    return code, out.getvalue(), err.getvalue()


def assert_well_formed(code, out, err):
    """Exit 0 or 2; stdout holds one `error:` or `note:` line per finding and nothing else; stderr ends with their
    count, or with the one sentence for a file that is no DeepSpeed config (DeepSpeed's import may log there too)."""
    assert code in (0, 2)
    lines = out.splitlines()
    assert all(line.startswith(("error: ", "note: ")) for line in lines), out
    last = (err.splitlines() or [""])[-1]
    if SUMMARY.match(last):
        errors = sum(line.startswith("error: ") for line in lines)
        assert last.endswith(f": {errors} error(s), {len(lines) - errors} note(s)") and code == (2 if errors else 0)
    else:
        sentences = [line for line in err.splitlines() if line.startswith("bigbatch: error: ")]
        assert code == 2 and not lines and sentences == [last], err
    assert "Traceback" not in out + err


def corpus_files():
    shipped = [(p, None) for p in sorted(DS_CONFIGS.glob("*.json"))]
    listed = []
    for corpus in CORPORA:
        expected = json.loads((corpus / "expected.json").read_text())
        files = sorted(p.name for p in corpus.glob("*.json") if p.name != "expected.json")
        assert files == sorted(expected), f"{corpus}: every file needs an entry in expected.json"
        listed += [(corpus / name, expected[name]) for name in files]
    return shipped + listed


@pytest.mark.parametrize("path,expected", corpus_files(), ids=lambda v: v.name if isinstance(v, Path) else "")
def test_every_config_of_the_corpora_ends_in_sentences(path, expected):
    code, out, err = check_output([str(path)])
    assert_well_formed(code, out, err)
    if expected is not None:
        assert code == expected["exit"], out + err
        for text in expected["says"]:
            assert text in out + err, f"missing: {text}\n{out}{err}"


def _known_paths():
    """Every key the checker has a rule for, every section, and a few that only DeepSpeed's parser reads."""
    from bigbatch.check.rules import OPTIMIZER_PARAMS, SCHEDULER_PARAMS, SECTIONS

    paths = [f"{s}.{k}" if s else k for s, rules in SECTIONS.items() for k in rules]
    paths += [f"optimizer.params.{k}" for k in OPTIMIZER_PARAMS] + [f"scheduler.params.{k}" for k in SCHEDULER_PARAMS]
    return sorted({*paths, *SECTIONS, "optimizer", "scheduler", "optimizer.params", "scheduler.params",
                   "optimizer.type", "scheduler.type", "train_batch_size", "train_micro_batch_size_per_gpu",
                   "gradient_accumulation_steps", "sparse_attention", "zero_optimization.mics_shard_size", "pipeline",
                   "vocabulary_size", "checkpoint", "aio", "compile", "timers", "comet", "torch_autocast"} - {""})


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.sampled_from(
        ["auto", "", "cpu", "LAMB", "lars", "Adam", "SGD", "WarmupLR", "OneCycle", "log", "fp16", "yes"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(entries=st.lists(st.tuples(st.sampled_from(_known_paths()), json_values), max_size=8),
       world=st.none() | st.integers(1, 16))
def test_fuzz_never_raises(tmp_path_factory, entries, world):
    """Random JSON values under random known keys: exit 0 or 2, one `error:`/`note:` line each, never a traceback."""
    config: dict = {}
    for path, value in entries:
        *parents, last = path.split(".")
        node = config
        for p in parents:
            node = node.setdefault(p, {}) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node[last] = value
    path = tmp_path_factory.mktemp("fuzz") / "ds.json"
    path.write_text(json.dumps(config))
    code, out, err = check_output([str(path)] + (["--world", str(world)] if world else []))
    assert_well_formed(code, out, err)


def test_an_unreadable_file_is_one_sentence(tmp_path, monkeypatch):
    path = tmp_path / "ds.json"
    path.write_text("{}")

    def refuse(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_text", refuse)  # as root, chmod 000 would not stop the read
    code, out, err = check_output([str(path)])
    assert code == 2 and out == ""
    sentence = f"bigbatch: error: DeepSpeed config {path} cannot be read (Permission denied); check its permissions."
    assert sentence in err.splitlines() and "Traceback" not in err


def test_a_fragment_deepspeed_accepts_passes_check(tmp_path):
    """Comments, trailing commas and a byte-order mark: DeepSpeed 0.19 reads such a file (hjson), so check does."""
    path = tmp_path / "lenient.json"
    path.write_text('\ufeff{\n  // ZeRO-1\n  "zero_optimization": {"stage": 1,},  # trailing comma\n'
                    '  "train_batch_size": 1e3, "train_micro_batch_size_per_gpu": 125, "gradient_clipping": 1.0,\n}\n',
                    encoding="utf-8")
    code, out, err = check_output([str(path), "--world", "8"])
    assert code == 0, out + err
    assert "error:" not in out and ": 0 error(s)" in err
