"""The on-disk cache of captured LayerGraphs: one capture per model, shapes and K-Cloud version."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from kcloud.graph import cache
from kcloud.graph.layergraph import LayerGraph
from kcloud.graph.loaders import load_model_spec
from kcloud.graph.zoo import capture_model


@pytest.fixture()
def graph_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("KCLOUD_CACHE_DIR", str(tmp_path))
    cache.clear_memory()
    yield tmp_path / "graphs"
    cache.clear_memory()


def _counting(graph: LayerGraph) -> tuple[list[int], object]:
    calls: list[int] = []

    def capture() -> LayerGraph:
        calls.append(1)
        return graph

    return calls, capture


def test_a_cached_graph_equals_a_fresh_capture(graph_dir: Path) -> None:
    first = load_model_spec("llama-2-7b", batch=1, seq_len=1, phase="decode", kv_len=200)
    assert len(list(graph_dir.glob("llama-2-7b-*.pkl"))) == 1
    cache.clear_memory()  # the next load reads the file
    again = load_model_spec("llama-2-7b", batch=1, seq_len=1, phase="decode", kv_len=200)
    fresh = capture_model("llama-2-7b", phase="decode", kv_len=200, cached=False)
    assert again is not first
    assert again.to_dict(with_ops=True) == fresh.to_dict(with_ops=True)
    assert again.layers == fresh.layers and dict(again.meta) == dict(fresh.meta)


def test_shapes_are_part_of_the_key(graph_dir: Path) -> None:
    a = load_model_spec("llama-2-7b", batch=1, seq_len=1, phase="decode", kv_len=100)
    b = load_model_spec("llama-2-7b", batch=1, seq_len=1, phase="decode", kv_len=300)
    c = load_model_spec("llama-2-7b", batch=2, seq_len=1, phase="decode", kv_len=100)
    assert (a.kv_len, b.kv_len, c.batch) == (100, 300, 2)
    assert len(list(graph_dir.glob("*.pkl"))) == 3


def test_a_new_version_of_the_capture_code_captures_afresh(
        graph_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    g = capture_model("resnet50")
    calls, capture = _counting(g)
    kw = {"batch": 1, "seq_len": None, "phase": None, "kv_len": None}
    cache.cached_graph("resnet50", capture, **kw)
    cache.clear_memory()
    cache.cached_graph("resnet50", capture, **kw)
    assert len(calls) == 1  # the second came from disk
    monkeypatch.setattr(cache, "code_digest", lambda: "another-version")
    cache.clear_memory()
    cache.cached_graph("resnet50", capture, **kw)
    assert len(calls) == 2  # stale: captured again, and its slot replaced
    assert len(list(graph_dir.glob("resnet50-*.pkl"))) == 1


def test_an_unreadable_file_is_a_miss(graph_dir: Path) -> None:
    g = capture_model("resnet50")
    calls, capture = _counting(g)
    kw = {"batch": 1, "seq_len": None, "phase": None, "kv_len": None}
    cache.cached_graph("resnet50", capture, **kw)
    (path,) = graph_dir.glob("resnet50-*.pkl")
    path.write_bytes(b"\x80\x05truncated")
    cache.clear_memory()
    assert cache.cached_graph("resnet50", capture, **kw).layers == g.layers
    assert len(calls) == 2
    with path.open("rb") as f:
        assert isinstance(pickle.load(f)["graph"], LayerGraph)  # rewritten whole


def test_an_edited_model_file_is_captured_again(graph_dir: Path, tmp_path: Path) -> None:
    src = tmp_path / "net.py"
    body = textwrap.dedent("""
        import torch
        from torch import nn

        def factory():
            return nn.Sequential(nn.Linear(8, {h}), nn.ReLU(), nn.Linear({h}, 8)), \\
                (torch.zeros(2, 8),)
    """)
    src.write_text(body.format(h=16))
    a = load_model_spec(f"{src}:factory", batch=2)
    src.write_text(body.format(h=32))
    b = load_model_spec(f"{src}:factory", batch=2)
    assert b.total_params > a.total_params


def test_a_cached_graph_loads_without_torch(graph_dir: Path) -> None:
    """A command whose graphs are cached does not import torch (seconds on a busy host)."""
    code = textwrap.dedent("""
        import sys
        from kcloud.graph.loaders import load_model_spec
        g = load_model_spec("bert-large", batch=1, seq_len=None, phase=None, kv_len=None)
        print(len(g.layers), "torch" in sys.modules)
    """)
    env = {**os.environ, "KCLOUD_CACHE_DIR": str(graph_dir.parent)}
    run = [sys.executable, "-c", code]
    cold = subprocess.run(run, env=env, capture_output=True, text=True, check=True).stdout.split()
    warm = subprocess.run(run, env=env, capture_output=True, text=True, check=True).stdout.split()
    assert cold[1] == "True" and warm == [cold[0], "False"]


def test_the_cache_can_be_turned_off(graph_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KCLOUD_GRAPH_CACHE", "0")
    load_model_spec("resnet50", batch=1)
    assert not graph_dir.exists()


def test_a_second_plan_command_does_not_import_torch(graph_dir: Path) -> None:
    """`kcloud plan` as a whole command: once the model's graphs are cached it plans without
    importing torch (its import alone is seconds of a busy host's wall time)."""
    code = textwrap.dedent("""
        import sys
        from kcloud.cli import main
        sys.argv = ["kcloud", "plan", "--model", "tiny-gpt", "--cluster", "k-cloud-rack",
                    "--json"]
        try:
            main()
        finally:
            print("torch" in sys.modules, file=sys.stderr)
    """)
    env = {**os.environ, "KCLOUD_CACHE_DIR": str(graph_dir.parent)}
    run = [sys.executable, "-c", code]
    cold = subprocess.run(run, env=env, capture_output=True, text=True, check=True)
    warm = subprocess.run(run, env=env, capture_output=True, text=True, check=True)
    assert cold.stderr.split()[-1] == "True"
    assert warm.stderr.split()[-1] == "False"
    plans = [json.loads(r.stdout) for r in (cold, warm)]
    for doc in plans:  # the measured times
        doc.pop("search_time_s")
        doc.pop("kernel_s")
    assert plans[0] == plans[1]  # the cached graphs plan as the captured ones did
