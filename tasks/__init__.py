"""Tasks and task families: what learned optimizers are trained and tested on.

* :class:`Task`: a model, a dataset and a batch size, with pure ``loss``.
* :class:`TaskFamily` and :class:`MLPFamily`, :class:`CNNFamily`,
  :class:`MixtureFamily`: distributions over tasks.
* :func:`get_task`, :func:`get_family`, :func:`get_suite`: the registry of
  named tasks (``python -m tasks list``); :func:`parse_mixture` reads a
  weighted mixture of them (``real-family=0.7,mlp-family-fit=0.3``).
"""

from tasks.base import FixedFamily, Task, TaskFamily
from tasks.data import Dataset
from tasks.families import (
    FAMILIES,
    SUITES,
    TASK_STEPS,
    TASKS,
    CNNFamily,
    MixtureFamily,
    MLPFamily,
    get_dataset,
    get_family,
    get_suite,
    get_task,
    parse_mixture,
)

__all__ = [
    "CNNFamily",
    "Dataset",
    "FAMILIES",
    "FixedFamily",
    "MLPFamily",
    "MixtureFamily",
    "SUITES",
    "TASK_STEPS",
    "TASKS",
    "Task",
    "TaskFamily",
    "get_dataset",
    "get_family",
    "get_suite",
    "get_task",
    "parse_mixture",
]
