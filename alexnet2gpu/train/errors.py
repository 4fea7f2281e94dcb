"""Why a run or an evaluation stops: the errors the commands turn into one line."""

from __future__ import annotations


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss); the message names the step and the checkpoint."""


class EvaluationError(ValueError):
    """No number worth reporting: no images were evaluated, or the model's outputs are not finite."""
