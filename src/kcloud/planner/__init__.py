"""Automatic parallelization: from (model, cluster, goal) to a Plan.

`make_plan` is the entry point; `Goal` states what the plan is for; `Plan` is the frozen,
versioned result. The plan space and the algorithm are described in `kcloud.planner.search`.
"""

from kcloud.planner.api import Outcome, make_plan
from kcloud.planner.goal import OBJECTIVES, Goal, GoalError, InfeasibleGoal
from kcloud.planner.model import ModelGraphs, load_model
from kcloud.planner.plan import Plan, Predicted, Replica, Stage

__all__ = [
    "OBJECTIVES",
    "Goal",
    "GoalError",
    "InfeasibleGoal",
    "ModelGraphs",
    "Outcome",
    "Plan",
    "Predicted",
    "Replica",
    "Stage",
    "load_model",
    "make_plan",
]
