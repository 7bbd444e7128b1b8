"""Knowledge distillation: the loss, the student that carries its frozen teacher, and the student's start from the
teacher's layers.

The loss is Hinton et al. (2015): `T^2 * KL(softmax(z_t / T) || softmax(z_s / T))`, the T^2 keeping the soft targets'
gradients the same size as T changes, over the positions the model predicts (BERT: the masked ones; GPT/Llama: every
next token), ignored labels (-100) excluded; plus the hard MLM/LM loss on the labels and DistilBERT's (Sanh et al.
2019) cosine loss between the last hidden states. The student starts, as DistilBERT and DeepSpeed's layer reduction
did, from every other teacher layer.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from bigbatch.config import ConfigError, DistillConfig

IGNORE = -100
# a transformer layer's index in transformers' parameter names: BERT `encoder.layer.3.`, GPT-2 `h.3.`, Llama `layers.3.`
_LAYER = re.compile(r"\.(layer|h|layers)\.(\d+)\.")


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(z_t/T) || softmax(z_s/T)), the mean over rows (a row per predicted position); 0 without rows."""
    log_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    total = F.kl_div(log_s, log_t, reduction="sum", log_target=True)
    return temperature**2 * total / max(student_logits.shape[0], 1)


def hidden_loss(student: torch.Tensor, teacher: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """DistilBERT's cosine loss: 1 - cos(h_s, h_t), the mean over the positions attention sees (padding excluded)."""
    keep = attention_mask.bool()
    cos = F.cosine_similarity(student[keep].float(), teacher[keep].float(), dim=-1)
    return (1 - cos).sum() / max(cos.numel(), 1)


def predicted(hf: nn.Module, arch: str, input_ids: torch.Tensor, attention_mask: torch.Tensor,
              labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(last hidden states [batch, seq, width], logits at the predicted positions [n, vocab], their labels [n]).

    BERT predicts the masked positions (its head runs there only, as `MaskedLM`); GPT/Llama predict every next token,
    so position i's logits go with label i+1, as transformers' causal LM loss shifts them."""
    if arch == "bert":
        hidden = hf.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        keep = labels != IGNORE
        return hidden, hf.cls(hidden[keep]), labels[keep]
    out = hf(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, use_cache=False)
    targets = labels[:, 1:]
    keep = targets != IGNORE
    return out.hidden_states[-1], out.logits[:, :-1][keep], targets[keep]


class Distilled(nn.Module):
    """The student, whose forward returns the distillation loss in training and its own MLM/LM loss in evaluation.

    Its parameters are the student's alone, named as in a plain run (`hf.`), so the optimizer, the checkpoints, export
    and compress see only the student. The teacher is kept outside the module tree (not a submodule): DeepSpeed never
    partitions, casts, saves or hands it to the optimizer. It stays in eval mode with no gradients, in the precision
    the caller gave it, and follows the inputs to their device.
    """

    def __init__(self, student_hf: nn.Module, teacher_hf: nn.Module, cfg: DistillConfig, arch: str,
                 vocab_size: int) -> None:
        super().__init__()
        self.hf = student_hf
        object.__setattr__(self, "teacher", teacher_hf.eval().requires_grad_(False))
        self.cfg, self.arch, self.vocab_size = cfg, arch, vocab_size
        self.sums: dict[str, torch.Tensor] = {}
        self.micro_batches = 0

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        s_hidden, s_logits, targets = predicted(self.hf, self.arch, input_ids, attention_mask, labels)
        # the real vocabulary only: padded embedding rows are never a target, and the two models may pad differently
        s_logits = s_logits[:, : self.vocab_size]
        hard = F.cross_entropy(s_logits.float(), targets, reduction="sum") / max(targets.numel(), 1)
        if not self.training:
            return hard
        teacher = self.teacher
        if next(teacher.parameters()).device != input_ids.device:
            teacher.to(input_ids.device)
        with torch.no_grad():
            t_hidden, t_logits, _ = predicted(teacher, self.arch, input_ids, attention_mask, labels)
        cfg = self.cfg
        terms = {"loss_kd": kd_loss(s_logits, t_logits[:, : self.vocab_size], cfg.temperature), "loss_hard": hard}
        if cfg.alpha_hidden:
            terms["loss_hidden"] = hidden_loss(s_hidden, t_hidden, attention_mask)
        total = cfg.alpha_kd * terms["loss_kd"] + cfg.alpha_hard * hard
        if cfg.alpha_hidden:
            total = total + cfg.alpha_hidden * terms["loss_hidden"]
        for name, value in terms.items():
            self.sums[name] = self.sums.get(name, 0.0) + value.detach().float()
        self.micro_batches += 1
        return total

    def take_terms(self) -> dict[str, float]:
        """Each loss term's mean over the micro-batches since the last call (for metrics.jsonl)."""
        terms = {k: float(v) / self.micro_batches for k, v in self.sums.items()}
        self.sums, self.micro_batches = {}, 0
        return terms


def teacher_kind(spec: str) -> str:
    """What `distill.teacher` names: "run" (a bigbatch run directory), "export" (a `bigbatch export` directory) or
    "hf" (`hf:<name>`); a ConfigError when it is none of them. Reads no weights (`bigbatch check` asks it too)."""
    if spec.startswith("hf:"):
        return "hf"
    path = Path(spec)
    if not path.exists():
        raise ConfigError(f"distill.teacher={spec} does not exist; give a bigbatch run directory, a `bigbatch export` "
                          "directory or hf:<name> in the local cache.")
    if (path / "recipe.json").is_file():
        return "run"
    if (path / "config.json").is_file() and (path / "tokenizer.model").is_file():
        return "export"
    raise ConfigError(f"distill.teacher={spec} holds neither a bigbatch run (recipe.json) nor a `bigbatch export` "
                      "directory (config.json and tokenizer.model); point it at one of those.")


def every_other(teacher_layers: int, student_layers: int) -> tuple[int, ...]:
    """DistilBERT's choice: teacher layers 0, 2, 4, ... for the student's layers in order."""
    layers = tuple(range(0, teacher_layers, 2))[:student_layers]
    if len(layers) < student_layers:
        raise ConfigError(f"the student has {student_layers} layers but every other layer of the {teacher_layers}"
                          f"-layer teacher gives only {len(layers)}; set --distill.layers=<one teacher layer per "
                          "student layer> or --distill.init=none.")
    return layers


def init_from_teacher(student_hf: nn.Module, teacher_hf: nn.Module, layers: tuple[int, ...]) -> list[str]:
    """Copies teacher layer `layers[j]` into student layer j, tensor by tensor, and every other tensor (embeddings,
    head, final norm) whose name and shape match; returns the student's names that were copied."""
    teacher = teacher_hf.state_dict()
    n_teacher = 1 + max((int(m.group(2)) for k in teacher for m in [_LAYER.search(k)] if m), default=-1)
    if max(layers, default=-1) >= n_teacher:
        raise ConfigError(f"distill.layers={','.join(map(str, layers))} names a layer the {n_teacher}-layer teacher "
                          f"does not have; use layers 0..{n_teacher - 1}.")
    copied = []
    with torch.no_grad():
        for name, tensor in student_hf.state_dict().items():
            found = _LAYER.search(name)
            source = name if not found else (
                f"{name[:found.start()]}.{found.group(1)}.{layers[int(found.group(2))]}.{name[found.end():]}")
            if source in teacher and teacher[source].shape == tensor.shape:
                tensor.copy_(teacher[source])
                copied.append(name)
            elif found:
                raise ConfigError(f"distill.init=teacher_layers copies whole layers, but the student's {name} has "
                                  f"shape {tuple(tensor.shape)} and the teacher's {source} "
                                  f"{tuple(teacher[source].shape) if source in teacher else 'does not exist'}; give "
                                  "the student the teacher's width, heads and MLP width, or set --distill.init=none.")
    return copied


def weights_sha256(module: nn.Module) -> str:
    """A sha256 of a model's weights (names, dtypes, shapes and bytes in name order), to tell a changed teacher."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()

