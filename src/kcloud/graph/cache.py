"""Captured LayerGraphs kept on disk, so that a model is captured once, not once per command.

A graph is stored under `$KCLOUD_CACHE_DIR/graphs/` (see `kcloud.paths.cache_dir`), keyed by
- the model: the spec as given, and for a file (`file.py:factory`, `.onnx`) its resolved path
  and its contents (a digest of a Python file; size and modification time of an ONNX file,
  which may be gigabytes; the JSON configs of a Hugging Face model directory);
- the shapes asked for: batch, sequence length, phase, KV length;
- the K-Cloud version and a digest of the capture code itself (every source file of
  `kcloud.graph`, the zoo's configs included), so that a change to either captures afresh.

A change to any of them is a new key: the stored graph is stale, captured afresh and replaced
(one file per model and shapes). Reading is torch-free: a hit
costs a file read, not a torch import and a trace. `KCLOUD_GRAPH_CACHE=0` turns the cache off.
A file that cannot be read (truncated, another version's format) is a miss.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pickle
import tempfile
from collections.abc import Callable
from functools import cache
from pathlib import Path

from kcloud import __version__
from kcloud.graph.layergraph import LayerGraph
from kcloud.paths import cache_dir

ENV_GRAPH_CACHE = "KCLOUD_GRAPH_CACHE"
FORMAT = 1  # layout of the stored record

_MEMORY: dict[str, LayerGraph] = {}  # this process's hits and captures, by key


@cache
def code_digest() -> str:
    """Digest of the capture code (every .py under kcloud/graph) and the K-Cloud version."""
    root = Path(__file__).resolve().parent
    h = hashlib.sha256(f"kcloud {__version__} format {FORMAT}".encode())
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def _model_identity(spec: str) -> str:
    """What the spec names, down to the file contents it will be captured from."""
    file_part, colon, factory = spec.rpartition(":")
    if colon and file_part.endswith(".py"):
        path = Path(file_part).expanduser()
        try:
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
        except OSError:
            return f"missing {spec}"
        return f"py {path.resolve()} {factory} {digest}"
    if spec.lower().endswith(".onnx"):
        path = Path(spec).expanduser()
        try:
            st = path.stat()
        except OSError:
            return f"missing {spec}"
        return f"onnx {path.resolve()} {st.st_size} {st.st_mtime_ns}"
    path = Path(spec).expanduser()
    if path.is_dir():  # a Hugging Face model directory: its graph follows its JSON configs
        h = hashlib.sha256()
        for f in sorted(path.glob("*.json")):
            with contextlib.suppress(OSError):
                h.update(f.name.encode() + f.read_bytes())
        return f"dir {path.resolve()} {h.hexdigest()}"
    return f"zoo {spec}"


def graph_key(spec: str, *, batch: int | None, seq_len: int | None, phase: str | None,
              kv_len: int | None) -> tuple[str, str]:
    """(slot, key): the slot names the model and shapes (one file each); the key adds the
    capture code's digest, so a new version finds its slot stale and replaces it."""
    text = "|".join(str(x) for x in (_model_identity(spec), batch, seq_len, phase, kv_len))
    slot = hashlib.sha256(text.encode()).hexdigest()[:24]
    return slot, f"{slot}-{code_digest()}"


def enabled() -> bool:
    return os.environ.get(ENV_GRAPH_CACHE, "1").strip().lower() not in ("0", "false", "no",
                                                                      "off")


def graph_dir() -> Path:
    return cache_dir() / "graphs"


def _file(spec: str, slot: str) -> Path:
    # A readable stem per model (the spec made filename-safe), the slot after it.
    stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in spec)[-60:]
    return graph_dir() / f"{stem}-{slot}.pkl"


def _read(path: Path, key: str) -> LayerGraph | None:
    try:
        with path.open("rb") as f:
            record = pickle.load(f)
    except (OSError, EOFError, pickle.UnpicklingError, AttributeError, ImportError,
            TypeError, ValueError):
        return None
    if (not isinstance(record, dict) or record.get("key") != key
            or not isinstance(record.get("graph"), LayerGraph)):
        return None
    return record["graph"]


def _write(path: Path, key: str, graph: LayerGraph) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".pkl")
        with os.fdopen(fd, "wb") as f:
            pickle.dump({"key": key, "graph": graph}, f, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(tmp, path)  # readers see the old file or the whole new one
    except OSError:
        return  # a read-only or full cache directory costs a recapture next time, no error


def cached_graph(spec: str, capture: Callable[[], LayerGraph], *, batch: int | None,
                 seq_len: int | None, phase: str | None, kv_len: int | None) -> LayerGraph:
    """The graph of `spec` at these shapes: from memory, from disk, or `capture()`d and stored.

    Errors of `capture()` (an unknown model, a bad shape) are raised, never stored.
    """
    slot, key = graph_key(spec, batch=batch, seq_len=seq_len, phase=phase, kv_len=kv_len)
    hit = _MEMORY.get(key)
    if hit is not None:
        return hit
    use_disk = enabled()
    path = _file(spec, slot)
    graph = _read(path, key) if use_disk else None
    if graph is None:
        graph = capture()
        if use_disk:
            _write(path, key, graph)
    if len(_MEMORY) > 128:
        _MEMORY.clear()
    _MEMORY[key] = graph
    return graph


def clear_memory() -> None:
    """Forget this process's graphs (the disk cache stays)."""
    _MEMORY.clear()
