"""The engine's measured step costs on this host (`kcloud.runtime.step_costs`): the fit finds
the constants that made the steps, and a step another process delayed does not move them."""

from __future__ import annotations

import random

import pytest

from kcloud.hardware.host import EngineStepCosts
from kcloud.runtime.step_costs import FEATURES, StepSample, fit

TRUE = EngineStepCosts(step_s=1.5e-3, row_s=80e-6, kv_byte_s=0.3e-9, prefill_byte_s=2e-9,
                       pair_byte_s=0.0, group_s=0.25e-3, spill_byte_s=0.5e-9, cache_bytes=8e6,
                       date="", steps=0, load_avg=0.0)
KVB = 4096.0  # KV bytes a token keeps


def _samples(delayed: float, seed: int = 0, chunk_bias: float = 1.0) -> list[StepSample]:
    """Steps timed as the engine would; with `chunk_bias` the cost model's kernels of a prompt
    chunk are that many times their real time (the chunk runs faster than modeled)."""
    rng = random.Random(seed)
    out = []
    for _ in range(400):
        prompt = rng.random() < 0.25
        rows = rng.randint(1, 12)
        groups = 0 if prompt else rng.randint(1, min(3, rows))
        padded = 0.0 if prompt else rows * rng.randint(50, 3000)
        pre = rng.randint(16, 256) if prompt else 0
        feats = (1.0, rows, padded * KVB, pre * KVB, 0.0, groups,
                 max(0.0, padded * KVB - TRUE.cache_bytes))
        kernels = 2e-3 + 1e-5 * rows + (pre * 2e-4)
        real = kernels - (1.0 - 1.0 / chunk_bias) * pre * 2e-4
        wall = real + TRUE.extra_s(rows, padded, pre, 0.0, KVB, groups)
        wall *= rng.uniform(0.97, 1.03)
        if rng.random() < delayed:  # another process took the core for a while
            wall += rng.uniform(5e-3, 40e-3)
        out.append(StepSample(feats, wall, kernels))
    return out


@pytest.mark.parametrize("delayed", [0.0, 0.15])
def test_fit_recovers_the_step_costs_despite_delayed_steps(delayed: float) -> None:
    samples = _samples(delayed)
    got = fit(samples, cache_bytes=TRUE.cache_bytes)
    assert len(FEATURES) == 7
    for name in ("step_s", "row_s", "kv_byte_s", "group_s", "spill_byte_s"):  # decode steps
        want = getattr(TRUE, name)
        assert getattr(got, name) == pytest.approx(want, rel=0.25), name
    assert got.steps == 400
    # every step as it ran undisturbed, prompt chunks too, within a few percent
    clean = _samples(0.0)
    for s in clean:
        rows, padded, pre, groups = s.features[1], s.features[2] / KVB, s.features[3] / KVB, \
            int(s.features[5])
        want = s.kernels_s + TRUE.extra_s(int(rows), padded, int(pre), 0.0, KVB, groups)
        have = s.kernels_s + got.extra_s(int(rows), padded, int(pre), 0.0, KVB, groups)
        assert have == pytest.approx(want, rel=0.05)


def test_chunks_faster_than_modeled_leave_the_decode_costs_alone() -> None:
    """The cost model's kernels of a prompt chunk 15 % above what they take here: the chunks'
    signed constants take that back, and a decode step's own costs are found as before (with
    every constant non-negative, the fit put them near zero)."""
    samples = _samples(0.0, chunk_bias=1.15)
    got = fit(samples, cache_bytes=TRUE.cache_bytes)
    assert got.prefill_byte_s < 0
    for name in ("step_s", "row_s", "kv_byte_s", "group_s"):
        assert getattr(got, name) == pytest.approx(getattr(TRUE, name), rel=0.25), name
    for s in samples:  # every step, chunks too, as it ran
        rows, padded, pre, groups = int(s.features[1]), s.features[2] / KVB, \
            int(s.features[3] / KVB), int(s.features[5])
        have = s.kernels_s + got.extra_s(rows, padded, pre, 0.0, KVB, groups)
        assert have == pytest.approx(s.wall_s, rel=0.05)


def test_sim_prices_padded_kv_and_groups_on_the_engines_workers() -> None:
    """A host-CPU replica's step costs what the fitted constants say for its padded KV (past
    the cache share too) and its attention groups, on top of the kernels' time."""
    from kcloud.hardware.steps import StepCost
    from kcloud.sim.replica import ReplicaModel

    class Stage:  # a stage's tables: kernels linear in batch, KV and prompt pairs
        device = type("D", (), {"id": "host-cpu"})()
        tp, idle_w = 1, 1.0

        def step(self, batch: int, kv: float, pre: int, pairs: float) -> StepCost:
            t = 1e-3 + 1e-5 * batch + 1e-9 * kv + 1e-7 * pre + 1e-10 * pairs
            return StepCost(time_s=t, energy_j=10 * t, idle_w=1.0)

    m = ReplicaModel([Stage()], [], True, engine=[(TRUE, KVB)])  # type: ignore[list-item]
    assert m.engine_costs
    batch, kv, padded, groups = 6, 3000.0, 4100.0, 2  # 16.8 MB of KV read: past the cache
    dt, _ = m.mixed(batch, kv, 0, 0.0, padded, groups)
    kernels = Stage().step(batch, kv, 0, 0.0).time_s
    assert dt == pytest.approx(kernels + TRUE.extra_s(batch, padded, 0, 0.0, KVB, groups))
    plain, _ = m.mixed(batch, kv, 0, 0.0)  # unpadded, no group
    assert dt - plain == pytest.approx(
        TRUE.kv_byte_s * KVB * (padded - kv) + 2 * TRUE.group_s
        + TRUE.spill_byte_s * ((padded * KVB - 8e6) - (kv * KVB - 8e6)))
