"""Checkpoints through DeepSpeed's engine (every ZeRO stage's partitions, optimizer, LR scheduler, loss scaler),
with the trainer's position in `client_state`, and keep-last-N pruning."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any, Optional

TAG = re.compile(r"^step(\d+)$")


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def list_tags(root: Path) -> list[str]:
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and TAG.match(p.name))


def save(engine: Any, root: Path, step: int, client_state: dict[str, Any], keep_last: int, is_writer: bool) -> str:
    """Saves on every rank (each writes its own partitions); DeepSpeed writes `latest` after the tag is complete."""
    tag = tag_for(step)
    engine.save_checkpoint(str(root), tag=tag, client_state=client_state)
    if is_writer:
        for old in list_tags(root)[:-keep_last]:
            shutil.rmtree(root / old, ignore_errors=True)
    return tag


def load_latest(engine: Any, root: Path) -> Optional[dict[str, Any]]:
    """Loads the checkpoint `latest` names; returns its client_state, or None when there is none."""
    if not (root / "latest").exists():
        return None
    path, client_state = engine.load_checkpoint(str(root))
    if path is None:
        return None
    return client_state
