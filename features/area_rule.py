"""The default study area's guard when a profile has no bounding box: points far outside the bulk of the data.

Rule (documented in the README): take the median longitude and latitude of the points with usable coordinates;
measure every point's distance from it (km, equirectangular); a point is far when its distance exceeds
``factor`` x the 90th percentile distance (and at least ``MIN_RADIUS_KM``). Up to 10% of the points can be junk
without moving the threshold, and a city's own outskirts are never cut: they sit inside the 90th percentile
times four. Batches of fewer than ``MIN_POINTS`` points are not judged (too few to know the bulk).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

QUANTILE = 0.90
MIN_POINTS = 50
MIN_RADIUS_KM = 5.0
CITY_SPAN_KM = 150.0  # a study area wider than this is implausible for one city
KM_PER_DEG = 111.195


def distances_km(lat: np.ndarray, lon: np.ndarray, lat0: float, lon0: float) -> np.ndarray:
    dx = (lon - lon0) * np.cos(np.radians(lat0)) * KM_PER_DEG
    dy = (lat - lat0) * KM_PER_DEG
    return np.hypot(dx, dy)


@dataclass(frozen=True)
class BulkRule:
    far: np.ndarray  # True where a usable point is far outside the bulk
    centre: tuple[float, float] | None  # (lat, lon) median
    radius_km: float | None  # the threshold used

    def note(self) -> str | None:
        n = int(self.far.sum())
        if not n or self.centre is None:
            return None
        return (f"{n:,} point(s) lie more than {self.radius_km:,.1f} km from the median point "
                f"({self.centre[0]:.4f}, {self.centre[1]:.4f}), far outside the bulk of the data: quarantined as "
                f"out_of_area (set area.bbox in the profile to decide the area yourself, or area.outliers = 'off')")


def far_from_bulk(lat: np.ndarray, lon: np.ndarray, usable: np.ndarray, factor: float) -> BulkRule:
    """Flag usable points far from the median point (see the module docstring)."""
    far = np.zeros(lat.shape[0], dtype=bool)
    if usable.sum() < MIN_POINTS:
        return BulkRule(far, None, None)
    lat0, lon0 = float(np.median(lat[usable])), float(np.median(lon[usable]))
    dist = distances_km(lat[usable], lon[usable], lat0, lon0)
    radius = max(factor * float(np.quantile(dist, QUANTILE)), MIN_RADIUS_KM)
    far[np.flatnonzero(usable)[dist > radius]] = True
    return BulkRule(far, (lat0, lon0), radius)


@dataclass(frozen=True)
class FixedBulk:
    """The rule measured once on a whole file (``measure``), applied to each chunk of it (``applied``)."""

    centre: tuple[float, float] | None
    radius_km: float | None

    @classmethod
    def measure(cls, lat: np.ndarray, lon: np.ndarray, factor: float) -> FixedBulk:
        rule = far_from_bulk(lat, lon, np.ones(lat.shape[0], dtype=bool), factor)
        return cls(rule.centre, rule.radius_km)

    def applied(self, lat: np.ndarray, lon: np.ndarray, usable: np.ndarray) -> BulkRule:
        far = np.zeros(lat.shape[0], dtype=bool)
        if self.centre is not None and self.radius_km is not None and usable.any():
            dist = distances_km(lat[usable], lon[usable], *self.centre)
            far[np.flatnonzero(usable)[dist > self.radius_km]] = True
        return BulkRule(far, self.centre, self.radius_km)


def span_km(lat: np.ndarray, lon: np.ndarray) -> float:
    """Diagonal of the points' bounding box in km (0 for fewer than two points)."""
    if lat.size < 2:
        return 0.0
    mid = float(np.mean([lat.min(), lat.max()]))
    dx = (lon.max() - lon.min()) * np.cos(np.radians(mid)) * KM_PER_DEG
    dy = (lat.max() - lat.min()) * KM_PER_DEG
    return float(np.hypot(dx, dy))


def span_note(lat: np.ndarray, lon: np.ndarray) -> str | None:
    """A warning when the accepted points span more than a city plausibly does."""
    span = span_km(lat, lon)
    if span <= CITY_SPAN_KM:
        return None
    return (f"the accepted points span {span:,.0f} km (latitude {lat.min():.3f} to {lat.max():.3f}, longitude "
            f"{lon.min():.3f} to {lon.max():.3f}): implausibly large for a city; check coordinates.crs and the x/y "
            f"columns, and set area.bbox in the profile")
