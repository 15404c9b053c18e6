"""What every benchmark report says about where it ran, and how it is written out.

The machine, the versions and the load average go beside every figure (the development machine
is shared, so a number without its load cannot be read); tables are markdown; ``--json PATH``
writes one object with the same header facts. Nothing here imports torch or NeMo at the top:
the loop benchmark's child processes import its module, and this one with it.
"""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import json
import os
import platform
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any


def machine() -> str:
    """CPU model and logical CPU count (plus the GPU where torch sees one, if torch is loaded)."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} logical CPUs ({platform.machine()})"


def versions(packages: Iterable[str] = ("torch", "nemo_toolkit")) -> str:
    """``name version`` of each installed distribution, then Python's."""
    parts = []
    for name in packages:
        try:
            parts.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            parts.append(f"{name} (not installed)")
    return ", ".join([*parts, f"Python {platform.python_version()}"])


def load_1m() -> float:
    """The 1-minute load average (NaN where the system has none)."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def load_line() -> str:
    """The 1/5/15-minute load averages, as ``uptime`` prints them."""
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def header_lines(
    command: str, load_before: str, packages: Iterable[str] = ("torch", "nemo_toolkit")
) -> list[str]:
    """The bullet lines every report starts with."""
    return [
        f"- Machine: {machine()}.",
        f"- Versions: {versions(packages)}.",
        f"- Load average (1/5/15 min): {load_before} at the start, {load_line()} at the end.",
        f"- Command: `{command}`",
    ]


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A markdown table, every column right-aligned and padded to its widest cell."""
    cells = [list(header), *[list(r) for r in rows]]
    for row in cells:
        if len(row) != len(header):
            raise ValueError(f"row {row} has {len(row)} cells, the header {len(header)}")
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]

    def line(row: Sequence[str]) -> str:
        return "| " + " | ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) + " |"

    rule = "|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|"
    return "\n".join([line(cells[0]), rule, *(line(r) for r in cells[1:])])


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` with the environment facts added under ``"environment"``, atomically."""
    document = {
        "environment": {
            "machine": machine(),
            "versions": versions(),
            "load_avg": load_line(),
            "utc": utc_now().isoformat(timespec="seconds"),
        },
        **payload,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(document, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    tmp.replace(path)


def append_markdown(path: Path, section: str) -> None:
    """Append ``section``; another writer may have added to the file, so read it just before."""
    existing = path.read_text(encoding="utf-8") if path.exists() else ""
    if not existing:
        lead = "# Benchmarks\n\n"
    elif existing.endswith("\n\n"):
        lead = ""
    else:
        lead = "\n" if existing.endswith("\n") else "\n\n"
    with path.open("a", encoding="utf-8") as f:
        f.write(lead + section.rstrip("\n") + "\n")
