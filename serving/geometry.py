"""GeoJSON geometry of H3 cells, from h3 itself."""

from __future__ import annotations

from functools import lru_cache

import h3


@lru_cache(maxsize=2**16)  # a cell's ring never changes; a city-wide GeoJSON asks for thousands
def hexagon_ring(h3_id: str) -> list[tuple[float, float]]:
    """RFC 7946 exterior ring of a cell: [lon, lat] positions, counter-clockwise, closed (h3's GeoJSON order)."""
    ring = h3.cells_to_geo([h3_id])["coordinates"][0]
    return [(round(lng, 7), round(lat, 7)) for lng, lat in ring]  # shared between bodies: never mutated
