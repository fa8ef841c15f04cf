"""What the command-line tools (`python -m fastsae ...`) share: argument types that refuse out-of-range
counts as usage errors naming the option, the text files they read, and the SAEs they are given."""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from pathlib import Path

import torch

from .sae import DTYPES, SparseAutoencoder


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


HUB_PREFIX = "hf://"


def add_sae_and_text_arguments(command: argparse.ArgumentParser, verb: str) -> None:
    """The options of a command that runs SAEs in their model on texts (evaluate, features): the SAEs
    and their hook points (`load_saes`), the texts and how the model reads them, the device and the
    model's dtype; `verb` says what the command does with the SAEs' positions."""
    command.add_argument("--sae", nargs="+", required=True,
                         help="SAEs (fastsae files, SAELens or sparsify directories, or hf://ORG/REPO/PATH on the "
                              "Hugging Face Hub), each at the hook point its file or directory is named after "
                              "(h.6.safetensors: h.6)")  # fmt: skip
    command.add_argument("--hookpoint", nargs="+", help="the SAEs' hook points instead, in their order")
    command.add_argument("--texts", nargs="+", type=Path, required=True, help=".txt or .jsonl files")
    command.add_argument("--context-size", type=at_least(2), default=128, help="tokens per text at most")
    command.add_argument("--texts-per-forward", type=at_least(1), default=8)
    command.add_argument("--keep-special-tokens", action="store_true",
                         help=f"{verb} special tokens too (training drops them by default)")  # fmt: skip
    command.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    command.add_argument("--model-dtype", choices=list(DTYPES), default=None,
                         help="dtype the model runs in (default: as its checkpoint stores it)")  # fmt: skip


def load_saes(specs: list[str], hookpoints: list[str] | None, device: str) -> dict[str, SparseAutoencoder]:
    """{hook point: SAE} of --sae files, directories or hf:// locations (`add_sae_and_text_arguments`), at
    the hook points --hookpoint names in their order, or else that their names give."""
    names = hookpoints or [_hookpoint_named_by(spec) for spec in specs]
    if len(names) != len(specs):
        raise ValueError(f"--hookpoint names {len(names)} hook points for {len(specs)} SAEs")
    if len(set(names)) != len(names):
        raise ValueError(f"the SAEs' hook points must be distinct, got {names} (name them with --hookpoint)")
    return {name: _load_sae(spec, device) for name, spec in zip(names, specs)}


def _hub_location(spec: str) -> tuple[str, str]:
    """(repository, path in it) of an hf://ORG/REPO[/PATH] --sae."""
    parts = spec.removeprefix(HUB_PREFIX).strip("/").split("/")
    if len(parts) < 2:
        raise ValueError(f"{spec}: a Hub SAE is hf://ORG/REPO or hf://ORG/REPO/PATH")
    return "/".join(parts[:2]), "/".join(parts[2:])


def _hookpoint_named_by(spec: str) -> str:
    """The hook point a --sae names by default: its file's stem or its directory's name (on the Hub, the
    last part of its path in the repository)."""
    if spec.startswith(HUB_PREFIX):
        repository, inside = _hub_location(spec)
        path = Path(inside or repository)
    else:
        path = Path(spec)
    return path.stem if path.suffix == ".safetensors" else path.name


def _load_sae(spec: str, device: str) -> SparseAutoencoder:
    if spec.startswith(HUB_PREFIX):
        from .io import load_hub

        return load_hub(*_hub_location(spec), device=device)
    return SparseAutoencoder.load(spec, device)
