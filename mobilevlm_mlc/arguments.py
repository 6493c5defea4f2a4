"""Command-line argument types, every value checked as it is parsed (before any work), and the parser
whose complaints are one `error:` line."""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path

from .errors import MobileVLMError


def integer(low: int, high: int | None = None) -> Callable[[str], int]:
    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {value!r}") from None
        if number < low or (high is not None and number > high):
            bounds = f"in [{low}, {high}]" if high is not None else f">= {low}"
            raise argparse.ArgumentTypeError(f"expected an integer {bounds}, got {value}")
        return number

    return parse


def integers(low: int, high: int | None = None) -> Callable[[str], list[int]]:
    """A comma-separated list of integers, each checked as `integer(low, high)` checks one."""
    one = integer(low, high)
    return lambda value: [one(v) for v in value.split(",")]


def number(low: float, high: float, low_open: bool = False) -> Callable[[str], float]:
    def parse(value: str) -> float:
        try:
            number = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {value!r}") from None
        if not math.isfinite(number) or number < low or (low_open and number == low) or number > high:
            raise argparse.ArgumentTypeError(
                f"expected a number in {'(' if low_open else '['}{low:g}, {high:g}], got {value}"
            )
        return number

    return parse


positive = integer(1)
count = integer(0)


def logit_bias(value: str) -> tuple[int, float]:
    """TOKEN_ID=BIAS, e.g. `29871=-100` (OpenAI's range: -100..100)."""
    token, sep, bias = value.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected TOKEN_ID=BIAS, got {value!r}")
    return integer(0)(token.strip()), number(-100, 100)(bias.strip())


def text(value: str) -> str:
    """A prompt: the shell hands undecodable bytes over as surrogates, which no tokenizer takes."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise argparse.ArgumentTypeError(
            f"not valid UTF-8 text (byte {value[err.start].encode('utf-8', 'surrogateescape')!r} "
            f"at position {err.start})"
        ) from None
    return value


def api_key(value: str) -> str:
    """A key clients must send: an empty one (`--api-key "$UNSET"`) would leave the server open, and a
    header cannot carry control characters or spaces at its ends."""
    if not value or value != value.strip() or not value.isprintable():
        raise argparse.ArgumentTypeError(f"expected a non-empty key of printable characters, got {value!r}")
    return value


def path(value: str) -> Path:
    if "\x00" in value:
        raise argparse.ArgumentTypeError("a path cannot contain a NUL byte")
    text(value)
    return Path(value)


def folder(value: str) -> Path:
    """A folder to write into: one that exists, or a path where one can be made (no file in the way)."""
    where = path(value)
    for at in (where, *where.parents):
        if at.exists():
            if not at.is_dir():
                raise argparse.ArgumentTypeError(f"{at} is a file, expected a folder (or a path to make one)")
            break
    return where


def executable(value: str) -> Path:
    """A program to run: an existing file this user may execute."""
    where = path(value)
    if not where.is_file() or not os.access(where, os.X_OK):
        found = "a folder" if where.is_dir() else "a file that is not executable" if where.exists() else "nothing"
        raise argparse.ArgumentTypeError(f"expected an executable program, found {found} at {where}")
    return where


def target(value: str) -> str:
    from .targets import TARGETS

    if value not in TARGETS:
        raise argparse.ArgumentTypeError(f"unknown target {value!r} (expected one of {', '.join(TARGETS)})")
    return value


def device(value: str) -> str:
    from mobilevlm_mlc.runtime.backend import parse_device

    try:
        parse_device(value)
    except MobileVLMError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return value


def lengths(value: str) -> tuple[int, ...]:
    try:
        lengths = tuple(int(v) for v in value.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated token counts, got {value!r}") from None
    if not lengths or min(lengths) < 1:
        raise argparse.ArgumentTypeError(f"expected positive token counts, got {value!r}")
    return lengths


class Parser(argparse.ArgumentParser):
    """argparse, with its complaint as the one `error:` line every failure gets (usage stays in --help)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print_error(f"{message} (see `{self.prog} --help`)")
        raise SystemExit(2)


def print_error(message: str) -> None:
    print("error: " + " ".join(message.split()), file=sys.stderr)  # one line, whatever the message held
