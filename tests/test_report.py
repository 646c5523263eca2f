"""Backtest report: every file written, figures not blank, numbers in the text equal the metrics, HTML
self-contained, the map on the busiest shift. A small synthetic backtest, nothing fitted."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import h3
import numpy as np
import polars as pl
import pytest
from matplotlib.image import imread

from features.calendar import ShiftCalendar
from features.grid import StudyArea
from features.matrix import build_targets
from features.panel import build_panel
from features.validation import CANONICAL_SCHEMA
from forecasting.backtest import BacktestResult, per_category_hit_rates
from forecasting.claim import claim_test
from forecasting.reporting.report import (
    Block,
    best_sentence,
    busiest_shift,
    fmt_interval,
    fmt_rate,
    fmt_ratio,
    to_html,
    write_report,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
IMAGE_KEYS = ("hit_rate_curves", "pai_bars", "calibration", "hotspot_map")
N_SHIFTS, BUSY_ROW = 60, 37
COVERAGES = (0.01, 0.05, 0.2)


@pytest.fixture(scope="module")
def backtest():
    rng = np.random.default_rng(7)
    disk = h3.grid_disk(h3.latlng_to_cell(43.65, -79.38, 9), 4)
    area = StudyArea([h3.str_to_int(c) for c in disk], 9, name="toy-toronto")
    cal = ShiftCalendar("America/Toronto")
    first = cal.shift_of(datetime(2021, 3, 1, 6, tzinfo=timezone(timedelta(hours=-5))))
    origins = np.arange(first, first + N_SHIFTS, dtype=np.int64)
    n = len(area)
    lam = np.full(n, 0.02)
    lam[rng.choice(n, 5, replace=False)] = 0.6  # a few hot cells
    counts = rng.poisson(lam, size=(N_SHIFTS, n))
    counts[BUSY_ROW, rng.choice(n, 6, replace=False)] += 4  # the busiest shift by far
    rows, cells = np.nonzero(counts)
    rows, cells = np.repeat(rows, counts[rows, cells]), np.repeat(cells, counts[rows, cells])
    starts = cal.bounds(origins)["start_utc"].to_numpy()
    lat, lon = area.centroids
    incidents = pl.DataFrame(
        {
            "incident_id": [f"i{i}" for i in range(rows.size)],
            "occurred_at": starts[rows] + rng.integers(5, 400, rows.size).astype("timedelta64[m]"),
            "timezone": "America/Toronto",
            "category": rng.choice(["assault", "theft"], rows.size),
            "latitude": lat[cells],
            "longitude": lon[cells],
            "source": "test",
        },
        schema=CANONICAL_SCHEMA,
    )
    panel, binning = build_panel(incidents, area, cal, ("assault", "theft"), first_shift=first,
                                 end_shift=first + N_SHIFTS)
    assert binning.binned == rows.size
    observed = build_targets(panel, origins).reshape(N_SHIFTS, n).astype(np.float64)
    assert np.array_equal(observed, counts)
    predictions = {
        "lightgbm": lam * rng.gamma(4.0, 0.25, size=(N_SHIFTS, n)),
        "naive": np.maximum(lam + rng.normal(0, 0.2, size=(N_SHIFTS, n)), 0),
        "random": rng.random((N_SHIFTS, n)) * 0.1,
    }
    result = BacktestResult(
        origins=origins, observed=observed, predictions=predictions, areas=area.areas_km2, per_day=cal.per_day,
        cutoffs=[int(origins[0]), int(origins[30])], fit_seconds={k: 1.0 for k in predictions},
        predict_seconds={k: 0.1 for k in predictions},
    )
    summaries = result.summaries(coverages=COVERAGES, n_boot=50)
    claims = claim_test(predictions["lightgbm"], predictions["naive"], observed, area.areas_km2, origins, cal.per_day,
                        coverages=(0.01, 0.05), n_boot=100, names=("lightgbm", "naive"))
    return result, panel, summaries, claims, per_category_hit_rates(result, panel)


@pytest.fixture(scope="module")
def report(backtest, tmp_path_factory):
    result, panel, summaries, claims, per_category = backtest
    out = tmp_path_factory.mktemp("report") / "nested"
    paths = write_report(result, panel, out, title="Toy backtest", summaries=summaries, claims=claims,
                         per_category=per_category, meta={"city": "Toronto (toy)", "refit_cadence": "monthly"})
    return paths, out


def _nan(x):
    return np.nan if x is None else x


def test_all_files_written_and_pngs_not_blank(report):
    paths, out = report
    assert set(paths) == {*IMAGE_KEYS, "report_md", "report_html", "summary_json"}
    for key, path in paths.items():
        assert path.parent == out and path.exists() and path.stat().st_size > 0, key
    for key in IMAGE_KEYS:
        assert paths[key].read_bytes()[:8] == PNG_MAGIC
        img = imread(paths[key])
        assert img.shape[0] >= 300 and img.shape[1] >= 400, (key, img.shape)
        assert img[..., :3].var() > 1e-4, f"{key} looks blank"


def test_summary_json_round_trips_and_equals_metric_summary(report, backtest):
    paths, _ = report
    _, _, summaries, claims, _ = backtest
    data = json.loads(paths["summary_json"].read_text())
    assert set(data["forecasters"]) == set(summaries)
    for name, s in summaries.items():
        entry = data["forecasters"][name]
        assert entry["deviance"] == pytest.approx(s.deviance)
        assert [c["coverage"] for c in entry["coverages"]] == pytest.approx(list(COVERAGES))
        for metric in ("hit_rate", "pai", "pei", "rri"):
            for part, source in (("point", s.point), ("low", s.low), ("high", s.high)):
                got = np.array([_nan(c[metric][part]) for c in entry["coverages"]], dtype=float)
                np.testing.assert_allclose(got, source[metric], rtol=1e-12, equal_nan=True)
    assert data["claims"] == json.loads(json.dumps([c.as_dict() for c in claims]))
    assert data["meta"]["city"] == "Toronto (toy)" and data["meta"]["refit_cadence"] == "monthly"
    assert data["meta"]["data_fingerprint"] and "H3 9" in data["meta"]["resolution"]
    assert json.loads(json.dumps(data)) == data


def test_markdown_has_names_verdicts_and_numbers(report, backtest):
    paths, _ = report
    _, _, summaries, claims, per_category = backtest
    md = paths["report_md"].read_text()
    assert md.startswith("# Toy backtest")
    for name in summaries:
        assert name in md
    for c in claims:
        assert c.sentence() in md
        assert c.verdict.upper() in md
        assert fmt_interval(c.ratio, c.ratio_low, c.ratio_high, fmt_ratio) in md
    data = json.loads(paths["summary_json"].read_text())
    for entry in data["forecasters"].values():
        for c in entry["coverages"]:
            hr, pai = c["hit_rate"], c["pai"]
            assert fmt_interval(hr["point"], hr["low"], hr["high"]) in md
            assert fmt_interval(pai["point"], pai["low"], pai["high"], fmt_ratio) in md
        assert f"{entry['deviance']:.5f}" in md
    # best forecaster at 1% and 5%, and the plain baseline-wins sentence exactly when a baseline is on top
    for _cov, label in ((0.01, "1%"), (0.05, "5%")):
        best = data["best_by_hit_rate"][label]
        assert f"At {label} of the area the best forecaster is **{best}**" in md
    assert ("A baseline wins" in md) == any(b != "lightgbm" for b in data["best_by_hit_rate"].values())
    assert "A baseline wins" in best_sentence(summaries, 0.01, {"random"})
    # per-category pivot
    assert "Hit rate by crime category" in md and "| assault |" in md and "| theft |" in md
    row = per_category.filter((pl.col("category") == "theft") & (pl.col("coverage") == 0.05)).sort("forecaster")
    assert all(fmt_rate(v) in md for v in row["hit_rate"])
    for f in ("hit_rate_curves.png", "pai_bars.png", "calibration.png", "hotspot_map.png"):
        assert f"]({f})" in md
    assert "Toronto (toy)" in md and "data fingerprint" in md and "code version" in md


def test_html_is_self_contained(report):
    paths, _ = report
    page = paths["report_html"].read_text()
    assert page.count("data:image/png;base64,") == len(IMAGE_KEYS)
    assert "<script" not in page and "<link" not in page and "http" not in page
    assert 'src="hotspot_map.png"' not in page
    md = paths["report_md"].read_text()
    assert "SUPPORTED" in page or "REFUTED" in page or "UNDETERMINED" in page
    data = json.loads(paths["summary_json"].read_text())
    hr = data["forecasters"]["lightgbm"]["coverages"][0]["hit_rate"]
    assert fmt_interval(hr["point"], hr["low"], hr["high"]) in page and "<table>" in page and md


def test_map_picks_the_busiest_shift(report, backtest):
    paths, _ = report
    result, panel, *_ = backtest
    assert busiest_shift(result.observed) == BUSY_ROW
    data = json.loads(paths["summary_json"].read_text())
    m = data["map"]
    assert m["shift_id"] == int(result.origins[BUSY_ROW]) and m["forecaster"] == "lightgbm"
    assert m["crimes"] == result.observed[BUSY_ROW].sum() and m["coverage"] == 0.05
    start = panel.calendar.bounds([m["shift_id"]])["start_local"][0]
    assert m["start_local"] == start.isoformat() and m["label"] in paths["report_md"].read_text()
    # ties: the first busiest shift wins, deterministically
    tied = np.zeros((4, 3))
    tied[1, 0] = tied[3, 2] = 5
    assert busiest_shift(tied) == 1


def test_minimal_report_falls_back_to_first_forecaster(backtest, tmp_path):
    result, panel, summaries, _, _ = backtest
    paths = write_report(result, panel, tmp_path, title="No claims", summaries=summaries, claims=[],
                         map_forecaster="sepp", map_coverage=0.01)
    data = json.loads(paths["summary_json"].read_text())
    assert data["map"]["forecaster"] == "lightgbm" and data["map"]["cells_flagged"] == 1
    assert data["claims"] == []
    md = paths["report_md"].read_text()
    assert "No claim test was run." in md and "Hit rate by crime category" not in md


def test_html_escapes_text_and_keeps_the_two_inline_marks(tmp_path):
    """Autoescaping: names and sentences never become markup, except **bold** and `code` in sentences."""
    (tmp_path / "f.png").write_bytes(PNG_MAGIC)
    page = to_html([Block("h1", "<script>x</script>"), Block("p", "**best** is `a&b` <i>"),
                    Block("table", header=["<th>"], items=[["<td>"]]), Block("img", 'alt "q" <x>', items=["f.png"])],
                   "T <title>", tmp_path)
    assert "<script>" not in page and "<h1>&lt;script&gt;x&lt;/script&gt;</h1>" in page
    assert "<p><strong>best</strong> is <code>a&amp;b</code> &lt;i&gt;</p>" in page
    assert "<th>&lt;th&gt;</th>" in page and "<td>&lt;td&gt;</td>" in page
    assert 'alt="alt &#34;q&#34; &lt;x&gt;"' in page and "<title>T &lt;title&gt;</title>" in page


def test_references_and_headroom_are_reported_apart_from_forecasters(backtest, tmp_path):
    """The clairvoyant maps get their own labelled section, summary.json key and no place among the forecasters
    (tables, figures, 'who wins'); each forecaster's headroom share is stated against the strongest baseline."""
    from forecasting.references import CEILING, STATIC, headroom, score_references

    result, panel, summaries, claims, _ = backtest
    refs = score_references(result.observed, result.areas, result.origins, result.per_day, COVERAGES, n_boot=50)
    shares = headroom(summaries, refs, "naive")
    paths = write_report(result, panel, tmp_path, title="With references", summaries=summaries, claims=claims,
                         references=refs, headroom=shares)
    data = json.loads(paths["summary_json"].read_text())
    assert set(data["forecasters"]) == {"lightgbm", "naive", "random"} and set(data["references"]) == {STATIC, CEILING}
    assert set(data["best_by_hit_rate"].values()) <= {"lightgbm", "naive", "random"}
    ceiling = data["references"][CEILING]["coverages"][0]["hit_rate"]["point"]
    assert ceiling == pytest.approx(refs[CEILING].point["hit_rate"][0])
    lgbm = next(s for s in data["headroom"]["shares"]
                if s["forecaster"] == "lightgbm" and s["coverage"] == 0.01 and s["ties"] == "random")
    expected = (summaries["lightgbm"].point["hit_rate"][0] - summaries["naive"].point["hit_rate"][0]) / (
        ceiling - summaries["naive"].point["hit_rate"][0])
    assert lgbm["share"] == pytest.approx(expected) and data["headroom"]["strongest_baseline"] == "naive"
    md = paths["report_md"].read_text()
    section = md.split("## Clairvoyant references (not forecasters)")[1].split("## Metrics by coverage")[0]
    assert "no forecaster can use" in section and f"{CEILING} (reference)" in section
    assert f"| lightgbm | {lgbm['text']} |" in section.split("## Share of the headroom")[1]
    assert "naive (strongest baseline) | 0% |" in section
    assert STATIC not in md.split("## Metrics by coverage")[1]  # never in the forecasters' tables
