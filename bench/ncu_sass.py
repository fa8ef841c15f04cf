"""Where a kernel's instructions go, from Nsight Compute's source page exported as CSV (`ncu --import
REPORT --page source --csv --print-source sass`, as bench/device.sh's FASTSAE_NCU writes it): for each
kernel in the file, its executed warp instructions in all and per unit of work (`--per`, e.g. the rows of
a select), and its basic blocks (runs of consecutive SASS lines executed equally often by equally many
threads) by the instructions they executed, with their share of the warp-stall samples, their average
active threads and their first opcodes.

    python -m bench.ncu_sass ncu_select_sass.csv --per 16384 [--top 25]

A block run by one thread at a time (threads 1) is a divergent loop, each lane's iterations in turn.
"""

from __future__ import annotations

import argparse
import csv
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Block:
    """Consecutive SASS lines executed `count` times each by `threads` active threads on average."""

    address: str
    count: float
    threads: float
    samples: float = 0.0
    opcodes: list[str] = field(default_factory=list)

    @property
    def instructions(self) -> float:
        return self.count * len(self.opcodes)


def _number(text: str) -> float:
    return float(text.replace(",", "")) if text.strip() else 0.0


def _opcode(source: str) -> str:
    words = source.split()
    return words[1] if words and words[0].startswith("@") and len(words) > 1 else (words[0] if words else "")


def kernels(path: Path) -> dict[str, list[dict[str, str]]]:
    """The file's SASS lines (column name -> text) of each kernel, by kernel name."""
    found: dict[str, list[dict[str, str]]] = {}
    header: list[str] | None = None
    name = ""
    with path.open(newline="") as f:
        for row in csv.reader(f):
            if row and row[0] == "Kernel Name":
                name, header = row[1], None
                found[name] = []
            elif row and row[0] == "Address":
                header = row
            elif header is not None and len(row) == len(header):
                found[name].append(dict(zip(header, row)))
    return found


def blocks(lines: list[dict[str, str]]) -> list[Block]:
    """The kernel's lines grouped into runs executed equally often by equally many threads."""
    grouped: list[Block] = []
    for line in lines:
        count = _number(line["Instructions Executed"])
        threads = round(_number(line["Avg. Threads Executed"]), 1)
        if not grouped or grouped[-1].count != count or grouped[-1].threads != threads:
            grouped.append(Block(line["Address"], count, threads))
        grouped[-1].samples += _number(line["Warp Stall Sampling (All Samples)"])
        grouped[-1].opcodes.append(_opcode(line["Source"]))
    return grouped


def report(path: Path, per: float, top: int) -> str:
    out = []
    for name, lines in kernels(path).items():
        grouped = blocks(lines)
        total = sum(b.instructions for b in grouped)
        samples = sum(b.samples for b in grouped) or 1.0
        out.append(f"== {name[:150]}")
        out.append(f"   {total:,.0f} warp instructions executed, {total / per:,.1f} per unit (--per {per:g})")
        out.append(f"   {'address':>18} {'instr/unit':>10} {'stalls':>7} {'threads':>7}  first opcodes")
        for b in sorted(grouped, key=lambda b: -b.instructions)[:top]:
            out.append(f"   {b.address:>18} {b.instructions / per:10.1f} {100 * b.samples / samples:6.1f}% "
                       f"{b.threads:7.1f}  {' '.join(b.opcodes[:10])}")  # fmt: skip
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("csv", type=Path, help="ncu's source page, --csv --print-source sass")
    parser.add_argument("--per", type=float, default=1.0, help="units of work to divide the counts by")
    parser.add_argument("--top", type=int, default=25, help="blocks to list, most instructions first")
    args = parser.parse_args(argv)
    print(report(args.csv, args.per, args.top))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
