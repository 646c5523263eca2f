"""Fetch the City of Chicago "Crimes - 2001 to Present" dataset through the Socrata SODA API.

Why this exists: the portal's CSV export is a manual download, while the SODA endpoint lets the
service pull a date window on demand (e.g. the last few weeks before a forecast run). The output
deliberately mimics the portal export (display column names, ``MM/DD/YYYY hh:mm:ss AM/PM`` local
times, every column a string) so both sources go through the same CSV ingest and validation.

Usage::

    client = SocrataClient(app_token="...")
    df = client.fetch(since=datetime(2018, 1, 1), until=datetime(2018, 2, 1))
    df.write_csv("crimes_2018_01.csv")        # or: fetch_to_csv("crimes.csv", since=..., until=...)

SODA notes that shape this code:
- ``$order=:id`` (the internal row id) gives a stable order, so ``$offset`` paging neither skips
  nor repeats rows; the dataset has no ordering guarantee otherwise.
- ``date`` and ``updated_on`` are *floating* timestamps (Chicago wall-clock time, no zone), so the
  ``$where`` bounds are written without an offset too.
- Socrata omits null fields from a row object entirely; missing keys become nulls here.
- Numbers come back as JSON strings and ``arrest``/``domestic`` as JSON booleans.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterator
from datetime import date, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import polars as pl
import requests
from requests.adapters import HTTPAdapter
from urllib3.connectionpool import ConnectionPool
from urllib3.exceptions import InvalidHeader, MaxRetryError
from urllib3.response import BaseHTTPResponse
from urllib3.util.retry import Retry

__all__ = [
    "API_TO_DISPLAY",
    "DISPLAY_COLUMNS",
    "DEFAULT_DATASET_ID",
    "DEFAULT_DOMAIN",
    "SocrataClient",
    "SocrataError",
    "fetch_to_csv",
]

log = logging.getLogger(__name__)

DEFAULT_DOMAIN = "data.cityofchicago.org"
DEFAULT_DATASET_ID = "ijzp-q8t2"  # Crimes - 2001 to Present

# API field name -> portal export column name, in the portal's column order.
API_TO_DISPLAY: dict[str, str] = {
    "id": "ID",
    "case_number": "Case Number",
    "date": "Date",
    "block": "Block",
    "iucr": "IUCR",
    "primary_type": "Primary Type",
    "description": "Description",
    "location_description": "Location Description",
    "arrest": "Arrest",
    "domestic": "Domestic",
    "beat": "Beat",
    "district": "District",
    "ward": "Ward",
    "community_area": "Community Area",
    "fbi_code": "FBI Code",
    "x_coordinate": "X Coordinate",
    "y_coordinate": "Y Coordinate",
    "year": "Year",
    "updated_on": "Updated On",
    "latitude": "Latitude",
    "longitude": "Longitude",
}
DISPLAY_COLUMNS: list[str] = list(API_TO_DISPLAY.values())

# Every field is read as a string: Socrata already sends numbers as strings, and keeping them as
# text (e.g. District "018", IUCR "0810") preserves leading zeros exactly like the CSV export.
# Booleans become "true"/"false", which is how the portal export writes them too. Fields not listed
# here (the nested ``location`` object, ``:@computed_region_*`` columns) are ignored.
_API_SCHEMA: dict[str, pl.DataType] = {field: pl.String() for field in API_TO_DISPLAY}
_TIMESTAMP_FIELDS = ("date", "updated_on")
_API_TIMESTAMP_FORMAT = "%Y-%m-%dT%H:%M:%S%.f"  # "2018-01-01T12:00:00.000"
_PORTAL_TIMESTAMP_FORMAT = "%m/%d/%Y %I:%M:%S %p"  # "01/01/2018 12:00:00 PM"
_LOCAL_TZ = "America/Chicago"  # what the floating timestamps mean

# 429 (throttled) and every 5xx (overloaded/failing node) are transient; other 4xx are our fault.
_RETRY_STATUSES = frozenset({429, *range(500, 600)})


class _LoggedRetry(Retry):
    """urllib3's ``Retry`` that says at WARNING what failed and how long it waits, which urllib3 only logs at DEBUG.

    A Retry-After that urllib3 cannot parse falls back to the backoff instead of aborting the pull.
    """

    def increment(
        self,
        method: str | None = None,
        url: str | None = None,
        response: BaseHTTPResponse | None = None,
        error: Exception | None = None,
        _pool: ConnectionPool | None = None,
        _stacktrace: TracebackType | None = None,
    ) -> Self:
        new = super().increment(method, url, response, error, _pool, _stacktrace)  # raises MaxRetryError when used up
        retry_after = new.get_retry_after(response) if response is not None and new.respect_retry_after_header else None
        delay = retry_after or new.get_backoff_time()  # the same choice as Retry.sleep
        reason = f"HTTP {response.status} {response.reason or ''}".rstrip() if response is not None else _describe(error)
        attempt = len(new.history)
        total = attempt + new.total + 1 if isinstance(new.total, int) else "?"
        log.warning("Socrata request failed (%s), attempt %d of %s; retrying in %.1fs", reason, attempt, total, delay)
        return new

    def get_retry_after(self, response: BaseHTTPResponse) -> float | None:
        try:
            return super().get_retry_after(response)
        except InvalidHeader:
            return None


class SocrataError(RuntimeError):
    """A SODA request failed for good (non-retryable error, or retries exhausted).

    ``url``, ``status`` (``None`` for a connection error) and ``attempts`` are kept as attributes
    so callers can decide what to tell the user (e.g. 403 -> check the app token).
    """

    def __init__(self, message: str, *, url: str, status: int | None = None, attempts: int = 1):
        super().__init__(message)
        self.url = url
        self.status = status
        self.attempts = attempts


class SocrataClient:
    """Paged, retrying reader for one Socrata dataset (defaults: Chicago crimes, ``ijzp-q8t2``).

    Retries are urllib3's ``Retry`` on a ``requests`` ``HTTPAdapter`` mounted on ``session`` for this
    client's base URL only (a session you pass in gets that adapter for this domain). ``max_retries``
    counts retries after the first attempt, so a request is tried at most ``max_retries + 1`` times,
    on 429, any 5xx, connection errors and timeouts. urllib3 retries the first failure at once, then
    waits ``backoff_seconds * 2**n`` (n = 1, 2, ...; at most 120 s) unless the server sends a
    ``Retry-After`` (seconds or an HTTP date). ``domain`` may carry a scheme (``http://host:port``)
    for a self-hosted or local endpoint; a bare host means HTTPS.
    """

    def __init__(
        self,
        domain: str = DEFAULT_DOMAIN,
        dataset_id: str = DEFAULT_DATASET_ID,
        app_token: str | None = None,
        page_size: int = 50_000,
        max_retries: int = 5,
        backoff_seconds: float = 1.0,
        timeout: float = 60.0,
        session: requests.Session | None = None,
    ) -> None:
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        self.domain = domain
        self.dataset_id = dataset_id
        self.app_token = app_token
        self.page_size = page_size
        self.max_retries = max_retries
        self.backoff_seconds = backoff_seconds
        self.timeout = timeout
        self.session = session if session is not None else requests.Session()
        retry = _LoggedRetry(
            total=max_retries,
            connect=None,
            read=None,
            status=None,
            other=None,
            allowed_methods=frozenset({"GET"}),
            status_forcelist=_RETRY_STATUSES,
            backoff_factor=backoff_seconds,
            respect_retry_after_header=True,
            raise_on_status=False,  # hand back the last 429/5xx response so its message reaches the error
        )
        self.session.mount(f"{self.base_url}/", HTTPAdapter(max_retries=retry))

    @property
    def base_url(self) -> str:
        """Scheme and host: ``https://`` + ``domain`` unless ``domain`` already names a scheme."""
        return self.domain.rstrip("/") if "://" in self.domain else f"https://{self.domain}"

    @property
    def url(self) -> str:
        """The SODA JSON resource endpoint."""
        return f"{self.base_url}/resource/{self.dataset_id}.json"

    # -- query building ---------------------------------------------------------------------------

    @staticmethod
    def build_where(
        since: datetime | date | None = None, until: datetime | date | None = None
    ) -> str | None:
        """SoQL ``$where`` for the half-open window ``since <= date < until`` (``None`` = unbounded).

        Half-open so consecutive windows (Jan, Feb, ...) never double count an incident.
        """
        clauses = []
        if since is not None:
            clauses.append(f"date >= '{_floating(since)}'")
        if until is not None:
            clauses.append(f"date < '{_floating(until)}'")
        if since is not None and until is not None and _as_local_naive(since) >= _as_local_naive(until):
            raise ValueError(f"since ({since}) must be earlier than until ({until})")
        return " AND ".join(clauses) or None

    def _headers(self) -> dict[str, str]:
        headers = {"Accept": "application/json"}
        if self.app_token:
            # An app token lifts the anonymous, IP-shared throttling limit.
            headers["X-App-Token"] = self.app_token
        return headers

    # -- HTTP -------------------------------------------------------------------------------------

    def _get_page(self, params: dict[str, str]) -> list[dict[str, Any]]:
        """One GET (urllib3 retries the transient failures); returns the decoded row list."""
        try:
            response = self.session.get(self.url, params=params, headers=self._headers(), timeout=self.timeout)
        except requests.RequestException as exc:
            # No response to take the URL from: prepare it the way the session did.
            failed_url = requests.Request("GET", self.url, params=params).prepare().url or self.url
            cause = exc.args[0] if exc.args else None
            if isinstance(cause, MaxRetryError):  # every attempt failed without an HTTP response
                attempts = self.max_retries + 1
                raise SocrataError(
                    f"Socrata request to {failed_url} failed after {attempts} attempts "
                    f"(last: no HTTP response; {type(exc).__name__}: {_describe(cause.reason)})",
                    url=failed_url,
                    attempts=attempts,
                ) from exc
            raise SocrataError(
                f"Socrata request to {failed_url} failed: {_describe(exc)}; rerun the fetch",
                url=failed_url,
            ) from exc

        status = response.status_code
        if status < 400:
            return _decode_rows(response)
        retries = getattr(response.raw, "retries", None)
        attempts = len(retries.history) + 1 if retries is not None else 1
        if status not in _RETRY_STATUSES:
            raise SocrataError(
                f"Socrata request failed with HTTP {status} at {response.url}: {_error_message(response)}",
                url=response.url,
                status=status,
                attempts=attempts,
            )
        raise SocrataError(
            f"Socrata request to {response.url} failed after {attempts} attempts "
            f"(last: HTTP {status}: {_error_message(response)})",
            url=response.url,
            status=status,
            attempts=attempts,
        )

    # -- public API -------------------------------------------------------------------------------

    def iter_pages(
        self, since: datetime | date | None = None, until: datetime | date | None = None
    ) -> Iterator[list[dict[str, Any]]]:
        """Yield raw row dicts page by page (API field names), ordered by ``:id``.

        Stops after the first page shorter than ``page_size``; empty pages are not yielded.
        """
        where = self.build_where(since, until)
        offset = 0
        while True:
            params = {"$limit": str(self.page_size), "$offset": str(offset), "$order": ":id"}
            if where:
                params["$where"] = where
            rows = self._get_page(params)
            if rows:
                yield rows
            if len(rows) < self.page_size:
                return
            offset += len(rows)

    def iter_frames(
        self, since: datetime | date | None = None, until: datetime | date | None = None
    ) -> Iterator[pl.DataFrame]:
        """Yield one portal-format DataFrame per page, so big pulls can be streamed to disk."""
        for rows in self.iter_pages(since, until):
            yield rows_to_frame(rows)

    def fetch(
        self,
        since: datetime | date | None = None,
        until: datetime | date | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> pl.DataFrame:
        """All rows in ``[since, until)`` as one DataFrame in the portal export's format.

        ``progress`` is called after each page with the cumulative row count. The frame has the
        display columns of :data:`DISPLAY_COLUMNS` (all ``String``) even when nothing matched.
        """
        frames: list[pl.DataFrame] = []
        total = 0
        for frame in self.iter_frames(since, until):
            frames.append(frame)
            total += frame.height
            if progress is not None:
                progress(total)
        if not frames:
            return empty_frame()
        return pl.concat(frames, how="vertical", rechunk=True)


# -- conversion helpers ---------------------------------------------------------------------------


def empty_frame() -> pl.DataFrame:
    """A zero-row frame with every display column, so downstream code never special-cases empty."""
    return pl.DataFrame(schema={name: pl.String for name in DISPLAY_COLUMNS})


def rows_to_frame(rows: list[dict[str, Any]]) -> pl.DataFrame:
    """Convert SODA row dicts to the portal export's columns, names and timestamp format.

    The explicit schema matters: without it polars infers columns from the first rows only, so a
    field that is null (hence absent) early in a page could be lost.
    """
    if not rows:
        return empty_frame()
    raw = pl.from_dicts(rows, schema=_API_SCHEMA)
    try:
        raw = raw.with_columns(
            pl.col(field)
            .str.to_datetime(_API_TIMESTAMP_FORMAT, strict=True)
            .dt.strftime(_PORTAL_TIMESTAMP_FORMAT)
            for field in _TIMESTAMP_FIELDS
        )
    except pl.exceptions.PolarsError as exc:
        raise ValueError(
            f"unexpected timestamp format from Socrata in {_TIMESTAMP_FIELDS} "
            f"(expected like '2018-01-01T12:00:00.000'): {exc}"
        ) from exc
    return raw.rename(API_TO_DISPLAY).select(DISPLAY_COLUMNS)


def _as_local_naive(value: datetime | date) -> datetime:
    """Floating timestamps are Chicago wall-clock time: convert aware datetimes there, drop the zone."""
    if not isinstance(value, datetime):
        return datetime(value.year, value.month, value.day)
    if value.tzinfo is not None:
        from zoneinfo import ZoneInfo  # only needed for aware inputs

        return value.astimezone(ZoneInfo(_LOCAL_TZ)).replace(tzinfo=None)
    return value


def _floating(value: datetime | date) -> str:
    """SoQL floating timestamp literal, e.g. ``2018-01-01T00:00:00`` (milliseconds only if set)."""
    local = _as_local_naive(value)
    text = local.strftime("%Y-%m-%dT%H:%M:%S")
    if local.microsecond:
        text += f".{local.microsecond // 1000:03d}"
    return text


def _describe(error: BaseException | None) -> str:
    """``Type: message`` of a transport error, for logs and error messages."""
    return f"{type(error).__name__}: {error}" if error is not None else "unknown error"


def _error_message(response: requests.Response) -> str:
    """The server's own explanation: Socrata sends ``{"message": ...}`` (with ``code``/``error``)."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        message = body.get("message")
        if message:
            code = body.get("code") or body.get("errorCode")
            return f"{message} [{code}]" if code else str(message)
    text = (response.text or "").strip()
    return text[:500] if text else (response.reason or "no response body")


def _decode_rows(response: requests.Response) -> list[dict[str, Any]]:
    try:
        body = response.json()
    except ValueError as exc:
        raise SocrataError(
            f"Socrata returned a non-JSON body from {response.url}: {response.text[:200]!r}",
            url=response.url,
            status=response.status_code,
        ) from exc
    if not isinstance(body, list):
        raise SocrataError(
            f"Socrata returned {type(body).__name__} instead of a row list from {response.url}: "
            f"{json.dumps(body)[:200]}",
            url=response.url,
            status=response.status_code,
        )
    return body


# -- convenience ----------------------------------------------------------------------------------


def fetch_to_csv(
    path: str | os.PathLike[str],
    since: datetime | date | None = None,
    until: datetime | date | None = None,
    app_token: str | None = None,
    **client_kwargs: Any,
) -> int:
    """Download ``[since, until)`` to a portal-format CSV and return the number of rows written.

    Pages are streamed to disk (the full dataset is ~8M rows, too big to hold comfortably), into a
    temporary file that replaces ``path`` only on success, so a failed pull never leaves a
    truncated CSV that the ingest would happily read. Extra keyword arguments go to
    :class:`SocrataClient`.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    client = SocrataClient(app_token=app_token, **client_kwargs)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    total = 0
    try:
        with os.fdopen(fd, "wb") as fh:
            for frame in client.iter_frames(since, until):
                frame.write_csv(fh, include_header=total == 0)
                total += frame.height
            if total == 0:
                empty_frame().write_csv(fh)
        os.replace(tmp_name, target)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return total
