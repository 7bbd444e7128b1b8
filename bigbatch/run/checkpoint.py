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

from bigbatch.config.errors import StorageFault
from bigbatch.run import distributed, faults
from bigbatch.run.rundir import filesystem

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
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    except OSError:
        tmp.unlink(missing_ok=True)  # a full disk: no half-written file stays
        raise
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
    """Every rank calls this: each writes its own partitions; the writer makes the checkpoint complete and visible.
    A write that fails on any rank (a full disk, a quota, a read-only remount) is agreed by all of them: the partial
    `.tmp` goes, `latest` keeps naming the last complete checkpoint, and every rank raises StorageFault."""
    tag = tag_for(step)
    staging = root / f"{tag}.tmp"
    if is_writer and staging.exists():
        shutil.rmtree(staging)  # left by a save that was killed
    barrier()
    failure = _attempt(lambda: engine.save_checkpoint(str(root), tag=staging.name, client_state=client_state,
                                                      save_latest=False))
    if failure is not None:
        # DeepSpeed's save ends in one barrier after every rank's writes (engine.save_checkpoint, 0.19): a rank whose
        # write failed meets the others there before they all agree below
        barrier()
    faults.at("checkpoint", root.parent)
    if is_writer and failure is None:
        failure = _attempt(lambda: _complete(staging, root / tag, world))
    if distributed.sum_across_ranks([float(failure is not None)])[0]:
        written = sum(p.stat().st_size for p in staging.rglob("*") if p.is_file()) if staging.is_dir() else 0
        barrier()  # every rank has counted the partial bytes before the writer removes them
        if is_writer:
            shutil.rmtree(staging, ignore_errors=True)
        barrier()
        raise StorageFault(_save_failed(root, tag, failure, written))
    if is_writer:
        # the newest keep_last up to this one; tags after it (ones a resume skipped as incomplete) are not counted
        # as kept, or they could push out the checkpoint just written
        for old in [t for t in list_tags(root) if t <= tag][:-keep_last]:
            shutil.rmtree(root / old, ignore_errors=True)
            shutil.rmtree(root / f"{old}-universal", ignore_errors=True)
    barrier()
    return tag


def _attempt(write: Callable[[], Any]) -> Optional[str]:
    """None when `write()` succeeded; else what failed. torch's zip writer reports a full disk as a RuntimeError
    ("unexpected pos ..."), not as the OSError underneath, so both count as a failed write."""
    try:
        write()
    except (OSError, RuntimeError) as err:
        log.error("writing a checkpoint failed: %s", err)
        return (err.strerror if isinstance(err, OSError) and err.strerror else str(err)).splitlines()[0]
    return None


def _complete(staging: Path, final: Path, world: int) -> None:
    """Writer rank: the manifest, the rename to the tag, then `latest`."""
    write_manifest(staging, world)
    if final.exists():  # the same step saved again (an overwrite of a finished step): replace it
        shutil.rmtree(final)
    os.replace(staging, final)
    _write_atomic(final.parent / "latest", final.name)


def checkpoint_bytes(directory: Path) -> Optional[int]:
    """The bytes a complete checkpoint holds, from its manifest."""
    try:
        return sum(f["bytes"] for f in json.loads((directory / MANIFEST).read_text())["files"].values())
    except (OSError, ValueError, KeyError):
        return None


def _save_failed(root: Path, tag: str, failure: Optional[str], written: int) -> str:
    """The sentence: the filesystem, bytes needed and free, the last complete checkpoint, what to do."""
    latest = (root / "latest").read_text().strip() if (root / "latest").is_file() else None
    previous = checkpoint_bytes(root / latest) if latest else None
    need = f"a checkpoint needs about {previous:,} bytes" if previous else f"it had written {written:,} bytes"
    kept = (f"the last complete checkpoint is {root / latest} (`latest` still names it)" if latest
            else "no checkpoint was complete yet, so a resume starts from step 0")
    return (f"writing checkpoint {tag} into {root} failed ({failure or 'on another rank'}); its filesystem "
            f"({filesystem(root)}) has {shutil.disk_usage(root).free:,} bytes free and {need}; {kept}; the partial "
            f"{tag}.tmp was removed: free space, then --resume")


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
