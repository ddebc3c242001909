"""In-Run Data Shapley inside Megatron-Core and DeepSpeed pretraining runs.

``raw`` = <grad of a training sequence's loss term, grad of the validation loss> at a step's
weights; ``value`` = lr * clip_coef * raw; positive = the sequence lowered the validation loss.
See ``SCORE_CONTRACT`` and the README.
"""

from inrun_megatron.config import ScoringConfig
from inrun_megatron.scores import SCORE_CONTRACT, SCORE_DEFINITION_VERSION, StepRecords, ValueAccumulator
from inrun_megatron.sites import register_rule
from inrun_megatron.step_result import MemorySink, PassTimings, ResultSink, StepResult

__version__ = "0.1.0"

__all__ = [
    "SCORE_CONTRACT",
    "SCORE_DEFINITION_VERSION",
    "MemorySink",
    "PassTimings",
    "ResultSink",
    "ScoringConfig",
    "StepRecords",
    "StepResult",
    "ValueAccumulator",
    "register_rule",
]
