"""Faults injected into `kcloud run` as a user meets them: SIGTERM, SIGKILL and Ctrl-C of the
driver, SIGTERM, SIGKILL and SIGSTOP of a worker. Each asserts the exit code, the one-line
message and that nothing is left: no process of the run, no temporary file. Timings are
printed (`-s`) for the issue's note."""

from __future__ import annotations

import json
import signal
import subprocess
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from tests import clitools

pytestmark = pytest.mark.slow

# A model whose layers take 50 ms each in a worker (an activation: a traced leaf, so it runs
# in the stage), and mark the worker's PID per layer once it streams.
MODEL = textwrap.dedent("""
    import os, time
    import torch
    from torch import nn
    import torch.distributed as dist

    class Slow(nn.ReLU):
        def __init__(self, i):
            super().__init__()
            self.i = i

        def forward(self, x):
            if dist.is_initialized():
                mark = os.path.join(os.environ["KCLOUD_TEST_MARKS"], f"{self.i}-{os.getpid()}")
                if not os.path.exists(mark):
                    open(mark, "w").close()
                time.sleep(0.05)
            return super().forward(x)

    def factory():
        layers = []
        for i in range(4):
            layers += [nn.Linear(16, 16), Slow(i)]
        return nn.Sequential(*layers), (torch.randn(2, 16),)
""")


def _stage(start: int, end: int, i: int) -> dict:
    return {"start": start, "end": end, "device_type": "rebellions-atom",
            "devices": [f"atom-0/rebellions-atom/{i}"], "precision": "int8", "time_s": 1e-3,
            "comm_s": 0.0, "memory_bytes": 1e6, "power_w": 50.0}


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, int]:
    from kcloud.graph.loaders import load_model_spec

    d = tmp_path_factory.mktemp("faultmodel")
    (d / "slow.py").write_text(MODEL)
    spec = f"{d / 'slow.py'}:factory"
    return spec, len(load_model_spec(spec).layers)


def _plan(path: Path, spec: str, n_layers: int, stages: int) -> Path:
    cut = n_layers // 2
    reps = [_stage(0, n_layers, 0)] if stages == 1 else [_stage(0, cut, 0),
                                                          _stage(cut, n_layers, 1)]
    doc = {"schema": "kcloud.plan", "version": 1, "model": spec, "cluster": "k-cloud-rack",
           "objective": "throughput", "batch": 2, "micro_batch": 2, "seq_len": None,
           "phase": "forward", "n_layers": n_layers, "replicas": [{"stages": reps}],
           "predicted": {"latency_s": 1e-3, "throughput": 1.0, "unit": "samples/s",
                         "power_w": 1.0, "energy_per_item_j": 1.0,
                         "device_hours_per_item": 0.0, "cost_per_item_usd": None,
                         "comm_share": 0.0}}
    path.write_text(json.dumps(doc))
    return path


class Run:
    """`kcloud run` started in its own session (so that Ctrl-C reaches its process group,
    as a terminal's does), watched until its workers stream."""

    def __init__(self, tmp: Path, spec: str, plan: Path, *extra: str) -> None:
        self.tmp = tmp / "tmp"
        self.marks = tmp / "marks"
        self.marks.mkdir()
        env = {**clitools.env(self.tmp), "KCLOUD_TEST_MARKS": str(self.marks)}
        self.proc = subprocess.Popen(
            [*clitools.KCLOUD, "run", str(plan), "--model", spec, "--batches", "2000",
             "--trace", str(tmp / "trace.json"), *extra],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
            start_new_session=True, stdin=subprocess.DEVNULL)

    def streaming(self, n_workers: int, within_s: float = 240.0) -> dict[int, int]:
        """Layer index -> PID of the worker running it, once every worker streams; also
        records every process of the run (workers and multiprocessing's resource tracker)."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < within_s:
            assert self.proc.poll() is None, self.proc.communicate()
            marks = {int(m.name.split("-")[0]): int(m.name.split("-")[1])
                     for m in self.marks.iterdir()}
            if len(set(marks.values())) >= n_workers and 3 in marks:
                self.family = [p.pid for p in psutil.Process(self.proc.pid).children(
                    recursive=True)]
                assert len(self.family) > n_workers  # the workers and the resource tracker
                return marks
            time.sleep(0.1)
        raise AssertionError("the workers did not start streaming")

    def end(self, within_s: float = 60.0) -> tuple[int, list[str], float]:
        t0 = time.monotonic()
        _, err = self.proc.communicate(timeout=within_s)
        return self.proc.returncode, [ln for ln in err.splitlines() if ln.strip()], \
            time.monotonic() - t0

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for pid in clitools.live(getattr(self, "family", [])):
            psutil.Process(pid).kill()


def _left(run: Run, within_s: float = 5.0) -> float:
    took = clitools.wait_gone(run.family, within_s)
    assert took is not None, f"processes left: {clitools.live(run.family)}"
    return took


@pytest.mark.parametrize("sig, code, word", [(signal.SIGTERM, 143, "terminated (SIGTERM)"),
                                             (signal.SIGINT, 130, "interrupted (SIGINT)")])
def test_sigterm_or_ctrl_c_of_the_driver(tmp_path: Path, model: tuple[str, int],
                                         sig: int, code: int, word: str) -> None:
    spec, n = model
    run = Run(tmp_path, spec, _plan(tmp_path / "plan.json", spec, n, 2))
    try:
        run.streaming(2)
        t0 = time.monotonic()
        # Ctrl-C at a terminal signals the whole foreground process group.
        if sig == signal.SIGINT:
            import os

            os.killpg(run.proc.pid, sig)
        else:
            run.proc.send_signal(sig)
        rc, err, _ = run.end()
        took = time.monotonic() - t0
        gone = _left(run)
        print(f"\n{signal.Signals(sig).name} of the driver: exit {rc} after {took:.2f} s, "
              f"every process gone {gone:.2f} s later")
        assert rc == code
        assert len(err) == 1 and err[0].startswith(f"kcloud: {word}"), err
        assert clitools.run_dirs(run.tmp) == []
    finally:
        run.kill()


def test_sigkill_of_the_driver(tmp_path: Path, model: tuple[str, int]) -> None:
    spec, n = model
    run = Run(tmp_path, spec, _plan(tmp_path / "plan.json", spec, n, 2))
    try:
        run.streaming(2)
        run.proc.send_signal(signal.SIGKILL)
        run.proc.wait(10)
        gone = _left(run)
        print(f"\nSIGKILL of the driver: every process gone {gone:.2f} s later")
        assert clitools.run_dirs(run.tmp) == []  # the workers build their own weights
    finally:
        run.kill()


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_a_worker_killed(tmp_path: Path, model: tuple[str, int], sig: int) -> None:
    spec, n = model
    run = Run(tmp_path, spec, _plan(tmp_path / "plan.json", spec, n, 2))
    try:
        marks = run.streaming(2)
        victim = marks[3]  # the last layer: stage 1
        t0 = time.monotonic()
        psutil.Process(victim).send_signal(sig)
        rc, err, _ = run.end()
        took = time.monotonic() - t0
        gone = _left(run)
        print(f"\n{signal.Signals(sig).name} of a worker: exit {rc} after {took:.2f} s")
        assert rc == 2
        assert len(err) == 1, err
        assert err[0].startswith("kcloud: error: stage 1 of replica 0 on "
                                 "atom-0/rebellions-atom/1 (rebellions-atom, emulated) died "
                                 f"with signal {int(sig)}"), err
        assert took < 30 and gone < 5
        assert clitools.run_dirs(run.tmp) == []
    finally:
        run.kill()


@pytest.mark.parametrize("stages", [1, 2])
def test_a_stopped_worker_is_caught_by_its_heartbeat(tmp_path: Path, model: tuple[str, int],
                                                     stages: int) -> None:
    spec, n = model
    run = Run(tmp_path, spec, _plan(tmp_path / "plan.json", spec, n, stages),
              "--worker-timeout", "3")
    try:
        marks = run.streaming(stages)
        victim = marks[3]  # the last stage
        t0 = time.monotonic()
        psutil.Process(victim).send_signal(signal.SIGSTOP)
        rc, err, _ = run.end()
        took = time.monotonic() - t0
        gone = _left(run)
        print(f"\nSIGSTOP of a worker ({stages} stage(s), --worker-timeout 3): exit {rc} "
              f"after {took:.2f} s")
        assert rc == 2
        assert len(err) == 1, err
        stage = stages - 1
        assert err[0].startswith(
            f"kcloud: error: stage {stage} of replica 0 on atom-0/rebellions-atom/{stage} "
            "(rebellions-atom, emulated) stopped responding: no heartbeat for 3."), err
        assert took < 3 + 10 and gone < 5
        assert clitools.run_dirs(run.tmp) == []
    finally:
        run.kill()


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
@pytest.mark.parametrize("command", ["graph", "plan", "predict", "run"])
def test_every_command_interrupted_while_user_code_runs(tmp_path: Path, command: str, sig: int,
                                                        code: int) -> None:
    """Ctrl-C or SIGTERM while a model file's factory loops (in its child process): one line,
    exit 130 or 143, the child gone."""
    loop = tmp_path / "loop.py"
    loop.write_text("def factory():\n    while True:\n        pass\n")
    spec = f"{loop}:factory"
    args = {"graph": ["graph", spec], "plan": ["plan", "-m", spec, "-c", "k-cloud-rack"],
            "predict": ["predict", "-m", spec, "-d", "rebellions-atom"],
            "run": ["run", "--model", spec, "--cluster", "k-cloud-rack"]}[command]
    proc = subprocess.Popen([*clitools.KCLOUD, *args, "--model-timeout", "600"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=clitools.env(tmp_path / "tmp"), start_new_session=True,
                            stdin=subprocess.DEVNULL)
    try:
        t0 = time.monotonic()
        family: list[int] = []
        while not family and time.monotonic() - t0 < 120:  # the user-code child has started
            family = [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]
            time.sleep(0.2)
        assert family, "no child process for the model file"
        time.sleep(2.0)
        if sig == signal.SIGINT:
            import os

            os.killpg(proc.pid, sig)  # as a terminal's Ctrl-C: the whole process group
        else:
            proc.send_signal(sig)
        _, err = proc.communicate(timeout=30)
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert proc.returncode == code, err
        assert len(lines) == 1 and "Traceback" not in err, err
        assert lines[0].startswith("kcloud: interrupted" if code == 130 else "kcloud: terminated")
        assert clitools.wait_gone(family, 5.0) is not None
    finally:
        proc.kill()
