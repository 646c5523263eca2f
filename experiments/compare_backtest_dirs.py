"""Compare two backtest folders written from the same forecasts (old and new code): every JSON figure, every
Parquet table, every array of predictions.npz, report.md and the tables of report.html must be equal.

    python -m experiments.compare_backtest_dirs OLD_DIR NEW_DIR

Fields that name the run rather than its figures (MLflow run id, registered version, code version) are
ignored. Prints one line per file and exits 1 on any difference.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import polars as pl

IGNORED = {"run_id", "version", "code_version"}


def _strip(value):
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if k not in IGNORED}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value


def _unversioned(text: str) -> str:
    """The report's text without the code version it names (old and new code differ there by design)."""
    return re.sub(r"code version(\s*\|[^|\n]*|</t[dh]>\s*<td>[^<]*)", "code version", text)


def _tables(html: str) -> list[str]:
    """The report's tables without embedded images (PNG bytes carry no figure the tables lack)."""
    return re.findall(r"<table.*?</table>", _unversioned(re.sub(r"data:image/[^\"')]+", "", html)), flags=re.S)


def compare(old: Path, new: Path) -> list[str]:
    problems = []
    names = sorted({p.name for p in old.iterdir()} | {p.name for p in new.iterdir()})
    for name in names:
        a, b = old / name, new / name
        if not (a.is_file() and b.is_file()):
            problems.append(f"{name}: only in {'old' if a.is_file() else 'new'}")
            continue
        if name.endswith(".json"):
            same = _strip(json.loads(a.read_text())) == _strip(json.loads(b.read_text()))
        elif name.endswith(".parquet"):
            same = pl.read_parquet(a).equals(pl.read_parquet(b))
        elif name.endswith(".npz"):
            with np.load(a) as x, np.load(b) as y:
                same = sorted(x.files) == sorted(y.files) and all(np.array_equal(x[k], y[k]) for k in x.files)
        elif name.endswith(".md"):
            same = _unversioned(a.read_text()) == _unversioned(b.read_text())
        elif name.endswith(".html"):
            ta, tb = _tables(a.read_text()), _tables(b.read_text())
            same = ta == tb
            name += f" ({len(ta)} tables)"
        else:
            same = a.read_bytes() == b.read_bytes()
            name += " (bytes)"
        print(f"{'same' if same else 'DIFFERENT'}  {name}")
        if not same:
            problems.append(name)
    return problems


if __name__ == "__main__":
    sys.exit(1 if compare(Path(sys.argv[1]), Path(sys.argv[2])) else 0)
