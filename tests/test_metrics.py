"""Metrics against hand-computed values, ties included."""

import numpy as np
import pytest

from forecasting.metrics import (
    bootstrap_weights,
    calibration,
    cells_for_coverage,
    hit_rate_curve,
    poisson_deviance,
    pooled,
    rank_cells,
    ranking,
    shift_hits,
    summarise,
    summarise_all,
)

EXPECTED = np.array([[3.0, 2.0, 2.0, 0.0], [0.0, 0.0, 5.0, 1.0]])
OBSERVED = np.array([[1.0, 0.0, 2.0, 1.0], [0.0, 1.0, 1.0, 0.0]])
EQUAL = np.ones(4)


def test_top_cell_hit_rate_pai_pei_rri():
    h = shift_hits(EXPECTED, OBSERVED, EQUAL, np.array([10, 11]), coverages=[0.25])
    m = pooled(h)
    assert h.hits[:, 0].tolist() == [1, 1] and h.best[:, 0].tolist() == [2, 1]
    assert m["hit_rate"][0] == pytest.approx(2 / 6)
    assert m["pai"][0] == pytest.approx((2 / 6) / 0.25)
    assert m["pei"][0] == pytest.approx(2 / 3)
    # forecast share in flagged cells: (3 + 5) / (7 + 6); observed share 2/6
    assert m["rri"][0] == pytest.approx((8 / 13) / (2 / 6))


def test_full_coverage_catches_everything():
    m = pooled(shift_hits(EXPECTED, OBSERVED, EQUAL, np.array([1, 2]), coverages=[1.0]))
    assert m["hit_rate"][0] == 1 and m["pai"][0] == 1 and m["pei"][0] == 1


def test_ties_broken_by_seeded_permutation_deterministic_and_fair():
    tied = np.array([[5.0, 1.0, 1.0, 0.0]])
    firsts = []
    for sid in range(400):
        order = rank_cells(tied, sid)[0]
        assert order[0] == 0 and order[-1] == 3
        firsts.append(order[1])
        assert np.array_equal(order, rank_cells(tied, sid)[0])  # same shift, same order
    share = np.mean(np.array(firsts) == 1)
    assert 0.4 < share < 0.6  # neither tied cell is favoured
    # the tie decides the hits at 50% coverage: either 1 + 0 or 1 + 2
    hits = {shift_hits(EXPECTED[:1], OBSERVED[:1], EQUAL, np.array([s]), coverages=[0.5]).hits[0, 0] for s in range(50)}
    assert hits == {1.0, 3.0}


def test_coverage_is_by_area_not_cell_count():
    areas = np.array([1.0, 3.0, 1.0, 1.0])  # total 6
    order = np.array([1, 0, 2, 3])
    assert cells_for_coverage(areas, order, 0.5) == 1  # the big cell alone is half the area
    assert cells_for_coverage(areas, order, 0.51) == 2
    h = shift_hits(np.array([[0.0, 9.0, 1.0, 0.5]]), np.array([[0.0, 1.0, 1.0, 0.0]]), areas, np.array([0]), coverages=[0.5])
    assert h.n_flagged[0, 0] == 1 and h.area_share[0, 0] == pytest.approx(0.5) and pooled(h)["pai"][0] == pytest.approx(1.0)


def test_poisson_deviance_hand_value():
    assert poisson_deviance(np.array([1.0, 1.0]), np.array([0.0, 2.0])) == pytest.approx(2 * np.log(2))
    assert poisson_deviance(np.array([2.0, 3.0]), np.array([2.0, 3.0])) == pytest.approx(0.0)


def test_calibration_by_decile():
    mu = np.repeat(np.arange(1.0, 11.0), 10)
    y = mu * 2
    cal = calibration(mu, y, bins=10)
    assert np.allclose(cal["observed"], 2 * cal["predicted"]) and cal["n"].sum() == 100


def test_block_bootstrap_resamples_whole_days():
    blocks = np.repeat(np.arange(5), 3)
    w = bootstrap_weights(blocks, 200, seed=1)
    assert w.shape == (200, 15) and np.all(w.sum(axis=1) == 15)
    assert np.all(w.reshape(200, 5, 3).std(axis=2) == 0)  # the three shifts of a day move together


def test_summary_interval_contains_point_and_curve_is_monotone():
    rng = np.random.default_rng(0)
    truth = rng.gamma(0.5, 1.0, size=(90, 200))
    observed = rng.poisson(truth)
    s = summarise(truth, observed, np.ones(200), np.arange(90), per_day=3, coverages=[0.05, 0.2], n_boot=200)
    assert np.all(s.low["hit_rate"] <= s.point["hit_rate"]) and np.all(s.point["hit_rate"] <= s.high["hit_rate"])
    assert s.point["hit_rate"][1] > s.point["hit_rate"][0]
    grid, curve = hit_rate_curve(truth, observed, np.ones(200), np.arange(90))
    assert curve[0] == 0 and curve[-1] == pytest.approx(1.0) and np.all(np.diff(curve) >= -1e-12)


def _lexsort_ranking(expected, shift_ids, observed=None, seed=20240101):
    """The former per-shift ranking, kept here as the reference the vectorised one must equal."""
    out = np.empty(expected.shape, dtype=np.int64)
    for i, (row, sid) in enumerate(zip(expected, shift_ids)):
        tiebreak = np.random.default_rng([seed, int(sid)]).permutation(row.size)
        out[i] = np.lexsort((tiebreak, -row) if observed is None else (tiebreak, observed[i], -row))
    return out


def test_vectorised_ranking_equals_per_shift_lexsort_with_ties():
    rng = np.random.default_rng(3)
    expected = rng.integers(0, 4, size=(40, 300)).astype(float)  # many ties
    observed = rng.poisson(0.5, size=expected.shape).astype(float)
    ids = np.arange(1000, 1040)
    assert np.array_equal(rank_cells(expected, ids), _lexsort_ranking(expected, ids))
    assert np.array_equal(rank_cells(expected, ids, worst_first=observed), _lexsort_ranking(expected, ids, observed))
    assert np.array_equal(rank_cells(expected[3], 1003)[0], _lexsort_ranking(expected[3:4], [1003])[0])


def test_frozen_arrays_are_scored_once_and_identically():
    rng = np.random.default_rng(4)
    expected, observed = rng.gamma(0.3, size=(30, 200)), rng.poisson(0.4, size=(30, 200)).astype(float)
    areas, ids = rng.uniform(0.5, 1.5, 200), np.arange(30)
    fresh = shift_hits(expected, observed, areas, ids)
    frozen_e, frozen_o = expected.copy(), observed.copy()
    frozen_e.setflags(write=False)
    frozen_o.setflags(write=False)
    first = shift_hits(frozen_e, frozen_o, areas, ids)
    assert shift_hits(frozen_e, frozen_o, areas, ids) is first  # remembered
    assert shift_hits(frozen_e.copy(), frozen_o, areas, ids) is not first  # another array is scored anew
    for field in ("hits", "best", "predicted_in", "area_share", "n_flagged"):
        assert np.array_equal(getattr(first, field), getattr(fresh, field))
    for ties in ("random", "pessimistic"):  # other coverages reuse the remembered ranking: same figures
        again = shift_hits(frozen_e, frozen_o, areas, ids, coverages=[0.01, 0.3, 1.0], ties=ties)
        anew = shift_hits(expected, observed, areas, ids, coverages=[0.01, 0.3, 1.0], ties=ties)
        assert np.array_equal(again.hits, anew.hits) and np.array_equal(again.n_flagged, anew.n_flagged)


def test_bootstrap_replicates_at_once_equal_one_at_a_time():
    rng = np.random.default_rng(5)
    expected, observed = rng.gamma(0.3, size=(60, 100)), rng.poisson(0.4, size=(60, 100)).astype(float)
    h = shift_hits(expected, observed, np.ones(100), np.arange(60), coverages=[0.01, 0.05, 0.2])
    weights = bootstrap_weights(np.arange(60) // 3, 50, seed=0)
    together = pooled(h, weights)
    for k, w in enumerate(weights):
        one = pooled(h, w)
        for name, values in one.items():
            np.testing.assert_allclose(together[name][k], values, rtol=1e-12, equal_nan=True)


def _full_cumsum_hits(expected, observed, areas, ids, coverages):
    """shift_hits' hits, flagged counts and area shares the long way: cumulative areas over every rank."""
    order = rank_cells(expected, ids)
    cum_area = np.cumsum(areas[order], axis=1)
    targets = np.asarray(coverages) * areas.sum() - 1e-12
    k = np.minimum(np.stack([np.searchsorted(row, targets) for row in cum_area]) + 1, areas.size)
    cum_obs = np.cumsum(np.take_along_axis(observed, order, axis=1), axis=1)
    return (np.take_along_axis(cum_obs, k - 1, axis=1), k,
            np.take_along_axis(cum_area, k - 1, axis=1) / areas.sum())


@pytest.mark.parametrize("spread", [0.0, 0.5, 0.95])
def test_cumulative_areas_over_the_reachable_ranks_equal_all_ranks(spread):
    """shift_hits sums cell areas only over the ranks any coverage can reach: the same k, hits and area shares
    as over every rank, with equal, varied and very unequal cell areas, up to full coverage."""
    rng = np.random.default_rng(7)
    expected = rng.integers(0, 3, size=(25, 400)).astype(float)  # many ties
    observed = rng.poisson(0.6, size=expected.shape).astype(float)
    areas, ids = rng.uniform(1 - spread, 1 + spread, 400), np.arange(25)
    coverages = [0.0025, 0.01, 0.05, 0.2, 0.5, 0.999, 1.0]
    h = shift_hits(expected, observed, areas, ids, coverages=coverages)
    hits, k, share = _full_cumsum_hits(expected, observed, areas, ids, coverages)
    assert np.array_equal(h.n_flagged, k) and np.array_equal(h.hits, hits) and np.array_equal(h.area_share, share)
    small = shift_hits(expected, observed, areas, ids, coverages=[0.01, 0.05])  # a short reach: few ranks summed
    assert np.array_equal(small.n_flagged, k[:, 1:3]) and np.array_equal(small.hits, hits[:, 1:3])


def test_summaries_in_threads_equal_one_after_another():
    """summarise_all scores forecasters two at a time: every figure equals summarise's, in the order given."""
    rng = np.random.default_rng(8)
    observed = rng.poisson(0.4, size=(45, 150)).astype(float)
    observed.setflags(write=False)
    predictions = {name: rng.gamma(0.3, size=observed.shape).round(1) for name in ("c", "a", "b")}
    for pred in predictions.values():
        pred.setflags(write=False)
    areas, ids = rng.uniform(0.5, 1.5, 150), np.arange(300, 345)
    together = summarise_all(predictions, observed, areas, ids, 3, n_boot=200, threads=2)
    assert list(together) == ["c", "a", "b"]
    for name, pred in predictions.items():
        alone = summarise(pred.copy(), observed.copy(), areas, ids, 3, n_boot=200)  # fresh arrays: not remembered
        got = together[name]
        assert got.deviance == alone.deviance and got.crimes == alone.crimes
        for part in ("point", "low", "high", "pessimistic"):
            for metric, values in getattr(alone, part).items():
                assert np.array_equal(getattr(got, part)[metric], values, equal_nan=True), (name, part, metric)


def test_remembered_ranking_is_rank_cells_and_is_reused():
    """The per-category rates, the diagnostics and the bias audit take the backtest's remembered ranking
    (``ranking``): the same cells in the same order as ``rank_cells``, ranked once per frozen forecast."""
    rng = np.random.default_rng(9)
    expected = rng.integers(0, 4, size=(20, 120)).astype(float)  # many ties
    observed = rng.poisson(0.5, size=expected.shape).astype(float)
    ids = np.arange(500, 520)
    frozen_e, frozen_o = expected.copy(), observed.copy()
    frozen_e.setflags(write=False)
    frozen_o.setflags(write=False)
    first = ranking(frozen_e, ids)
    assert np.array_equal(first, rank_cells(expected, ids)) and ranking(frozen_e, ids) is first
    worst = ranking(frozen_e, ids, worst_first=frozen_o)
    assert np.array_equal(worst, rank_cells(expected, ids, worst_first=observed)) and worst is not first
    assert ranking(expected, ids) is not ranking(expected, ids)  # a writable array is ranked anew each time


@pytest.mark.parametrize("case", ["counts", "fractional", "nan"])
def test_remembered_pessimistic_ranking_equals_rank_cells(case):
    """The remembered pessimistic ranking re-sorts the ties of the random one (counts), or ranks anew where that
    shortcut does not hold (fractional counts, NaN forecasts): always rank_cells' order."""
    rng = np.random.default_rng(10)
    expected = rng.integers(0, 3, size=(15, 90)).astype(float) * 0.5
    observed = rng.poisson(0.8, size=expected.shape).astype(float)
    if case == "fractional":
        observed = observed * 0.5 + 0.25
    if case == "nan":
        expected[2, :5] = np.nan
    expected[0, :10] = -0.0  # equal to 0.0 in both orders
    ids = np.arange(40, 55)
    want = rank_cells(expected, ids, worst_first=observed)
    frozen_e, frozen_o = expected.copy(), observed.copy()
    frozen_e.setflags(write=False)
    frozen_o.setflags(write=False)
    assert np.array_equal(ranking(frozen_e, ids, worst_first=frozen_o), want)
