"""The profile assistant: draft a profile from a sample of an export (``hotspots profile init``) and dry-run a
profile against a file (``hotspots profile check``).

Detection works on value shapes, with column names only as tie-breakers: a column is a time when at least 90%
of its sampled values parse with one format; coordinates are the numeric pair whose ranges fit longitude and
latitude, or easting and northing; the CRS of projected values is the candidate (UTM zones, NAD83 state
planes in metres and feet) that puts the median point inside its own area of use and nearest the time zone's
reference place (zone1970.tab), so a time zone (given or guessed) makes the guess much better.
"""

from __future__ import annotations

import gzip
import io
import json
import re
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import cast

import numpy as np
import polars as pl

from features.area_rule import distances_km
from features.profile import SourceProfile

SAMPLE_ROWS = 5000
SAMPLE_BYTES = 8 << 20
SHARE = 0.9
DATETIME_FORMATS = (
    "%Y-%m-%dT%H:%M:%S%.f%#z", "%Y-%m-%d %H:%M:%S%.f%#z", "%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M:%S%.f",
    "%Y/%m/%d %H:%M:%S%.f", "%Y/%m/%d %H:%M:%S%#z", "%m/%d/%Y %I:%M:%S %p", "%m/%d/%Y %I:%M %p", "%m/%d/%Y %H:%M:%S",
    "%m/%d/%Y %H:%M", "%d/%m/%Y %H:%M:%S", "%d/%m/%Y %H:%M", "%Y-%m-%dT%H:%M", "%Y-%m-%d %H:%M", "%d.%m.%Y %H:%M",
)
DATE_FORMATS = ("%Y-%m-%d", "%Y/%m/%d", "%m/%d/%Y", "%d/%m/%Y", "%d.%m.%Y", "%Y%m%d")
CLOCK_FORMATS = ("%H:%M:%S", "%H:%M")
PART_NAMES = {"year": (1900, 2100), "month": (1, 12), "day": (1, 31), "hour": (0, 23), "minute": (0, 59)}
ID_HINT = re.compile(r"(^|_| )(id|no|num|number|nbr|case|event|incident|report|ccn|objectid|uid)($|_| )|id$", re.I)
CATEGORY_HINT = re.compile(r"offen[cs]e|crime|categ|type|mci|ucr|class|charge|desc", re.I)
OCCURRED_HINT = re.compile(r"occ|from|start|incident|offen", re.I)
REPORTED_HINT = re.compile(r"report|rpt|end|to_|updated|created|modified", re.I)
X_HINT = re.compile(r"lon|lng|long|(^|_| )x($|_| )|^x|easting|point_x", re.I)
Y_HINT = re.compile(r"lat|(^|_| )y($|_| )|^y|northing|point_y", re.I)
ZONE_TAB = Path("/usr/share/zoneinfo/zone1970.tab")


class AssistantError(ValueError):
    """The sample cannot be read or holds nothing to detect; the message says what to do."""


# --- reading a sample ------------------------------------------------------------------------------------


def read_sample(path: Path, rows: int = SAMPLE_ROWS) -> pl.DataFrame:
    """The first ``rows`` rows of a CSV (gzipped or not; delimiter sniffed) or Parquet export, all as text."""
    if not path.is_file():
        raise AssistantError(f"no such file: {path}: give the export file (CSV, CSV.gz or Parquet)")
    if {s.lower() for s in path.suffixes} & {".parquet", ".pq"}:
        frame = pl.read_parquet(path, n_rows=rows)
        return frame.with_columns(pl.all().cast(pl.String))
    opener = gzip.open if path.suffix.lower() == ".gz" else open
    with opener(path, "rb") as fh:
        data = fh.read(SAMPLE_BYTES)
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    if len(data) == SAMPLE_BYTES and b"\n" in data:
        data = data[: data.rfind(b"\n") + 1]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = data.decode("latin-1")
    header = text.split("\n", 1)[0]
    delimiter = max((",", ";", "\t", "|"), key=header.count)
    if not header.strip():
        raise AssistantError(f"{path.name} is empty: expected a header row naming the columns, then incident rows")
    frame = pl.read_csv(io.StringIO(text), separator=delimiter, infer_schema=False, n_rows=rows,
                        truncate_ragged_lines=True)
    if frame.height == 0:
        raise AssistantError(f"{path.name} has a header but no rows: nothing to detect from")
    return frame.with_columns(pl.all().str.strip_chars().replace("", None))


# --- time ------------------------------------------------------------------------------------------------


def _share(values: pl.Series, fmt: str, dtype: pl.DataType) -> float:
    if values.len() == 0:
        return 0.0
    return float(values.str.strptime(dtype, fmt, strict=False).is_not_null().mean())  # type: ignore[arg-type]


def _best_format(values: pl.Series, formats: tuple[str, ...], dtype_of) -> tuple[str, float] | None:
    scored = [(f, _share(values, f, dtype_of(f))) for f in formats]
    best = max(scored, key=lambda fs: fs[1])
    return best if best[1] >= SHARE else None


def _format_set(values: pl.Series, formats: tuple[str, ...]) -> list[str] | None:
    """The fewest datetime formats (greedy) that together parse at least 90% of the values: exports that mix
    offsets, Z and fractions need several."""
    if values.len() == 0:
        return None
    parsed = {f: values.str.strptime(_datetime_dtype(f), f, strict=False).is_not_null() for f in formats}
    chosen: list[str] = []
    covered = pl.Series([False] * values.len())
    while True:
        gains = {f: float((covered | ok).mean()) for f, ok in parsed.items() if f not in chosen}  # type: ignore[arg-type]
        if not gains:
            return None
        best = max(gains, key=gains.__getitem__)
        if gains[best] <= float(covered.mean()):  # type: ignore[arg-type]
            return None
        chosen.append(best)
        covered = covered | parsed[best]
        if float(covered.mean()) >= SHARE:  # type: ignore[arg-type]
            return chosen


def _datetime_dtype(fmt: str) -> pl.Datetime:
    return pl.Datetime("us", "UTC") if "%#z" in fmt or "%z" in fmt else pl.Datetime("us")


def detect_time_format(values: pl.Series) -> list[str] | None:
    """The formats that parse at least 90% of the values (a datetime format, else a date format), or None."""
    values = values.drop_nulls().cast(pl.String)
    several = _format_set(values, DATETIME_FORMATS)
    if several:
        return several
    found = _best_format(values, DATE_FORMATS, lambda f: pl.Date())
    return [found[0]] if found else None


@dataclass
class ColumnShape:
    name: str
    non_null: int
    distinct: int
    datetime_formats: list[str] | None = None
    date_format: str | None = None
    clock_format: str | None = None
    numeric: bool = False
    whole: bool = False
    low: float = float("nan")
    high: float = float("nan")
    median: float = float("nan")
    midnight_share: float = 0.0


def column_shapes(frame: pl.DataFrame) -> dict[str, ColumnShape]:
    shapes = {}
    for name in frame.columns:
        values = frame[name].drop_nulls()
        shape = ColumnShape(name, values.len(), values.n_unique())
        if values.len():
            number = values.cast(pl.Float64, strict=False)
            if number.is_not_null().mean() >= 0.95:  # type: ignore[operator]
                number = number.drop_nulls()
                shape.numeric = True
                shape.whole = bool((number == number.floor()).all())
                shape.low, shape.high, shape.median = float(number.min()), float(number.max()), float(number.median())  # type: ignore[arg-type]
            else:
                several = _format_set(values, DATETIME_FORMATS)
                if several:
                    shape.datetime_formats = several
                    parsed = values.str.strptime(_datetime_dtype(several[0]), several[0], strict=False).drop_nulls()
                    shape.midnight_share = float((parsed.dt.time() == datetime.min.time()).mean())  # type: ignore[arg-type]
                else:
                    found = _best_format(values, DATE_FORMATS, lambda f: pl.Date())
                    if found:
                        shape.date_format = found[0]
                    else:
                        found = _best_format(values, CLOCK_FORMATS, lambda f: pl.Time())
                        shape.clock_format = found[0] if found else None
        shapes[name] = shape
    return shapes


@dataclass
class TimeGuess:
    kind: str
    columns: dict[str, str]  # role -> column
    formats: list[str] = field(default_factory=list)
    time_formats: list[str] = field(default_factory=list)
    epoch_unit: str = "s"
    why: str = ""

    def used(self) -> set[str]:
        return set(self.columns.values())


def _time_score(name: str) -> int:
    return (2 if OCCURRED_HINT.search(name) else 0) - (2 if REPORTED_HINT.search(name) else 0)


def _part_column(shapes: dict[str, ColumnShape], prefix: str, part: str) -> str | None:
    low, high = PART_NAMES[part]
    for shape in shapes.values():
        name = shape.name.lower()
        if shape.numeric and shape.whole and low <= shape.low and shape.high <= high and name.startswith(prefix) \
                and name[len(prefix):].strip("_ ") in (part, part + "s", part[:2] if part != "minute" else "min"):
            return shape.name
    return None


def guess_time(shapes: dict[str, ColumnShape]) -> TimeGuess | None:
    """One datetime column (occurrence rather than report), else date + time-of-day or date + hour columns,
    else split parts (year, month, day [, hour, minute]), else epoch seconds or milliseconds."""
    stamps = [s for s in shapes.values() if s.datetime_formats]
    if stamps:
        best = max(stamps, key=lambda s: (_time_score(s.name), -s.midnight_share))
        return TimeGuess("datetime", {"column": best.name}, list(best.datetime_formats),  # type: ignore[arg-type]
                         why=f"{best.name!r} parses with {' or '.join(repr(f) for f in best.datetime_formats)}")  # type: ignore[union-attr]
    dates = sorted((s for s in shapes.values() if s.date_format), key=lambda s: -_time_score(s.name))
    if dates:
        day = dates[0]
        clocks = [s for s in shapes.values() if s.clock_format]
        if clocks:
            clock = max(clocks, key=lambda s: _time_score(s.name))
            return TimeGuess("date_time", {"column": day.name, "time_column": clock.name}, [day.date_format],  # type: ignore[list-item]
                             [clock.clock_format], why=f"date {day.name!r} plus time of day {clock.name!r}")  # type: ignore[list-item]
        hours = [s for s in shapes.values() if "hour" in s.name.lower() and s.numeric and s.whole and 0 <= s.low and s.high <= 23]
        if hours:
            return TimeGuess("date_hour", {"column": day.name, "hour_column": hours[0].name}, [day.date_format],  # type: ignore[list-item]
                             why=f"date {day.name!r} plus hour {hours[0].name!r}")
    years = [s.name for s in shapes.values() if s.name.lower().endswith(("year", "yr"))]
    for year in sorted(years, key=lambda n: -_time_score(n)):
        lower = year.lower()
        prefix = lower[: lower.rfind("y")]
        parts = {p: _part_column(shapes, prefix, p) for p in PART_NAMES}
        if parts["year"] and parts["month"] and parts["day"]:
            chosen = {p: c for p, c in parts.items() if c}
            return TimeGuess("parts", chosen, why="split columns " + ", ".join(f"{p} = {c!r}" for p, c in chosen.items()))
    for shape in shapes.values():
        if shape.numeric and (re.search(r"time|date|epoch|stamp|ts$", shape.name, re.I) or not ID_HINT.search(shape.name)):
            for unit, (low, high) in (("s", (9e8, 2.2e9)), ("ms", (9e11, 2.2e12))):
                if low <= shape.low and shape.high <= high:
                    return TimeGuess("epoch", {"column": shape.name}, epoch_unit=unit,
                                     why=f"{shape.name!r} holds epoch {'seconds' if unit == 's' else 'milliseconds'}")
    if dates:
        return TimeGuess("datetime", {"column": dates[0].name}, [dates[0].date_format],  # type: ignore[list-item]
                         why=f"only a date: {dates[0].name!r} (every incident at midnight)")
    return None


# --- coordinates and CRS ---------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def zone_places() -> tuple[tuple[str, float, float], ...]:
    """(time zone, lat, lon) of each zone's reference place in tzdata's zone1970.tab."""
    def degrees(text: str, width: int) -> float:
        sign = -1 if text[0] == "-" else 1
        body = text[1:]
        d, m, s = body[:width], body[width:width + 2], body[width + 2:width + 4] or "0"
        return sign * (int(d) + int(m) / 60 + int(s) / 3600)

    out = []
    if ZONE_TAB.is_file():
        for line in ZONE_TAB.read_text().splitlines():
            if line.startswith("#") or not line.strip():
                continue
            _, coords, zone = line.split("\t")[:3]
            split = max(coords.rfind("+"), coords.rfind("-"))
            out.append((zone, degrees(coords[:split], 2), degrees(coords[split:], 3)))
    return tuple(out)


def nearest_zone(lat: float, lon: float) -> str | None:
    places = zone_places()
    if not places:
        return None
    d = distances_km(np.array([p[1] for p in places]), np.array([p[2] for p in places]), lat, lon)
    return places[int(np.argmin(d))][0]


def zone_place(zone: str) -> tuple[float, float] | None:
    return next(((lat, lon) for z, lat, lon in zone_places() if z == zone), None)


@lru_cache(maxsize=1)
def _projected_candidates() -> tuple[tuple[str, str, tuple[float, float, float, float]], ...]:
    """(code, name, area of use) of WGS 84 UTM north/south zones and NAD83 projections (state planes)."""
    from pyproj.database import query_crs_info
    from pyproj.enums import PJType

    out = []
    for info in query_crs_info(auth_name="EPSG", pj_types=PJType.PROJECTED_CRS):
        if info.area_of_use is None or info.deprecated:
            continue
        if info.name.startswith("WGS 84 / UTM zone") or (info.name.startswith("NAD83 / ") and "(" not in info.name.split("/")[0]):
            a = info.area_of_use
            out.append((f"EPSG:{info.code}", info.name, (a.west, a.south, a.east, a.north)))
    return tuple(out)


@dataclass
class CrsGuess:
    crs: str
    name: str
    lat: float
    lon: float
    alternatives: list[str] = field(default_factory=list)
    certain: bool = True


def guess_crs(x: float, y: float, timezone: str | None = None) -> CrsGuess | None:
    """The projected CRS that maps (x, y) inside its own area of use, nearest the time zone's place when one is
    known, else nearest its area's centre (UTM zones cannot be told apart without a time zone)."""
    from pyproj import Transformer

    place = zone_place(timezone) if timezone else None
    scored = []
    for code, name, (w, s, e, n) in _projected_candidates():
        if place is not None and not (w - 1 <= place[1] <= e + 1 and s - 1 <= place[0] <= n + 1):
            continue  # a time zone's place outside the CRS's area of use: not this one
        if e - w > 20:
            continue  # national projections (Conus Albers ...) fit everything and say nothing
        try:
            lon, lat = Transformer.from_crs(code, "EPSG:4326", always_xy=True).transform(x, y)
        except Exception:  # noqa: BLE001 - a CRS pyproj cannot invert here is simply not a candidate
            continue
        if not (np.isfinite(lon) and np.isfinite(lat) and w <= lon <= e and s <= lat <= n):
            continue
        if place is not None:
            score = float(distances_km(np.array([lat]), np.array([lon]), *place)[0])
        else:
            score = float(np.hypot((lon - (w + e) / 2) / max(e - w, 1e-6), (lat - (s + n) / 2) / max(n - s, 1e-6)))
        scored.append((score, code, name, lat, lon))
    if not scored:
        return None
    scored.sort()
    _, code, name, lat, lon = scored[0]
    return CrsGuess(code, name, lat, lon, [f"{c} ({n})" for _, c, n, _, _ in scored[1:4]],
                    certain=place is not None)


@dataclass
class CoordGuess:
    x: str
    y: str
    crs: str
    why: str
    lat: float
    lon: float
    zero_share: float
    certain: bool = True
    alternatives: list[str] = field(default_factory=list)


def guess_coordinates(frame: pl.DataFrame, shapes: dict[str, ColumnShape], used: set[str],
                      timezone: str | None) -> CoordGuess | None:
    numeric = [s for s in shapes.values() if s.numeric and s.name not in used]
    xs = [s for s in numeric if X_HINT.search(s.name)] or numeric
    ys = [s for s in numeric if Y_HINT.search(s.name)] or numeric
    pairs = []
    for sx in xs:
        for sy in ys:
            if sx.name == sy.name:
                continue
            both = frame.select(pl.col(sx.name).cast(pl.Float64, strict=False).alias("x"),
                                pl.col(sy.name).cast(pl.Float64, strict=False).alias("y")).drop_nulls()
            zero = (both["x"] == 0) & (both["y"] == 0)
            real = both.filter(~zero)
            if real.height < 2 or real["x"].std() == 0 or real["y"].std() == 0:
                continue
            mx, my = float(real["x"].median()), float(real["y"].median())  # type: ignore[arg-type]
            geographic = (cast(float, real["x"].abs().max()) <= 180 and cast(float, real["y"].abs().max()) <= 90
                          and not (sx.whole and sy.whole))  # both columns have values: real.height >= 2
            projected = abs(mx) > 1000 and abs(my) > 1000
            hinted = bool(X_HINT.search(sx.name)) + bool(Y_HINT.search(sy.name))
            if geographic or projected:
                pairs.append((geographic, hinted, sx.name, sy.name, mx, my, float(cast(float, zero.mean()))))
    if not pairs:
        return None
    geographic, _, x, y, mx, my, zero_share = max(pairs, key=lambda p: (p[1], p[0]))
    if geographic:
        return CoordGuess(x, y, "EPSG:4326", f"{x!r}/{y!r} hold longitude/latitude", my, mx, zero_share)
    crs = guess_crs(mx, my, timezone)
    if crs is None:
        return None
    return CoordGuess(x, y, crs.crs, f"{x!r}/{y!r} are projected; median ({mx:,.0f}, {my:,.0f}) is at "
                      f"({crs.lat:.4f}, {crs.lon:.4f}) in {crs.name}", crs.lat, crs.lon, zero_share, crs.certain,
                      crs.alternatives)


# --- id, category, row rules -----------------------------------------------------------------------------


def guess_id(shapes: dict[str, ColumnShape], rows: int, used: set[str]) -> str | None:
    unique = [s for s in shapes.values() if s.name not in used and s.non_null >= 0.99 * rows and s.distinct == s.non_null
              and not s.datetime_formats]
    hinted = [s for s in unique if ID_HINT.search(s.name)]
    return hinted[0].name if hinted else None


def guess_category(frame: pl.DataFrame, shapes: dict[str, ColumnShape], used: set[str]) -> str | None:
    rows = frame.height
    candidates = [s for s in shapes.values() if s.name not in used and 2 <= s.distinct <= max(2, min(1000, rows // 2))
                  and not s.datetime_formats and not s.date_format]
    if not candidates:
        return None

    def score(s: ColumnShape) -> tuple:
        hint = CATEGORY_HINT.search(s.name)
        return (bool(hint), not s.numeric, "code" not in s.name.lower(), -s.distinct)

    return max(candidates, key=score).name


def snake(value: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", value.lower()).strip("_") or "other"


# --- the draft -------------------------------------------------------------------------------------------


@dataclass
class Draft:
    """What init found, and the profile text it writes."""

    name: str
    timezone: str
    time: TimeGuess
    coordinates: CoordGuess
    id_column: str | None
    category: str
    top_values: list[tuple[str, int]]
    reversal_column: str | None
    text: str


def _q(value) -> str:
    return json.dumps(value, ensure_ascii=False)


def draft_profile(path: Path, name: str | None = None, timezone: str | None = None, top: int = 15) -> Draft:
    """Read a sample of the export and write a commented draft profile (see the module docstring)."""
    frame = read_sample(path)
    shapes = column_shapes(frame)
    time = guess_time(shapes)
    if time is None:
        raise AssistantError(f"no time column found in {path.name} (columns: {', '.join(frame.columns[:30])}): write "
                             f"[time] by hand (README: profile reference)")
    coords = guess_coordinates(frame, shapes, time.used(), timezone)
    if coords is None:
        raise AssistantError(f"no coordinate columns found in {path.name}: write [coordinates] by hand (README: "
                             f"profile reference)")
    used = time.used() | {coords.x, coords.y}
    zone = timezone or (nearest_zone(coords.lat, coords.lon) if coords.certain else None) or "UTC"
    id_column = guess_id(shapes, frame.height, used)
    category = guess_category(frame, shapes, used | {id_column} if id_column else used)
    if category is None:
        raise AssistantError(f"no category column found in {path.name}: write [columns] category by hand")
    counts = frame[category].drop_nulls().value_counts(sort=True).head(top)
    top_values = [(str(v), int(n)) for v, n in counts.iter_rows()]
    reversal = next((s.name for s in shapes.values() if s.numeric and s.low < 0 and "count" in s.name.lower()), None)
    name = name or snake(path.name.split(".")[0]).replace("_", "-")

    lines = [f"# Draft profile written by `hotspots profile init {path.name}` from its first {frame.height:,} rows.",
             "# Check every line marked CHECK, then dry-run it: hotspots profile check THIS.toml EXPORT",
             "# Field reference: README, section 'Profile reference'.",
             f"name = {_q(name)}",
             f"timezone = {_q(zone)}" + ("" if timezone else "  # CHECK: guessed from the points' location" if coords.certain
                                          else "  # CHECK: unknown; rerun init with --timezone Area/City"),
             "", "[columns]"]
    lines.append(f"id = {_q(id_column)}  # unique in the sample" if id_column else
                 "# id: no unique id column found; ids are derived from each row's content")
    lines.append(f"category = {_q(category)}")
    lines += ["", "[time]", f"# detected: {time.why}", f"kind = {_q(time.kind)}"]
    if time.kind == "parts":
        lines += ["", "[time.parts]"] + [f"{part} = {_q(col)}" for part, col in time.columns.items()]
    else:
        lines += [f"{role} = {_q(col)}" for role, col in time.columns.items()]
        if time.formats:
            lines.append(f"formats = {_q(time.formats)}  # chrono strftime; 'iso8601' accepts any ISO 8601")
        if time.time_formats:
            lines.append(f"time_formats = {_q(time.time_formats)}")
        if time.kind == "epoch":
            lines.append(f"epoch_unit = {_q(time.epoch_unit)}")
    lines += ["", "[coordinates]", f"# detected: {coords.why}", f"x = {_q(coords.x)}", f"y = {_q(coords.y)}",
              f"crs = {_q(coords.crs)}" + ("" if coords.certain else "  # CHECK: projected values fit many CRSs; "
                                              "rerun init with --timezone Area/City for a sound guess")]
    if coords.alternatives:
        lines.append(f"# other CRSs that fit: {'; '.join(coords.alternatives)}")
    if coords.zero_share:
        lines.append(f"# {coords.zero_share:.1%} of the sample sits at (0, 0): placeholders, quarantined as "
                     f"missing_coordinates")
    lines += ["", "[area]", "# no bbox: the area is derived from the data; points far outside its bulk are "
              "out_of_area", "# bbox = [lon_min, lat_min, lon_max, lat_max]", "",
              "[categories]",
              "# values no map entry or rule matches go to the default (remove it to quarantine them as "
              "unknown_category)", 'default = "other"',
              '# rules, tried after the map: [[categories.rules]] prefix = "14" / glob = "THEFT*" / regex = "..."',
              "", "[categories.map]", f"# the {len(top_values)} most common values of {category!r} in the sample "
              "(value = rows); rename the canonical categories as you like"]
    lines += [f"{_q(v)} = {_q(snake(v))}  # {n:,}" for v, n in top_values]
    if reversal:
        lines += ["", f"# {reversal!r} has negative values: reversal rows cancelling earlier ones",
                  "[[rows]]", 'name = "reversal"', f"column = {_q(reversal)}", 'op = "<"', "value = 0"]
    text = "\n".join(lines) + "\n"
    return Draft(name, zone, time, coords, id_column, category, top_values, reversal, text)


# --- the dry run -----------------------------------------------------------------------------------------


@dataclass
class CheckReport:
    rows: int
    accepted: int
    reasons: dict[str, int]
    samples: dict[str, list[dict]]
    first: datetime | None
    last: datetime | None
    midnight_share: float
    unmapped: dict[str, int]
    notes: list[str]
    latitude: np.ndarray
    longitude: np.ndarray
    cells: np.ndarray  # the derived study area's H3 cells (empty when nothing was accepted)
    resolution: int

    def lines(self) -> list[str]:
        out = [f"rows {self.rows:,}: accepted {self.accepted:,}, quarantined {self.rows - self.accepted:,}"]
        for reason, n in self.reasons.items():
            out.append(f"  {reason:<20} {n:>9,}")
            for sample in self.samples.get(reason, []):
                out.append("      row {source_row}: id={raw_id} time={raw_time} category={raw_category} "
                           "x={raw_x} y={raw_y}".format(**sample))
        if self.first is not None:
            out.append(f"time range (local) {self.first:%Y-%m-%d %H:%M} to {self.last:%Y-%m-%d %H:%M}")
            out.append(f"at exactly midnight {self.midnight_share:.1%} (time unknown in many exports: kept, they "
                       f"land in the night shift)")
        if self.unmapped:
            out.append("unmapped category values: " + ", ".join(f"{k!r} ({v:,})" for k, v in self.unmapped.items()))
        out.append(f"derived study area: {self.cells.size:,} cells at H3 resolution {self.resolution}")
        out += [f"note: {n}" for n in self.notes]
        return out


def check_profile(profile: SourceProfile, path: Path, resolution: int = 9, samples: int = 3,
                  encoding: str | None = None) -> CheckReport:
    """Read and validate the file as ingest would, storing nothing."""
    from features.grid import StudyArea, points_to_cells
    from features.ingest import read_raw
    from features.validation import reason_counts, validate

    batch = read_raw(path, profile, encoding=encoding)
    result = validate(batch.frame, profile)
    quarantine = pl.concat([result.quarantine, batch.rejected])
    reasons = reason_counts(quarantine)
    shown = {r: quarantine.filter(pl.col("reason") == r).sort("source_row").head(samples).to_dicts() for r in reasons}
    inc = result.incidents
    local = inc["occurred_at"].dt.convert_time_zone(profile.timezone)
    lat, lon = inc["latitude"].to_numpy(), inc["longitude"].to_numpy()
    cells = np.array([], dtype=np.uint64)
    if inc.height:
        cells = StudyArea.from_cells(points_to_cells(lat, lon, resolution), resolution).cells
    return CheckReport(
        rows=batch.rows, accepted=inc.height, reasons=reasons, samples=shown,
        first=local.min() if inc.height else None, last=local.max() if inc.height else None,  # type: ignore[arg-type]
        midnight_share=float((local.dt.time() == datetime.min.time()).mean()) if inc.height else 0.0,  # type: ignore[arg-type]
        unmapped=result.unmapped, notes=list(batch.notes) + result.notes, latitude=lat, longitude=lon, cells=cells,
        resolution=resolution,
    )
