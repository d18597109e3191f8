"""PEFT adapter folders on disk: safetensors only; pickled weights are refused, never loaded."""

from __future__ import annotations

from pathlib import Path

from loraforge.errors import ModelError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PICKLED_ADAPTER_WEIGHTS = "adapter_model.bin"


def check_adapter_dir(path: str | Path) -> Path:
    """A PEFT adapter folder with safetensors weights; pickled (.bin) weights are refused, not loaded."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ModelError(f"adapter folder not found: {path}")
    if not (folder / ADAPTER_CONFIG).is_file():
        raise ModelError(f"adapter folder {path} has no {ADAPTER_CONFIG}: not a PEFT adapter")
    if not (folder / ADAPTER_WEIGHTS).is_file():
        if (folder / PICKLED_ADAPTER_WEIGHTS).is_file():
            raise ModelError(
                f"adapter {path} holds {PICKLED_ADAPTER_WEIGHTS} (pickle): only safetensors adapters are "
                f"served, because loading a pickle can run arbitrary code. Re-save it with "
                f"save_pretrained(..., safe_serialization=True) to get {ADAPTER_WEIGHTS}"
            )
        raise ModelError(f"adapter folder {path} has no {ADAPTER_WEIGHTS}")
    return folder.resolve()


