"""Live operation replayed on a real Toronto stream: central Toronto's Major Crime Indicators (from the PyPI
wheel) for January-February 2019 are the history, then each day of early March 2019 arrives as one drop file.
After each ``update`` the running service (refresh every 0.25 s, its clock set to 05:00 the next morning) serves
the real next shift, the 06:00 one; the appended panel equals a full rebuild on the same cells; a revised row
moves its count; a file cut mid-row and a file of another format are handled without losing anything."""

from __future__ import annotations

import time
from datetime import datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from zoneinfo import ZoneInfo

import mlflow
import polars as pl
import pytest
from service_support import PASS, get, isolated_mlflow_env
from typer.testing import CliRunner

from features.panel import CountPanel
from features.paths import DataPaths
from features.pipeline import build_city_panel, ingest_file
from features.profile import builtin_profiles, load_profile
from features.settings import Settings
from features.store import IncidentStore
from features.update import MARKER, changed_times, extend_panel, update_from_drop_folder, update_from_fetch
from forecasting import registry
from forecasting.reporting.tracking import apply_promotion, configure, log_model
from serving.keys import Role

CITY = "toronto-live"
ZONE = ZoneInfo("America/Toronto")
DAYS = ["2019/03/01", "2019/03/02", "2019/03/03", "2019/03/04"]
REVISED = 1  # the day whose file revises a row of the first day


def live_profile(folder: Path):
    """toronto-mci with an incident id column (the MCI release has none), so a re-delivered row is a revision."""
    text = builtin_profiles()["toronto-mci"].read_text().replace('name = "toronto-mci"', f'name = "{CITY}"')
    text = text.replace("[columns]\n", '[columns]\nid = "event_id"\n')
    path = folder / f"{CITY}.toml"
    path.write_text(text)
    return load_profile(path)


def write_csv(frame: pl.DataFrame, path: Path) -> Path:
    frame.drop("day", "n").write_csv(path)
    return path


def morning_after(day: str) -> datetime:
    """05:00 local the day after ``day``: an hour before the day shift a planner prepares for."""
    d = datetime.strptime(day, "%Y/%m/%d").replace(tzinfo=ZONE) + timedelta(days=1)
    return d.replace(hour=5)


def register_champion(settings: Settings, panel: CountPanel) -> str:
    """A count-map champion (all-history): cheap to fit, served by the same code as any model."""
    configure(settings)
    model = registry.make("all_history").fit(panel, panel.end_shift)
    with mlflow.start_run(run_name="live-test"):
        version = str(log_model(model, model.model_inputs(panel, panel.end_shift - 1).head(50), CITY)
                      .registered_model_version)
    apply_promotion(CITY, version, PASS)
    return version


def served_next(svc, expected_start: datetime, timeout: float = 60.0) -> dict:
    """Poll /v1/hotspots?shift=next until the service (refreshing in the background) serves ``expected_start``."""
    deadline = time.monotonic() + timeout
    while True:
        body = get(svc, "/v1/hotspots", city=CITY, shift="next", k=3).json()
        if datetime.fromisoformat(body["shift"]["start"]) == expected_start or time.monotonic() > deadline:
            return body
        time.sleep(0.3)


@pytest.fixture(scope="module")
def replay(toronto_store, tmp_path_factory):
    from fastapi.testclient import TestClient

    from serving.app import create_app
    from serving.dependencies import get_now

    root = tmp_path_factory.mktemp("live")
    raw = pl.read_csv(toronto_store.data_dir / "raw" / "toronto-mci.csv", infer_schema=False).with_row_index("n")
    box = raw.filter(pl.col("Lat").cast(pl.Float64).is_between(43.64, 43.67)
                     & pl.col("Long").cast(pl.Float64).is_between(-79.41, -79.37))
    box = box.with_columns(event_id=pl.format("E{}", pl.col("n")), day=pl.col("occurrencedate").str.slice(0, 10))
    history = box.filter(pl.col("day").is_between(pl.lit("2019/01/01"), pl.lit("2019/02/28")))
    days = {day: box.filter(pl.col("day") == day).sort("occurrencehour") for day in DAYS}
    # the revision: a first-day row re-delivered with another offence and hour (another shift, another count)
    revised_id = days[DAYS[0]].filter(pl.col("MCI") == "Assault")["event_id"][0]
    original = days[DAYS[0]].filter(pl.col("event_id") == revised_id)
    revision = original.with_columns(MCI=pl.lit("Robbery"),
                                     occurrencehour=((pl.col("occurrencehour").cast(pl.Int32) + 8) % 24).cast(pl.String))
    days[DAYS[REVISED]] = pl.concat([days[DAYS[REVISED]], revision])
    # the third day's file is cut mid-row; its last row comes again, whole, with the fourth day
    cut_row = days[DAYS[2]].tail(1)
    days[DAYS[3]] = pl.concat([cut_row, days[DAYS[3]]])

    settings = Settings(data_dir=root / "data", model_refresh_seconds=0)
    profile = live_profile(root)
    store = IncidentStore(settings.data_dir)
    assert ingest_file(write_csv(history, root / "history.csv"), profile, store, now=morning_after(DAYS[0])).balanced
    initial = build_city_panel(store.read(CITY), profile, settings, name=CITY).panel
    panel_dir = DataPaths(settings).panel(CITY)
    initial.save(panel_dir)
    drop = root / "drop"
    drop.mkdir()

    clock = {"now": morning_after(DAYS[0])}
    steps = []
    with isolated_mlflow_env():
        register_champion(settings, initial)
        app = create_app(settings)
        app.dependency_overrides[get_now] = lambda: clock["now"]
        keys = {role: app.state.keys.create_key(role, f"test {role.value}") for role in Role}
        with TestClient(app) as client:
            svc = SimpleNamespace(client=client, keys=keys)
            before = get(svc, "/v1/hotspots", city=CITY, shift="next", k=3).json()
            for i, day in enumerate(DAYS):
                name = f"mci-{day.replace('/', '')}.csv"
                path = write_csv(days[day], drop / name)
                if i == 2:  # cut the last line in the middle
                    data = path.read_bytes().rstrip(b"\n")
                    path.write_bytes(data[: data.rfind(b",")])
                if i == 1:  # a file that is not an MCI export, and one still being written
                    (drop / "notes.csv").write_text("a,b\n1,2\n")
                    (drop / "mci-next.csv.part").write_text("occurrencedate\n")
                clock["now"] = morning_after(day)
                lines: list[str] = []
                report = update_from_drop_folder(profile, store, panel_dir, drop, now=clock["now"], log=lines.append)
                panel = CountPanel.load(panel_dir)
                body = served_next(svc, clock["now"].replace(hour=6))
                steps.append(SimpleNamespace(day=day, report=report, panel=panel, lines=lines, body=body,
                                             incidents=store.read(CITY), now=clock["now"]))
    yield SimpleNamespace(steps=steps, initial=initial, profile=profile, settings=settings, store=store, drop=drop,
                          before=before, revised_id=revised_id, original=original, revision=revision,
                          panel_dir=panel_dir, cut_row=cut_row)


def full_rebuild(replay, incidents: pl.DataFrame, end_shift: int) -> CountPanel:
    return build_city_panel(incidents, replay.profile, replay.settings, study_area=replay.initial.study_area,
                            first_shift=replay.initial.first_shift, end_shift=end_shift, name=CITY).panel


def test_each_update_serves_the_real_next_shift(replay):
    assert replay.before["shift"]["after_data"] is True  # before any update the data ends days before 'now'
    for step in replay.steps:
        shift = step.body["shift"]
        assert datetime.fromisoformat(shift["start"]) == step.now.replace(hour=6), step.day
        assert shift["after_data"] is False
        assert len(step.body["hotspots"]) == 3
        assert datetime.fromisoformat(step.body["data_end"]) == step.now.replace(hour=6)


def test_the_appended_panel_equals_a_full_rebuild(replay):
    previous = replay.initial
    for step in replay.steps:
        panel = step.panel
        assert panel.end_shift > previous.end_shift and panel.first_shift == replay.initial.first_shift
        assert (panel.study_area.cells == replay.initial.study_area.cells).all()  # the cells are fixed
        rebuilt = full_rebuild(replay, step.incidents, panel.end_shift)
        assert panel.counts.equals(rebuilt.counts), step.day
        assert panel.end_shift == panel.calendar.shift_of(step.incidents["occurred_at"].max()) + 1
        # appending recounts the new shifts and those whose incidents changed, not the whole panel
        assert step.report.panel.recounted_shifts < (panel.end_shift - panel.first_shift) / 4
        previous = panel


def test_a_revised_row_moves_its_count(replay):
    step = replay.steps[REVISED]
    summaries = {f.file: f.summary for f in step.report.files if f.summary}
    assert summaries[f"mci-{DAYS[REVISED].replace('/', '')}.csv"].updated == 1
    history = replay.store.read_revisions(CITY)
    assert history["incident_id"].to_list() == [replay.revised_id]
    old, new = history.row(0, named=True), step.incidents.filter(pl.col("incident_id") == replay.revised_id).row(0, named=True)
    panel, before = step.panel, replay.steps[REVISED - 1].panel
    cal, area = panel.calendar, panel.study_area

    def count(p: CountPanel, row: dict) -> int:
        shift = cal.shift_of(row["occurred_at"])
        cell = int(area.index_of([_cell(row, area.resolution)])[0])
        assert cell >= 0
        cat = p.categories.index(row["category"])
        hit = p.counts.filter((pl.col("shift") == shift) & (pl.col("cell") == cell) & (pl.col("category") == cat))
        return int(hit["count"].sum())

    assert old["category"] == "assault" and new["category"] == "robbery"
    assert cal.shift_of(old["occurred_at"]) != cal.shift_of(new["occurred_at"])
    assert count(panel, old) == count(before, old) - 1
    assert count(panel, new) == count(before, new) + 1


def _cell(row: dict, resolution: int) -> int:
    import h3

    return h3.str_to_int(h3.latlng_to_cell(row["latitude"], row["longitude"], resolution))


def test_drop_files_are_processed_once_and_nothing_is_lost(replay):
    done = sorted(p.name for p in (replay.drop / "done").iterdir())
    assert done == [f"mci-{d.replace('/', '')}.csv" for d in DAYS]
    assert [p.name for p in (replay.drop / "failed").iterdir()] == ["notes.csv"]
    assert [p.name for p in replay.drop.iterdir() if p.is_file()] == ["mci-next.csv.part"]  # still being written
    failed = [f for f in replay.steps[1].report.failed]
    assert len(failed) == 1 and "lacks required column" in failed[0].error
    # the cut row is quarantined with the third file, then stored whole from the fourth
    third = {f.file: f.summary for f in replay.steps[2].report.files}[f"mci-{DAYS[2].replace('/', '')}.csv"]
    assert third.quarantined == {"truncated_row": 1} and third.balanced
    cut_id = replay.cut_row["event_id"][0]
    assert cut_id not in replay.steps[2].incidents["incident_id"].to_list()
    assert cut_id in replay.steps[3].incidents["incident_id"].to_list()
    assert not (replay.panel_dir / MARKER).exists()
    # one log line per step: files found, each file, the panel
    lines = replay.steps[1].lines
    assert lines[0].startswith("2 new file(s)") and "notes.csv: not ingested" in " ".join(lines)
    assert "shifts appended" in lines[-1] and all("\n" not in line for line in lines)


def test_an_update_with_nothing_new_changes_nothing(replay, tmp_path):
    empty = tmp_path / "drop"
    empty.mkdir()
    last = replay.steps[-1]
    report = update_from_drop_folder(replay.profile, replay.store, replay.panel_dir, empty, now=last.now)
    assert report.panel.appended == 0 and report.panel.recounted_shifts == 0
    assert CountPanel.load(replay.panel_dir).counts.equals(last.panel.counts)


def test_an_interrupted_update_recounts_the_whole_panel(replay, tmp_path):
    last = replay.steps[-1]
    panel, change = extend_panel(replay.initial, last.incidents, None, last.now)
    assert change.full_recount and panel.counts.equals(last.panel.counts)
    # a marker left by a crash between ingest and the panel's save makes the next update recount everything
    (replay.panel_dir / MARKER).write_text("crashed\n")
    empty = tmp_path / "drop"
    empty.mkdir()
    report = update_from_drop_folder(replay.profile, replay.store, replay.panel_dir, empty, now=last.now)
    assert report.panel.full_recount and not (replay.panel_dir / MARKER).exists()
    assert CountPanel.load(replay.panel_dir).counts.equals(last.panel.counts)


def test_changed_times_lists_both_versions_of_a_revision(replay):
    before = replay.steps[REVISED - 1].incidents
    after = replay.steps[REVISED].incidents
    times = changed_times(before, after)
    new_rows = after.join(before.select("incident_id"), on="incident_id", how="anti")
    assert times.len() == new_rows.height + 2  # every new row, plus the revised row's old and new version


def test_a_pull_starts_an_overlap_before_the_last_stored_time(replay, tmp_path):
    """The API path (Chicago's Socrata client in production) with a stand-in fetch that writes a real export."""
    last = replay.steps[-1]
    seen = {}
    rows = pl.read_csv(replay.drop / "done" / f"mci-{DAYS[-1].replace('/', '')}.csv", infer_schema=False)

    def fetch(target: Path, since):
        seen["since"] = since
        rows.write_csv(target)
        return rows.height

    report = update_from_fetch(replay.profile, replay.store, replay.panel_dir, fetch, overlap=timedelta(days=7),
                               now=last.now)
    assert seen["since"] == last.incidents["occurred_at"].max() - timedelta(days=7)
    assert report.files[0].summary.already_stored == rows.height  # read again, recognised, nothing counted twice
    assert not list((replay.store.data_dir / "raw" / "updates").iterdir())  # the raw pull is not kept
    assert CountPanel.load(replay.panel_dir).counts.equals(last.panel.counts)


def test_cli_update_says_what_to_fix(tmp_path):
    from serving.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["update", "toronto-mci", "--data-dir", str(tmp_path)])
    assert result.exit_code == 2 and "give --drop-dir" in result.output and "Traceback" not in result.output
    result = runner.invoke(app, ["update", "toronto-mci", "--drop-dir", str(tmp_path / "nope"), "--data-dir",
                                 str(tmp_path)])
    assert result.exit_code == 2 and "run `hotspots panel toronto-mci` once first" in result.output


def test_cli_update_pulls_chicago_from_the_api_since_the_last_stored_time(tmp_path, monkeypatch):
    """`hotspots update chicago`: the Socrata client (SODA replies recorded from the portal) from the last stored
    time minus the overlap; the rows are recognised as already stored and the raw pull is not kept."""
    import json

    import responses
    from responses import matchers
    from test_socrata import EXPORT_CSV, FIXTURES, URL

    from serving.cli import app

    monkeypatch.delenv("HOTSPOTS_H3_RESOLUTION", raising=False)
    settings = Settings(data_dir=tmp_path / "data")
    profile = load_profile("chicago")
    store = IncidentStore(settings.data_dir)
    (tmp_path / "export.csv").write_text(EXPORT_CSV)
    assert ingest_file(tmp_path / "export.csv", profile, store).stored_new == 3  # one row has no coordinates
    build_city_panel(store.read("chicago"), profile, settings).panel.save(DataPaths(settings).panel("chicago"))
    rows = json.loads((FIXTURES / "page1.json").read_text()) + json.loads((FIXTURES / "page2.json").read_text())
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        mock.get(URL, json=rows, match=[matchers.query_param_matcher(
            {"$limit": "50000", "$offset": "0", "$order": ":id", "$where": "date >= '2017-12-25T12:00:00'"})])
        result = CliRunner().invoke(app, ["update", "chicago", "--data-dir", str(settings.data_dir)])
        calls = len(mock.calls)
    assert result.exit_code == 0, result.output
    assert "fetched 4 rows since 2017-12-25" in result.output
    assert "4 rows, 0 new, 0 revised, 3 already stored, 1 quarantined" in result.output
    assert calls == 1 and not list((settings.data_dir / "raw" / "updates").iterdir())
