"""The serving engine package. Until the continuous-batching engine lands, `Engine` is the PEFT one."""

from loraforge.serve.engine.errors import (
    ContextLengthError,
    InvalidParameterError,
    RequestError,
    UnknownModelError,
)
from loraforge.serve.engine.folders import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    PICKLED_ADAPTER_WEIGHTS,
    check_adapter_dir,
)
from loraforge.serve.engine.types import BASE_ALIAS, Completion, FinishReason, cut_at_stop
from loraforge.serve.peft_engine import PeftEngine as Engine

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "BASE_ALIAS",
    "PICKLED_ADAPTER_WEIGHTS",
    "Completion",
    "ContextLengthError",
    "Engine",
    "FinishReason",
    "InvalidParameterError",
    "RequestError",
    "UnknownModelError",
    "check_adapter_dir",
    "cut_at_stop",
]
