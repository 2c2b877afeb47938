"""Record a benchmark table in ``benchmarks/RESULTS.md`` (one section per benchmark and machine).

Each script calls :func:`record` with its section name; re-running replaces that section,
so the file always holds the latest figures with their date, machine and command.
"""

from __future__ import annotations

import datetime as _dt
import os
import re
import sys
from pathlib import Path

RESULTS = Path(__file__).parent / "RESULTS.md"
HEADER = "# Benchmark results\n\nWritten by the scripts in `benchmarks/`; each section is replaced when its script re-runs.\n"


def machine() -> str:
    """A one-line description of where this runs (CPU model and cores, GPU if any)."""
    from mv_interp.report.runner import cpu_name

    desc = f"{cpu_name()}, {os.cpu_count()} cores"
    try:
        import torch

        if torch.cuda.is_available():
            desc += f"; GPU {torch.cuda.get_device_name(0)}"
        desc += f"; torch {torch.__version__}"
    except ImportError:
        pass
    return desc


def markdown_table(headers: list[str], rows: list[list]) -> str:
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def record(section: str, body: str, command: str | None = None, path: Path = RESULTS) -> None:
    """Replace (or add) ``## section`` in RESULTS.md with ``body``, stamped with date, machine, command."""
    command = command or "python " + " ".join(sys.argv)
    stamp = f"_{_dt.date.today().isoformat()} · {machine()} · `{command}`_"
    block = f"## {section}\n\n{stamp}\n\n{body.strip()}\n"
    text = path.read_text() if path.exists() else HEADER
    pattern = re.compile(rf"^## {re.escape(section)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = pattern.sub(lambda _: block + "\n", text) if pattern.search(text) else text.rstrip() + "\n\n" + block
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
