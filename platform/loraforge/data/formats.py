"""Input row formats -> conversations (`[{"role", "content"}]`), one JSON line at a time.

Formats:
  alpaca         {"instruction", "input"?, "output"}
  chat           {"messages": [{"role", "content"}]}, or ShareGPT {"conversations": [{"from", "value"}]}
  self_instruct  {"instruction", "instances": [{"input", "output"}]}: one conversation per instance
  auto           picks one of the above per row from its keys

A row that cannot be used raises `RowError(reason, detail)`; `reason` is a short stable code (counted
in the manifest), `detail` the human-readable why (e.g. the JSON error message).
"""

from __future__ import annotations

import json
from typing import Any

FORMATS = ("auto", "alpaca", "chat", "self_instruct")
ROLES = ("system", "user", "assistant")
# ShareGPT speaker names -> chat roles.
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}

# Parse reasons (op "parse").
BAD_ENCODING = "bad_encoding"
BAD_JSON = "bad_json"
NOT_OBJECT = "not_object"
UNKNOWN_FORMAT = "unknown_format"
MISSING_FIELD = "missing_field"
BAD_TYPE = "bad_type"
BAD_ROLE = "bad_role"
NO_ASSISTANT = "no_assistant"
NO_INSTANCES = "no_instances"

Message = dict[str, str]
Conversation = list[Message]


class RowError(ValueError):
    """A row that cannot become a conversation; never fatal for the curate stage."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


# One parsed row: (sub-row index, conversation or the reason it is unusable). The index is 0 for
# one-row formats and 1..n for self_instruct instances.
ParsedRow = tuple[int, Conversation | RowError]


def detect_format(obj: dict[str, Any]) -> str:
    if "messages" in obj or "conversations" in obj:
        return "chat"
    if "instances" in obj:
        return "self_instruct"
    if "instruction" in obj or "output" in obj:
        return "alpaca"
    keys = ", ".join(sorted(map(str, obj))[:8]) or "none"
    raise RowError(
        UNKNOWN_FORMAT, f"no messages/conversations/instruction/instances field (keys: {keys})"
    )


def _field(obj: dict[str, Any], key: str, where: str, optional: bool = False) -> str:
    if key not in obj or (optional and obj[key] is None):
        if optional:
            return ""
        raise RowError(MISSING_FIELD, f"{where}no {key!r} field")
    value = obj[key]
    if not isinstance(value, str):
        raise RowError(BAD_TYPE, f"{where}{key!r} must be a string, got {type(value).__name__}")
    return value


def _prompt(instruction: str, extra: str) -> str:
    return f"{instruction}\n\n{extra}" if extra.strip() else instruction


def _instruction(obj: dict[str, Any]) -> str:
    instruction = _field(obj, "instruction", "")
    if not instruction.strip():
        raise RowError(MISSING_FIELD, "'instruction' is empty")
    return instruction


def _with_answer(user: str, answer: str) -> Conversation:
    return [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]


def parse_alpaca(obj: dict[str, Any]) -> Conversation:
    instruction = _instruction(obj)
    return _with_answer(_prompt(instruction, _field(obj, "input", "", optional=True)), _field(obj, "output", ""))


def parse_chat(obj: dict[str, Any]) -> Conversation:
    key = "messages" if "messages" in obj else "conversations" if "conversations" in obj else None
    if key is None:
        raise RowError(MISSING_FIELD, "no 'messages' (or ShareGPT 'conversations') field")
    turns = obj[key]
    if not isinstance(turns, list):
        raise RowError(BAD_TYPE, f"{key!r} must be a list, got {type(turns).__name__}")
    sharegpt = key == "conversations"
    role_key, content_key = ("from", "value") if sharegpt else ("role", "content")
    out: Conversation = []
    for i, turn in enumerate(turns):
        where = f"{key}[{i}]: "
        if not isinstance(turn, dict):
            raise RowError(BAD_TYPE, f"{where}must be an object, got {type(turn).__name__}")
        role = _field(turn, role_key, where)
        role = SHAREGPT_ROLES.get(role, "") if sharegpt else (role if role in ROLES else "")
        if not role:
            allowed = sorted(SHAREGPT_ROLES) if sharegpt else list(ROLES)
            raise RowError(BAD_ROLE, f"{where}{role_key}={turn[role_key]!r} is not one of {allowed}")
        out.append({"role": role, "content": _field(turn, content_key, where)})
    if not any(m["role"] == "assistant" for m in out):
        raise RowError(NO_ASSISTANT, f"no assistant turn among {len(out)} message(s)")
    return out


def parse_self_instruct(obj: dict[str, Any]) -> list[ParsedRow]:
    instruction = _instruction(obj)
    instances = obj.get("instances")
    if not isinstance(instances, list):
        raise RowError(BAD_TYPE, f"'instances' must be a list, got {type(instances).__name__}")
    if not instances:
        raise RowError(NO_INSTANCES, "'instances' is empty")
    rows: list[ParsedRow] = []
    for k, inst in enumerate(instances, start=1):
        where = f"instances[{k - 1}]: "
        try:
            if not isinstance(inst, dict):
                raise RowError(BAD_TYPE, f"{where}must be an object, got {type(inst).__name__}")
            user = _prompt(instruction, _field(inst, "input", where, optional=True))
            rows.append((k, _with_answer(user, _field(inst, "output", where))))
        except RowError as err:
            rows.append((k, err))
    return rows


def parse_record(obj: Any, fmt: str = "auto") -> list[ParsedRow]:
    """One decoded JSON value -> its rows. Raises RowError when the whole record is unusable."""
    if not isinstance(obj, dict):
        raise RowError(NOT_OBJECT, f"expected a JSON object, got {type(obj).__name__}")
    if fmt == "auto":
        fmt = detect_format(obj)
    if fmt == "alpaca":
        return [(0, parse_alpaca(obj))]
    if fmt == "chat":
        return [(0, parse_chat(obj))]
    if fmt == "self_instruct":
        return parse_self_instruct(obj)
    raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS}")


def parse_line(text: str, fmt: str = "auto") -> list[ParsedRow]:
    """One JSONL line -> its rows. Raises RowError for bad JSON or an unusable record."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        raise RowError(BAD_JSON, str(err)) from None
    except RecursionError:
        raise RowError(BAD_JSON, "nested too deeply") from None
    return parse_record(obj, fmt)


def text_chars(messages: Conversation) -> int:
    return sum(len(m["content"]) for m in messages)
