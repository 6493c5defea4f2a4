"""The one exception type users see: a one-line message naming the file or field at fault."""

from __future__ import annotations

from collections import Counter


class MobileVLMError(Exception):
    """Bad input or environment, reported as `error: <message>` by the CLI (no traceback)."""


def summarize(names: list[str], singular: str, plural: str, shown: int = 3) -> str:
    """'373 tensors (model.vision_tower.* 372, lm_head.weight 1; e.g. a, b, c)': a count, the leading name parts
    they share, and a few examples, so that one error line stays one line."""
    if len(names) <= shown:
        return f"{len(names)} {singular if len(names) == 1 else plural}: {', '.join(names)}"
    groups = Counter(".".join(name.split(".")[:2]) + ".*" if name.count(".") >= 2 else name for name in names)
    parts = ", ".join(f"{group} {count}" for group, count in groups.most_common(4))
    more = f" and {len(groups) - 4} more groups" if len(groups) > 4 else ""
    return f"{len(names)} {plural} ({parts}{more}; e.g. {', '.join(names[:shown])})"


def first_line(err: BaseException) -> str:
    """An exception's first non-empty line (TVM's carry C++ stack traces below it)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[0] if lines else ''}"
