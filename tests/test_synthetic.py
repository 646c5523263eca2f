"""The synthetic self-exciting city: simulation statistics and the exactness of the true expected counts."""

from __future__ import annotations

from datetime import date

import h3
import numpy as np
import polars as pl
import pytest
import scipy.linalg

from features.calendar import ShiftCalendar
from features.grid import StudyArea, points_to_cells
from features.panel import build_panel
from features.synthetic import (
    SyntheticCity,
    background_from_rates,
    simulate,
    smooth_background,
)
from features.validation import CANONICAL_SCHEMA

CAL = ShiftCalendar("America/Toronto")
FIRST = CAL.local_day(date(2021, 1, 1)) * CAL.per_day
US_PER_HOUR = 3_600_000_000


def disk_area(k: int) -> StudyArea:
    """Real downtown-Toronto H3 cells (resolution 8) within k rings of King & Bay."""
    centre = h3.latlng_to_cell(43.65, -79.38, 8)
    return StudyArea(np.array([h3.str_to_int(c) for c in h3.grid_disk(centre, k)], dtype=np.uint64), 8, "toronto")


@pytest.fixture(scope="module")
def area() -> StudyArea:
    return disk_area(3)  # 37 cells, the outer ring has fewer than 6 neighbours inside the area


@pytest.fixture(scope="module")
def background(area: StudyArea) -> np.ndarray:
    return smooth_background(area, total_per_day=60, seed=1)


@pytest.fixture(scope="module")
def hawkes(area: StudyArea, background: np.ndarray):
    city = SyntheticCity(area, CAL, background, branching_ratio=0.5)
    return simulate(city, FIRST, FIRST + 3 * 150, seed=11, burn_in_shifts=30)


def shift_index(result) -> np.ndarray:
    return CAL.shift_ids(result.incidents["occurred_at"]) - result.first_shift


def test_same_seed_same_city_other_seed_other_city(area, background):
    city = SyntheticCity(area, CAL, background, branching_ratio=0.4)
    a = simulate(city, FIRST, FIRST + 60, seed=3)
    b = simulate(city, FIRST, FIRST + 60, seed=3)
    c = simulate(city, FIRST, FIRST + 60, seed=4)
    assert a.incidents.height > 100
    assert a.incidents.equals(b.incidents)
    np.testing.assert_array_equal(a.true_expected, b.true_expected)
    np.testing.assert_array_equal(a.generation, b.generation)
    assert not a.incidents["occurred_at"].equals(c.incidents["occurred_at"])
    assert not np.array_equal(a.true_expected, c.true_expected)  # different histories, different forecasts
    np.testing.assert_array_equal(a.background_expected, c.background_expected)


def test_incidents_are_canonical_and_bin_back_into_their_cells(area, hawkes):
    inc = hawkes.incidents
    assert dict(inc.schema) == CANONICAL_SCHEMA
    assert inc["incident_id"][0] == "syn-000001"
    assert inc["incident_id"].n_unique() == inc.height
    assert inc["occurred_at"].is_sorted()
    assert set(inc["source"].unique()) == {"synthetic"} and set(inc["timezone"].unique()) == {"America/Toronto"}
    assert set(inc["category"].unique()) == {"synthetic"}

    lat, lon = inc["latitude"].to_numpy(), inc["longitude"].to_numpy()
    expected_cells = area.cells[hawkes.cell_index]
    np.testing.assert_array_equal(points_to_cells(lat, lon, 8), expected_cells)
    sample = np.random.default_rng(0).choice(inc.height, 200, replace=False)
    assert all(h3.str_to_int(h3.latlng_to_cell(lat[i], lon[i], 8)) == expected_cells[i] for i in sample)
    # jittered (not stacked on the centroid) but within ~1/3 of an edge of it
    clat, clon = (c[hawkes.cell_index] for c in area.centroids)
    dist_m = np.array([h3.great_circle_distance((lat[i], lon[i]), (clat[i], clon[i]), "m") for i in sample])
    edge_m = h3.average_hexagon_edge_length(8, "m")
    assert np.all(dist_m < 0.4 * edge_m) and np.median(dist_m) > 0.1 * edge_m
    assert hawkes.meta["centroid_fallbacks"] == 0

    panel, report = build_panel(inc, area, CAL, ("synthetic",), first_shift=hawkes.first_shift, end_shift=hawkes.end_shift)
    assert report.binned == inc.height and report.balanced
    assert int(panel.counts["count"].sum()) == inc.height
    dense = panel.dense(hawkes.first_shift, hawkes.end_shift, dtype=np.int64)
    own = np.zeros_like(dense)
    np.add.at(own, (shift_index(hawkes), hawkes.cell_index), 1)
    np.testing.assert_array_equal(dense, own)
    np.testing.assert_array_equal(hawkes.panel().dense(hawkes.first_shift, hawkes.end_shift, dtype=np.int64), own)


def test_without_triggering_counts_match_the_background(area, background):
    city = SyntheticCity(area, CAL, background, branching_ratio=0.0)
    res = simulate(city, FIRST, FIRST + 3 * 365, seed=5)
    np.testing.assert_array_equal(res.true_expected, res.background_expected)
    assert np.all(res.generation == 0)
    counts = np.zeros(res.true_expected.shape)
    np.add.at(counts, (shift_index(res), res.cell_index), 1)
    expected = res.background_expected

    # overall mean count per cell-shift
    total, mean = counts.sum(), expected.sum()
    assert abs(total - mean) < 4 * np.sqrt(mean)
    # per cell: Poisson chi-square over the 37 cells (sd of chi2_k is sqrt(2k))
    per_cell, per_cell_exp = counts.sum(0), expected.sum(0)
    chi2 = np.sum((per_cell - per_cell_exp) ** 2 / per_cell_exp)
    k = area.cells.size
    assert abs(chi2 - k) < 5 * np.sqrt(2 * k)
    # the shift-of-day profile (0.7, 1.2, 1.1) is reproduced
    day_part = np.arange(counts.shape[0]) % 3
    for s in range(3):
        n_s, e_s = counts[day_part == s].sum(), expected[day_part == s].sum()
        assert abs(n_s - e_s) < 4 * np.sqrt(e_s)
    assert counts[day_part == 0].sum() < 0.75 * counts[day_part == 1].sum()


def test_long_run_total_is_background_over_one_minus_theta(area, background):
    theta = 0.5
    city = SyntheticCity(area, CAL, background, branching_ratio=theta)
    res = simulate(city, FIRST, FIRST + 3 * 365, seed=8, burn_in_shifts=3 * 20)
    n = res.incidents.height
    bg = res.background_expected.sum()
    target = bg / (1 - theta)
    # a cluster process's total has variance mu T / (1 - theta)^3; offspring cut off by the end lose
    # about theta / ((1 - theta) omega T) of the total
    sd = np.sqrt(bg / (1 - theta) ** 3)
    edge = target * theta / ((1 - theta) * city.decay_per_hour * res.shift_hours.sum())
    assert abs(n - target) < 4 * sd + edge
    assert n > 1.8 * bg  # far from the background-only total
    # the immigrant share is 1 - theta
    assert abs(np.mean(res.generation == 0) - (1 - theta)) < 0.02


@pytest.mark.parametrize("decay_per_hour", [1 / 24, 0.25])
def test_true_expected_sums_to_the_events(area, background, decay_per_hour):
    """N - E[N | past] is a martingale difference, so the sums agree within the cluster-inflated noise.
    With omega = 0.25/h most offspring fall in their parent's shift, so a missing in-shift cascade would
    miss by ~20 standard errors."""
    theta = 0.5
    city = SyntheticCity(area, CAL, background, branching_ratio=theta, decay_per_hour=decay_per_hour)
    res = simulate(city, FIRST, FIRST + 3 * 240, seed=21, burn_in_shifts=30)
    n, e = res.incidents.height, res.true_expected.sum()
    # Var(N | past) <= E / (1 - theta)^2 for Poisson(theta) branching
    sd = np.sqrt(e) / (1 - theta)
    assert abs(n - e) < 4 * sd
    assert e > 1.6 * res.background_expected.sum()
    counts = np.zeros(res.true_expected.shape)
    np.add.at(counts, (shift_index(res), res.cell_index), 1)
    z = (counts.sum(0) - res.true_expected.sum(0)) / (np.sqrt(res.true_expected.sum(0)) / (1 - theta))
    assert np.max(np.abs(z)) < 4.5
    # the conditional mean beats the background-only forecast on squared error, as the best forecast must
    assert np.mean((counts - res.true_expected) ** 2) < np.mean((counts - res.background_expected / (1 - theta)) ** 2)


@pytest.mark.parametrize(("theta", "omega", "spread", "rtol"), [(0.3, 1 / 24, 0.3, 1e-10), (0.6, 0.25, 0.4, 3e-8)])
def test_true_expected_equals_the_exact_matrix_exponential(theta, omega, spread, rtol):
    """Independent check of the RK4 integration: the expected count solves a linear ODE, so it is exactly
    expm(L M) applied to [start excitation, background, 0] with M = [[-w I + t w K', t w K', 0], [0, 0, 0],
    [I, I, 0]]. The window covers the spring DST change (a 7-hour shift). RK4's error grows as (omega h)^4,
    hence the looser tolerance for the fast kernel."""
    area = disk_area(1)
    n = 7
    city = SyntheticCity(area, CAL, smooth_background(area, 40, seed=2), branching_ratio=theta,
                         decay_per_hour=omega, spread=spread)
    first = CAL.local_day(date(2021, 3, 12)) * 3
    res = simulate(city, first, first + 9, seed=9)
    assert sorted(set(res.shift_hours.tolist())) == [7.0, 8.0]

    adj = area.ring1.toarray().astype(np.float64)  # ring1 is float32
    deg = adj.sum(1)
    kernel = np.diag(1 - spread * (deg > 0)) + spread * adj / np.maximum(deg, 1)[:, None]
    np.testing.assert_allclose(kernel.sum(1), 1.0)
    t_h = res.incidents["occurred_at"].dt.epoch("us").to_numpy() / US_PER_HOUR
    starts_h = CAL.starts_utc(np.arange(first, first + 10)).astype(np.int64) / US_PER_HOUR
    for s in range(9):
        a, length = starts_h[s], starts_h[s + 1] - starts_h[s]
        before = t_h < a
        x0 = theta * omega * (np.exp(-omega * (a - t_h[before])) @ kernel[res.cell_index[before]])
        mu = res.background_expected[s] / length
        m = np.zeros((3 * n, 3 * n))
        m[:n, :n] = -omega * np.eye(n) + theta * omega * kernel.T
        m[:n, n : 2 * n] = theta * omega * kernel.T
        m[2 * n :, :n] = np.eye(n)
        m[2 * n :, n : 2 * n] = np.eye(n)
        z = scipy.linalg.expm(length * m) @ np.concatenate([x0, mu, np.zeros(n)])
        np.testing.assert_allclose(res.true_expected[s], z[2 * n :], rtol=rtol, atol=1e-12)
    # the triggered part is a real share of the forecast here
    assert res.true_expected.sum() > (1 + theta / 3) * res.background_expected.sum()


def test_a_burst_raises_the_next_shifts_expectation(hawkes):
    city = hawkes.city
    counts = np.zeros(hawkes.true_expected.shape)
    s_idx = shift_index(hawkes)
    np.add.at(counts, (s_idx, hawkes.cell_index), 1)
    t, c = np.unravel_index(np.argmax(counts[:-2]), counts[:-2].shape)
    assert counts[t, c] >= 5
    nxt = t + 1
    # lower bound from the burst's direct children alone (the cascade only adds):
    # theta (1 - spread) * P(delay lands in shift t+1) per event
    t_h = hawkes.incidents["occurred_at"].dt.epoch("us").to_numpy() / US_PER_HOUR
    starts_h = CAL.starts_utc(np.array([hawkes.first_shift + nxt, hawkes.first_shift + nxt + 1])).astype(np.int64) / US_PER_HOUR
    burst = t_h[(s_idx == t) & (hawkes.cell_index == c)]
    w = city.decay_per_hour
    bound = city.branching_ratio * (1 - city.spread) * np.sum(
        np.exp(-w * (starts_h[0] - burst)) - np.exp(-w * (starts_h[1] - burst)))
    assert hawkes.true_expected[nxt, c] >= hawkes.background_expected[nxt, c] + bound
    assert hawkes.true_expected[nxt, c] > 1.5 * hawkes.background_expected[nxt, c]
    # the excitation spills into the neighbours too
    neighbours = hawkes.city.study_area.ring1[c].indices
    assert np.all(hawkes.true_expected[nxt, neighbours] > hawkes.background_expected[nxt, neighbours])


def test_dst_shifts_integrate_the_real_length(area, background):
    city = SyntheticCity(area, CAL, background, branching_ratio=0.0)
    spring = CAL.local_day(date(2021, 3, 13)) * 3 + 2  # 22:00 Sat 13 Mar -> 06:00 Sun 14 Mar (EST -> EDT)
    fall = CAL.local_day(date(2021, 11, 6)) * 3 + 2  # 22:00 Sat 6 Nov -> 06:00 Sun 7 Nov (EDT -> EST)
    for shift, hours in ((spring, 7.0), (fall, 9.0)):
        week_before = shift - 7 * 3
        res = simulate(city, week_before, shift + 1, seed=0)
        assert res.shift_hours[-1] == hours and res.shift_hours[0] == 8.0
        assert CAL.bounds([shift])["hours"][0] == hours
        rate = background * (1.1 / np.mean((0.7, 1.2, 1.1))) * 1.1  # night shift, Saturday
        np.testing.assert_allclose(res.background_expected[-1], rate * hours)
        np.testing.assert_allclose(res.background_expected[-1], res.background_expected[0] * hours / 8)
        # and the simulated background events of that shift all fall inside its 7 or 9 hours
        ids = CAL.shift_ids(res.incidents["occurred_at"])
        bounds = CAL.bounds([shift])
        times = res.incidents.filter(pl.Series(ids == shift))["occurred_at"]
        assert times.min() >= bounds["start_utc"][0] and times.max() < bounds["end_utc"][0]


def test_smooth_background_is_hot_in_places_and_near_zero_elsewhere(area):
    bg = smooth_background(area, total_per_day=50, seed=7)
    np.testing.assert_array_equal(bg, smooth_background(area, total_per_day=50, seed=7))
    assert bg.shape == (37,) and np.all(bg > 0)
    assert bg.sum() * 24 == pytest.approx(50)
    top = np.sort(bg)[::-1]
    assert top[:4].sum() > 0.3 * bg.sum()  # ~10% of cells carry > 30% of the rate
    assert np.mean(bg < 0.25 * bg.mean()) > 0.2  # and many cells are nearly empty
    # spatially smooth: neighbouring cells' log rates are positively correlated
    rows, cols = area.ring1.nonzero()
    logs = np.log(bg)
    assert np.corrcoef(logs[rows], logs[cols])[0, 1] > 0.3
    floored = smooth_background(area, total_per_day=50, seed=7, floor_share=0.2)
    assert floored.min() >= 0.2 * 50 / 24 / 37 - 1e-12

    rates = background_from_rates(area, np.arange(37, dtype=float), hours=100.0, floor=0.01)
    np.testing.assert_allclose(rates, np.arange(37) / 100 + 0.01)
    with pytest.raises(ValueError):
        background_from_rates(area, np.ones(5), hours=10.0)


def test_categories_are_drawn_by_weight(area, background):
    city = SyntheticCity(area, CAL, background, branching_ratio=0.2, categories=("theft", "assault"),
                         category_weights=(3, 1))
    res = simulate(city, FIRST, FIRST + 3 * 60, seed=2)
    share = (res.incidents["category"] == "theft").mean()
    assert abs(share - 0.75) < 4 * np.sqrt(0.75 * 0.25 / res.incidents.height)
    np.testing.assert_allclose(city.category_probabilities, [0.75, 0.25])


def test_invalid_configurations_are_rejected(area, background):
    with pytest.raises(ValueError, match="branching_ratio"):
        SyntheticCity(area, CAL, background, branching_ratio=1.0)
    with pytest.raises(ValueError, match="background"):
        SyntheticCity(area, CAL, background[:-1])
    with pytest.raises(ValueError, match="shift_profile"):
        SyntheticCity(area, CAL, background, shift_profile=(1.0, 1.0))
    with pytest.raises(ValueError):
        simulate(SyntheticCity(area, CAL, background), FIRST, FIRST, seed=0)
