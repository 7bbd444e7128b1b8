"""Text sources -> `datasets` datasets of documents: local files and directories, the hub, and a built-in corpus."""

from __future__ import annotations

import ast
import logging
import os
import sysconfig
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator, Optional

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


_BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def _builtin_records() -> Iterator[dict[str, str]]:
    for doc in _python_docs():
        yield {"text": doc}


def _clean(batch: dict[str, list[Any]]) -> dict[str, list[str]]:
    """Documents stripped of surrounding whitespace; empty and non-string ones dropped."""
    return {"text": [t.strip() for t in batch["text"] if isinstance(t, str) and t.strip()]}


class HubUnreachable(ConfigError):
    """An `hf:` source is not cached and the hub did not answer: training cannot start, while `bigbatch check` can
    only say that it could not look (a note, not an error)."""


def _hub_error(source: str, err: Exception) -> ConfigError:
    """One sentence for an `hf:` source that `datasets` could not open."""
    import datasets

    if isinstance(err, ConnectionError):  # datasets' word for "no answer from the hub and nothing in the cache"
        return HubUnreachable(f"data source {source} is not in the local cache and the Hugging Face hub could not be "
                           f"reached ({err}); connect to the hub (check HF_ENDPOINT and HF_HUB_OFFLINE) or cache the "
                           "dataset first where the hub is reachable.")
    if isinstance(err, datasets.exceptions.DatasetNotFoundError):
        return ConfigError(f"data source {source} names no dataset the Hugging Face hub gives access to ({err}); "
                           "fix the name in --data.sources (hf:<dataset>[:<config>]) or log in for a gated one.")
    return ConfigError(f"data source {source} could not be opened ({type(err).__name__}: {err}); fix the dataset or "
                       "config name in --data.sources (hf:<dataset>[:<config>]).")


@contextmanager
def _quiet_hub() -> Iterator[None]:
    """huggingface_hub logs each retry of an unreachable hub as a warning; the user gets one sentence instead."""
    hub_log = logging.getLogger("huggingface_hub")
    level = hub_log.level
    hub_log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        hub_log.setLevel(level)


def check_hub(source: str, cache_dir: Optional[str] = None) -> None:
    """Opens an `hf:` source's builder (the hub's metadata, or the local cache offline) without reading its data, so
    an unreachable hub or an unknown name ends in one sentence before anything is written."""
    import datasets

    dataset, _, config = source[3:].partition(":")
    datasets.logging.set_verbosity_error()
    try:
        with _quiet_hub():
            datasets.load_dataset_builder(dataset, name=config or None, cache_dir=cache_dir or None)
    except Exception as err:  # whatever keeps the builder from opening, the run cannot read this source
        raise _hub_error(source, err) from None


def _load(builder: str, what: str, streaming: bool, cache_dir: Optional[str], **kwargs: Any) -> Any:
    import datasets

    try:
        ds = datasets.load_dataset(builder, split="train", streaming=streaming, cache_dir=cache_dir or None, **kwargs)
    except (ConnectionError, datasets.exceptions.DatasetNotFoundError) as err:
        if not what.startswith("hf:"):
            raise
        raise _hub_error(what, err) from None
    except datasets.exceptions.DatasetGenerationError as err:
        cause = " ".join(str(err.__cause__ or err).split())  # datasets' cast errors run over several lines
        raise ConfigError(f"data source {what} could not be read ({cause}); fix the file (JSON lines need one "
                          "object per line with a \"text\" field).") from None
    except ValueError as err:  # datasets' way of saying that the files hold no record at all
        if "corresponds to no data" not in str(err):
            raise
        raise ConfigError(f"data source {what} holds no text; point --data.sources at a non-empty corpus.") from None
    columns = ds.column_names
    if columns is None:  # a stream of a format whose columns are known only once read
        first = next(iter(ds.take(1)), {})
        columns = list(first)
    if "text" not in columns:
        raise ConfigError(f"data source {what} has no \"text\" field (fields: {', '.join(columns)}); rename the "
                          "field that holds the text to \"text\".")
    return ds.select_columns(["text"])


def open_source(source: str, streaming: bool = False, cache_dir: Optional[str] = None) -> Any:
    """One source as a `datasets` dataset with a "text" column of non-empty documents (an IterableDataset when
    streaming). Local files load through `datasets`' own text/json/parquet builders, so their preparation and every
    later `map` are cached, and keyed on the files' contents.

    .txt: documents separated by blank lines; .jsonl/.json: a "text" field per record; .parquet: a "text" column.
    A directory: its files of those kinds, grouped by format. `hf:<dataset>[:<config>]`: the train split on the hub.
    """
    import datasets

    datasets.disable_progress_bars()  # bigbatch prints its own progress lines
    datasets.logging.set_verbosity_error()  # a bad file becomes one ConfigError sentence, not a logged traceback too
    if source == BUILTIN:
        ds = datasets.Dataset.from_generator(_builtin_records, cache_dir=cache_dir or None)
        parts = [ds.to_iterable_dataset() if streaming else ds]
    elif source.startswith("hf:"):
        dataset, _, config = source[3:].partition(":")
        parts = [_load(dataset, source, streaming, cache_dir, name=config or None)]
    else:
        groups: dict[str, list[str]] = {}
        for f in _files(Path(source)):
            groups.setdefault(_BUILDERS[f.suffix], []).append(str(f))
        parts = [_load(builder, source, streaming, cache_dir, data_files=files,
                       **({"sample_by": "paragraph"} if builder == "text" else {}))
                 for builder, files in groups.items()]
    ds = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    ds = ds.map(_clean, batched=True)
    empty = next(iter(ds.take(1)), None) is None if streaming else len(ds) == 0
    if empty:
        raise ConfigError(f"data source {source} holds no text; point --data.sources at a non-empty corpus.")
    return ds


def _files(path: Path) -> list[Path]:
    if path.is_dir():
        found = sorted(p for p in path.rglob("*") if p.suffix in SUFFIXES and p.is_file())
        if not found:
            raise ConfigError(f"data source {path} is a directory with no {'/'.join(SUFFIXES)} files; add some.")
        return found
    if path.suffix not in SUFFIXES:
        raise ConfigError(f"data source {path} has suffix {path.suffix!r}; use one of {', '.join(SUFFIXES)}.")
    return [path]


def check_sources(sources: tuple[str, ...], cache_dir: Optional[str] = None) -> None:
    """Fails fast, before any process group starts, on a local source that does not exist or an `hf:` source that
    cannot be opened (the hub unreachable and the dataset not cached, or an unknown name)."""
    for source in sources:
        if source.startswith("hf:"):
            check_hub(source, cache_dir)
            continue
        if source == BUILTIN:
            continue
        if source.startswith("builtin:"):
            raise ConfigError(f"data.sources names {source!r}; the only built-in corpus is {BUILTIN!r}.")
        if not Path(source).exists():
            raise ConfigError(f"data source {source} does not exist; fix --data.sources or create the file.")
        _files(Path(source))


def load_documents(sources: tuple[str, ...], cache_dir: Optional[str] = None) -> list[str]:
    """Every document of every source, in order, in memory (for small corpora: the tokenizer CLI, tests)."""
    check_sources(sources, cache_dir)
    return [t for source in sources for t in open_source(source, cache_dir=cache_dir)["text"]]
