"""Bias audit: exposure ratios against a hand-computed toy city, the areal join on real Chicago and Toronto
layers (population conserved), intensive variables area-weighted, and clear errors for bad layers."""

from __future__ import annotations

import json

import geopandas as gpd
import h3
import numpy as np
import pandas as pd
import polars as pl
import pytest
import shapely
from conftest import require_shared

from features.grid import StudyArea, read_boundary
from forecasting.area_join import TOTAL, AreaJoin, AreaJoinError, join_to_cells, population_quantiles, read_layer
from forecasting.area_presets import PRESETS, AreaLayerSpec, default_layer, get_preset
from forecasting.bias_audit import audit, flag_masks, population_split, quantile_split
from forecasting.metrics import summarise
from forecasting.reporting.assess import log_audit
from forecasting.reporting.bias_audit_view import bias_audit_figure, bias_audit_page, bias_audit_section

# --- the toy city ------------------------------------------------------------------------------------
# Four cells of equal area. Cell 3 is a park: nobody lives there.
#   cell:        0    1    2    3
#   group a:   100   50    0    0
#   group b:     0   50  200    0
# Two shifts (one per day), 25% of the area flagged = one cell per shift.
#   lightgbm forecasts [5,1,1,0] then [1,1,6,0]  -> flags cell 0, then cell 2
#   naive forecasts    [0,5,0,0] twice           -> flags cell 1 both times
#   observed           [2,1,0,1] then [0,2,2,0]
TOY_POP = {"a": [100.0, 50.0, 0.0, 0.0], "b": [0.0, 50.0, 200.0, 0.0]}
TOY_PRED = {"lightgbm": np.array([[5.0, 1, 1, 0], [1, 1, 6, 0]]), "naive": np.array([[0.0, 5, 0, 0], [0, 5, 0, 0]])}
TOY_OBS = np.array([[2.0, 1, 0, 1], [0, 2, 2, 0]])
TOY_AREAS = np.ones(4)
TOY_ORIGINS = np.array([10, 11])


def toy_join(rates: list[float] | None = None) -> AreaJoin:
    counts = pd.DataFrame(TOY_POP)
    counts[TOTAL] = counts.sum(axis=1)
    rate_frame = pd.DataFrame({"poverty": rates} if rates else {})
    return AreaJoin([f"cell{i}" for i in range(4)], counts, rate_frame, np.ones(4), {c: float(counts[c].sum()) for c in counts},
                    1.0, "toy")


@pytest.fixture(scope="module")
def toy_audit():
    split = population_split(toy_join(), name="toy", label="toy groups")
    return audit(TOY_PRED, TOY_OBS, TOY_AREAS, TOY_ORIGINS, 1, [split], coverages=[0.25], baseline="naive", n_boot=200)


def test_toy_exposure_ratios_match_hand_computation(toy_audit):
    get = lambda g, m, f="lightgbm": toy_audit.get("toy", g, m, f, 0.25)["value"]  # noqa: E731
    # share of each group living in flagged cells, averaged over the two shifts:
    #   a: (100/150 + 0/150) / 2 = 1/3;  b: (0 + 200/250) / 2 = 2/5;  everyone: (100/400 + 200/400) / 2 = 3/8
    assert get("a", "flagged_share") == pytest.approx(1 / 3)
    assert get("b", "flagged_share") == pytest.approx(2 / 5)
    assert get("all", "flagged_share") == pytest.approx(3 / 8)
    # exposure ratio = (1/3) / (3/8) = 8/9, and (2/5) / (3/8) = 16/15; the same as
    # (a's share of the 300 flagged residents, 100/300) / (a's share of residents, 150/400)
    assert get("a", "exposure_ratio") == pytest.approx(8 / 9)
    assert get("b", "exposure_ratio") == pytest.approx(16 / 15)
    assert (100 / 300) / (150 / 400) == pytest.approx(8 / 9)
    # the naive map flags the mixed cell twice: a 100/300 of 150, everyone 200/800
    assert get("a", "exposure_ratio", "naive") == pytest.approx((1 / 3) / (1 / 4))
    assert get("b", "exposure_ratio", "naive") == pytest.approx((1 / 5) / (1 / 4))
    assert get("a", "exposure_ratio_minus_naive") == pytest.approx(8 / 9 - 4 / 3)


def test_toy_crime_share_hit_rate_pai_calibration_match_hand_computation(toy_audit):
    get = lambda g, m, f="lightgbm": toy_audit.get("toy", g, m, f, 0.25)["value"]  # noqa: E731
    # crime attributed by residents' shares (cell 1 is half a, half b; the park's crime is nobody's):
    #   a: 2*1 + 1*0.5 + 2*0.5 = 3.5;  b: 1*0.5 + 2*0.5 + 2*1 = 3.5  -> 0.5 each
    assert toy_audit.get("toy", "a", "crime_share")["value"] == pytest.approx(0.5)
    assert toy_audit.splits[0]["unattributed_crime_share"] == pytest.approx(1 / 8)
    # exposure over crime share: (1/3) / 0.5 and (2/3) / 0.5
    assert get("a", "exposure_to_crime_ratio") == pytest.approx(2 / 3)
    assert get("b", "exposure_to_crime_ratio") == pytest.approx(4 / 3)
    # hits: a gets 2 (cell 0, shift 0), b gets 2 (cell 2, shift 1), of 3.5 each
    assert get("a", "hit_rate") == pytest.approx(4 / 7)
    assert get("b", "hit_rate") == pytest.approx(4 / 7)
    # a's area is 1 + 0.5 = 1.5 cells, flagged 1 cell-shift of 2 shifts -> area share 1/3, PAI (4/7) / (1/3)
    assert get("a", "pai") == pytest.approx(12 / 7)
    # predicted within a's areas: 5 + 0.5 + 1 + 0.5 = 7 over 3.5 recorded; b: 0.5 + 1 + 0.5 + 6 = 8
    assert get("a", "calibration") == pytest.approx(2.0)
    assert get("b", "calibration") == pytest.approx(8 / 3.5)
    # everyone (populated cells): 4 of the 7 crimes in populated cells
    assert get("all", "hit_rate") == pytest.approx(4 / 7)


def test_toy_intervals_and_outputs(toy_audit):
    rows = toy_audit.frame.filter(pl.col("low").is_not_null())
    assert rows.height > 0
    assert (rows["low"] <= rows["value"] + 1e-12).all() and (rows["value"] <= rows["high"] + 1e-12).all()
    data = json.loads(toy_audit.to_json())  # strict JSON: no NaN
    assert {"definitions", "rows", "meta", "majority", "splits"} <= set(data)
    assert "exposure_ratio" in data["definitions"] and "/" in data["definitions"]["exposure_ratio"]
    metrics = toy_audit.mlflow_metrics()
    assert metrics["bias.lightgbm.toy.a.exposure_ratio.25pct"] == pytest.approx(8 / 9)
    assert "bias.lightgbm.toy.a.exposure_ratio_low.25pct" in metrics
    section = bias_audit_section(toy_audit)
    assert section.startswith("<section") and "exposure_ratio" in section and "data:image/png;base64," in section
    assert "0.889" in section  # 8/9 in the table
    page = bias_audit_page(toy_audit, png=b"png")
    assert page.startswith("<!DOCTYPE html>") and "<style>" in page and "0.889" in page
    assert page.count("data:image/png;base64,") == 1 and "data:image/png;base64,cG5n" in page  # the given PNG
    assert any("most exposed" in t for t in toy_audit.findings())
    fig = bias_audit_figure(toy_audit)
    assert len(fig.axes) == 2


def test_majority_view_and_quintiles_agree_with_metricframe():
    """Cells in exactly one quintile: fairlearn's MetricFrame and the population-weighted engine must agree."""
    rng = np.random.default_rng(7)
    n_cells, n_shifts = 60, 30
    counts = pd.DataFrame({"a": rng.integers(0, 500, n_cells).astype(float), "b": rng.integers(0, 500, n_cells).astype(float)})
    counts[TOTAL] = counts.sum(axis=1)
    join = AreaJoin([str(i) for i in range(n_cells)], counts, pd.DataFrame({"rate": rng.uniform(0, 40, n_cells)}),
                    np.ones(n_cells), {}, 1.0, "toy")
    split = quantile_split(join, "rate", name="rate_q")
    assert split.groups == ["Q1", "Q2", "Q3", "Q4", "Q5"]
    observed = rng.poisson(0.5, (n_shifts, n_cells)).astype(float)
    pred = {"m": rng.gamma(1.0, 0.5, (n_shifts, n_cells))}
    areas = rng.uniform(0.09, 0.11, n_cells)
    result = audit(pred, observed, areas, np.arange(n_shifts), 3, [split], coverages=[0.1], baseline=None, n_boot=50)
    majority = result.majority.filter(pl.col("group") != "(none)")
    for row in majority.iter_rows(named=True):
        for measure in ("flagged_share", "exposure_ratio", "exposure_to_crime_ratio", "hit_rate", "pai", "calibration"):
            engine = result.get("rate_q", row["group"], measure, "m", 0.1)["value"]
            assert engine == pytest.approx(row[measure], rel=1e-9), (row["group"], measure)


def test_flag_masks_reproduce_backtest_hits_and_all_hit_rate_matches_summarise():
    rng = np.random.default_rng(3)
    observed = rng.poisson(0.3, (12, 40)).astype(float)
    expected = np.round(rng.gamma(1.0, 0.3, (12, 40)), 1)  # rounded: plenty of ties
    areas = rng.uniform(0.09, 0.11, 40)
    origins = np.arange(100, 112)
    masks = flag_masks(expected, observed, areas, origins, [0.05, 0.2])
    assert masks.shape == (2, 12, 40) and (masks[0].sum(axis=1) <= masks[1].sum(axis=1)).all()
    counts = pd.DataFrame({"a": np.full(40, 10.0)})
    counts[TOTAL] = counts["a"]
    split = population_split(AreaJoin([str(i) for i in range(40)], counts, pd.DataFrame(), np.ones(40), {}, 1.0, "toy"))
    result = audit({"m": expected}, observed, areas, origins, 3, [split], coverages=[0.05, 0.2], n_boot=20)
    reference = summarise(expected, observed, areas, origins, 3, coverages=(0.05, 0.2), n_boot=20)
    for j, c in enumerate((0.05, 0.2)):
        assert result.get("group", "all", "hit_rate", "m", c)["value"] == pytest.approx(reference.point["hit_rate"][j])
        assert result.get("group", "all", "pai", "m", c)["value"] == pytest.approx(reference.point["pai"][j])


def test_population_weighted_quantiles_keep_ties_together():
    assert population_quantiles(np.array([1.0, 2, 3, 4, 5]), np.ones(5)).tolist() == [1, 2, 3, 4, 5]
    # weights 20% | 60% | 20%: midpoints 0.1, 0.5, 0.9 -> Q1, Q3, Q5; equal values share a quintile
    labels = population_quantiles(np.array([1.0, 1.0, 2.0, 3.0, np.nan]), np.array([10.0, 10, 60, 20, 5]))
    assert labels.tolist() == [1, 1, 3, 5, 0]


def test_audit_rejects_mismatched_inputs():
    split = population_split(toy_join())
    with pytest.raises(ValueError, match="shape"):
        audit({"m": np.ones((2, 3))}, TOY_OBS, TOY_AREAS, TOY_ORIGINS, 1, [split])
    with pytest.raises(ValueError, match="cells"):
        audit({"m": np.ones((2, 5))}, np.ones((2, 5)), np.ones(5), TOY_ORIGINS, 1, [split])


# --- the areal join on small real-shaped geometry -------------------------------------------------------
def _toy_area() -> tuple[StudyArea, float]:
    centre = h3.latlng_to_cell(41.88, -87.63, 9)
    cells = np.array([h3.str_to_int(c) for c in h3.grid_disk(centre, 2)], dtype=np.uint64)
    return StudyArea(cells, 9, "toy"), h3.cell_to_latlng(centre)[1]


def _halves(lon0: float) -> gpd.GeoDataFrame:
    west = shapely.box(-87.70, 41.84, lon0, 41.92)
    east = shapely.box(lon0, 41.84, -87.56, 41.92)
    return gpd.GeoDataFrame({"pop_x": [1000.0, 3000.0], "pop_y": [500.0, 0.0], "rate": [10.0, 30.0], "hood": [1, 2]},
                            geometry=[west, east], crs=4326)


def test_the_join_overlays_polygons_and_cells_once(monkeypatch):
    """Counts and rates come from one polygon-cell overlay (tobler's area table, most of a join's time): the
    rates are not a second overlay of the same geometry. Their values are checked by hand below."""
    import importlib

    module = importlib.import_module("tobler.area_weighted.area_interpolate")  # the module, not its function
    tables = []
    real = module._area_tables_binning
    monkeypatch.setattr(module, "_area_tables_binning", lambda *a, **k: tables.append(1) or real(*a, **k))
    area, lon0 = _toy_area()
    join = join_to_cells(_halves(lon0), area, {"x": "pop_x", "y": "pop_y"}, intensive=["rate"])
    assert len(tables) == 1 and np.isfinite(join.rates["rate"].to_numpy()).all() and join.counts["x"].sum() > 0


def test_intensive_variables_are_area_weighted_and_coverage_reported():
    area, lon0 = _toy_area()
    layer = _halves(lon0)
    join = join_to_cells(layer, area, {"x": "pop_x", "y": "pop_y"}, intensive=["rate"])
    cells = area.to_geodataframe().to_crs(join.crs)
    parts = layer.to_crs(join.crs)
    a_west = cells.intersection(parts.geometry.iloc[0]).area.to_numpy()
    a_east = cells.intersection(parts.geometry.iloc[1]).area.to_numpy()
    expected_rate = (10 * a_west + 30 * a_east) / (a_west + a_east)
    assert join.rates["rate"].to_numpy() == pytest.approx(expected_rate, rel=1e-5)
    straddling = (a_west > 0) & (a_east > 0)
    straddling_rates = join.rates["rate"].to_numpy()[straddling]
    assert straddling.any() and ((straddling_rates > 10) & (straddling_rates < 30)).all()
    # extensive: each cell gets the polygon's count in proportion to the polygon area it covers
    expected_x = 1000 * a_west / parts.area.iloc[0] + 3000 * a_east / parts.area.iloc[1]
    assert join.counts["x"].to_numpy() == pytest.approx(expected_x, rel=1e-5)
    # the 19 cells cover a small part of the boxes: the coverage says how much of each total is inside
    assert join.coverage["x"] == pytest.approx(expected_x.sum() / 4000, rel=1e-5)
    assert 0 < join.coverage["x"] < 0.1 and 0 < join.area_coverage < 0.1
    assert join.coverage[TOTAL] == pytest.approx(join.cell_totals[TOTAL] / 4500)


def test_layer_covered_by_cells_conserves_population_exactly():
    area, lon0 = _toy_area()
    cells = area.to_geodataframe()
    layer = gpd.GeoDataFrame({"pop": [700.0, 300.0]}, geometry=[cells.geometry.iloc[:7].union_all(),
                                                                cells.geometry.iloc[7:].union_all()], crs=4326)
    join = join_to_cells(layer, area, ["pop"])
    assert join.area_coverage == pytest.approx(1.0, abs=1e-6)
    assert join.cell_totals["pop"] == pytest.approx(1000.0, rel=1e-6)
    assert join.counts["pop"].to_numpy()[:7].sum() == pytest.approx(700.0, rel=1e-5)


def test_clear_errors_for_missing_columns_crs_and_keys(tmp_path):
    area, lon0 = _toy_area()
    layer = _halves(lon0)
    with pytest.raises(AreaJoinError, match=r"group column\(s\) missing.*'BLACK'.*'WHITE'"):
        join_to_cells(layer, area, {"white": "WHITE", "black": "BLACK"})
    with pytest.raises(AreaJoinError, match=r"missing.*'nope'"):
        join_to_cells(layer, area, {"derived": "pop_x - nope"})
    with pytest.raises(AreaJoinError, match="no CRS"):
        join_to_cells(layer.set_crs(None, allow_override=True), area, ["pop_x"])
    with pytest.raises(AreaJoinError, match="not numeric"):
        join_to_cells(layer.assign(name=["w", "e"]), area, ["name"])
    with pytest.raises(AreaJoinError, match="missing values"):
        join_to_cells(layer.assign(pop_x=[1.0, np.nan]), area, ["pop_x"])
    with pytest.raises(AreaJoinError, match="no study-area cell intersects"):
        join_to_cells(layer.set_geometry(layer.translate(5, 5)), area, ["pop_x"])
    path = tmp_path / "halves.gpkg"
    layer.to_file(path, layer="hoods")
    pd.DataFrame({"hood": [1, 2], "poverty": [5.0, 25.0]}).to_csv(tmp_path / "t.csv", index=False)
    with pytest.raises(AreaJoinError, match="key column 'hood_id' is not in the layer"):
        read_layer(path, "hoods", table=tmp_path / "t.csv", key="hood_id")
    pd.DataFrame({"hood": [1], "poverty": [5.0]}).to_csv(tmp_path / "short.csv", index=False)
    with pytest.raises(AreaJoinError, match="no table row"):
        read_layer(path, "hoods", table=tmp_path / "short.csv", key="hood")
    joined = read_layer(path, "hoods", table=tmp_path / "t.csv", key="hood")
    assert joined["poverty"].tolist() == [5.0, 25.0]
    with pytest.raises(AreaJoinError, match="unknown area preset"):
        get_preset("atlantis")


def test_any_city_from_a_toml_spec(tmp_path):
    area, lon0 = _toy_area()
    _halves(lon0).to_file(tmp_path / "city.gpkg", layer="hoods")
    pd.DataFrame({"hood": [1, 2], "poverty": [5.0, 25.0]}).to_csv(tmp_path / "t.csv", index=False)
    (tmp_path / "city.toml").write_text(
        '[area]\npath = "city.gpkg"\nlayer = "hoods"\ntable = "t.csv"\nkey = "hood"\nsplit = "poverty"\n'
        '[area.groups]\nx = "pop_x"\nnot_x = "pop_y"\n'
    )
    spec = AreaLayerSpec.from_toml(tmp_path / "city.toml")
    join = spec.join(area, base=tmp_path)
    assert join.groups == ["x", "not_x"] and "poverty" in join.rates.columns
    assert join.counts[TOTAL].to_numpy() == pytest.approx(join.counts[["x", "not_x"]].sum(axis=1).to_numpy())


# --- real layers ---------------------------------------------------------------------------------------
def test_chicago_community_areas_conserve_population_at_res9():
    gpkg = require_shared("areas", "chicago.gpkg")
    require_shared("areas", "chicago_community_area_demographics.csv")
    spec = PRESETS["chicago-community-areas"]
    area = StudyArea.from_boundary(read_boundary(gpkg, spec.layer), 9, "chicago")
    join = spec.join(area)
    layer = gpd.read_file(gpkg, layer=spec.layer)
    assert join.layer_totals[TOTAL] == pytest.approx(layer["TOT_POP"].sum())
    for column, source in {"white": "WHITE", "black": "BLACK", "hispanic": "HISP", "asian": "ASIAN", "total": "TOT_POP"}.items():
        assert abs(join.cell_totals[column] / layer[source].sum() - 1) < 1e-3, column
    assert join.area_coverage == pytest.approx(1.0, abs=1e-4)
    hardship = join.rates[spec.split].to_numpy()
    assert np.isfinite(hardship).all() and hardship.min() >= 1 and hardship.max() <= 98
    split = quantile_split(join, spec.split)
    shares = split.population.sum(axis=0) / split.total_population.sum()
    assert shares.sum() == pytest.approx(1.0) and (np.abs(shares - 0.2) < 0.05).all()


def test_toronto_neighbourhoods_conserve_population_and_derive_groups():
    gpkg = require_shared("areas", "toronto.gpkg")
    spec = PRESETS["toronto-neighbourhoods"]
    area = StudyArea.from_boundary(read_boundary(gpkg, spec.layer), 9, "toronto")
    join = spec.join(area)
    for column, value in join.coverage.items():
        assert abs(value - 1) < 1e-3, column
    counts = join.counts
    assert counts["visible_minority"].to_numpy() == pytest.approx(
        (counts["black"] + counts["visible_minority_not_black"]).to_numpy())
    partition = counts[list(spec.partition)].sum(axis=1).to_numpy()
    assert partition == pytest.approx(counts[TOTAL].to_numpy())
    low_income = join.rates[spec.split].to_numpy()
    assert np.nanmin(low_income) > 0 and np.nanmax(low_income) < 60


def test_audit_logs_metrics_and_html_to_mlflow(toy_audit, tmp_path):
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    try:
        experiment = mlflow.create_experiment("bias-audit-test", artifact_location=(tmp_path / "artifacts").as_uri())
        with mlflow.start_run(experiment_id=experiment) as run:
            log_audit(toy_audit)
        client = MlflowClient()
        logged = client.get_run(run.info.run_id).data.metrics
        assert logged["bias_audit.lightgbm.toy.a.exposure_ratio.25pct"] == pytest.approx(8 / 9)
        files = {f.path for f in client.list_artifacts(run.info.run_id, "bias_audit")}
        assert files == {"bias_audit/bias_audit.json", "bias_audit/bias_audit.html", "bias_audit/bias_audit.png"}
    finally:
        mlflow.set_tracking_uri(None)


def test_default_layer_is_the_sources_own_when_present(monkeypatch, tmp_path):
    shared = require_shared("areas", "toronto.gpkg").parents[1]
    monkeypatch.setenv("HOTSPOTS_SHARED_DATA", str(shared))
    assert default_layer("toronto-mci") is PRESETS["toronto-neighbourhoods"]
    assert default_layer("chicago") is PRESETS["chicago-community-areas"]
    assert default_layer("mycity") is None  # no shipped layer: audit with --layer-config
    monkeypatch.setenv("HOTSPOTS_SHARED_DATA", str(tmp_path))  # a machine without the layers
    assert default_layer("toronto-mci") is None
