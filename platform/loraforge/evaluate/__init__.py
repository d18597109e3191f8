"""Task accuracy and forgetting measurements."""

from loraforge.evaluate.runner import EvalResult, run_evaluate

__all__ = ["EvalResult", "run_evaluate"]
