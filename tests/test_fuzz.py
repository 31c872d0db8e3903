"""Bad input to every sub-command, as a table of cases: each must end with one line on stderr
(`kcloud: error: ...`), exit code 2, no traceback, within a bounded time, leaving no process
and no temporary file. The table runs in this process (fast) and, marked slow, as a `kcloud`
child process (what a user runs: its whole stderr, its exit, its process group). Hypothesis
then throws random values into plan and cluster files: each loads or is one `KCloudError`."""

from __future__ import annotations

import json
import math
import os
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kcloud.errors import KCloudError
from tests import clitools

BOUND_S = 90.0  # the slowest case (a model file's time limit, a child's start) on a loaded host

GOOD_PLAN: dict[str, Any] = {
    "schema": "kcloud.plan", "version": 1, "model": "tiny-resnet", "cluster": "k-cloud-rack",
    "objective": "throughput", "batch": 4, "micro_batch": 4, "seq_len": None,
    "phase": "forward", "n_layers": 9,
    "replicas": [{"stages": [{"start": 0, "end": 9, "device_type": "rebellions-atom",
                              "devices": ["atom-0/rebellions-atom/0"], "precision": "int8",
                              "time_s": 1e-3, "comm_s": 0.0, "memory_bytes": 1e6,
                              "power_w": 50.0}]}],
    "predicted": {"latency_s": 1e-3, "throughput": 1.0, "unit": "samples/s", "power_w": 1.0,
                  "energy_per_item_j": 1.0, "device_hours_per_item": 0.0,
                  "cost_per_item_usd": None, "comm_share": 0.0},
}

CSV_HEAD = "device,model,scenario,precision,input_tokens,output_tokens,metric,value,unit,source\n"
CSV_ROW = "rebellions-atom,resnet50,offline,int8,,,throughput,{v},{u},MLPerf v3.0\n"


def _plan(**change: Any) -> str:
    doc = json.loads(json.dumps(GOOD_PLAN))
    for key, value in change.items():
        where = doc
        *path, last = key.split("__")
        for k in path:
            where = where[int(k)] if k.isdigit() else where[k]
        where[last] = value
    return json.dumps(doc)


def _cluster(nodes: str, network: str = "") -> str:
    return f"name: fuzz\n{network}nodes:\n{nodes}"


# name -> file content (bytes or text), made once per session.
FILES: dict[str, str | bytes] = {
    "latin1.yaml": "name: caf\xe9\nnodes: []\n".encode("latin-1"),
    "latin1.csv": (CSV_HEAD + "caf\xe9,resnet50,offline,int8,,,throughput,1,samples/s,x\n"
                   ).encode("latin-1"),
    "latin1.json": b"\xff\xfe{\x00}",
    "catalog/bad.yaml": b"id: bad\nname: \xff\xfe\n",
    "list.json": "[1, 2, 3]",
    "null.json": "null",
    "empty.json": "",
    "deep.json": "[" * 100_000 + "]" * 100_000,
    "notjson.json": "{plan: yes",
    "good.json": _plan(),
    "frac-micro.json": _plan(micro_batch=1.5),
    "huge-micro.json": _plan(micro_batch=10**12),
    "str-micro.json": _plan(micro_batch="4"),
    "neg-tokens.json": _plan(output_tokens=-5),
    "phase.json": _plan(phase="sideways"),
    "no-layers.json": _plan(n_layers=0),
    "no-devices.json": _plan(replicas__0__stages__0__devices=[]),
    "empty-model.json": _plan(model=""),
    "no-replicas.json": _plan(replicas=[]),
    "nan-latency.json": _plan(predicted__latency_s=float("nan")),
    "gap.json": _plan(replicas__0__stages__0__end=5),
    "code-plan.json": _plan(model="{d}/evil.py:factory"),
    "evil.py": "import pathlib\npathlib.Path(__file__).with_name('RAN').write_text('x')\n"
               "def factory():\n    raise SystemExit(3)\n",
    "csv-zero.csv": CSV_HEAD + CSV_ROW.format(v=0, u="samples/s"),
    "csv-nan.csv": CSV_HEAD + CSV_ROW.format(v="nan", u="samples/s"),
    "csv-neg.csv": CSV_HEAD + CSV_ROW.format(v=-5, u="samples/s"),
    "csv-inf.csv": CSV_HEAD + CSV_ROW.format(v="inf", u="samples/s"),
    "csv-header.csv": CSV_HEAD,
    "csv-unit.csv": CSV_HEAD + CSV_ROW.format(v=7000, u="tokens/s"),
    "csv-furlong.csv": CSV_HEAD + CSV_ROW.format(v=7000, u="furlongs/s"),
    "csv-cols.csv": "device,value\nrebellions-atom,1\n",
    "csv-ragged.csv": CSV_HEAD + "rebellions-atom,resnet50\n",
    "csv-tokens.csv": CSV_HEAD + "rebellions-atom,llama-2-7b,offline,int8,-3,1,throughput,9,"
                                 "tokens/s,x\n",
    "million.yaml": _cluster("  - {name: n, count: 1000, devices: {rebellions-atom: 1000}}\n"),
    "billion.yaml": _cluster("  - {name: n, devices: {rebellions-atom: 1000000000}}\n"),
    "str-count.yaml": _cluster("  - {name: n, devices: {rebellions-atom: '8'}}\n"),
    "inf-bw.yaml": _cluster("  - {name: n, devices: {rebellions-atom: 8}}\n",
                            "network: {bandwidth_gbps: .inf}\n"),
    "neg-bw.yaml": _cluster("  - {name: n, devices: {rebellions-atom: 8}}\n",
                            "network: {bandwidth_gbps: -1}\n"),
    "empty-part.yaml": _cluster("  - {name: n, devices: {'rebellions-atom:': 8}}\n"),
    "unknown-dev.yaml": _cluster("  - {name: n, devices: {quantum-npu: 8}}\n"),
    "yaml-list.yaml": "- 1\n- 2\n",
    "yaml-syntax.yaml": "name: [unclosed\n",
    "empty-node.yaml": _cluster("  - {name: '', devices: {rebellions-atom: 8}}\n"),
    "empty.onnx": b"",
    "garbage.onnx": b"\x00\x01not an onnx file",
    "loop.py": "def factory():\n    while True:\n        pass\n",
    "exit.py": "import os\ndef factory():\n    os._exit(0)\n",
    "importloop.py": "while True:\n    pass\n",
    "raises.py": "def factory():\n    raise ValueError('no weights here')\n",
    "syntax.py": "def factory(:\n",
    "wrong.py": "def factory():\n    return 42\n",
    "nofactory.py": "x = 1\n",
}

# (id, argv with {d} for the inputs folder, extra environment, must be in the line, must not).
CASES: list[tuple[str, list[str], dict[str, str], str, str]] = [
    # top level and usage
    ("unknown-command", ["nosuch"], {}, "No such command 'nosuch'; see `kcloud --help`",
     ""),
    ("unknown-option", ["graph", "resnet50", "--bogus"], {}, "--bogus", ""),
    ("not-an-int", ["graph", "resnet50", "--batch", "x"], {}, "--batch", ""),
    ("missing-option", ["plan", "-m", "resnet50"], {}, "--cluster", ""),
    # input files that are not UTF-8, of every kind
    ("catalog-latin1", ["devices"], {"KCLOUD_CATALOG_PATH": "{d}/catalog"}, "not UTF-8", ""),
    ("cluster-latin1", ["clusters", "show", "{d}/latin1.yaml"], {}, "not UTF-8", ""),
    ("csv-latin1", ["calibrate", "--csv", "{d}/latin1.csv"], {}, "not UTF-8", ""),
    ("plan-latin1", ["run", "{d}/latin1.json"], {}, "not UTF-8", ""),
    # plan files: data, every field checked
    ("plan-list", ["run", "{d}/list.json"], {}, "JSON list", ""),
    ("plan-null", ["run", "{d}/null.json"], {}, "not a K-Cloud plan", ""),
    ("plan-empty", ["run", "{d}/empty.json"], {}, "not valid JSON", ""),
    ("plan-deep", ["run", "{d}/deep.json"], {}, "JSON", ""),
    ("plan-syntax", ["run", "{d}/notjson.json"], {}, "not valid JSON", ""),
    ("plan-missing", ["run", "{d}/nope.json"], {}, "no plan file", ""),
    ("plan-dir", ["run", "{d}"], {}, "no plan file", ""),
    ("plan-frac-micro", ["run", "{d}/frac-micro.json"], {}, "micro_batch", ""),
    ("plan-huge-micro", ["run", "{d}/huge-micro.json"], {}, "micro_batch", ""),
    ("plan-str-micro", ["run", "{d}/str-micro.json"], {}, "micro_batch", ""),
    ("plan-neg-tokens", ["run", "{d}/neg-tokens.json"], {}, "output_tokens", ""),
    ("plan-phase", ["run", "{d}/phase.json"], {}, "phase", ""),
    ("plan-no-layers", ["run", "{d}/no-layers.json"], {}, "n_layers", ""),
    ("plan-no-devices", ["run", "{d}/no-devices.json"], {}, "devices", ""),
    ("plan-empty-model", ["run", "{d}/empty-model.json"], {}, "model", ""),
    ("plan-no-replicas", ["run", "{d}/no-replicas.json"], {}, "replicas", ""),
    ("plan-nan", ["run", "{d}/nan-latency.json"], {}, "latency_s", ""),
    ("plan-gap", ["run", "{d}/gap.json"], {}, "layers", ""),
    ("plan-runs-no-code", ["run", "{d}/code-plan.json"], {}, "--trust-model-code", ""),
    ("plan-model-mismatch", ["run", "{d}/good.json", "--model", "mlp"], {},
     "not the plan's model", ""),
    # run's own options, checked before any worker starts
    ("run-batches-huge", ["run", "--model", "mlp", "--cluster", "k-cloud-rack",
                          "--batches", "100000000"], {}, "--batches", ""),
    ("run-batches-zero", ["run", "--model", "mlp", "--cluster", "k-cloud-rack",
                          "--batches", "0"], {}, "--batches", ""),
    ("run-mode", ["run", "--model", "mlp", "--cluster", "k-cloud-rack", "--mode", "fast"], {},
     "unknown mode", ""),
    ("run-trace-dir", ["run", "--model", "mlp", "--cluster", "k-cloud-rack", "--trace",
                       "{d}"], {}, "--trace", ""),
    ("run-trace-unwritable", ["run", "--model", "mlp", "--cluster", "k-cloud-rack",
                              "--trace", "{d}/no/such/dir/t.json"], {}, "--trace", ""),
    ("run-ray-nobody", ["run", "--model", "mlp", "--cluster", "k-cloud-rack", "--ray",
                        "127.0.0.1:9"], {}, "nothing answers", ""),
    ("run-ray-garbage", ["run", "--model", "mlp", "--cluster", "k-cloud-rack", "--ray",
                         "nowhere"], {}, "host:port", ""),
    ("run-timeout-zero", ["run", "--model", "mlp", "--cluster", "k-cloud-rack",
                          "--timeout", "0"], {}, "--timeout", ""),
    ("run-worker-timeout", ["run", "--model", "mlp", "--cluster", "k-cloud-rack",
                            "--worker-timeout", "-1"], {}, "--worker-timeout", ""),
    ("run-half", ["run", "--model", "mlp"], {}, "--cluster", ""),
    ("run-nothing", ["run"], {}, "nothing to run", ""),
    ("run-weights", ["run", "--model", "mlp", "--cluster", "k-cloud-rack", "--weights",
                     "{d}/nope.pt"], {}, "checkpoint", ""),
    ("run-onnx", ["run", "--model", "{d}/garbage.onnx", "--cluster", "k-cloud-rack"], {},
     "ONNX", ""),
    # calibration rows
    ("csv-zero", ["calibrate", "--csv", "{d}/csv-zero.csv"], {}, "finite positive", ""),
    ("csv-nan-fit", ["calibrate", "--fit", "--csv", "{d}/csv-nan.csv"], {}, "finite", ""),
    ("csv-neg", ["calibrate", "--csv", "{d}/csv-neg.csv"], {}, "finite positive", ""),
    ("csv-inf", ["calibrate", "--csv", "{d}/csv-inf.csv"], {}, "finite positive", ""),
    ("csv-header-only", ["calibrate", "--csv", "{d}/csv-header.csv"], {}, "no rows", ""),
    ("csv-wrong-unit", ["calibrate", "--csv", "{d}/csv-unit.csv"], {}, "samples/s", ""),
    ("csv-unknown-unit", ["calibrate", "--csv", "{d}/csv-furlong.csv"], {}, "unknown unit",
     ""),
    ("csv-columns", ["calibrate", "--csv", "{d}/csv-cols.csv"], {}, "missing columns", ""),
    ("csv-ragged", ["calibrate", "--csv", "{d}/csv-ragged.csv"], {}, "columns expected", ""),
    ("csv-neg-tokens", ["calibrate", "--csv", "{d}/csv-tokens.csv"], {}, "input_tokens", ""),
    ("csv-missing", ["calibrate", "--csv", "{d}/nope.csv"], {}, "no calibration file", ""),
    # clusters: bounded before the search, strict types
    ("cluster-million", ["plan", "-m", "mlp", "-c", "{d}/million.yaml"], {}, "1,000,000", ""),
    ("cluster-billion", ["plan", "-m", "mlp", "-c", "{d}/billion.yaml"], {}, "devices", ""),
    ("cluster-str-count", ["clusters", "show", "{d}/str-count.yaml"], {}, "integer", ""),
    ("cluster-inf-bw", ["clusters", "show", "{d}/inf-bw.yaml"], {}, "bandwidth_gbps", ""),
    ("cluster-neg-bw", ["clusters", "show", "{d}/neg-bw.yaml"], {}, "bandwidth_gbps", ""),
    ("cluster-empty-part", ["clusters", "show", "{d}/empty-part.yaml"], {},
     "empty partition name", ""),
    ("cluster-unknown-dev", ["clusters", "show", "{d}/unknown-dev.yaml"], {},
     "unknown device", "did you mean"),
    ("cluster-list", ["clusters", "show", "{d}/yaml-list.yaml"], {}, "must hold a mapping",
     "_ClusterSpec"),
    ("cluster-syntax", ["clusters", "show", "{d}/yaml-syntax.yaml"], {}, "not valid YAML", ""),
    ("cluster-empty-node", ["clusters", "show", "{d}/empty-node.yaml"], {}, "nodes.0.name", ""),
    ("cluster-unknown", ["clusters", "show", "nosuch"], {}, "unknown cluster", ""),
    ("cluster-missing-file", ["clusters", "show", "{d}/nope.yaml"], {}, "no cluster file", ""),
    # devices
    ("device-unknown", ["devices", "show", "nosuch"], {}, "unknown device", "did you mean"),
    ("device-unrelated", ["predict", "-m", "resnet50", "-d", "gpu"], {}, "unknown device",
     "host-cpu"),
    ("device-empty-part", ["devices", "show", "furiosa-rngd:"], {}, "empty partition name", ""),
    ("device-bad-part", ["devices", "show", "furiosa-rngd:nosuch"], {}, "no partition", ""),
    # graph: model specs and shapes
    ("graph-batch-huge", ["graph", "resnet50", "--batch", str(10**12)], {}, "--batch", ""),
    ("graph-batch-zero", ["graph", "resnet50", "--batch", "0"], {}, "--batch", ""),
    ("graph-seq-huge", ["graph", "tiny-gpt", "--seq-len", str(10**9)], {}, "--seq-len", ""),
    ("graph-kv-neg", ["graph", "tiny-gpt", "--kv-len", "-1"], {}, "--kv-len", ""),
    ("graph-phase", ["graph", "tiny-gpt", "--phase", "sideways"], {}, "unknown phase", ""),
    ("graph-unknown", ["graph", "nosuch-model"], {}, "nosuch-model", ""),
    ("graph-empty-onnx", ["graph", "{d}/empty.onnx"], {}, "no ONNX graph", ""),
    ("graph-garbage-onnx", ["graph", "{d}/garbage.onnx"], {}, "ONNX", ""),
    ("graph-missing-file", ["graph", "{d}/nope.py:factory"], {}, "no such file", ""),
    ("graph-no-factory", ["graph", "{d}/nofactory.py:factory"], {}, "no function", ""),
    ("graph-loop", ["graph", "{d}/loop.py:factory", "--model-timeout", "2"], {},
     "did not finish within 2 s", ""),
    ("graph-import-loop", ["graph", "{d}/importloop.py:factory", "--model-timeout", "2"], {},
     "did not finish within 2 s", ""),
    ("graph-exit0", ["graph", "{d}/exit.py:factory"], {}, "exit code 0", ""),
    ("graph-raises", ["graph", "{d}/raises.py:factory"], {}, "no weights here", ""),
    ("graph-syntax", ["graph", "{d}/syntax.py:factory"], {}, "SyntaxError", ""),
    ("graph-wrong-return", ["graph", "{d}/wrong.py:factory"], {}, "returned int", ""),
    ("graph-model-timeout", ["graph", "{d}/loop.py:factory", "--model-timeout", "0"], {},
     "--model-timeout", ""),
    # plan: the goal's bounds, outputs checked first, loops in the model file
    ("plan-batch-zero", ["plan", "-m", "mlp", "-c", "k-cloud-rack", "--batch", "0"], {},
     "--batch", ""),
    ("plan-batch-huge", ["plan", "-m", "mlp", "-c", "k-cloud-rack", "--batch", str(10**9)],
     {}, "--batch", ""),
    ("plan-slo-neg", ["plan", "-m", "mlp", "-c", "k-cloud-rack", "--slo-ms", "-1"], {},
     "SLO", ""),
    ("plan-slo-nan", ["plan", "-m", "mlp", "-c", "k-cloud-rack", "--slo-ms", "nan"], {},
     "SLO", ""),
    ("plan-share", ["plan", "-m", "mlp", "-c", "k-cloud-rack", "--min-domestic-share", "2"],
     {}, "domestic", ""),
    ("plan-objective", ["plan", "-m", "mlp", "-c", "k-cloud-rack", "--objective", "speed"],
     {}, "unknown objective", ""),
    ("plan-precision", ["plan", "-m", "mlp", "-c", "k-cloud-rack", "--precision", "fp7"], {},
     "fp7", ""),
    ("plan-max-devices", ["plan", "-m", "mlp", "-c", "k-cloud-rack", "--max-devices", "0"],
     {}, "max devices", ""),
    ("plan-out-tokens", ["plan", "-m", "tiny-gpt", "-c", "k-cloud-rack", "--output-tokens",
                         "-5"], {}, "--output-tokens", ""),
    ("plan-prompt-too-long", ["plan", "-m", "llama-2-7b", "-c", "k-cloud-rack",
                              "--input-tokens", "99999"], {}, "--input-tokens", "--seq-len"),
    ("plan-output-unwritable", ["plan", "-m", "mlp", "-c", "k-cloud-rack", "-o",
                                "{d}/no/such/plan.json"], {}, "-o", ""),
    ("plan-loop", ["plan", "-m", "{d}/loop.py:factory", "-c", "k-cloud-rack",
                   "--model-timeout", "2"], {}, "did not finish", ""),
    ("plan-exit0", ["plan", "-m", "{d}/exit.py:factory", "-c", "k-cloud-rack"], {},
     "exit code 0", ""),
    ("plan-unknown-cluster", ["plan", "-m", "mlp", "-c", "nosuch"], {}, "unknown cluster", ""),
    # predict
    ("predict-tp-zero", ["predict", "-m", "resnet50", "-d", "rebellions-atom", "--tp", "0"],
     {}, "--tp", ""),
    ("predict-scenario", ["predict", "-m", "resnet50", "-d", "rebellions-atom", "--scenario",
                          "burst"], {}, "unknown scenario", ""),
    ("predict-batch-huge", ["predict", "-m", "resnet50", "-d", "rebellions-atom", "--batch",
                            str(10**12)], {}, "--batch", ""),
    ("predict-prompt-too-long", ["predict", "-m", "llama-2-7b", "-d", "rebellions-atom",
                                 "--input-tokens", "99999"], {}, "4096", ""),
    ("predict-loop", ["predict", "-m", "{d}/loop.py:factory", "-d", "rebellions-atom",
                      "--model-timeout", "2"], {}, "did not finish", ""),
    # serve: the same plan files, the same rule for the code they name
    ("serve-runs-no-code", ["serve", "--plan", "{d}/code-plan.json"], {},
     "--trust-model-code", ""),
    ("serve-plan-list", ["serve", "--plan", "{d}/list.json"], {}, "JSON list", ""),
    ("serve-ray-nobody", ["serve", "--model", "mlp", "--ray", "127.0.0.1:9"], {},
     "nothing answers", ""),
    ("serve-port", ["serve", "--model", "mlp", "--port", "0"], {}, "--port", ""),
    ("serve-queue", ["serve", "--model", "mlp", "--max-queue", "0"], {}, "--max-queue", ""),
    # demo
    ("demo-batch", ["demo", "--batch", "0"], {}, "--batch", ""),
    ("demo-model", ["demo", "--model", "llama-2-70b"], {}, "runs on a CPU", ""),
    ("demo-out", ["demo", "--out", "{d}/good.json"], {}, "--out", ""),
]


@pytest.fixture(scope="session")
def inputs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("fuzz-inputs")
    for name, content in FILES.items():
        p = d / name
        p.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            p.write_bytes(content)
        else:
            p.write_text(content.replace("{d}", str(d)))
    return d


def _argv(case: list[str], d: Path) -> list[str]:
    return [a.replace("{d}", str(d)) for a in case]


def _check(name: str, code: int, err: str, seconds: float, must: str, must_not: str,
           d: Path) -> None:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert "Traceback" not in err, f"{name}: a traceback:\n{err}"
    assert code == 2, f"{name}: exit {code}, stderr: {err}"
    assert len(lines) == 1, f"{name}: {len(lines)} lines on stderr:\n{err}"
    assert lines[0].startswith("kcloud: error: "), lines[0]
    assert must in lines[0], f"{name}: '{must}' not in: {lines[0]}"
    assert not must_not or must_not not in lines[0], f"{name}: '{must_not}' in: {lines[0]}"
    assert seconds < BOUND_S, f"{name}: took {seconds:.1f} s"
    assert not (d / "RAN").exists(), f"{name}: a plan file ran the code it names"


def _others() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)
            if "resource_tracker" not in " ".join(p.cmdline())}


@pytest.mark.parametrize("name, argv, extra, must, must_not", CASES, ids=[c[0] for c in CASES])
def test_bad_input_in_process(name: str, argv: list[str], extra: dict[str, str], must: str,
                              must_not: str, inputs_dir: Path, tmp_path: Path,
                              monkeypatch: pytest.MonkeyPatch,
                              capsys: pytest.CaptureFixture[str]) -> None:
    from kcloud.cli import main

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))
    monkeypatch.setattr(tempfile, "tempdir", None)
    for k, v in extra.items():
        monkeypatch.setenv(k, v.replace("{d}", str(inputs_dir)))
    before = _others()
    monkeypatch.chdir(tmp_path)
    t0 = time.monotonic()
    with pytest.raises(SystemExit) as exc:
        main(_argv(argv, inputs_dir))
    seconds = time.monotonic() - t0
    err = capsys.readouterr().err
    _check(name, int(exc.value.code or 0), err, seconds, must, must_not, inputs_dir)
    assert clitools.wait_gone(list(_others() - before), 5.0) is not None, "processes left"
    assert clitools.run_dirs(tmp) == [], f"{name}: temporary files left"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


@pytest.mark.slow
@pytest.mark.parametrize("name, argv, extra, must, must_not", CASES, ids=[c[0] for c in CASES])
def test_bad_input_as_a_process(name: str, argv: list[str], extra: dict[str, str], must: str,
                                must_not: str, inputs_dir: Path, tmp_path: Path) -> None:
    import subprocess

    tmp = tmp_path / "tmp"
    env = {**clitools.env(tmp), **{k: v.replace("{d}", str(inputs_dir))
                                   for k, v in extra.items()}}
    t0 = time.monotonic()
    p = subprocess.Popen([*clitools.KCLOUD, *_argv(argv, inputs_dir)], cwd=tmp_path, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        _, err = p.communicate(timeout=BOUND_S)
    finally:
        p.kill()
    _check(name, p.returncode, err, time.monotonic() - t0, must, must_not, inputs_dir)
    # Nothing of its session is left (workers, user-code children, resource trackers).
    def session() -> list[int]:
        out = []
        for q in psutil.process_iter():
            try:
                if os.getsid(q.pid) == p.pid:
                    out.append(q.pid)
            except (ProcessLookupError, PermissionError):
                pass
        return out

    assert clitools.wait_gone(session(), 5.0) is not None, f"{name}: processes left"
    assert clitools.run_dirs(tmp) == [], f"{name}: temporary files left"


# ---- random values in plan and cluster files (hypothesis) -----------------------------------

_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8),
                    st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=3),
                                                                         st.integers(),
                                                                         max_size=2))
_PLAN_KEYS = ["batch", "micro_batch", "seq_len", "phase", "n_layers", "model", "cluster",
              "objective", "output_tokens", "version", "replicas__0__stages__0__start",
              "replicas__0__stages__0__end", "replicas__0__stages__0__devices",
              "replicas__0__stages__0__time_s", "predicted__latency_s", "predicted__unit",
              "notes", "goal"]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(key=st.sampled_from(_PLAN_KEYS), value=_VALUES)
def test_any_value_in_a_plan_file_loads_or_is_one_line(key: str, value: Any) -> None:
    from kcloud.planner.plan import Plan

    text = _plan(**{key: value})
    try:
        plan = Plan.from_json(text)
    except KCloudError as exc:
        assert "\n" not in exc.message
        return
    # What loads is within the bounds the runtime relies on.
    assert isinstance(plan.micro_batch, int) and 1 <= plan.micro_batch <= 65_536
    assert plan.phase in ("forward", "prefill", "decode")
    assert plan.output_tokens is None or plan.output_tokens >= 1
    assert math.isfinite(plan.predicted.latency_s)


_CLUSTER_KEYS = ["count", "devices", "name", "bandwidth_gbps", "latency_us"]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(key=st.sampled_from(_CLUSTER_KEYS), value=_VALUES)
def test_any_value_in_a_cluster_file_loads_or_is_one_line(key: str, value: Any) -> None:
    from kcloud.hardware.cluster import cluster_from_dict

    node: dict[str, Any] = {"name": "n", "devices": {"rebellions-atom": 2}}
    net: dict[str, Any] = {"bandwidth_gbps": 10}
    (net if key in ("bandwidth_gbps", "latency_us") else node)[key] = value
    try:
        c = cluster_from_dict({"name": "fuzz", "network": net, "nodes": [node]}, "fuzz")
    except KCloudError as exc:
        assert "\n" not in exc.message
        return
    assert 1 <= c.size <= 16_384
    assert math.isfinite(c.network.bandwidth) and c.network.bandwidth > 0
