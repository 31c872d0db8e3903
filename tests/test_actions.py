"""The schedule vocabulary prints and parses back, and the planner, the workers' timelines
and the run's report speak it."""

from __future__ import annotations

import pytest

from kcloud.planner.actions import Action, Kind, from_events, parse_all, render


@pytest.mark.parametrize("text", ["F0", "F12+AR", "R3", "S3", "P0", "P2+AR", "D1.7", "D0.1+AR",
                                  "RT4.2", "ST4.2", "R0.0", "W5"])
def test_action_round_trips(text: str) -> None:
    assert str(Action.parse(text)) == text


def test_parse_rejects_what_is_not_an_action() -> None:
    for bad in ("", "X1", "F", "F-1", "D1.", "F1+XY"):
        with pytest.raises(ValueError):
            Action.parse(bad)


def test_timeline_events_become_actions_with_their_all_reduces() -> None:
    events = [("R", 0, 0, 1), ("F", 0, 1, 2), ("AR", 0, 1, 2), ("S", 0, 2, 3), ("L", 1, 3, 4)]
    assert render(from_events(events)) == ["R0", "F0+AR", "S0"]
    gen = [("P", 0, 0, 1, 0), ("AR", 0, 0, 1, 0), ("ST", 0, 1, 2, 0), ("RT", 0, 2, 3, 1),
           ("D", 0, 3, 4, 1), ("LD", 0, 4, 5, 1)]
    acts = from_events(gen)
    assert render(acts) == ["P0+AR", "ST0.0", "RT0.1", "D0.1"]
    assert parse_all(render(acts)) == acts
    assert acts[0].kind is Kind.PREFILL and acts[-1].step == 1


def test_plan_schedule_parses() -> None:
    from kcloud.planner.api import make_plan
    from kcloud.planner.goal import Goal

    plan = make_plan("mlp", "k-cloud-rack", Goal(objective="latency")).plan
    for acts in plan.schedule(n_micro=3).values():
        assert render(parse_all(acts)) == acts
