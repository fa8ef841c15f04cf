"""What the command-line tools (`python -m fastsae ...`) share: argument types that refuse out-of-range
counts as usage errors naming the option, and the text files they read."""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from pathlib import Path


def read_texts(paths: list[Path]) -> Iterator[str]:
    """The documents of text files, in order: a line each in .txt, a {"text": ...} object a line in
    .jsonl; blank ones skipped."""
    for path in paths:
        if not path.is_file():
            raise ValueError(f"{path}: no such text file")
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if path.suffix == ".jsonl":
                    try:
                        line = json.loads(line)["text"]
                    except (json.JSONDecodeError, KeyError, TypeError) as error:
                        raise ValueError(f"{path}:{number}: not a JSON object with a 'text' field") from error
                if line.strip():
                    yield line.strip()


def at_least(minimum: int):
    """An argparse type: a whole number >= minimum, so that a zero or negative count is a usage error
    naming the option rather than a failure (or a run that trains nothing) later."""

    def whole_number(text: str) -> int:
        value = int(text)  # (not a whole number: argparse's "invalid whole_number value")
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return whole_number


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:  # (NaN too)
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def non_negative_float(text: str) -> float:
    """An argparse type for a ratio of norms and the like: a number >= 0 (not NaN, not -0.5)."""
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value
