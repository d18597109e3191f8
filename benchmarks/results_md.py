"""benchmarks/RESULTS.md: each benchmark owns one `## ` section and replaces it in place on every run."""

from __future__ import annotations

from pathlib import Path

RESULTS_MD = Path(__file__).resolve().parent / "RESULTS.md"


def write_section(section: str, body: list[str], path: Path = RESULTS_MD) -> None:
    """Replace the section headed `section` (up to the next `## `) with `body`, or append it."""
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmark results\n\n"
    start = text.find(section)
    if start >= 0:
        nxt = text.find("\n## ", start + len(section))
        text = text[:start] + "\n".join(body) + (text[nxt + 1:] if nxt >= 0 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + "\n".join(body)
    path.write_text(text, encoding="utf-8")
