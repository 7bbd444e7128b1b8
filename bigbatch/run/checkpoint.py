"""Checkpoints through DeepSpeed's engine (every ZeRO stage's partitions, optimizer, LR scheduler, loss scaler),
with the trainer's position in `client_state`, made atomic and verifiable around it.

Why around DeepSpeed: `engine.save_checkpoint` writes straight into `<root>/<tag>/` and then `latest`, so a process
killed mid-save (SIGKILL at a time limit) can leave a half-written tag that `latest` may already name, and a
truncated file is only discovered as an unpickling error at load time. Here every rank saves into `<tag>.tmp/`
(DeepSpeed's `save_latest=False`), then the writer rank lists every file with its size and sha256 in
`manifest.json`, renames the directory to `<tag>` (atomic on one filesystem) and replaces `latest` last. Loading
verifies the manifest and falls back, with a warning naming it, to the newest complete checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Optional

from bigbatch.run import faults

log = logging.getLogger(__name__)
TAG = re.compile(r"^step(\d+)$")
MANIFEST = "manifest.json"


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def list_tags(root: Path) -> list[str]:
    """Complete checkpoints (renamed from .tmp), oldest first."""
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and TAG.match(p.name))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _sha256_all(paths: list[Path]) -> list[str]:
    """Hashes in threads: the writer rank hashes every rank's files while the others wait at a barrier, and hashlib
    and file reads release the GIL, so a parallel file system serves several streams at once."""
    if len(paths) <= 1:
        return [_sha256(p) for p in paths]
    with ThreadPoolExecutor(max_workers=min(8, len(paths), os.cpu_count() or 1)) as pool:
        return list(pool.map(_sha256, paths))


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_manifest(directory: Path, world: int) -> None:
    """Every file with its size and sha256, and the data-parallel world that wrote them."""
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)
    entries = {str(p.relative_to(directory)): {"bytes": p.stat().st_size, "sha256": digest}
               for p, digest in zip(files, _sha256_all(files))}
    _write_atomic(directory / MANIFEST, json.dumps({"world": world, "files": entries}, indent=1))


def saved_world(directory: Path) -> Optional[int]:
    try:
        return json.loads((directory / MANIFEST).read_text()).get("world")
    except (OSError, ValueError):
        return None


def verify(directory: Path) -> Optional[str]:
    """None when every file the manifest lists is there with its size and hash; else what is wrong."""
    try:
        entries = json.loads((directory / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError):
        return f"{directory / MANIFEST} is missing or unreadable"
    for name, want in entries.items():
        path = directory / name
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != want["bytes"]:
            return f"{path} has {path.stat().st_size} bytes, the manifest says {want['bytes']} (truncated?)"
    digests = _sha256_all([directory / name for name in entries])
    for (name, want), digest in zip(entries.items(), digests):
        if digest != want["sha256"]:
            return f"{directory / name} does not match its sha256 in the manifest"
    return None


def save(engine: Any, root: Path, step: int, client_state: dict[str, Any], keep_last: int, is_writer: bool,
         barrier: Callable[[], None], world: int) -> str:
    """Every rank calls this: each writes its own partitions; the writer makes the checkpoint complete and visible."""
    tag = tag_for(step)
    staging = root / f"{tag}.tmp"
    if is_writer and staging.exists():
        shutil.rmtree(staging)  # left by a save that was killed
    barrier()
    engine.save_checkpoint(str(root), tag=staging.name, client_state=client_state, save_latest=False)
    faults.at("checkpoint", root.parent)
    if is_writer:
        write_manifest(staging, world)
        if (root / tag).exists():  # the same step saved again (an overwrite of a finished step): replace it
            shutil.rmtree(root / tag)
        os.replace(staging, root / tag)
        _write_atomic(root / "latest", tag)
        # the newest keep_last up to this one; tags after it (ones a resume skipped as incomplete) are not counted
        # as kept, or they could push out the checkpoint just written
        for old in [t for t in list_tags(root) if t <= tag][:-keep_last]:
            shutil.rmtree(root / old, ignore_errors=True)
            shutil.rmtree(root / f"{old}-universal", ignore_errors=True)
    barrier()
    return tag


def newest_complete(root: Path) -> Optional[str]:
    """The newest complete, verified checkpoint: `latest` first, then older tags; a bad one is named in a warning."""
    candidates = list(reversed(list_tags(root)))
    latest = (root / "latest").read_text().strip() if (root / "latest").is_file() else None
    if latest in candidates:
        candidates.remove(latest)
        candidates.insert(0, latest)
    for tag in candidates:
        problem = verify(root / tag)
        if problem is None:
            return tag
        log.warning("checkpoint %s is incomplete and is skipped: %s", root / tag, problem)
        print(f"warning: checkpoint {root / tag} is incomplete and is skipped: {problem}", flush=True)
    return None
