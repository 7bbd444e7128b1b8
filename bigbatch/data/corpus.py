"""Text sources -> a list of documents: local files and directories, the Hugging Face hub, and a built-in corpus."""

from __future__ import annotations

import ast
import json
import os
import sysconfig
from functools import lru_cache
from pathlib import Path

from bigbatch.config import ConfigError

BUILTIN = "builtin:python-docs"
SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")
# Parts of the standard library whose docstrings are mostly code or test scaffolding, not prose.
_SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "lib2to3", "turtledemo", "tkinter", "ensurepip"}


@lru_cache(maxsize=1)
def _python_docs() -> tuple[str, ...]:
    """English prose that ships inside every CPython: the `pydoc` topic pages and the standard library's longer
    docstrings (read with `ast`, nothing imported). About 1.6 MB of text on Python 3.11; no download."""
    docs: list[str] = []
    try:
        from pydoc_data.topics import topics

        for key in sorted(topics):
            docs += [p.strip() for p in topics[key].split("\n\n") if len(p.strip()) > 40]
    except ImportError:  # some distributions strip pydoc_data; the docstrings alone still make a corpus
        pass
    root = sysconfig.get_paths()["stdlib"]
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS)
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            try:
                tree = ast.parse(Path(folder, name).read_text(encoding="utf-8"))
            except (SyntaxError, UnicodeDecodeError, OSError):
                continue
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    doc = ast.get_docstring(node)
                    if doc and len(doc) > 200:
                        docs.append(doc)
    return tuple(docs)


def python_docs() -> list[str]:
    return list(_python_docs())


def _read_file(path: Path) -> list[str]:
    """.txt: documents separated by blank lines; .jsonl/.json: a "text" field per line; .parquet: a "text" column."""
    if path.suffix == ".txt":
        text = path.read_text(encoding="utf-8", errors="replace")
        return [d.strip() for d in text.split("\n\n") if d.strip()]
    if path.suffix in (".jsonl", ".json"):
        docs = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise ConfigError(f"{path} line {n} is not JSON; write one object per line with a \"text\" field.")
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise ConfigError(f"{path} line {n} has no string \"text\" field; add one to every line.")
            docs.append(record["text"])
        return docs
    import pyarrow.parquet as pq

    table = pq.read_table(path, columns=None)
    if "text" not in table.column_names:
        raise ConfigError(f"{path} has no \"text\" column (columns: {', '.join(table.column_names)}); rename one.")
    return [t for t in table.column("text").to_pylist() if t]


def _files(path: Path) -> list[Path]:
    if path.is_dir():
        found = sorted(p for p in path.rglob("*") if p.suffix in SUFFIXES and p.is_file())
        if not found:
            raise ConfigError(f"data source {path} is a directory with no {'/'.join(SUFFIXES)} files; add some.")
        return found
    if path.suffix not in SUFFIXES:
        raise ConfigError(f"data source {path} has suffix {path.suffix!r}; use one of {', '.join(SUFFIXES)}.")
    return [path]


def _hub(name: str) -> list[str]:
    """`hf:<dataset>[:<config>]`: the train split's "text" column, through `datasets` (needs the internet)."""
    import datasets

    dataset, _, config = name.partition(":")
    ds = datasets.load_dataset(dataset, config or None, split="train")
    if "text" not in ds.column_names:
        raise ConfigError(f"hub dataset {dataset} has no \"text\" column (columns: {', '.join(ds.column_names)}).")
    return [t for t in ds["text"] if t and t.strip()]


def check_sources(sources: tuple[str, ...]) -> None:
    """Fails fast, before any process group starts, on a local source that does not exist."""
    for source in sources:
        if source == BUILTIN or source.startswith("hf:"):
            continue
        if source.startswith("builtin:"):
            raise ConfigError(f"data.sources names {source!r}; the only built-in corpus is {BUILTIN!r}.")
        if not Path(source).exists():
            raise ConfigError(f"data source {source} does not exist; fix --data.sources or create the file.")
        _files(Path(source))


def load_documents(sources: tuple[str, ...]) -> list[str]:
    """Every document of every source, in order; a source that yields nothing is an error naming it."""
    check_sources(sources)
    docs: list[str] = []
    for source in sources:
        if source == BUILTIN:
            found = python_docs()
        elif source.startswith("hf:"):
            found = _hub(source[3:])
        else:
            found = [d for f in _files(Path(source)) for d in _read_file(f)]
        if not found:
            raise ConfigError(f"data source {source} holds no text; point --data.sources at a non-empty corpus.")
        docs += found
    return docs
