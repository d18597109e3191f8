"""One base error for everything a user can fix; the CLI turns it into exit code 2."""

from __future__ import annotations


class LoraforgeError(Exception):
    """A problem with the user's input or environment: message says what and where."""

    exit_code = 2


class SpecError(LoraforgeError):
    """A job file failed validation; `problems` lists (field path, message)."""

    def __init__(self, source: str, problems: list[tuple[str, str]]):
        self.source = source
        self.problems = problems
        lines = [f"{source}: {len(problems)} problem(s)"]
        lines += [f"  {path}: {msg}" for path, msg in problems]
        super().__init__("\n".join(lines))


class DataError(LoraforgeError):
    """A data file is missing, unreadable or has no usable rows."""


class ModelError(LoraforgeError):
    """A model or adapter path/id cannot be loaded."""


class ClusterError(LoraforgeError):
    """Ray or MLflow cannot be started or reached (port in use, bad address)."""
