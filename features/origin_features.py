"""One origin's feature matrix (every cell), memoised per panel lineage, so model versions share it.

A served forecast needs the features of one shift for every cell (about 0.05 s of CPU for a city of 6,000 cells),
then a cheaper booster call. The features depend on the panel's history and the feature configuration, not on the
model: when a new champion version is warmed up on the shifts planners recently asked for, or an alias moves
back and forth, every version with the same configuration reads the same matrices instead of rebuilding them.

The key is the panel's lineage (a loaded panel and its ``until`` views share it; a reloaded or updated panel gets
a new one), the origin, the end of the view the features were built from, and the configuration. The matrices
are read-only and the cache is bounded by bytes.
"""

from __future__ import annotations

import threading

from cachetools import LRUCache

from features.matrix import FeatureConfig, FeatureMatrix, build_features
from features.panel import CountPanel

CACHE_BYTES = 64 * 2**20  # ~80 origins of a 6,000-cell city at 33 float32 features

_matrices: LRUCache[tuple, FeatureMatrix] = LRUCache(maxsize=CACHE_BYTES, getsizeof=lambda m: m.X.nbytes)
_lock = threading.Lock()


def features_at(panel: CountPanel, origin: int, config: FeatureConfig) -> FeatureMatrix:
    """The feature matrix of ``origin`` from the panel's history before it (shared, read-only: do not write)."""
    origin = int(origin)
    view = panel.until(origin)
    key = (view.lineage, origin, view.end_shift, config)
    with _lock:
        found = _matrices.get(key)
    if found is not None:
        return found
    matrix = build_features(view, origin, config)  # two threads may both build it: the results are equal
    matrix.X.flags.writeable = False
    if matrix.X.nbytes <= CACHE_BYTES // 8:  # one huge matrix must not evict every other
        with _lock:
            _matrices[key] = matrix
    return matrix


def clear() -> None:
    with _lock:
        _matrices.clear()
