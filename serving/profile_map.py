"""The PNG map of a profile dry run: accepted points over the derived study area (``hotspots profile check``)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def write_check_map(latitude: np.ndarray, longitude: np.ndarray, cells: np.ndarray, out: Path, title: str,
                    max_points: int = 50_000) -> Path:
    """Cell centres of the study area (grey) under the accepted points (red), equal-ish aspect."""
    import h3

    fig, ax = plt.subplots(figsize=(7, 7), dpi=100)
    if cells.size:
        centres = np.array([h3.cell_to_latlng(h3.int_to_str(int(c))) for c in cells])
        ax.scatter(centres[:, 1], centres[:, 0], s=4, c="#cccccc", marker="h", linewidths=0, label="study area cells")
    if latitude.size:
        step = max(1, latitude.size // max_points)
        ax.scatter(longitude[::step], latitude[::step], s=1, c="#c0392b", alpha=0.5, linewidths=0,
                   label=f"accepted incidents ({latitude.size:,})")
        ax.set_aspect(1 / max(np.cos(np.radians(float(np.median(latitude)))), 0.1))
    ax.set_xlabel("longitude")
    ax.set_ylabel("latitude")
    ax.set_title(title)
    ax.legend(loc="upper right", markerscale=6, fontsize=8)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, bbox_inches="tight")
    plt.close(fig)
    return out
