"""Where things live in the data folder: the one place that knows the folder names.

Layout (``data_dir``)::

    incidents/ quarantine/ reports/ingest/      the store (features.store)
    profiles/<source>.toml                      the profile each source was last ingested with
    revisions/                                  replaced versions of revised incidents (features.store)
    .hotspots.lock                              the writers' lock (features.storelock)
    panels/<source>-r<resolution>/              saved count panels
    features/<source>-r<res>-<start>-<end>.parquet
    backtests/<source>-r<res>-<start>-<end>/    saved backtests (forecasting.saved)
    batches/<grid name>/<point>/                a backtest grid's points (forecasting.batch)
    serving/<city>/                             the service's last-good model copies
    mlflow.db, mlartifacts/                     the embedded MLflow store
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date
from pathlib import Path

from features.settings import Settings


def run_name(source: str, resolution: int) -> str:
    """``<source>-r<resolution>``: how a (source, grid) pair is named on disk."""
    return f"{source}-r{resolution}"


def split_run_name(name: str, resolution: int) -> str | None:
    """The source of a ``<source>-r<resolution>`` folder name, or None when it is of another resolution."""
    suffix = f"-r{resolution}"
    return name[: -len(suffix)] if name.endswith(suffix) and len(name) > len(suffix) else None


def _backtest_name_parts(folder_name: str) -> tuple[str, int]:
    """(``<source>-r<res>``, res) of a ``<source>-r<res>-<start>-<end>`` backtest folder name (res -1 if none)."""
    head = folder_name.rsplit("-", 2)[0]
    tail = head.rsplit("-r", 1)[-1]
    return head, int(tail) if tail.isdigit() else -1


@dataclass(frozen=True)
class DataPaths:
    settings: Settings

    @property
    def root(self) -> Path:
        return Path(self.settings.data_dir)

    def _res(self, resolution: int | None) -> int:
        return self.settings.h3_resolution if resolution is None else int(resolution)

    @property
    def profiles_root(self) -> Path:
        """Remembered profiles: later commands find a source's profile here by its name."""
        return self.root / "profiles"

    @property
    def panels_root(self) -> Path:
        return self.root / "panels"

    def panel(self, source: str, resolution: int | None = None) -> Path:
        return self.panels_root / run_name(source, self._res(resolution))

    def features(self, source: str, start: date, end: date, resolution: int | None = None) -> Path:
        return self.root / "features" / f"{run_name(source, self._res(resolution))}-{start:%Y%m%d}-{end:%Y%m%d}.parquet"

    @property
    def backtests_root(self) -> Path:
        return self.root / "backtests"

    def backtest(self, source: str, start: date, end: date, resolution: int | None = None) -> Path:
        return self.backtests_root / f"{run_name(source, self._res(resolution))}-{start:%Y%m%d}-{end:%Y%m%d}"

    def latest_backtest(self, source: str, resolution: int | None = None) -> Path:
        """The newest saved backtest of a source, at one resolution or (None) at any; FileNotFoundError says how
        to make one."""
        def of_source(folder: Path) -> bool:
            head, res = _backtest_name_parts(folder.name)
            return split_run_name(head, res) == source and (resolution is None or res == resolution)

        found = sorted((p for p in self.backtests_root.glob(f"{source}-r*/predictions.npz") if of_source(p.parent)),
                       key=lambda p: p.stat().st_mtime)
        if not found:
            at = f" at resolution {resolution}" if resolution is not None else ""
            raise FileNotFoundError(f"no backtest of {source}{at} under {self.backtests_root}: "
                                    f"run `hotspots backtest {source}` first")
        return found[-1].parent

    @property
    def serving_root(self) -> Path:
        return self.root / "serving"
