"""Issue 10: any city's open data. A corpus of city-shaped exports made from real Toronto rows (tests/city_corpus.py):
each shape's expected ingest summary, and `hotspots profile init` guessing each shape's time and coordinate columns."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import city_corpus as cc
import polars as pl
import pytest
from typer.testing import CliRunner

from features.pipeline import ingest_file
from features.profile import ProfileError, load_profile
from features.profile_assistant import check_profile, draft_profile
from features.store import IncidentStore
from serving.cli import app

REPO = Path(__file__).resolve().parents[1]
NOW = datetime(2024, 1, 1, tzinfo=UTC)


@pytest.fixture(scope="module")
def rows(toronto_incidents):
    return cc.base_rows(toronto_incidents)


def write(tmp_path: Path, text: str, name: str = "city.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def ingest(path: Path, profile, tmp_path: Path):
    store = IncidentStore(tmp_path / "data")
    summary = ingest_file(path, profile, store, now=NOW)
    assert summary.balanced
    return summary, store


# --- the corpus: shape -> expected summary ----------------------------------------------------------------

SPLIT = """name = "splitcity"
timezone = "America/Toronto"
[columns]
category = "TYPE"
[time]
kind = "parts"
[time.parts]
year = "YEAR"
month = "MONTH"
day = "DAY"
hour = "HOUR"
minute = "MINUTE"
[coordinates]
x = "X"
y = "Y"
crs = "EPSG:32617"
[categories]
default = "other"
[categories.map]
ASSAULT = "assault"
"""


def test_split_date_columns_and_utm_zero_placeholders(rows, tmp_path):
    path = tmp_path / "split.csv"
    expected = cc.split_utm(rows, path)
    summary, store = ingest(path, load_profile(write(tmp_path, SPLIT)), tmp_path)
    assert (summary.input_rows, summary.stored_new) == (2000, 2000 - 120)
    assert summary.quarantined == {"missing_coordinates": expected["missing_coordinates"]}
    stored = store.read("splitcity")
    # the instants survive the split into local parts, and the points the projection
    kept = rows[120:]
    assert stored["occurred_at"].sort().equals(kept["occurred_at"].sort())
    assert (stored["latitude"].sort() - kept["latitude"].sort()).abs().max() < 1e-6
    assert set(stored["category"]) == {"assault", "other"}
    # the derived area stays Toronto's size: no equator
    assert stored["latitude"].min() > 43.5 and summary.notes == []


FEET = """name = "feetcity"
timezone = "America/New_York"
[columns]
id = "CMPLNT_NUM"
category = "OFNS_DESC"
[time]
kind = "date_time"
column = "CMPLNT_FR_DT"
time_column = "CMPLNT_FR_TM"
formats = ["%m/%d/%Y"]
[coordinates]
x = "X_COORD_CD"
y = "Y_COORD_CD"
crs = "EPSG:2263"
[categories]
[[categories.rules]]
glob = "*THEFT*"
category = "theft"
[[categories.rules]]
regex = "^(ASSAULT|ROBBERY)$"
category = "violence"
[[categories.rules]]
prefix = "break"
category = "burglary"
"""


def test_date_and_time_columns_in_state_plane_feet(rows, tmp_path):
    path = tmp_path / "feet.csv"
    expected = cc.feet_date_time(rows, path)
    summary, store = ingest(path, load_profile(write(tmp_path, FEET)), tmp_path)
    assert summary.quarantined == {"missing_coordinates": expected["missing_coordinates"]}
    assert summary.stored_new == 2000 - 80 and summary.unmapped == {}
    stored = store.read("feetcity").sort("incident_id")
    assert stored["occurred_at"].equals(rows["occurred_at"][:-80], check_names=False) or \
        stored["occurred_at"].sort().equals(rows["occurred_at"][:-80].sort())
    assert stored["latitude"].is_between(40.5, 41.0).all() and stored["longitude"].is_between(-74.2, -73.6).all()
    assert set(stored["category"]) == {"theft", "violence", "burglary"}  # rules, case-insensitive prefix


REVERSAL = """name = "codecity"
timezone = "America/Chicago"
[columns]
id = "RD"
category = "IUCR"
[time]
column = "OCCURRED"
formats = ["%Y-%m-%d %H:%M:%S"]
[coordinates]
x = "X_COORDINATE"
y = "Y_COORDINATE"
crs = "EPSG:3435"
[[rows]]
name = "reversal"
column = "COUNT"
op = "<"
value = 0
[categories]
[[categories.rules]]
prefix = "04"
category = "assault"
[[categories.rules]]
regex = "^0[3689]"
category = "property"
"""


def test_reversal_rows_and_unmapped_codes(rows, tmp_path):
    path = tmp_path / "codes.csv"
    expected = cc.reversal_codes(rows, path)
    summary, store = ingest(path, load_profile(write(tmp_path, REVERSAL)), tmp_path)
    assert summary.input_rows == expected["rows"]
    assert summary.quarantined == {"excluded_row:reversal": 117, "unknown_category": 40}
    assert summary.unmapped == {"9999": 40}
    assert summary.stored_new == 2000 - 40
    assert any("'9999': 40" in line for line in summary.lines())
    quarantine = store.read_quarantine("codecity")
    assert quarantine.filter(pl.col("reason") == "excluded_row:reversal")["raw_id"].str.ends_with("R").all()
    # with a default bucket nothing is unknown, and the summary still names what went there
    with_default = load_profile(write(tmp_path, REVERSAL.replace("[categories]", '[categories]\ndefault = "other"'), "d.toml"))
    summary = ingest_file(path, with_default, IncidentStore(tmp_path / "other"), now=NOW)
    assert summary.quarantined == {"excluded_row:reversal": 117} and summary.unmapped == {"9999": 40}


ISO = """name = "isocity"
timezone = "America/Toronto"
[columns]
id = "EVENT_ID"
category = "OFFENCE"
[time]
column = "OCC_TS"
formats = ["iso8601"]
[coordinates]
x = "LONGITUDE"
y = "LATITUDE"
[categories]
default = "other"
"""


def test_iso8601_with_offsets_z_and_fractions(rows, tmp_path):
    path = tmp_path / "iso.csv"
    cc.iso_offsets(rows, path)
    summary, store = ingest(path, load_profile(write(tmp_path, ISO)), tmp_path)
    assert summary.stored_new == 2000 and summary.quarantined == {}
    stored = store.read("isocity").with_columns(pl.col("incident_id").str.slice(2).cast(pl.Int64).alias("i")).sort("i")
    shift = (stored["occurred_at"] - rows["occurred_at"]).dt.total_milliseconds()
    third = 2000 // 3
    assert (shift[: 2 * third] == 0).all() and (shift[2 * third:] == 250).all()  # the fraction is kept


def test_epoch_milliseconds(rows, tmp_path):
    path = tmp_path / "epoch.csv"
    cc.epoch_ms(rows, path)
    profile = load_profile(write(tmp_path, ISO.replace('column = "OCC_TS"\nformats = ["iso8601"]',
                                                       'kind = "epoch"\ncolumn = "event_time"\nepoch_unit = "ms"')
                                 .replace("EVENT_ID", "case_id").replace("OFFENCE", "crime_type")
                                 .replace("LONGITUDE", "lng").replace("LATITUDE", "lat")))
    summary, store = ingest(path, profile, tmp_path)
    assert summary.stored_new == 2000
    assert store.read("isocity")["occurred_at"].sort().equals(rows["occurred_at"].sort())


def test_unknown_crs_is_refused_when_the_profile_loads_with_the_esri_hint(tmp_path):
    path = write(tmp_path, FEET.replace("EPSG:2263", "EPSG:102696"))
    with pytest.raises(ProfileError) as info:
        load_profile(path)
    message = str(info.value)
    assert "field coordinates.crs" in message and "'ESRI:102696' exists" in message and "\n" not in message
    with pytest.raises(ProfileError, match="pyproj does not know CRS 'EPSG:999999'"):
        load_profile(write(tmp_path, FEET.replace("EPSG:2263", "EPSG:999999"), "b.toml"))


def test_profile_errors_are_one_line_per_field(tmp_path):
    bad = SPLIT.replace('kind = "parts"', 'column = ["YEAR", "MONTH", "DAY"]')
    with pytest.raises(ProfileError) as info:
        load_profile(write(tmp_path, bad))
    assert "field time.column" in str(info.value) and "kind = 'parts'" in str(info.value)
    assert "type=" not in str(info.value) and "pydantic" not in str(info.value)
    with pytest.raises(ProfileError, match=r"field rows.0: .*op '<' compares numbers"):
        load_profile(write(tmp_path, REVERSAL.replace("value = 0", 'value = "x"'), "c.toml"))
    with pytest.raises(ProfileError, match=r"field categories.rules.0: .*regex '\(' is not valid"):
        load_profile(write(tmp_path, ISO.replace('default = "other"',
                                                 'default = "o"\n[[categories.rules]]\nregex = "("\ncategory = "x"'), "e.toml"))
    with pytest.raises(ProfileError, match=r"field area.bbx: not a profile field"):
        load_profile(write(tmp_path, ISO + "[area]\nbbx = [1, 2, 3, 4]\n", "f.toml"))


def test_far_points_are_out_of_area_and_a_huge_area_warns(rows, tmp_path):
    path = tmp_path / "iso.csv"
    cc.iso_offsets(rows, path)
    frame = pl.read_csv(path, infer_schema=False)
    far = frame.head(25).with_columns(LATITUDE=pl.lit("0.5"), LONGITUDE=pl.lit("-79.4"),
                                      EVENT_ID=pl.col("EVENT_ID") + "far")  # on the equator: a bad projection
    pl.concat([frame, far]).write_csv(path)
    summary, store = ingest(path, load_profile(write(tmp_path, ISO)), tmp_path)
    assert summary.quarantined == {"out_of_area": 25} and summary.stored_new == 2000
    assert any("25 point(s) lie more than" in n and "out_of_area" in n for n in summary.notes)
    off = load_profile(write(tmp_path, ISO + '[area]\noutliers = "off"\n', "off.toml"))
    summary = ingest_file(path, off, IncidentStore(tmp_path / "off"), now=NOW)
    assert summary.stored_new == 2025 and any("implausibly large for a city" in n for n in summary.notes)


# --- profile init guesses each shape -----------------------------------------------------------------------

SHAPES = [
    (cc.split_utm, "America/Toronto", "parts", {"year": "YEAR", "month": "MONTH", "day": "DAY", "hour": "HOUR",
                                                "minute": "MINUTE"}, ("X", "Y", "EPSG:32617")),
    (cc.feet_date_time, "America/New_York", "date_time", {"column": "CMPLNT_FR_DT", "time_column": "CMPLNT_FR_TM"},
     ("X_COORD_CD", "Y_COORD_CD", "EPSG:2263")),
    (cc.reversal_codes, "America/Chicago", "datetime", {"column": "OCCURRED"}, ("X_COORDINATE", "Y_COORDINATE", "EPSG:3435")),
    (cc.iso_offsets, None, "datetime", {"column": "OCC_TS"}, ("LONGITUDE", "LATITUDE", "EPSG:4326")),
    (cc.epoch_ms, None, "epoch", {"column": "event_time"}, ("lng", "lat", "EPSG:4326")),
]


@pytest.mark.parametrize("make, zone, kind, columns, coords", SHAPES, ids=[s[0].__name__ for s in SHAPES])
def test_profile_init_guesses_each_shape(rows, tmp_path, make, zone, kind, columns, coords):
    path = tmp_path / f"{make.__name__}.csv"
    make(rows, path)
    draft = draft_profile(path, timezone=zone)
    assert (draft.time.kind, draft.time.columns) == (kind, columns)
    assert (draft.coordinates.x, draft.coordinates.y, draft.coordinates.crs) == coords
    # the draft loads, and ingests the file: every row with a location is stored
    profile = load_profile(write(tmp_path, draft.text))
    summary = ingest_file(path, profile, IncidentStore(tmp_path / "data"), now=NOW)
    assert summary.balanced and summary.stored_new >= 2000 - 120
    assert set(summary.quarantined) <= {"missing_coordinates", "excluded_row:reversal"}
    if zone is None:
        assert draft.timezone == "America/Toronto"  # from the points' location
    if make is cc.reversal_codes:
        assert draft.reversal_column == "COUNT" and summary.quarantined["excluded_row:reversal"] == 117


# --- the CLI: init, check, run on a profile file, nothing stored ---------------------------------------------


def test_cli_profile_init_and_check(rows, tmp_path):
    runner = CliRunner()
    path = tmp_path / "split.csv"
    cc.split_utm(rows, path)
    out = tmp_path / "draft.toml"
    result = runner.invoke(app, ["profile", "init", str(path), "--timezone", "America/Toronto", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "draft written to" in result.output and load_profile(out).coordinates.crs == "EPSG:32617"
    png = tmp_path / "check.png"
    result = runner.invoke(app, ["profile", "check", str(out), str(path), "--png", str(png),
                                 "--data-dir", str(tmp_path / "data")])
    assert result.exit_code == 0, result.output
    assert re.search(r"missing_coordinates\s+120", result.output) and "row 1: " in result.output
    assert re.search(r"time range \(local\) 2019-\d\d-\d\d \S+ to 2020-12-\d\d", result.output)
    assert "at exactly midnight" in result.output
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert not (tmp_path / "data" / "incidents").exists()  # a dry run stores nothing
    report = check_profile(load_profile(out), path)
    assert report.accepted == 1880 and 0 < report.midnight_share < 0.2 and report.cells.size > 100


def test_cli_ingest_of_a_profile_file_remembers_it_and_panel_finds_it(rows, tmp_path):
    runner = CliRunner()
    path = tmp_path / "iso.csv"
    cc.iso_offsets(rows, path)
    profile = write(tmp_path, ISO)
    data = str(tmp_path / "data")
    result = runner.invoke(app, ["ingest", str(profile), str(path), "--data-dir", data])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "data" / "profiles" / "isocity.toml").is_file()
    profile.unlink()  # later commands need only the source name
    result = runner.invoke(app, ["panel", "isocity", "--data-dir", data, "--resolution", "8"])
    assert result.exit_code == 0, result.output
    assert "panel saved to" in result.output
    result = runner.invoke(app, ["panel", "nocity", "--data-dir", data])
    assert result.exit_code == 2 and "remembered sources: isocity" in result.output


def test_cli_nothing_stored_exits_non_zero_with_a_hint(rows, tmp_path):
    runner = CliRunner()
    path = tmp_path / "iso.csv"
    cc.iso_offsets(rows, path)
    wrong = write(tmp_path, ISO.replace('formats = ["iso8601"]', 'formats = ["%Y-%m-%d %H:%M:%S"]'))
    result = runner.invoke(app, ["ingest", str(wrong), str(path), "--data-dir", str(tmp_path / "data")])
    assert result.exit_code == 2
    assert "nothing stored from iso.csv: 2,000 of 2,000 rows are unparseable_time; fix time.formats" in result.output
    assert "these parse with formats = ['%Y-%m-%dT%H:%M:%S%.f%#z']" in result.output
    assert len(IncidentStore(tmp_path / "data").read_quarantine("isocity")) == 2000  # nothing is lost
    header_only = tmp_path / "empty.csv"
    header_only.write_text(path.read_text().splitlines()[0] + "\n")
    result = runner.invoke(app, ["ingest", str(wrong), str(header_only), "--data-dir", str(tmp_path / "data")])
    assert result.exit_code == 2 and "empty.csv has a header but no rows" in result.output


# --- the README's walkthrough, end to end: hotspots run PROFILE FILE --quick --no-serve -----------------------


WALKTHROUGH = REPO / "experiments" / "walkthroughs" / "new_city.sh"


def walkthrough_commands() -> list[str]:
    script = WALKTHROUGH.read_text()
    block = script.split("# --- walkthrough (shown in the README) ---\n")[1].split("# --- end ---")[0]
    return [line for line in block.splitlines() if line.strip()]


def test_readme_shows_the_walkthrough_script():
    readme = (REPO / "README.md").read_text()
    block = readme.split("<!-- walkthrough: experiments/walkthroughs/new_city.sh -->\n```bash\n")[1].split("```")[0]
    shown = [line for line in block.splitlines() if line.strip() and not line.startswith("#")]
    assert shown[: len(walkthrough_commands())] == [
        c.replace('"$EXPORT"', "mycity-export.csv").replace('"$ZONE"', "America/Toronto") for c in walkthrough_commands()]


# A shell function named `hotspots`, exported to the script's bash: it records each call's arguments exactly as the
# script passes them (after its variables and quoting are expanded), NUL-separated, one file per call.
RECORDER = 'hotspots() { HOTSPOTS_CALL=$((${HOTSPOTS_CALL:-0} + 1)); printf "%s\\0" "$@" > "$HOTSPOTS_CALLS/$HOTSPOTS_CALL"; }'


def test_new_city_walkthrough_runs_end_to_end(toronto_incidents, tmp_path, monkeypatch):
    """A small generated city (two years of downtown Toronto in the ISO-offset shape) through the script:
    profile init -> profile check -> hotspots run mycity.toml EXPORT --quick --no-serve.

    bash runs the script as a user would; its three `hotspots` calls are recorded with their arguments, the first
    is run through the installed `hotspots` script, the other two in this test process through the CLI's app (the
    script's entry point). Three product processes cost 27 CPU-s, 70% of it interpreter start, imports and MLflow's
    schema migrations; the commands' own work is what this test is about."""
    box = toronto_incidents.filter(pl.col("latitude").is_between(43.64, 43.68) & pl.col("longitude").is_between(-79.42, -79.37)
                                   & pl.col("occurred_at").dt.year().is_between(2019, 2020)).sort("occurred_at")
    export = tmp_path / "mycity-export.csv"
    cc.iso_offsets(box, export)
    venv_bin = Path(sys.executable).parent
    assert shutil.which("hotspots", path=f"{venv_bin}:/usr/bin:/bin")
    calls = tmp_path / "calls"
    calls.mkdir()
    recorded = subprocess.run(["bash", "-c", f'{RECORDER}; export -f hotspots; exec bash "$0" "$@"', str(WALKTHROUGH),
                               export.name, "America/Toronto"], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                              env={"PATH": "/usr/bin:/bin", "HOTSPOTS_CALLS": str(calls), "HOME": str(tmp_path)})
    assert recorded.returncode == 0, recorded.stderr
    argv = [(calls / str(i)).read_bytes().decode().split("\0")[:-1] for i in range(1, len(list(calls.iterdir())) + 1)]
    assert [" ".join(["hotspots", *a]) for a in argv] == [
        c.replace('"$EXPORT"', export.name).replace('"$ZONE"', "America/Toronto") for c in walkthrough_commands()]

    # the first call (profile init, the lightest) through the installed console script, as a process of its own
    first = subprocess.run([str(venv_bin / "hotspots"), *argv[0]], cwd=tmp_path, capture_output=True, text=True,
                           timeout=120, env={"PATH": f"{venv_bin}:/usr/bin:/bin", "HOME": str(tmp_path),
                                             "HOTSPOTS_DATA_DIR": str(tmp_path / "data"), "PYTHONPATH": str(REPO)})
    assert first.returncode == 0 and "draft written to mycity.toml" in first.stdout, first.stdout + first.stderr

    from service_support import isolated_mlflow_env  # MLflow's process-wide URIs are restored afterwards

    monkeypatch.chdir(tmp_path)
    with isolated_mlflow_env() as env:
        env.setenv("HOTSPOTS_DATA_DIR", str(tmp_path / "data"))
        env.setenv("HOTSPOTS_H3_RESOLUTION", "8")
        outputs = []
        for args in argv[1:]:
            result = CliRunner().invoke(app, args)
            assert result.exit_code == 0, f"hotspots {' '.join(args)}\n{result.output[-3000:]}"
            outputs.append(result.output)
    assert (tmp_path / "mycity.toml").is_file() and (tmp_path / "mycity-check.png").is_file()
    assert (tmp_path / "data" / "profiles" / "mycity.toml").is_file()
    assert "model version" in outputs[-1] and "report:" in outputs[-1]
    assert list((tmp_path / "data" / "backtests").glob("mycity-r8-*/predictions.npz"))
