"""The partitioned store: months as hive partitions under a manifest, the id index, crash safety across several
partitions, and old single-file stores read as they are and converted at the next write."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import polars as pl
import pytest

import features.store as store_module
from features.store import IncidentStore, leftovers
from features.validation import CANONICAL_SCHEMA
from features.verify import verify_store


def rows(ids: list[str], days: list[int], category: str = "theft") -> pl.DataFrame:
    """Incidents on day ``d`` after 2020-01-01 (so months differ by ~30 days)."""
    start = datetime(2020, 1, 1, 12, tzinfo=UTC)
    return pl.DataFrame({"incident_id": ids, "occurred_at": [start + timedelta(days=d) for d in days],
                         "timezone": "America/Toronto", "category": category, "latitude": 43.7,
                         "longitude": -79.4, "source": "t"}).cast(CANONICAL_SCHEMA)  # type: ignore[arg-type]


def files(store: IncidentStore) -> list[str]:
    return sorted(str(p.relative_to(store.path("t"))) for p in store.path("t").rglob("*") if p.is_file())


def test_months_are_partitions_and_a_write_touches_only_its_months(tmp_path):
    store = IncidentStore(tmp_path)
    assert store.add(rows(["a", "b", "c"], [0, 40, 70]), "t").new == 3
    before = files(store)
    assert [f for f in before if f.startswith("month=")] == [
        f for f in before if f.startswith(("month=2020-01/", "month=2020-02/", "month=2020-03/"))]
    assert len([f for f in before if f.startswith("month=")]) == 3
    added = store.add(rows(["d"], [71]), "t")  # March only
    assert (added.new, added.updated, added.unchanged) == (1, 0, 0)
    after = files(store)
    unchanged = [f for f in before if f.startswith(("month=2020-01/", "month=2020-02/"))]
    assert set(unchanged) <= set(after)  # January and February were not rewritten
    assert store.count("t") == 4 and store.sources() == ["t"]
    # a date filter reads only the months it needs; scan is a lazy hive scan with the canonical columns
    assert [p.parent.name for p in store.partition_files("t", datetime(2020, 3, 5, tzinfo=UTC))] == ["month=2020-03"]
    assert store.read("t", start=datetime(2020, 3, 1, tzinfo=UTC))["incident_id"].sort().to_list() == ["c", "d"]
    assert store.scan("t").collect_schema() == pl.Schema(CANONICAL_SCHEMA)


def test_a_revision_that_moves_to_another_month_replaces_its_old_version(tmp_path):
    store = IncidentStore(tmp_path)
    store.add(rows(["a", "b"], [0, 40]), "t")
    added = store.add(rows(["a", "b"], [0, 100]), "t", "fix.csv")  # b moves from February to April
    assert (added.new, added.updated, added.unchanged) == (0, 1, 1)
    stored = store.read("t").sort("incident_id")
    assert stored["incident_id"].to_list() == ["a", "b"] and stored["occurred_at"][1].month == 4
    history = store.read_revisions("t")
    assert history.select("incident_id", "changed", "replaced_by_file").rows() == [("b", "occurred_at", "fix.csv")]
    assert history["occurred_at"][0].month == 2
    assert not any(f.startswith("month=2020-02/") for f in files(store))  # the emptied month is gone
    assert [f.level for f in verify_store(tmp_path)].count("error") == 0


def test_a_crash_before_the_manifest_swap_leaves_the_old_store_and_verify_names_the_leftovers(tmp_path, monkeypatch):
    store = IncidentStore(tmp_path)
    store.add(rows(["a", "b"], [0, 40]), "t")
    old = store.read("t")

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("the power went out")

    monkeypatch.setattr(store_module, "atomic_write_bytes", crash)  # the manifest replace never happens
    with pytest.raises(KeyboardInterrupt):
        store.add(rows(["a", "b", "c"], [0, 45, 70], category="assault"), "t")  # new files for Jan, Feb, Mar
    monkeypatch.undo()
    assert store.read("t").equals(old)  # the old store, whole: none of the new months is visible
    left = leftovers(store.path("t"), store.manifest("t"))
    assert len(left) == 4  # three months and the id index, written but never committed
    findings = verify_store(tmp_path)
    assert [f.level for f in findings].count("error") == 0
    assert sum("left over from an interrupted write that was not applied" in f.what for f in findings) == 4
    # the next write removes them and applies in full
    assert store.add(rows(["c"], [70]), "t").new == 1
    assert not leftovers(store.path("t"), store.manifest("t")) and store.count("t") == 3

    # a manifest naming a file that is not there is a half-applied or damaged write: an error
    victim = store.partition_files("t")[0]
    victim.unlink()
    errors = [f for f in verify_store(tmp_path) if f.level == "error"]
    assert any(f"{victim} is missing" in f.what for f in errors)


def test_an_old_single_file_store_is_read_as_is_and_migrates_with_nothing_lost(tmp_path):
    store = IncidentStore(tmp_path)
    legacy = store.legacy_path("t")
    legacy.parent.mkdir(parents=True)
    old = rows([f"id{i}" for i in range(50)], list(range(0, 500, 10)))
    old.write_parquet(legacy)  # as the store wrote it before months were partitions
    assert store.sources() == ["t"] and store.count("t") == 50
    assert store.read("t").equals(old) and store.scan("t").collect().equals(old)
    assert [f.level for f in verify_store(tmp_path)].count("error") == 0

    added = store.add(rows(["id0", "id1", "new"], [0, 300, 5]), "t", "later.csv")  # id1 revised into another month
    assert (added.new, added.updated, added.unchanged) == (1, 1, 1)
    assert not legacy.exists() and store.manifest("t") is not None
    got = store.read("t").sort("incident_id")
    expected = pl.concat([old.filter(pl.col("incident_id") != "id1"), rows(["id1", "new"], [300, 5])])
    assert got.equals(expected.sort("incident_id"))
    assert store.read_revisions("t")["incident_id"].to_list() == ["id1"]
    assert [f.level for f in verify_store(tmp_path)].count("error") == 0


def test_retention_drops_whole_months_unread_and_trims_the_boundary_month(tmp_path):
    store = IncidentStore(tmp_path)
    store.add(rows(["a", "b", "c", "d"], [0, 40, 45, 70]), "t")
    now = datetime(2020, 2, 13, tzinfo=UTC) + timedelta(days=30)
    deleted = store.delete_older_than(timedelta(days=30), now=now)  # cutoff 2020-02-13: a, b go
    assert deleted == {"t": 2}
    assert store.read("t")["incident_id"].sort().to_list() == ["c", "d"]
    assert [f.level for f in verify_store(tmp_path)].count("error") == 0


def test_a_panel_binned_month_by_month_equals_the_whole_store_binned_at_once(tmp_path):
    from features.pipeline import build_city_panel, build_city_panel_by_month
    from features.profile import load_profile
    from features.settings import Settings

    rng = np.random.default_rng(3)
    n = 4000
    start = datetime(2020, 1, 1, tzinfo=UTC)
    incidents = pl.DataFrame({
        "incident_id": [f"i{k}" for k in range(n)],
        "occurred_at": [start + timedelta(minutes=int(m)) for m in rng.integers(0, 200 * 24 * 60, n)],
        "timezone": "America/Toronto", "category": rng.choice(["assault", "robbery", "auto_theft"], n).tolist(),
        "latitude": 43.70 + rng.normal(0, 0.02, n), "longitude": -79.40 + rng.normal(0, 0.03, n),
        "source": "toronto-mci"}).cast(CANONICAL_SCHEMA)  # type: ignore[arg-type]
    store = IncidentStore(tmp_path)
    store.add(incidents, "toronto-mci")
    assert len(store.partition_files("toronto-mci")) >= 6
    profile, settings = load_profile("toronto-mci"), Settings(data_dir=tmp_path, h3_resolution=8)
    whole = build_city_panel(store.read("toronto-mci"), profile, settings)
    by_month = build_city_panel_by_month(store, profile, settings)
    assert by_month.report == whole.report
    assert np.array_equal(by_month.panel.study_area.cells, whole.panel.study_area.cells)
    assert (by_month.panel.first_shift, by_month.panel.end_shift) == (whole.panel.first_shift, whole.panel.end_shift)
    assert by_month.panel.counts.equals(whole.panel.counts)


def test_a_reader_racing_a_commit_reads_the_newer_version(tmp_path, monkeypatch):
    """Readers take no lock: one that listed the files just before a commit removed them reads the new version."""
    store = IncidentStore(tmp_path)
    store.add(rows(["a", "b"], [0, 40]), "t")
    stale = store.partition_files("t")
    store.add(rows(["a", "b"], [0, 40], category="assault"), "t")  # both months rewritten, old files deleted
    assert not any(p.exists() for p in stale)
    real, calls = IncidentStore.partition_files, []

    def listed_before_the_commit(self, source, start=None, end=None):
        calls.append(source)
        return stale if len(calls) == 1 else real(self, source, start, end)

    monkeypatch.setattr(IncidentStore, "partition_files", listed_before_the_commit)
    assert store.read("t")["category"].to_list() == ["assault", "assault"] and len(calls) == 2
