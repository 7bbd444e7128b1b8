"""The pre-flight `bigbatch train` and `bigbatch check` share: every problem of a recipe before a run starts.

First the recipe's inputs (data sources, tokenizer, DeepSpeed fragments), each checked even when another fails; then,
when they hold, its batch arithmetic on a world size (`resolve`) and the DeepSpeed JSON it resolves to
(`check_config`). The two callers differ on purpose in what they pass in: the world size (train: this launch's;
check: --world, else the recipe's cluster) and what an `hf:` source is that the hub could not be asked about (train
cannot read it: an error; check may run where the hub is out of reach while the cluster is not: a note).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from bigbatch.check.dsjson import check_config
from bigbatch.check.rules import Finding, errors
from bigbatch.config import ConfigError, Recipe
from bigbatch.config.dsconfig import find_fragment
from bigbatch.data.corpus import HubUnreachable, check_sources
from bigbatch.data.tokenizer import check_tokenizer
from bigbatch.models.distill import teacher_kind
from bigbatch.plan.advice import choose_at_start
from bigbatch.resolve import ResolvedRun, resolve


@dataclass(frozen=True)
class Preflight:
    run: Optional[ResolvedRun]  # None when an input or the batch arithmetic failed
    findings: tuple[Finding, ...]


def preflight(recipe: Recipe, world: int, *, hub_required: bool) -> Preflight:
    """Every problem of `recipe` on `world` data-parallel ranks, one finding each, and the resolved run when its
    inputs and batch arithmetic hold. hub_required: an `hf:` source the hub could not be asked about is an error
    (True), else a note."""
    found = _input_findings(recipe, hub_required)
    if errors(found):  # resolve reads the same fragments: it would only say again what is said
        return Preflight(None, tuple(found))
    try:
        recipe, auto = choose_at_start(recipe, world)  # an "auto" micro-batch or checkpointing, as train would
        run = resolve(recipe, world)  # every phase's and every ramp step's batch arithmetic, and the JSON
    except ConfigError as err:
        return Preflight(None, (*found, Finding("error", str(err))))
    chosen = [Finding("note", f"auto chose {auto}.")] if auto else []
    return Preflight(run, (*found, *chosen, *check_config(run.ds_config, run.world)))


def _input_findings(recipe: Recipe, hub_required: bool) -> list[Finding]:
    """The recipe's data sources, tokenizer and DeepSpeed fragments, each checked even when another fails."""
    data = recipe.data
    hub = tuple(s for s in data.sources if s.startswith("hf:"))
    local = tuple(s for s in data.sources if not s.startswith("hf:"))
    out: list[Finding] = []
    for step in (lambda: check_sources(hub, data.cache_dir or None),
                 lambda: check_sources(local),
                 lambda: check_tokenizer(data.tokenizer, data.vocab_size),
                 lambda: [find_fragment(f) for f in recipe.deepspeed.configs],
                 lambda: recipe.distill.teacher and teacher_kind(recipe.distill.teacher)):
        try:
            step()
        except ConfigError as err:
            # nothing to say about the data until the hub can be asked: check's other findings still count
            if isinstance(err, HubUnreachable) and not hub_required:
                out.append(Finding("note", f"{err} (bigbatch check could not verify it; the run will stop if it "
                                           "cannot)"))
            else:
                out.append(Finding("error", str(err)))
    return out


def ready_to_train(recipe: Recipe, world: int) -> ResolvedRun:
    """`bigbatch train`'s pre-flight: the resolved run, else a ConfigError (exit 2) before any process group starts,
    with the first problem of the inputs or batch arithmetic as its own sentence, or every error of the resolved
    DeepSpeed JSON, one line each."""
    checked = preflight(recipe, world, hub_required=True)
    bad = errors(checked.findings)
    if checked.run is None:
        raise ConfigError(bad[0].message)
    _refuse(recipe, bad)
    return checked.run


def chosen_in_free_memory(asked: Recipe, world: int, agree: Callable[[int], int]) -> tuple[ResolvedRun, str]:
    """`bigbatch train` on GPUs once the process group exists: the "auto" choice made again in the least free memory
    of the ranks (`agree`: an all-reduce MIN), its run resolved and its DeepSpeed JSON checked as the pre-flight
    does; with the choice in words."""
    recipe, auto = choose_at_start(asked, world, agree=agree)
    run = resolve(recipe, world)
    _refuse(recipe, errors(check_config(run.ds_config, run.world)))
    return run, auto


def _refuse(recipe: Recipe, bad: list[Finding]) -> None:
    """A ConfigError listing every error of the resolved DeepSpeed JSON, one line each; nothing when there is none."""
    if bad:
        lines = "\n  ".join(f.message for f in bad)
        raise ConfigError(f"the DeepSpeed config from recipe {recipe.name} has {len(bad)} problem(s):\n  {lines}")
