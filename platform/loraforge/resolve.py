"""Turn job-file references ('lab', lab://..., hub ids, folders) into loadable things."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from loraforge.errors import DataError, ModelError
from loraforge.spec import LAB_DATA_PREFIX, LAB_MODEL

# The lab's small quality scorer (MoDS), built inside the lab folder on first use.
LAB_QUALITY_SCORER = "lab://quality_scorer"


def _lab_quality_scorer() -> str:
    from loraforge.lab.quality_scorer import ensure_quality_scorer

    return str(ensure_quality_scorer())


def resolve_model(ref: str) -> str:
    """'lab' -> the cached lab model folder (built on first use); lab://quality_scorer -> the lab's
    quality scorer folder (built on first use); anything else unchanged."""
    if ref == LAB_QUALITY_SCORER:
        return _lab_quality_scorer()
    if ref == LAB_MODEL:
        from loraforge.lab.build import ensure_lab

        return str(ensure_lab().model_dir)
    p = Path(ref).expanduser()
    if p.exists():
        if not (p / "config.json").is_file():
            raise ModelError(f"model folder {ref!r} has no config.json: not a Hugging Face model")
        return str(p.resolve())
    return ref


def resolve_data(ref: str) -> Path:
    """lab://<relative path> -> a file in the lab's data folder (lab://quality_scorer: the scorer's folder);
    otherwise a local path that must exist."""
    if ref == LAB_QUALITY_SCORER:
        return Path(_lab_quality_scorer())
    if ref.startswith(LAB_DATA_PREFIX):
        from loraforge.lab.build import ensure_lab

        path = ensure_lab().data_dir / ref[len(LAB_DATA_PREFIX) :]
    else:
        path = Path(ref).expanduser()
    if not path.exists():
        raise DataError(f"data file not found: {ref} ({path})")
    return path.resolve()


def load_model(ref: str, **kwargs: Any):
    """AutoModelForCausalLM.from_pretrained with an error that names the model on failure."""
    from transformers import AutoModelForCausalLM

    path = resolve_model(ref)
    try:
        return AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as err:
        raise ModelError(f"cannot load model {ref!r}: {err}") from None


def load_tokenizer(ref: str):
    from transformers import AutoTokenizer

    path = resolve_model(ref)
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise ModelError(f"cannot load tokenizer for {ref!r}: {err}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok
