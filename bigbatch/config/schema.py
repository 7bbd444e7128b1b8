"""The recipe tree: small frozen dataclasses composed into one `Recipe`, and its validation.

Each number has one home here. The DeepSpeed JSON that a run hands to DeepSpeed is *generated* from this tree plus the
`ds_configs/` fragments it names (see `bigbatch.config.dsconfig`), never written by hand with a second copy of a number.
Overrides are parsed in `bigbatch.config.overrides`, recipe files found and loaded in `bigbatch.config.files`, model
shapes named in `bigbatch.config.shapes`.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Any

from bigbatch.config.errors import ConfigError


@dataclass(frozen=True)
class ModelConfig:
    """Model shape; built from a transformers config (`bigbatch.models.build`), never from downloaded weights."""

    arch: str = "bert"  # bert (masked LM) | gpt2 | llama (causal LM; llama: RMSNorm, rotary, SwiGLU)
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 2
    num_kv_heads: int = 0  # llama: grouped-query attention heads for k and v; 0 means num_heads
    intermediate_size: int = 256
    max_position: int = 512
    dropout: float = 0.1
    # Embedding rows are padded to a multiple of this (tensor-core friendly GEMMs); 1 disables it.
    pad_vocab_to_multiple: int = 8
    # A transformers directory (an export, a `bigbatch compress` output) the weights start from instead of a fresh
    # initialisation; with hold_zeros, Linear weights that are zero there stay zero (a pruned model's recovery).
    init_from: str = ""
    hold_zeros: bool = False
    # Query heads in each layer when some were pruned (`bigbatch compress --prune-kind heads`); empty: num_heads in
    # every layer.
    heads_per_layer: tuple[int, ...] = ()


@dataclass(frozen=True)
class DataConfig:
    """Where text comes from, how it is tokenized and cut into training sequences."""

    # Local files or directories (.txt, .jsonl, .parquet), `hf:<dataset name>` on the hub, or `builtin:python-docs`
    # (English documentation text that ships inside Python itself: on every machine, no download).
    sources: tuple[str, ...] = ("builtin:python-docs",)
    # Blend weights, one per source (Megatron's data blend): each epoch draws sequences from the sources in these
    # proportions, cycling through a small source and sampling a large one. Empty: the sources simply concatenated.
    weights: tuple[float, ...] = ()
    # A SentencePiece model file; empty means: train one on the corpus at the start of the run (rank 0).
    tokenizer: str = ""
    vocab_size: int = 2000  # used when the tokenizer is trained here
    seq_len: int = 64
    mlm_probability: float = 0.15
    whole_word_masking: bool = False  # mask all pieces of a selected word together
    eval_fraction: float = 0.02  # share of documents held out for evaluation
    eval_samples: int = 1024  # held-out sequences scored at each evaluation
    # Preprocessing (datasets.map): worker processes, 0 = one per core (at most 8) for corpora over 20,000
    # documents, else 1; cached by `datasets` under cache_dir (empty: its default, ~/.cache/huggingface/datasets).
    num_proc: int = 0
    cache_dir: str = ""
    # Stream the sources (datasets' IterableDataset) instead of preparing them on local disk: for corpora that
    # fit on neither. Order comes from a seeded shuffle buffer of documents; each rank reads its own share.
    streaming: bool = False
    shuffle_buffer: int = 10_000  # documents, streaming only


@dataclass(frozen=True)
class OptimizerConfig:
    """Optimizer and its learning rate rule. `lr` is the LR at `base_batch`; `lr_rule` carries it to the run's batch."""

    type: str = "lamb"  # lamb | lars | adamw
    lr: float = 1e-3
    lr_rule: str = "none"  # none | linear | sqrt
    base_batch: int = 0  # the batch `lr` was tuned at; 0 means the run's own global batch (no scaling)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-6
    weight_decay: float = 0.01
    grad_clip: float = 1.0  # global norm; 0 disables. Always written to the DeepSpeed JSON (its default is 1.0).
    max_coeff: float = 10.0  # LAMB trust-ratio clamp
    min_coeff: float = 0.01
    momentum: float = 0.9  # LARS
    trust_coefficient: float = 0.001  # LARS


@dataclass(frozen=True)
class ScheduleConfig:
    """Linear warmup, then decay to `min_lr_ratio * lr` at the last step."""

    steps: int = 60
    warmup: float = 0.1  # a fraction (< 1) of `steps`, or a number of samples (>= 1): scales with the batch, and
    # under a batch ramp is counted in the samples the ramp consumes
    decay: str = "poly"  # poly | cosine | constant
    power: float = 1.0  # poly decay power; 1 is linear, the BERT LAMB recipes use 0.5
    min_lr_ratio: float = 0.0


@dataclass(frozen=True)
class BatchConfig:
    """global_batch = micro_batch x grad_accum x data-parallel world. Give global_batch and one of the other two.

    Batch ramp (Megatron's --rampup-batch-size start increment samples): the first phase's global batch starts at
    `ramp_start` and grows by `ramp_increment` each `ramp_samples / ((global_batch - ramp_start) / ramp_increment)`
    samples until it reaches `global_batch`; the LR follows `optimizer.lr_rule` at each batch. 0 disables it.

    Adaptive batch (`adaptive=true`; McCandlish et al. 2018): every `adaptive_every` steps of a phase the global batch
    becomes clamp(adaptive_factor x the measured gradient noise scale, max(current, min), max), rounded down to a
    multiple of micro_batch x world; it never shrinks, the micro-batch stays and accumulation grows
    (bigbatch.config.adaptive).
    """

    global_batch: int = 4096
    # 0: solved from global_batch and grad_accum; "auto": chosen per phase at start, the fastest the time model
    # ranks among those that fit the GPU (bigbatch.plan.advice.choose_auto)
    micro_batch: int | str = 0
    grad_accum: int = 0  # 0: solved from global_batch and micro_batch
    ramp_start: int = 0
    ramp_increment: int = 0
    ramp_samples: int = 0
    adaptive: bool = False
    adaptive_factor: float = 1.0  # k: the batch steered to k x B_noise
    adaptive_every: int = 10  # steps between decisions
    min: int = 0  # the smallest batch a decision sets (0: global_batch)
    max: int = 0  # the largest batch a decision sets; required with adaptive


@dataclass(frozen=True)
class PhaseConfig:
    """A phase after the first (the first is the recipe's batch, schedule and data.seq_len), as in the LAMB paper's and
    NVIDIA's BERT seq-128 -> seq-512 switch. It starts with its own warmup at a step boundary, keeps model and
    optimizer state, and rebuilds the data (packed at `seq_len`), the batch and the schedule.

    Under `batch.adaptive`, `batch_from` says where the phase's batch starts: "own" (its `global_batch`) or "adapted"
    (the batch the previous phase ended at, rounded down to a multiple of this phase's micro_batch x world and at most
    `batch.max`; the phase keeps its number of steps and its LR follows `optimizer.lr_rule` at that batch).
    """

    global_batch: int = 4096
    seq_len: int = 128
    steps: int = 0  # give steps or samples (steps = ceil(samples / global_batch))
    samples: int = 0
    micro_batch: int | str = 0  # 0: the first phase's micro-batch (so "auto" there is "auto" here); "auto"
    lr: float = 0.0  # peak LR; 0: optimizer.lr carried from optimizer.base_batch to this batch by optimizer.lr_rule
    warmup: float = 0.1  # a fraction (< 1) of the phase's steps, or a number of samples (>= 1)
    decay: str = "poly"  # poly | cosine | constant
    power: float = 1.0
    min_lr_ratio: float = 0.0
    batch_from: str = "own"  # own | adapted (needs batch.adaptive): where the phase's global batch starts

    def num_steps(self) -> int:
        return self.steps or -(-self.samples // self.global_batch)


@dataclass(frozen=True)
class DeepSpeedSection:
    """The DeepSpeed JSON fragments this recipe composes, merged in order (names are looked up in ds_configs/)."""

    configs: tuple[str, ...] = ("zero1.json", "fp32.json")
    # "": as the configs say; "auto": on only when the fastest fitting micro-batch needs it (with micro_batch "auto")
    activation_checkpointing: str = ""


@dataclass(frozen=True)
class CheckpointConfig:
    every_steps: int = 0  # 0: only at the end of the run
    keep_last: int = 2


@dataclass(frozen=True)
class RunConfig:
    seed: int = 1234
    eval_every: int = 10  # steps; the first evaluation is at step 0, before any update
    log_every: int = 1
    trust_ratio_every: int = 10  # steps between trust-ratio records in metrics.jsonl; 0 disables
    runs_root: str = "runs"  # default run directory: <runs_root>/<recipe>-<time>
    # Steps in a row skipped with the fp16 loss scale already at min_loss_scale (or, in fp32/bf16, skipped for a
    # gradient that is not finite) before the run checkpoints and stops (bigbatch.run.overflow).
    overflow_patience: int = 10
    # Moving-average factor of the gradient noise scale's estimates (bigbatch.run.noise; logged as noise_scale, the
    # critical batch estimate); 0 switches the estimate off.
    noise_scale_ema: float = 0.95


@dataclass(frozen=True)
class ClusterConfig:
    """The cluster a recipe was planned for; `bigbatch plan <recipe>` and `bigbatch check <recipe>` default to it."""

    nodes: int = 1
    gpus_per_node: int = 8
    # a card of the planner's catalogue (A100-80GB: the 81,252 MiB the device reports), 80GB (1e9 bytes), 80GiB or 80
    gpu_memory: str = "A100-80GB"


@dataclass(frozen=True)
class DistillConfig:
    """Knowledge distillation (Hinton et al. 2015; DistilBERT, Sanh et al. 2019): the recipe's model is the student of
    `teacher`; an empty teacher switches the section off."""

    teacher: str = ""  # a bigbatch run directory, a `bigbatch export` directory, or hf:<name> from the local cache
    temperature: float = 2.0
    alpha_kd: float = 1.0  # T^2 * KL(teacher || student) on the soft targets
    alpha_hard: float = 0.5  # the MLM / LM loss on the labels
    alpha_hidden: float = 0.0  # 1 - cosine between the last hidden states (needs equal widths)
    init: str = "teacher_layers"  # none | teacher_layers
    layers: tuple[int, ...] = ()  # teacher layers the student's layers start from; empty: every other (0, 2, 4, ...)


@dataclass(frozen=True)
class Recipe:
    name: str = "recipe"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    run: RunConfig = field(default_factory=RunConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    phases: tuple[PhaseConfig, ...] = ()  # phases after the first; override as --phases.1.seq_len=512 (1-based)
    distill: DistillConfig = field(default_factory=DistillConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> "Recipe":
        """Checks that need no other file; raises ConfigError on the first problem."""
        self._check_counts()
        self._check_model_shape()
        self._check_ranges()
        self._check_data()
        self._check_phases()
        self._check_ramp()
        self._check_adaptive()
        self._check_distill()
        return self

    def _check_counts(self) -> None:
        """The named choices, and every count that must be at least 1."""
        _choice("model.arch", self.model.arch, ("bert", "gpt2", "llama"))
        _choice("optimizer.type", self.optimizer.type.lower(), ("lamb", "lars", "adamw"))
        _choice("optimizer.lr_rule", self.optimizer.lr_rule, ("none", "linear", "sqrt"))
        _choice("schedule.decay", self.schedule.decay, ("poly", "cosine", "constant"))
        for key, value in [
            ("model.hidden_size", self.model.hidden_size),
            ("model.num_layers", self.model.num_layers),
            ("model.num_heads", self.model.num_heads),
            ("model.pad_vocab_to_multiple", self.model.pad_vocab_to_multiple),
            ("data.seq_len", self.data.seq_len),
            ("data.vocab_size", self.data.vocab_size),
            ("schedule.steps", self.schedule.steps),
            ("batch.global_batch", self.batch.global_batch),
            ("run.eval_every", self.run.eval_every),
            ("run.log_every", self.run.log_every),
            ("run.overflow_patience", self.run.overflow_patience),
            ("checkpoint.keep_last", self.checkpoint.keep_last),
            ("cluster.nodes", self.cluster.nodes),
            ("cluster.gpus_per_node", self.cluster.gpus_per_node),
        ]:
            if value < 1:
                raise ConfigError(f"{key}={value} must be a positive integer; set --{key}=<n> with n >= 1.")

    def _check_model_shape(self) -> None:
        """Heads divide the width (and key/value heads the heads); the sequence fits the positions."""
        kv = self.model.num_kv_heads
        if self.model.hold_zeros and not self.model.init_from:
            raise ConfigError("model.hold_zeros=true holds the zeros of the weights the run starts from; set "
                              "--model.init_from=<a transformers directory> too.")
        if kv < 0 or (kv and self.model.num_heads % kv):
            raise ConfigError(f"model.num_kv_heads={kv} must divide model.num_heads={self.model.num_heads} "
                              "(0 means as many as num_heads).")
        self._check_heads_per_layer()
        if self.model.hidden_size % self.model.num_heads:
            raise ConfigError(
                f"model.hidden_size={self.model.hidden_size} is not divisible by model.num_heads="
                f"{self.model.num_heads}; pick a head count that divides the width."
            )
        if self.data.seq_len > self.model.max_position:
            raise ConfigError(
                f"data.seq_len={self.data.seq_len} exceeds model.max_position={self.model.max_position}; "
                f"raise --model.max_position or lower --data.seq_len."
            )

    def _check_heads_per_layer(self) -> None:
        """One count per layer, each at least one head (Llama: one key-value group) and at most num_heads."""
        m = self.model
        heads, group = m.heads_per_layer, m.num_heads // (m.num_kv_heads or m.num_heads)
        if heads and (len(heads) != m.num_layers or any(not 1 <= h <= m.num_heads or h % group for h in heads)):
            raise ConfigError(f"model.heads_per_layer={','.join(map(str, heads))} must give {m.num_layers} counts "
                              f"(one per layer), each a multiple of {group} between {group} and {m.num_heads}; "
                              "leave it empty for num_heads in every layer.")

    def _check_ranges(self) -> None:
        """The optimizer's, data's, run's and schedule's numbers within their ranges."""
        if not 0.0 < self.optimizer.lr:
            raise ConfigError(f"optimizer.lr={self.optimizer.lr} must be positive.")
        if self.optimizer.grad_clip < 0:
            raise ConfigError(f"optimizer.grad_clip={self.optimizer.grad_clip} must be >= 0 (0 disables clipping).")
        if not 0.0 <= self.data.mlm_probability < 1.0:
            raise ConfigError(f"data.mlm_probability={self.data.mlm_probability} must lie in [0, 1).")
        if not 0.0 < self.data.eval_fraction < 1.0:
            raise ConfigError(f"data.eval_fraction={self.data.eval_fraction} must lie in (0, 1).")
        if not 0.0 <= self.run.noise_scale_ema < 1.0:
            raise ConfigError(f"run.noise_scale_ema={self.run.noise_scale_ema} must lie in [0, 1); 0 switches the "
                              "noise scale estimate off.")
        if self.schedule.warmup < 0:
            raise ConfigError(f"schedule.warmup={self.schedule.warmup} must be >= 0 (a fraction, or samples).")

    def _check_data(self) -> None:
        """Sources and their blend weights, the data workers, and at least one DeepSpeed fragment."""
        if not self.data.sources:
            raise ConfigError("data.sources is empty; name at least one file, directory or `hf:<name>`.")
        w = self.data.weights
        if w and (len(w) != len(self.data.sources) or min(w) < 0 or sum(w) <= 0):
            raise ConfigError(f"data.weights={','.join(map(str, w))} must give one non-negative weight per source "
                              f"({len(self.data.sources)} sources) with a positive sum; e.g. --data.weights="
                              + ",".join(["1"] * len(self.data.sources)) + ".")
        if w and self.data.streaming:
            raise ConfigError("data.weights is set with data.streaming=true; blends need the prepared (non-streaming) "
                              "path, so drop one of the two.")
        if self.data.num_proc < 0 or self.data.shuffle_buffer < 1:
            raise ConfigError(f"data.num_proc={self.data.num_proc} must be >= 0 and data.shuffle_buffer="
                              f"{self.data.shuffle_buffer} >= 1.")
        if not self.deepspeed.configs:
            raise ConfigError("deepspeed.configs is empty; name at least one DeepSpeed JSON, e.g. zero1.json.")

    def _check_phases(self) -> None:
        """Each later phase: its decay, sizes, length in steps or samples, and sequence length."""
        for i, ph in enumerate(self.phases, start=1):
            key = f"phases.{i}"
            _choice(f"{key}.decay", ph.decay, ("poly", "cosine", "constant"))
            _choice(f"{key}.batch_from", ph.batch_from, ("own", "adapted"))
            if ph.batch_from == "adapted" and not self.batch.adaptive:
                raise ConfigError(f"{key}.batch_from='adapted' starts the phase from the batch the adaptive batch "
                                  f"reached, but batch.adaptive is false; set --batch.adaptive=true or --{key}"
                                  ".batch_from=own.")
            _micro_batch(f"{key}.micro_batch", ph.micro_batch)
            if ph.global_batch < 1 or ph.seq_len < 1 or ph.lr < 0 or ph.warmup < 0:
                raise ConfigError(f"{key} needs global_batch >= 1, seq_len >= 1, micro_batch >= 0, lr >= 0 and "
                                  f"warmup >= 0; got {ph}.")
            if (ph.steps > 0) == (ph.samples > 0):
                raise ConfigError(f"{key} gives steps={ph.steps} and samples={ph.samples}; give exactly one of "
                                  f"--{key}.steps or --{key}.samples.")
            if ph.seq_len > self.model.max_position:
                raise ConfigError(f"{key}.seq_len={ph.seq_len} exceeds model.max_position={self.model.max_position}; "
                                  f"raise --model.max_position to at least {ph.seq_len}.")

    def _check_ramp(self) -> None:
        """The batch ramp: all three keys or none, landing on the global batch; and the micro-batch's form."""
        b = self.batch
        _micro_batch("batch.micro_batch", b.micro_batch)
        if b.micro_batch == "auto" and b.grad_accum:
            raise ConfigError(f"batch.micro_batch='auto' with batch.grad_accum={b.grad_accum}: auto solves the "
                              "accumulation; set --batch.grad_accum=0.")
        _choice("deepspeed.activation_checkpointing", self.deepspeed.activation_checkpointing, ("", "auto"))
        if b.ramp_start or b.ramp_increment or b.ramp_samples:
            if min(b.ramp_start, b.ramp_increment, b.ramp_samples) < 1 or b.ramp_start >= b.global_batch:
                raise ConfigError(
                    f"batch ramp ramp_start={b.ramp_start} ramp_increment={b.ramp_increment} "
                    f"ramp_samples={b.ramp_samples} needs all three >= 1 and ramp_start < global_batch="
                    f"{b.global_batch}; set all three, or all to 0 to disable the ramp.")
            if (b.global_batch - b.ramp_start) % b.ramp_increment:
                raise ConfigError(
                    f"batch.global_batch={b.global_batch} - batch.ramp_start={b.ramp_start} is not a multiple of "
                    f"batch.ramp_increment={b.ramp_increment}; the ramp must land on the global batch.")

    def _check_adaptive(self) -> None:
        """The adaptive batch: a positive factor, a cadence, min <= max, max at least the starting batch, the noise
        scale it steers by switched on, and no second steering (the ramp)."""
        b = self.batch
        if not b.adaptive:
            return
        if not b.adaptive_factor > 0:
            raise ConfigError(f"batch.adaptive_factor={b.adaptive_factor} must be > 0 (the batch is steered to "
                              "factor x the gradient noise scale); set e.g. --batch.adaptive_factor=1.")
        if b.adaptive_every < 1:
            raise ConfigError(f"batch.adaptive_every={b.adaptive_every} must be >= 1 (steps between decisions).")
        if b.min < 0 or b.max < max(b.min, b.global_batch):
            raise ConfigError(f"batch.max={b.max} must be at least batch.min={b.min} and batch.global_batch="
                              f"{b.global_batch} (where the adaptive batch starts); set --batch.max=<n> above both.")
        if self.run.noise_scale_ema == 0:
            raise ConfigError("batch.adaptive=true steers by the gradient noise scale, which run.noise_scale_ema=0 "
                              "switches off; set --run.noise_scale_ema=0.95 or drop --batch.adaptive.")
        if b.ramp_start:
            raise ConfigError(f"batch.adaptive=true and batch.ramp_start={b.ramp_start} both steer the batch; keep "
                              "one of them (--batch.ramp_start=0 --batch.ramp_increment=0 --batch.ramp_samples=0).")

    def _check_distill(self) -> None:
        """The distill section: a positive temperature, non-negative weights of which one at least is positive."""
        d = self.distill
        if not d.teacher:
            return
        _choice("distill.init", d.init, ("none", "teacher_layers"))
        if not d.temperature > 0:
            raise ConfigError(f"distill.temperature={d.temperature} must be positive; 2.0 is the usual choice.")
        alphas = {"alpha_kd": d.alpha_kd, "alpha_hard": d.alpha_hard, "alpha_hidden": d.alpha_hidden}
        if min(alphas.values()) < 0 or not sum(alphas.values()) > 0:
            raise ConfigError("distill " + ", ".join(f"{k}={v}" for k, v in alphas.items()) + " must be >= 0 with "
                              "one at least positive, or the student learns nothing; set e.g. --distill.alpha_kd=1.")
        if d.layers and (len(d.layers) != self.model.num_layers or min(d.layers) < 0):
            raise ConfigError(f"distill.layers={','.join(map(str, d.layers))} must name one teacher layer (0-based) "
                              f"for each of the student's {self.model.num_layers} layers; leave it empty for every "
                              "other layer.")


def _choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        hint = difflib.get_close_matches(value, allowed, n=1)
        extra = f" (did you mean {hint[0]!r}?)" if hint else ""
        raise ConfigError(f"{key}={value!r} is not one of {', '.join(allowed)}{extra}; set --{key}=<one of them>.")


def _micro_batch(key: str, value: int | str) -> None:
    """A micro-batch is a whole number >= 0 or "auto"."""
    if value != "auto" and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
        raise ConfigError(f"{key}={value!r} must be a whole number >= 0 or 'auto'; e.g. --{key}=auto.")
