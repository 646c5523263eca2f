"""The layers point down (serving -> forecasting.reporting -> forecasting -> features) and the product never
imports experiments/: import-linter's contracts from pyproject.toml, checked on every run of the suite."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_linter_contracts_are_kept():
    lint = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout and "Contracts: 4 kept" in result.stdout, result.stdout


def test_the_product_imports_nothing_from_experiments():
    """The same rule read as text, for imports the graph could miss (inside functions, strings for importlib)."""
    found = subprocess.run(["grep", "-rnE", r"^\s*(from|import) experiments|import_module\(.experiments",
                            "features", "forecasting", "serving"], cwd=ROOT, capture_output=True, text=True)
    assert found.stdout == "", found.stdout
