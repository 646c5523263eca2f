"""H3 grid (bulk binning, study areas at resolutions 8 and 9) and the sparse count panel."""

from datetime import UTC, datetime

import h3
import numpy as np
import polars as pl
import pytest
import shapely

from features.calendar import ShiftCalendar
from features.grid import StudyArea, points_to_cells
from features.panel import CountPanel, build_panel

CATS = ["assault", "auto_theft", "break_and_enter", "robbery", "theft_over"]


@pytest.fixture(scope="module")
def toronto_2020(toronto_incidents):
    return toronto_incidents.filter(
        (pl.col("occurred_at") >= datetime(2020, 1, 1, tzinfo=UTC))
        & (pl.col("occurred_at") < datetime(2021, 1, 1, tzinfo=UTC))
    )


def test_bulk_binning_equals_h3_per_point(toronto_2020):
    sample = toronto_2020.sample(2000, seed=1)
    lat, lon = sample["latitude"].to_numpy(), sample["longitude"].to_numpy()
    for res in (8, 9):
        bulk = points_to_cells(lat, lon, res)
        reference = np.array([h3.str_to_int(h3.latlng_to_cell(a, b, res)) for a, b in zip(lat, lon)], dtype=np.uint64)
        np.testing.assert_array_equal(bulk, reference)


@pytest.mark.parametrize("res", [8, 9])
def test_study_area_from_data_covers_every_incident_and_empty_cells(toronto_2020, res):
    lat, lon = toronto_2020["latitude"].to_numpy(), toronto_2020["longitude"].to_numpy()
    area = StudyArea.from_points(lat, lon, res)
    occupied = np.unique(points_to_cells(lat, lon, res))
    assert (area.index_of(occupied) >= 0).all()
    assert len(area) > occupied.size  # cells with no recorded crime are part of the area
    # Toronto is ~630 km2; the derived area should be of that order
    assert 450 < area.areas_km2.sum() < 1000
    assert np.allclose(area.areas_km2.mean(), h3.average_hexagon_area(res, "km^2"), rtol=0.1)


def test_study_area_from_boundary_polygon_includes_edge_cells():
    square = shapely.box(-79.40, 43.64, -79.37, 43.66)
    area = StudyArea.from_boundary(square, 9)
    centre_fill = {h3.str_to_int(c) for c in h3.geo_to_cells(shapely.geometry.mapping(square), 9)}
    assert centre_fill <= set(area.cells.tolist())
    assert len(area) > len(centre_fill)  # overlap containment adds the cells straddling the edge
    corner = points_to_cells(np.array([43.6400001]), np.array([-79.3999999]), 9)
    assert area.index_of(corner)[0] >= 0


def test_study_area_from_real_boundary_layer(shared_data):
    area = StudyArea.from_file(shared_data / "areas" / "toronto.gpkg", 8, layer="city_boundary_dissolved")
    assert 600 < area.areas_km2.sum() < 800
    assert area.name == "toronto"


def test_ring_adjacency_is_symmetric_and_bounded():
    area = StudyArea([h3.str_to_int(c) for c in h3.grid_disk(h3.latlng_to_cell(43.65, -79.38, 9), 4)], 9)
    for k, max_degree in ((1, 6), (2, 12)):
        adj = area.ring_adjacency(k)
        assert (adj != adj.T).nnz == 0
        degree = np.asarray(adj.sum(axis=1)).ravel()
        assert degree.max() == max_degree and degree.min() >= 1
    centre = area.index_of(np.array([h3.str_to_int(h3.latlng_to_cell(43.65, -79.38, 9))]))[0]
    assert area.ring1[centre].nnz == 6 and area.ring2[centre].nnz == 12


def test_index_of_outside_is_minus_one():
    area = StudyArea([h3.str_to_int(c) for c in h3.grid_disk(h3.latlng_to_cell(43.65, -79.38, 9), 1)], 9)
    far = points_to_cells(np.array([41.88]), np.array([-87.63]), 9)
    assert area.index_of(far)[0] == -1


def test_panel_counts_and_roundtrip(toronto_2020, tmp_path):
    cal = ShiftCalendar("America/Toronto")
    lat, lon = toronto_2020["latitude"].to_numpy(), toronto_2020["longitude"].to_numpy()
    area = StudyArea.from_points(lat, lon, 8)
    panel, report = build_panel(toronto_2020, area, cal, CATS)
    assert report.balanced and report.binned == toronto_2020.height
    assert panel.counts["count"].sum() == toronto_2020.height
    dense = panel.dense(panel.first_shift, panel.end_shift)
    assert dense.shape == (panel.n_shifts, len(area)) and dense.sum() == toronto_2020.height
    by_cat = sum(panel.dense(panel.first_shift, panel.end_shift, category=c).sum() for c in CATS)
    assert by_cat == toronto_2020.height
    robberies = (toronto_2020["category"] == "robbery").sum()
    assert panel.dense(panel.first_shift, panel.end_shift, category="robbery").sum() == robberies
    # slicing agrees with a direct filter
    mid = panel.first_shift + 500
    direct = panel.counts.filter(pl.col("shift").is_between(mid, mid + 29))["count"].sum()
    assert panel.slice(mid, mid + 30)["count"].sum() == direct
    panel.save(tmp_path / "p")
    loaded = CountPanel.load(tmp_path / "p")
    assert loaded.counts.equals(panel.counts) and np.array_equal(loaded.study_area.cells, area.cells)
    assert loaded.calendar == cal and loaded.categories == tuple(CATS)


def test_panel_reports_incidents_outside_area_and_period(toronto_2020):
    cal = ShiftCalendar("America/Toronto")
    area = StudyArea.from_boundary(shapely.box(-79.40, 43.64, -79.37, 43.66), 9)
    first = cal.shift_of(datetime(2020, 6, 1, tzinfo=UTC))
    panel, report = build_panel(toronto_2020, area, cal, CATS, first_shift=first)
    assert report.balanced
    assert report.outside_study_area > 0 and report.outside_period > 0
    assert panel.counts["count"].sum() == report.binned


def test_unknown_category_is_an_error(toronto_2020):
    area = StudyArea.from_boundary(shapely.box(-79.40, 43.64, -79.37, 43.66), 9)
    with pytest.raises(ValueError, match="not in the panel's categories"):
        build_panel(toronto_2020, area, ShiftCalendar("America/Toronto"), ["assault"])
