"""Every malformed input has a precise, designed outcome: each row is stored or quarantined exactly once, with the
reason the corpus intends, or the file is refused with a message that says what to fix.

The corpus is tests/fixtures/malformed/ (see its README.md); the profiles are tests/fixtures/profiles/.
"""

from __future__ import annotations

import csv
import gzip
import json
from datetime import UTC, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import polars as pl
import pytest

from features.ingest import IngestError
from features.pipeline import IngestSummary, ingest_file
from features.profile import CoordinatesSpec, load_profile
from features.store import IncidentStore
from features.validation import CANONICAL_SCHEMA, QUARANTINE_SCHEMA, READ_REASONS, REASONS, VALIDATION_REASONS

FIXTURES = Path(__file__).parent / "fixtures"
MALFORMED = FIXTURES / "malformed"
TESTVILLE = FIXTURES / "profiles" / "testville.toml"
TESTVILLE_PROJECTED = FIXTURES / "profiles" / "testville_projected.toml"
NOW = datetime(2024, 1, 1, tzinfo=UTC)
NY = ZoneInfo("America/New_York")
UTC = UTC

# all_reasons.csv, designed row by row (1-based data rows)
ALL_REASONS_QUARANTINE = {
    3: "missing_id",
    4: "missing_time",
    5: "unparseable_time",
    6: "future_time",
    7: "before_coverage",
    8: "missing_coordinates",
    9: "invalid_coordinates",
    10: "missing_coordinates",  # (0, 0) is a placeholder for "no location" (issue 10)
    11: "sentinel_point",
    12: "out_of_area",
    13: "excluded_category",
    14: "unknown_category",
    15: "duplicate_id",
    17: "missing_id",  # also lacks a time: the first reason in REASONS order wins
    18: "missing_coordinates",
    20: "future_time",  # also lat 95 and an unknown category
}
ALL_REASONS_STORED = {1: "T-001", 2: "T-002", 16: "T-016", 19: "T-018"}


@pytest.fixture(scope="module")
def testville():
    return load_profile(TESTVILLE)


@pytest.fixture(scope="module")
def testville_projected():
    return load_profile(TESTVILLE_PROJECTED)


def file_rows(path: Path, encoding: str = "utf-8-sig") -> list[dict[str, str]]:
    """The data rows of a CSV as the csv module reads them; index 0 is source_row 1."""
    with path.open(newline="", encoding=encoding) as fh:
        return list(csv.DictReader(fh))


def blank_to_none(value: str | None) -> str | None:
    if value is None:
        return None
    value = value.strip()
    return value or None


def ingest(path: Path, profile, tmp_path: Path, **kwargs) -> tuple[IngestSummary, IncidentStore]:
    store = IncidentStore(tmp_path / "data")
    summary = ingest_file(path, profile, store, now=NOW, **kwargs)
    return summary, store


def stored(store: IncidentStore, source: str) -> pl.DataFrame:
    return store.read(source) if store.count(source) else pl.DataFrame(schema=CANONICAL_SCHEMA)


def assert_every_row_once(summary: IngestSummary, store: IncidentStore, source: str, n_rows: int) -> pl.DataFrame:
    """input = stored + quarantined, no row quarantined twice, and the summary agrees with what is on disk."""
    quarantine = store.read_quarantine(source)
    incidents = stored(store, source)
    assert summary.input_rows == n_rows
    assert summary.balanced
    assert summary.stored_new + summary.already_stored + summary.quarantined_total == n_rows
    assert incidents.height == summary.stored_new + summary.already_stored
    assert quarantine.height == summary.quarantined_total
    if quarantine.height:
        rows = quarantine["source_row"].to_list()
        assert len(rows) == len(set(rows)), "a row was quarantined twice"
        assert all(1 <= r <= n_rows for r in rows)
    assert incidents["incident_id"].n_unique() == incidents.height
    return quarantine


def assert_quarantine_matches_file(quarantine: pl.DataFrame, rows: list[dict[str, str]], profile) -> None:
    """Each quarantined row carries the raw values of the file row its source_row points at."""
    for q in quarantine.iter_rows(named=True):
        raw = rows[q["source_row"] - 1]
        assert q["raw_id"] == blank_to_none(raw.get(profile.columns.id)), q
        assert q["raw_time"] == blank_to_none(raw.get(profile.time.column)), q
        assert q["raw_category"] == blank_to_none(raw.get(profile.columns.category)), q
        assert q["raw_x"] == blank_to_none(raw.get(profile.coordinates.x)), q
        assert q["raw_y"] == blank_to_none(raw.get(profile.coordinates.y)), q


# --- every reason code ---------------------------------------------------------------------------------


def test_corpus_covers_every_reason():
    """all_reasons.csv covers every validation reason; the read-time ones have their own files (test_csv_input.py)."""
    assert set(ALL_REASONS_QUARANTINE.values()) == set(VALIDATION_REASONS)
    assert set(REASONS) == set(VALIDATION_REASONS) | set(READ_REASONS)


def test_all_reasons_file(testville, tmp_path):
    path = MALFORMED / "all_reasons.csv"
    rows = file_rows(path)
    assert len(rows) == 20
    summary, store = ingest(path, testville, tmp_path)
    quarantine = assert_every_row_once(summary, store, "testville", len(rows))

    expected_counts = {r: list(ALL_REASONS_QUARANTINE.values()).count(r) for r in VALIDATION_REASONS}
    assert summary.quarantined == expected_counts
    assert list(summary.quarantined) == list(VALIDATION_REASONS)  # reported in REASONS order
    assert summary.stored_new == 4 and summary.already_stored == 0

    assert dict(zip(quarantine["source_row"].to_list(), quarantine["reason"].to_list())) == ALL_REASONS_QUARANTINE
    assert set(quarantine["file"]) == {"all_reasons.csv"}
    assert_quarantine_matches_file(quarantine, rows, testville)
    # stored + quarantined rows partition the file
    assert set(ALL_REASONS_QUARANTINE) | set(ALL_REASONS_STORED) == set(range(1, 21))
    assert not set(ALL_REASONS_QUARANTINE) & set(ALL_REASONS_STORED)

    incidents = store.read("testville").sort("incident_id")
    assert incidents["incident_id"].to_list() == ["T-001", "T-002", "T-016", "T-018"]
    for row_no, incident_id in ALL_REASONS_STORED.items():
        raw = rows[row_no - 1]
        got = incidents.filter(pl.col("incident_id") == incident_id).row(0, named=True)
        assert got["latitude"] == float(raw["lat"]) and got["longitude"] == float(raw["lon"])
        local = datetime.fromisoformat(raw["occurred"]).replace(tzinfo=NY)
        assert got["occurred_at"] == local.astimezone(UTC)
        assert got["timezone"] == "America/New_York" and got["source"] == "testville"
    # the kept T-001 is the first in file order (row 1, theft at 10:00 local), not the repeat on row 15
    t001 = incidents.filter(pl.col("incident_id") == "T-001").row(0, named=True)
    assert t001["occurred_at"] == datetime(2021, 6, 1, 14, 0, tzinfo=UTC)
    # " burglary " matched case-insensitively after stripping
    assert incidents.filter(pl.col("incident_id") == "T-016")["category"].item() == "burglary"
    assert sorted(incidents["category"]) == ["assault", "assault", "burglary", "theft"]


def test_reason_for_each_row_is_consistent_with_its_raw_values(testville, tmp_path):
    """Spot checks that the quarantine row is the right file row, not just the right count."""
    summary, store = ingest(MALFORMED / "all_reasons.csv", testville, tmp_path)
    q = {r["source_row"]: r for r in store.read_quarantine("testville").iter_rows(named=True)}
    assert q[5]["raw_time"] == "yesterday afternoon"
    assert q[6]["raw_time"].startswith("2999-")
    assert q[7]["raw_time"] == "2014-12-31 23:59:00"  # 04:59Z on 2015-01-01, but local date is 2014-12-31
    assert q[9]["raw_y"] == "95.000000"
    assert (q[10]["raw_x"], q[10]["raw_y"]) == ("0", "0")
    assert q[13]["raw_category"] == "NON-CRIMINAL"
    assert q[14]["raw_category"] == "JAYWALKING"
    assert (q[15]["raw_id"], q[15]["raw_time"]) == ("T-001", "2021-06-03 08:00:00")
    assert q[17]["raw_id"] is None and q[17]["raw_time"] is None  # "  " is blank
    assert (q[18]["raw_id"], q[18]["raw_y"]) == ("T-018", None)


def test_only_canonical_columns_are_stored(testville, tmp_path):
    """Block and free-text Description (SECRET... markers) never reach the store, the quarantine or the report."""
    summary, store = ingest(MALFORMED / "all_reasons.csv", testville, tmp_path)
    assert "SECRET" in (MALFORMED / "all_reasons.csv").read_text()
    incidents = pl.read_parquet(store.partition_files("testville"))
    quarantine_files = list((store.data_dir / "quarantine" / "testville").glob("*.parquet"))
    assert len(quarantine_files) == 1
    quarantine = pl.read_parquet(quarantine_files[0])
    assert incidents.columns == list(CANONICAL_SCHEMA)
    assert quarantine.columns == [*QUARANTINE_SCHEMA, "file"]
    for frame in (incidents, quarantine):
        for column in frame.columns:
            values = frame[column].cast(pl.String).drop_nulls()
            assert not values.str.contains("SECRET").any(), column
            assert not values.str.contains("bike taken").any(), column
    report = Path(summary.report_path).read_text()
    assert "SECRET" not in report
    assert json.loads(report)["input_rows"] == 20


# --- encodings, empty files, gzip, BOM -------------------------------------------------------------------


def test_latin1_without_encoding_names_latin1(testville, tmp_path):
    with pytest.raises(IngestError) as info:
        ingest(MALFORMED / "latin1.csv", testville, tmp_path)
    message = str(info.value)
    assert "latin1.csv" in message and "not valid UTF-8" in message
    assert "latin-1" in message and "--encoding latin-1" in message
    assert "line 2" in message  # the first non-ASCII byte is on the first data line
    assert not (tmp_path / "data" / "incidents").exists()


@pytest.mark.parametrize("how", ["argument", "profile"])
def test_latin1_with_encoding(testville, tmp_path, how):
    path = MALFORMED / "latin1.csv"
    if how == "argument":
        summary, store = ingest(path, testville, tmp_path, encoding="latin-1")
    else:
        summary, store = ingest(path, testville.model_copy(update={"encoding": "latin-1"}), tmp_path)
    rows = file_rows(path, encoding="latin-1")
    quarantine = assert_every_row_once(summary, store, "testville", 3)
    assert summary.quarantined == {"unknown_category": 1}
    assert_quarantine_matches_file(quarantine, rows, testville)
    assert quarantine.row(0, named=True)["raw_category"] == "Fraude élevée"
    assert quarantine["source_row"].to_list() == [2]
    incidents = store.read("testville").sort("incident_id")
    # "Vol à l'étalage" only maps to theft if the bytes were decoded as latin-1
    assert incidents.select("incident_id", "category").rows() == [("L-001", "theft"), ("L-003", "theft")]


@pytest.mark.parametrize("name", ["empty.csv", "whitespace_only.csv"])
def test_empty_file(testville, tmp_path, name):
    with pytest.raises(IngestError, match=r"is empty") as info:
        ingest(MALFORMED / name, testville, tmp_path)
    assert name in str(info.value) and "header row" in str(info.value)
    assert not (tmp_path / "data").exists() or not any((tmp_path / "data").rglob("*.parquet"))


def test_header_only(testville, tmp_path):
    summary, store = ingest(MALFORMED / "header_only.csv", testville, tmp_path)
    assert (summary.input_rows, summary.stored_new, summary.already_stored, summary.quarantined) == (0, 0, 0, {})
    assert summary.balanced
    assert store.count("testville") == 0
    assert not store.path("testville").exists()
    assert store.read_quarantine("testville").height == 0


def test_missing_columns_names_columns_and_profile(testville, tmp_path):
    with pytest.raises(IngestError) as info:
        ingest(MALFORMED / "missing_columns.csv", testville, tmp_path)
    message = str(info.value)
    assert "missing_columns.csv" in message
    assert "lacks required column(s) 'occurred', 'lat'" in message
    assert "'testville'" in message
    assert str(TESTVILLE) in message
    # the columns the file does have are listed so the user can fix the profile
    assert "occurred_at" in message and "latitude" in message
    # an unrelated present column is not reported missing
    assert "'lon'" not in message and "'incident_no'" not in message


def test_missing_columns_parquet(testville, tmp_path):
    path = tmp_path / "export.parquet"
    pl.DataFrame({"incident_no": ["X-1"], "when": ["2021-06-01 10:00:00"], "offence": ["THEFT"],
                  "lat": [40.75]}).write_parquet(path)
    with pytest.raises(IngestError) as info:
        ingest(path, testville, tmp_path)
    assert "'occurred', 'lon'" in str(info.value) and str(TESTVILLE) in str(info.value)


@pytest.mark.parametrize("name", ["truncated.csv.gz", "not_gzip.csv.gz", "corrupt_deflate.csv.gz"])
def test_corrupt_gzip_raises_ingest_error(testville, tmp_path, name):
    with pytest.raises(Exception) as info:
        ingest(MALFORMED / name, testville, tmp_path)
    exc = info.value
    # BUG (corrupt_deflate.csv.gz): features/ingest.py _read_csv catches only (OSError, EOFError) around
    # gzip.decompress; a damaged deflate body raises zlib.error, which escapes as a raw traceback
    # (and `hotspots ingest` exits 1 with a traceback instead of "error: ..." and exit 2).
    assert isinstance(exc, IngestError), f"{name}: expected IngestError, got {type(exc).__module__}.{type(exc).__name__}: {exc}"
    assert name in str(exc) and "gzip" in str(exc)


def test_valid_gzip_reads_like_plain_csv(testville, tmp_path):
    plain = MALFORMED / "dst.csv"
    packed = tmp_path / "dst.csv.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    s1, store1 = ingest(plain, testville, tmp_path / "a")
    s2, store2 = ingest(packed, testville, tmp_path / "b")
    assert (s2.input_rows, s2.stored_new) == (s1.input_rows, s1.stored_new) == (6, 6)
    assert store1.read("testville").equals(store2.read("testville"))


def test_utf8_bom(testville, tmp_path):
    path = MALFORMED / "bom.csv"
    assert path.read_bytes().startswith(b"\xef\xbb\xbfincident_no,")
    summary, store = ingest(path, testville, tmp_path)
    assert_every_row_once(summary, store, "testville", 2)
    assert summary.quarantined == {}
    incidents = store.read("testville").sort("incident_id")
    assert incidents["incident_id"].to_list() == ["B-001", "B-002"]  # no \ufeff glued to the first column
    # CRLF line ends: the last column is a clean number, not "-73.99\r"
    assert incidents["longitude"].to_list() == [-73.99, -73.98]


def test_row_with_too_few_fields(testville, tmp_path):
    path = MALFORMED / "short_row.csv"
    summary, store = ingest(path, testville, tmp_path)
    quarantine = assert_every_row_once(summary, store, "testville", 3)
    assert summary.quarantined == {"missing_coordinates": 1}
    assert quarantine.select("source_row", "raw_id", "raw_category", "raw_x", "raw_y").rows() == [
        (2, "S-002", "ASSAULT", None, None)
    ]
    incidents = store.read("testville").sort("incident_id")
    # the rows after the short one are not shifted
    assert incidents.select("incident_id", "category", "latitude", "longitude").rows() == [
        ("S-001", "theft", 40.75, -73.99),
        ("S-003", "burglary", 40.76, -73.98),
    ]


def test_non_numeric_coordinate_is_invalid_not_missing(testville, tmp_path):
    path = MALFORMED / "coordinate_text.csv"
    summary, store = ingest(path, testville, tmp_path)
    quarantine = assert_every_row_once(summary, store, "testville", 2)
    assert store.read("testville")["incident_id"].to_list() == ["C-001"]
    assert quarantine.select("source_row", "raw_y").rows() == [(2, "abc")]
    # BUG: features/validation.py _coordinates casts with strict=False, so lat "abc" becomes null and the row is
    # labelled missing_coordinates (as if never geocoded), unlike times, where unparseable text gets its own reason.
    assert summary.quarantined == {"invalid_coordinates": 1}, (
        f"lat='abc' should be invalid_coordinates (the value is present but not a number); got {summary.quarantined}"
    )


# --- local time and DST ---------------------------------------------------------------------------------


def test_dst_gap_and_ambiguous_hour(testville, tmp_path):
    summary, store = ingest(MALFORMED / "dst.csv", testville, tmp_path)
    assert_every_row_once(summary, store, "testville", 6)
    assert summary.quarantined == {}
    got = dict(store.read("testville").select("incident_id", "occurred_at").rows())

    def local(*args, fold=0):
        return datetime(*args, tzinfo=NY, fold=fold).astimezone(UTC)

    assert got["D-001"] == local(2021, 3, 14, 1, 30)  # EST, 06:30Z
    # 02:30 does not exist on 14 March 2021 in New York: moved forward an hour, to the 03:30 EDT instant
    assert got["D-002"] == local(2021, 3, 14, 3, 30) == datetime(2021, 3, 14, 7, 30, tzinfo=UTC)
    assert got["D-003"] == got["D-002"]
    # 01:30 on 7 November 2021 happens twice: the first (EDT) occurrence is taken
    assert got["D-004"] == local(2021, 11, 7, 1, 30, fold=0) == datetime(2021, 11, 7, 5, 30, tzinfo=UTC)
    assert got["D-004"] != local(2021, 11, 7, 1, 30, fold=1)
    assert got["D-005"] == datetime(2021, 11, 7, 4, 30, tzinfo=UTC)  # 00:30 EDT
    assert got["D-006"] == datetime(2021, 11, 7, 7, 30, tzinfo=UTC)  # 02:30 EST


# --- projected coordinates ------------------------------------------------------------------------------


def test_projected_profile_converts_to_wgs84(testville_projected, tmp_path):
    path = MALFORMED / "projected.csv"
    summary, store = ingest(path, testville_projected, tmp_path)
    quarantine = assert_every_row_once(summary, store, "testville-projected", 5)
    assert summary.quarantined == {"missing_coordinates": 1, "sentinel_point": 1, "out_of_area": 1}
    assert dict(quarantine.select("source_row", "reason").rows()) == {
        3: "sentinel_point",  # City Hall, 40.7128 -74.0060, given in feet
        4: "out_of_area",  # Albany
        5: "missing_coordinates",
    }
    assert_quarantine_matches_file(quarantine, file_rows(path), testville_projected)
    incidents = store.read("testville-projected").sort("incident_id")
    assert incidents.columns == list(CANONICAL_SCHEMA)
    expected = {"P-001": (40.748440, -73.985664), "P-002": (40.703300, -74.017000)}
    assert incidents["incident_id"].to_list() == list(expected)
    for incident_id, lat, lon in incidents.select("incident_id", "latitude", "longitude").rows():
        assert abs(lat - expected[incident_id][0]) < 1e-5, (incident_id, lat)
        assert abs(lon - expected[incident_id][1]) < 1e-5, (incident_id, lon)


# --- real data: the Chicago portal ----------------------------------------------------------------------


@pytest.mark.shared_data
def test_chicago_raw_csv_slice(chicago_raw_csv, tmp_path):
    raw = pl.read_csv(chicago_raw_csv, infer_schema=False)
    no_coords = pl.col("Latitude").is_null() | pl.col("Longitude").is_null()
    part = pl.concat([raw.head(3000), raw.slice(3000).filter(no_coords)])
    path = tmp_path / "chicago_slice.csv"
    part.write_csv(path)
    profile = load_profile("chicago")
    summary, store = ingest(path, profile, tmp_path)
    quarantine = assert_every_row_once(summary, store, "chicago", part.height)

    # the expected outcome, computed directly from the raw slice
    n_missing = part.filter(no_coords).height
    assert n_missing > 1000  # the 2018 export has ~1,179 rows without coordinates
    with_coords = part.filter(~no_coords)
    excluded = with_coords.filter(pl.col("Primary Type").is_in(profile.categories.exclude))
    kept = with_coords.filter(~pl.col("Primary Type").is_in(profile.categories.exclude))
    n_dupes = kept.height - kept["Case Number"].n_unique()
    expected = {"missing_coordinates": n_missing, "excluded_category": excluded.height, "duplicate_id": n_dupes}
    assert summary.quarantined == {k: v for k, v in expected.items() if v}
    assert summary.stored_new == kept["Case Number"].n_unique()

    # quarantined rows point at the right rows of the slice
    indexed = part.with_row_index("source_row", offset=1)
    missing_rows = set(indexed.filter(no_coords)["source_row"].to_list())
    assert set(quarantine.filter(pl.col("reason") == "missing_coordinates")["source_row"].to_list()) == missing_rows
    joined = quarantine.join(indexed.select("source_row", "Case Number"), on="source_row")
    assert (joined["raw_id"] == joined["Case Number"]).all()

    incidents = store.read("chicago")
    assert incidents.columns == list(CANONICAL_SCHEMA)
    x0, y0, x1, y1 = profile.area.bbox
    assert incidents["latitude"].is_between(y0, y1).all() and incidents["longitude"].is_between(x0, x1).all()
    local_years = incidents["occurred_at"].dt.convert_time_zone("America/Chicago").dt.year().unique().to_list()
    assert local_years == [2018]


@pytest.mark.shared_data
def test_chicago_projected_xy_matches_portal_latlon(chicago_raw_csv, tmp_path):
    """The portal's X/Y Coordinate (Illinois East, EPSG:3435 US feet) through pyproj gives the portal's lat/lon."""
    part = pl.read_csv(chicago_raw_csv, infer_schema=False, n_rows=2000)
    path = tmp_path / "chicago_xy.csv"
    part.write_csv(path)
    geographic = load_profile("chicago")
    projected = geographic.model_copy(
        update={"coordinates": CoordinatesSpec(x="X Coordinate", y="Y Coordinate", crs="EPSG:3435")}
    )
    _, s1 = ingest(path, geographic, tmp_path / "a")
    _, s2 = ingest(path, projected, tmp_path / "b")
    a, b = s1.read("chicago"), s2.read("chicago")
    both = a.join(b, on="incident_id", suffix="_xy")
    assert both.height == a.height == b.height > 1900
    assert (both["latitude"] - both["latitude_xy"]).abs().max() < 1e-6
    assert (both["longitude"] - both["longitude_xy"]).abs().max() < 1e-6


@pytest.mark.shared_data
def test_chicago_parquet_slice_with_sentinels(chicago_parquet, tmp_path):
    scan = pl.scan_parquet(chicago_parquet)
    sentinel_rows = pl.col("Latitude") < 40
    part = pl.concat([scan.head(50_000).collect(), scan.slice(50_000).filter(sentinel_rows).collect()])
    path = tmp_path / "chicago_slice.parquet"
    part.write_parquet(path)
    profile = load_profile("chicago")
    summary, store = ingest(path, profile, tmp_path)
    quarantine = assert_every_row_once(summary, store, "chicago", part.height)

    n_sentinel = part.filter(sentinel_rows).height
    assert n_sentinel == 161  # all of the dataset's geocoder-default rows (Missouri)
    assert summary.quarantined["sentinel_point"] == 161
    assert summary.quarantined["missing_coordinates"] == part["Latitude"].is_null().sum()
    assert set(summary.quarantined) <= {"missing_coordinates", "sentinel_point", "duplicate_id", "excluded_category"}
    assert summary.quarantined.get("duplicate_id", 0) < 10

    indexed = part.with_row_index("source_row", offset=1)
    sentinel_source_rows = set(indexed.filter(sentinel_rows)["source_row"].to_list())
    q_sentinel = quarantine.filter(pl.col("reason") == "sentinel_point")
    assert set(q_sentinel["source_row"].to_list()) == sentinel_source_rows
    assert q_sentinel["raw_y"].str.starts_with("36.619").all()
    dupes = quarantine.filter(pl.col("reason") == "duplicate_id")["raw_id"]
    assert dupes.is_in(store.read("chicago")["incident_id"].implode()).all()  # the first copy was kept

    incidents = store.read("chicago")
    assert incidents.columns == list(CANONICAL_SCHEMA)
    assert incidents["latitude"].min() > 41.6
