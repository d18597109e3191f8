"""Input row formats -> parsed rows (a conversation, its kind and, for preference pairs, the rejected answer).

Formats (the `format` of an input; `auto` picks one per row from its keys, in this order):
  chat           {"messages": [{"role", "content"}]}  (also accepts ShareGPT `conversations`)
  sharegpt       {"conversations": [{"from", "value"}]}; from: human/user, gpt/assistant, system
  self_instruct  {"instruction", "instances": [{"input", "output"}]}: one row per instance
  preference     {"prompt", "chosen", "rejected"}; prompt a string or a list of chat messages, chosen and
                 rejected strings or message lists ending in an assistant turn (then prompt may be omitted:
                 the chosen list's earlier turns are the prompt)
  alpaca         {"instruction", "input"?, "output"}
  text           {"text"}: a plain document, one assistant message

A row that cannot be used raises `RowError(reason, detail)`; `reason` is a short stable code (counted
in the manifest), `detail` the human-readable why (e.g. the JSON error message).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from loraforge.data.schema import KIND_CHAT, KIND_PREFERENCE, KIND_TEXT

FORMATS = ("auto", "alpaca", "chat", "sharegpt", "self_instruct", "preference", "text")
ROLES = ("system", "user", "assistant")
# ShareGPT speaker names -> chat roles.
SHAREGPT_ROLES = {
    "system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
    "chatgpt": "assistant", "bing": "assistant", "bard": "assistant",
}

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


@dataclass(frozen=True, slots=True)
class Parsed:
    """One usable row. Preference pairs end `messages` with the chosen answer and keep the other answer in
    `rejected`; text documents are one assistant message."""

    messages: Conversation
    kind: str = KIND_CHAT
    rejected: str | None = None


# One parsed row: (sub-row index, the row or the reason it is unusable). The index is 0 for one-row
# formats and 1..n for self_instruct instances.
ParsedRow = tuple[int, Parsed | RowError]


# Key sets that identify a format, in detection order.
_SIGNATURES = (
    ("chat", ("messages",)),
    ("sharegpt", ("conversations",)),
    ("self_instruct", ("instances",)),
    ("preference", ("chosen", "rejected")),
    ("alpaca", ("instruction", "output")),
    ("text", ("text",)),
)


def detect_format(obj: dict[str, Any]) -> str:
    """The format whose keys the record has. Null values count as absent first (a Parquet file mixing
    formats has every column on every record); a record with only null candidates is detected by its keys,
    so the parser names the field that is wrong."""
    for present in (lambda k: obj.get(k) is not None, lambda k: k in obj):
        for fmt, keys in _SIGNATURES:
            if any(present(k) for k in keys):
                return fmt
    keys = ", ".join(sorted(map(str, obj))[:8]) or "none"
    raise RowError(
        UNKNOWN_FORMAT,
        f"no messages/conversations/instruction/instances/chosen/text field (keys: {keys})",
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


def _turns(turns: Any, key: str) -> Conversation:
    """A list of chat turns -> messages. `messages` turns are {role, content} with chat roles; ShareGPT
    `conversations` turns are {from, value} (or {role, content}) with ShareGPT speaker names."""
    if not isinstance(turns, list):
        raise RowError(BAD_TYPE, f"{key!r} must be a list, got {type(turns).__name__}")
    sharegpt = key == "conversations"
    out: Conversation = []
    for i, turn in enumerate(turns):
        where = f"{key}[{i}]: "
        if not isinstance(turn, dict):
            raise RowError(BAD_TYPE, f"{where}must be an object, got {type(turn).__name__}")
        role_key, content_key = "role", "content"
        if sharegpt and ("from" in turn or "role" not in turn):
            role_key, content_key = "from", "value"
        role = _field(turn, role_key, where)
        mapped = SHAREGPT_ROLES.get(role.lower(), "") if sharegpt else (role if role in ROLES else "")
        if not mapped:
            allowed = sorted(SHAREGPT_ROLES) if sharegpt else list(ROLES)
            raise RowError(BAD_ROLE, f"{where}{role_key}={role!r} is not one of {allowed}")
        out.append({"role": mapped, "content": _field(turn, content_key, where)})
    return out


def _need_assistant(messages: Conversation) -> Conversation:
    if not any(m["role"] == "assistant" for m in messages):
        raise RowError(NO_ASSISTANT, f"no assistant turn among {len(messages)} message(s)")
    return messages


def parse_alpaca(obj: dict[str, Any]) -> Parsed:
    instruction = _instruction(obj)
    user = _prompt(instruction, _field(obj, "input", "", optional=True))
    return Parsed(_with_answer(user, _field(obj, "output", "")))


def parse_chat(obj: dict[str, Any]) -> Parsed:
    key = "messages" if "messages" in obj else "conversations" if "conversations" in obj else None
    if key is None:
        raise RowError(MISSING_FIELD, "no 'messages' (or ShareGPT 'conversations') field")
    return Parsed(_need_assistant(_turns(obj[key], key)))


def parse_sharegpt(obj: dict[str, Any]) -> Parsed:
    if "conversations" not in obj:
        raise RowError(MISSING_FIELD, "no 'conversations' field (ShareGPT: [{from, value}])")
    return Parsed(_need_assistant(_turns(obj["conversations"], "conversations")))


def _answer(obj: dict[str, Any], key: str) -> tuple[str, Conversation]:
    """A preference answer: a string, or a message list ending in an assistant turn (its earlier turns
    are returned as the implied prompt)."""
    if key not in obj or obj[key] is None:
        raise RowError(MISSING_FIELD, f"no {key!r} field")
    value = obj[key]
    if isinstance(value, str):
        return value, []
    if isinstance(value, list):
        turns = _turns(value, key)
        if not turns or turns[-1]["role"] != "assistant":
            raise RowError(NO_ASSISTANT, f"{key!r} must end with an assistant turn ({len(turns)} message(s))")
        return turns[-1]["content"], turns[:-1]
    raise RowError(BAD_TYPE, f"{key!r} must be a string or a list of messages, got {type(value).__name__}")


def parse_preference(obj: dict[str, Any]) -> Parsed:
    chosen, implied = _answer(obj, "chosen")
    rejected, _ = _answer(obj, "rejected")
    prompt = obj.get("prompt")
    if prompt is None:
        if not implied:
            raise RowError(MISSING_FIELD, "no 'prompt' field (and 'chosen' is not a conversation)")
        context = implied
    elif isinstance(prompt, str):
        if not prompt.strip():
            raise RowError(MISSING_FIELD, "'prompt' is empty")
        context = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, list):
        context = _turns(prompt, "prompt")
        if not context:
            raise RowError(MISSING_FIELD, "'prompt' is an empty list")
    else:
        raise RowError(BAD_TYPE, f"'prompt' must be a string or a list of messages, got {type(prompt).__name__}")
    return Parsed(context + [{"role": "assistant", "content": chosen}], KIND_PREFERENCE, rejected)


def parse_text(obj: dict[str, Any]) -> Parsed:
    return Parsed([{"role": "assistant", "content": _field(obj, "text", "")}], KIND_TEXT)


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
            rows.append((k, Parsed(_with_answer(user, _field(inst, "output", where)))))
        except RowError as err:
            rows.append((k, err))
    return rows


_ONE_ROW = {
    "alpaca": parse_alpaca, "chat": parse_chat, "sharegpt": parse_sharegpt,
    "preference": parse_preference, "text": parse_text,
}


def parse_record(obj: Any, fmt: str = "auto") -> list[ParsedRow]:
    """One decoded record -> its rows. Raises RowError when the whole record is unusable, ValueError for
    an unknown `fmt` (a spec problem, not a row problem)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS}")
    if not isinstance(obj, dict):
        raise RowError(NOT_OBJECT, f"expected a JSON object, got {type(obj).__name__}")
    if fmt == "auto":
        fmt = detect_format(obj)
    if fmt == "self_instruct":
        return parse_self_instruct(obj)
    return [(0, _ONE_ROW[fmt](obj))]


# A JSON escape of a UTF-16 surrogate: json.loads may turn it into a lone surrogate, which is not UTF-8
# (Arrow cannot store it), so such rows are checked.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _lone_surrogate(parsed: Parsed) -> RowError | None:
    texts = [m["content"] for m in parsed.messages] + ([parsed.rejected] if parsed.rejected is not None else [])
    for text in texts:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as err:
            return RowError(BAD_ENCODING, f"text holds a lone UTF-16 surrogate ({err.object[err.start]!r})")
    return None


def parse_line(text: str, fmt: str = "auto") -> list[ParsedRow]:
    """One JSONL line -> its rows. Raises RowError for bad JSON or an unusable record."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        raise RowError(BAD_JSON, str(err)) from None
    except RecursionError:
        raise RowError(BAD_JSON, "nested too deeply") from None
    rows = parse_record(obj, fmt)
    if _SURROGATE_ESCAPE.search(text):
        rows = [(sub, (_lone_surrogate(r) or r) if isinstance(r, Parsed) else r) for sub, r in rows]
    return rows


def text_chars(messages: Conversation) -> int:
    return sum(len(m["content"]) for m in messages)


def response_text(messages: Conversation) -> str:
    """The assistant turns joined by a newline: what filters and response scores look at (for a text row,
    the document; for a preference pair, the chosen answer)."""
    return "\n".join(m["content"] for m in messages if m["role"] == "assistant")
