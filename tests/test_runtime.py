"""The runtime: stage split, worker processes over gloo, emulated stages, faults, CLI."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from kcloud.errors import KCloudError
from kcloud.graph import zoo
from kcloud.planner.plan import Plan, Predicted, Replica, Stage
from kcloud.runtime import backends, execute
from kcloud.runtime.split import flat_tensors, n_layers, split_model

HOST = "host-cpu:1core"


def _plan(model: str, n: int, cuts: list[int], replicas: int = 1,
          types: list[str] | None = None, micro_batch: int = 2) -> Plan:
    reps = []
    k = 0
    for _ in range(replicas):
        pts = [0, *cuts, n]
        stages = []
        for i, (a, b) in enumerate(itertools.pairwise(pts)):
            dt = (types or [HOST] * len(pts))[i]
            stages.append(Stage(a, b, dt, (f"local/{dt}/{k}",),
                                "fp32" if dt == HOST else "bf16", time_s=1e-3))
            k += 1
        reps.append(Replica(tuple(stages)))
    return Plan(model=model, cluster="local-cpu", objective="throughput",
                batch=micro_batch * 3, micro_batch=micro_batch, seq_len=None, phase="forward",
                n_layers=n, replicas=tuple(reps),
                predicted=Predicted(2e-3, 1000.0, "samples/s", 10.0, 0.01, 0.0, None, 0.1))


def _layers(model: str) -> int:
    m, x = zoo.build(model, device="cpu", batch=2)
    return n_layers(m, x)


@pytest.mark.parametrize("name", ["mlp", "tiny-gpt", "tiny-resnet", "tiny-unet"])
def test_split_stages_equal_whole_model(name: str) -> None:
    m, x = zoo.build(name, device="cpu", batch=2)
    n = n_layers(m, x)
    with torch.no_grad():
        ref = m(*x)
        for bounds in ([(0, n // 2), (n // 2, n)], [(i, i + 1) for i in range(n)]):
            out = split_model(m, x, bounds).run(*x)
            for a, b in zip(flat_tensors(ref), flat_tensors(out), strict=True):
                assert (a - b).abs().max().item() < 1e-4


def test_split_rejects_wrong_layer_count() -> None:
    m, x = zoo.build("mlp", device="cpu", batch=2)
    with pytest.raises(KCloudError, match="layers"):
        split_model(m, x, [(0, 2), (2, 99)])


@pytest.mark.parametrize("name", ["tiny-gpt", "tiny-resnet"])
def test_two_stage_pipeline_matches_reference(name: str, tmp_path: Path) -> None:
    n = _layers(name)
    trace = tmp_path / "trace.json"
    r = execute(_plan(name, n, [n // 2]), n_micro=3, trace_path=trace)
    assert r.reference_ok and r.max_abs_error < 1e-4
    assert len(r.stages) == 2 and all(s.backend == "cpu" for s in r.stages)
    assert all(s.measured_compute_s > 0 and s.figures == "measured" for s in r.stages)
    assert r.measured["throughput"] > 0 and r.measured["figures"] == "measured"
    events = json.loads(trace.read_text())["traceEvents"]
    spans = [e for e in events if e["ph"] == "X"]
    assert {"name", "ph", "ts", "dur", "pid", "tid"} <= set(spans[0])
    assert {e["name"] for e in spans if e["pid"] == 1} >= {"R0", "F0", "F2"}


def test_replicated_plan(tmp_path: Path) -> None:
    n = _layers("mlp")
    r = execute(_plan("mlp", n, [], replicas=2), n_micro=2, trace_path=tmp_path / "t.json")
    assert r.reference_ok and len(r.outputs) == 4
    assert not torch.equal(r.outputs[0], r.outputs[2])  # the replicas got different slices


def test_emulated_stage_reports_modeled_time(tmp_path: Path) -> None:
    n = _layers("mlp")
    plan = _plan("mlp", n, [3], types=[HOST, "furiosa-rngd"])
    with pytest.raises(KCloudError, match=r"furiosa-rngd.*--mode emulated"):
        execute(plan, mode="real", n_micro=1, trace_path=None)
    r = execute(plan, mode="emulated", n_micro=2, trace_path=tmp_path / "t.json")
    assert r.reference_ok
    emu = r.stages[1]
    assert emu.backend == "emulated" and emu.figures == "modeled"
    assert emu.modeled_time_s is not None and emu.modeled_time_s > 0
    assert emu.time_s == emu.modeled_time_s
    assert r.emulated is not None and r.emulated["latency_s"] > 0


def test_backend_choice() -> None:
    assert backends.choose(HOST, "real") is backends.CPU
    assert backends.choose("furiosa-rngd", "emulated").name == "emulated"
    with pytest.raises(KCloudError, match="not present"):
        backends.choose("furiosa-rngd", "real")


_CRASH = '''
import os

import torch
import torch.distributed as dist
from torch import nn


@torch.fx.wrap
def fail_in_worker(x, how):
    if dist.is_initialized():  # only in a runtime worker
        if how == "raise":
            raise RuntimeError("device fault")
        os._exit(3)
    return x


class Block(nn.Module):
    def __init__(self, how=""):
        super().__init__()
        self.lin = nn.Linear(16, 16)
        self.how = how

    def forward(self, x):
        y = self.lin(x)
        return fail_in_worker(y, self.how) if self.how else y


class Net(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.blocks = nn.ModuleList([Block(), Block(), Block(how), Block()])

    def forward(self, x):
        for b in self.blocks:
            x = torch.relu(b(x))
        return x


def raises():
    return Net("raise"), (torch.randn(2, 16),)


def dies():
    return Net("die"), (torch.randn(2, 16),)
'''


def _workers_left() -> list[str]:
    out = subprocess.run(["ps", "--ppid", str(os.getpid()), "-o", "args="],
                         capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if "spawn_main" in line]


@pytest.mark.parametrize(("factory", "says"), [("raises", "RuntimeError: device fault"),
                                               ("dies", "died with exit code 3")])
def test_worker_fault_stops_run(factory: str, says: str, tmp_path: Path) -> None:
    f = tmp_path / "crash.py"
    f.write_text(_CRASH)
    plan = _plan(f"{f}:{factory}", 2, [1])
    t0 = time.monotonic()
    with pytest.raises(KCloudError) as info:
        execute(plan, n_micro=4, trace_path=None)
    assert time.monotonic() - t0 < 30  # the workers start (torch imports) within it
    msg = info.value.message
    assert "\n" not in msg and "stage 1 of replica 0 on local/host-cpu:1core/1 (" in msg
    assert says in msg
    assert _workers_left() == []


def test_cli_run_json(tmp_path: Path) -> None:
    n = _layers("mlp")
    plan_file = tmp_path / "plan.json"
    _plan("mlp", n, [3]).save(plan_file)
    trace = tmp_path / "trace.json"
    proc = subprocess.run(
        [sys.executable, "-c", "from kcloud.cli import main; main()", "run", str(plan_file),
         "--json", "--batches", "2", "--trace", str(trace)],
        capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1
    d = json.loads(lines[0])
    for key in ("max_abs_error", "reference_ok", "measured", "predicted", "trace_file",
                "stages"):
        assert key in d
    assert set(d["measured"]) >= {"latency_s", "throughput"}
    assert set(d["predicted"]) >= {"latency_s", "throughput"}
    assert d["reference_ok"] is True and len(d["stages"]) == 2
    assert trace.is_file()


def test_cli_run_real_mode_names_absent_devices(tmp_path: Path) -> None:
    plan_file = tmp_path / "plan.json"
    _plan("mlp", _layers("mlp"), [3], types=[HOST, "furiosa-rngd"]).save(plan_file)
    proc = subprocess.run(
        [sys.executable, "-c", "from kcloud.cli import main; main()", "run", str(plan_file),
         "--mode", "real"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2
    err = proc.stderr.strip()
    assert err.count("\n") == 0 and "furiosa-rngd" in err and "--mode emulated" in err


def test_run_loads_a_local_checkpoint(tmp_path: Path) -> None:
    from kcloud.runtime.model import load_runnable

    module, _ = load_runnable("mlp", batch=2)
    torch.manual_seed(7)
    state = {k: torch.randn_like(v) for k, v in module.state_dict().items()}
    ckpt = tmp_path / "mlp.pt"
    torch.save({"state_dict": state}, ckpt)
    plan = _plan("mlp", _layers("mlp"), [3])
    report = execute(plan, mode="real", n_micro=2, trace_path=None, weights=ckpt, probes=1)
    assert report.reference_ok
    # the outputs are those of the checkpoint's weights, not of the seeded random ones
    module.load_state_dict(state)
    from kcloud.runtime.model import micro_batches

    _, example = load_runnable("mlp", batch=2)
    with torch.inference_mode():
        want = module(*micro_batches(example, 1)[0])
    assert torch.allclose(report.outputs[0], want, atol=1e-5)
    assert report.measured["latency_probes"] == 1


@pytest.mark.parametrize(("content", "says"), [
    ("not a checkpoint", "cannot read checkpoint"),
    ({"fc.weight": "x"}, "holds no state dict"),
    ({"input_proj.weight": torch.zeros(3, 3)}, "does not fit the model"),
])
def test_bad_checkpoint_is_one_line(content: object, says: str, tmp_path: Path) -> None:
    from kcloud.runtime.model import load_checkpoint, load_runnable

    ckpt = tmp_path / "bad.pt"
    if isinstance(content, str):
        ckpt.write_text(content)
    else:
        torch.save(content, ckpt)
    module, _ = load_runnable("mlp", batch=1)
    with pytest.raises(KCloudError) as err:
        load_checkpoint(module, ckpt)
    msg = str(err.value)
    assert says in msg and "\n" not in msg


def test_run_reports_modeled_energy(tmp_path: Path) -> None:
    plan = _plan("mlp", _layers("mlp"), [3], types=[HOST, "furiosa-rngd"])
    r = execute(plan, mode="emulated", n_micro=2, trace_path=None, probes=1)
    e = r.energy
    assert e is not None and e["unit"] == "J/sample" and "modeled" in e["figures"]
    # every device draws at least its idle power over the period of the slowest stage
    period = max(max(s.time_s, s.measured_send_s) for s in r.stages)
    assert e["energy_per_item_j"] * plan.micro_batch > 2 * 0.5 * period
    assert e["estimated"] is True  # the host's power is an estimate
    assert e["predicted_energy_per_item_j"] == plan.predicted.energy_per_item_j


def test_frames_carry_channels_last_tensors_as_they_are():
    """A hop's frame keeps each item's values, and a channels-last activation arrives
    channels-last (no transpose on either end)."""
    from kcloud.runtime.comm import _encode, _pack, _spans, _unpack

    x = torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last)
    y = torch.arange(6, dtype=torch.int64).reshape(2, 3)
    header, items = _encode((x, y, {"step": 3}))
    spans, size = _spans(header)
    got = _unpack(_pack(items, spans, size), spans)
    assert torch.equal(got[0], x) and torch.equal(got[1], y) and got[2] == {"step": 3}
    assert got[0].is_contiguous(memory_format=torch.channels_last)


def test_a_group_shares_each_received_tuple_in_one_broadcast(monkeypatch):
    """A tensor-parallel group's lead broadcasts what it receives to the other ranks: one
    broadcast per tuple while its layout holds, the header again only when it changes (the
    first tuple, a smaller last micro-batch)."""
    from kcloud.runtime import comm

    wire: list[torch.Tensor] = []

    def broadcast(t: torch.Tensor, src: int, group: str) -> None:
        if group == "lead":
            wire.append(t.clone())
        else:  # the other rank posts a buffer of the size the protocol expects
            sent = wire.pop(0)
            assert (sent.dtype, sent.shape) == (t.dtype, t.shape)
            t.copy_(sent)

    monkeypatch.setattr(comm.dist, "broadcast", broadcast)
    lead, other = comm.TupleBroadcast(0, "lead"), comm.TupleBroadcast(0, "other")
    calls = []
    for rows in (4, 4, 4, 1, 1):
        sent = (torch.randn(rows, 8), {"step": rows})
        assert lead.share(sent) == sent
        calls.append(len(wire))
        got = other.share(None)
        assert torch.equal(got[0], sent[0]) and got[1] == sent[1] and not wire
    assert calls == [3, 1, 1, 3, 1]


def test_emulated_replicas_of_one_configuration_compute_once() -> None:
    import dataclasses

    from kcloud.planner.api import make_plan
    from kcloud.planner.goal import Goal
    from kcloud.planner.plan import Replica, Stage

    base = make_plan("mlp", "k-cloud-rack", Goal(objective="latency")).plan
    n = base.n_layers
    reps = tuple(Replica((Stage(0, n, dt, (f"n{i}/{dt}/0",), "int8"),))
                 for i, dt in enumerate(["furiosa-rngd", "furiosa-rngd", "rebellions-atom",
                                         "furiosa-warboy"]))
    plan = dataclasses.replace(base, replicas=reps)
    r = execute(plan, n_micro=2, trace_path=None)
    assert r.reference_ok and r.replicas == 4
    assert any(note.startswith("1 of 4 replicas computed") for note in r.notes)
    times = {s.device_type: s.modeled_time_s for s in r.stages}
    assert len(times) == 3 and times["furiosa-rngd"] != times["rebellions-atom"]
    assert len(r.outputs) == 8
