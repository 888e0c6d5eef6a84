"""Meta-training learned optimizers: truncated unrolls vectorised over a
population, ES / PES / truncated-backprop estimators, and the outer loop.

``python -m meta_train --help`` is the command line.
"""

from meta_train.estimators import PES, Estimator, TruncatedBackprop, TruncatedES, make_estimator
from meta_train.problems import LearnedOptimizerProblem, TruncatedProblem, rng
from meta_train.trainer import MetaTrainer
from meta_train.unroll import MetaLoss, TaskUnroll

__all__ = [
    "PES",
    "Estimator",
    "LearnedOptimizerProblem",
    "MetaLoss",
    "MetaTrainer",
    "TaskUnroll",
    "TruncatedBackprop",
    "TruncatedES",
    "TruncatedProblem",
    "make_estimator",
    "rng",
]
