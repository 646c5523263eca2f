"""SocrataClient against recorded SODA responses: ``responses`` mocks for paging, queries and format;
a real HTTP server on 127.0.0.1 for the retries, which urllib3 does below the layer ``responses`` mocks."""

from __future__ import annotations

import csv
import gzip
import io
import json
import logging
import socket
import time
from datetime import UTC, date, datetime, timedelta
from itertools import pairwise
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import polars as pl
import pytest
import requests
import responses
from pytest_httpserver import HTTPServer
from responses import matchers
from responses.registries import OrderedRegistry
from werkzeug import Request, Response

from features.sources.socrata import (
    DISPLAY_COLUMNS,
    SocrataClient,
    SocrataError,
    fetch_to_csv,
)

FIXTURES = Path(__file__).parent / "fixtures" / "socrata"
URL = "https://data.cityofchicago.org/resource/ijzp-q8t2.json"

# Header and rows of the real portal export (chicago/chicago_crimes_2018_raw.csv.gz) for the four
# incidents in page1.json + page2.json. The export has no Year column; the API does.
EXPORT_CSV = """\
ID,Case Number,Date,Block,IUCR,Primary Type,Description,Location Description,Arrest,Domestic,Beat,District,Ward,Community Area,FBI Code,X Coordinate,Y Coordinate,Updated On,Latitude,Longitude
11482392,JB483030,01/01/2018 12:00:00 PM,003XX E NORTH WATER ST,0810,THEFT,OVER $500,APARTMENT,true,false,1834,018,42,8,06,1178943,1903134,11/19/2018 04:14:28 PM,41.889497462,-87.618294943
11459757,JB452296,01/01/2018 12:00:00 AM,045XX S MARSHFIELD AVE,1752,OFFENSE INVOLVING CHILDREN,AGG CRIM SEX ABUSE FAM MEMBER,RESIDENCE,false,false,0924,009,15,61,20,1166099,1874550,11/10/2018 04:02:39 PM,41.811344308,-87.666278625
11497370,JB502882,01/01/2018 12:00:00 AM,051XX S LUNA AVE,1130,DECEPTIVE PRACTICE,FRAUD OR CONFIDENCE GAME,RESIDENCE,false,false,0814,008,14,56,11,1140228,1870076,11/07/2018 04:13:47 PM,41.799578775,-87.761282372
11281462,JB218438,01/02/2018 12:00:00 PM,002XX E DELAWARE PL,1150,DECEPTIVE PRACTICE,CREDIT CARD FRAUD,BAR OR TAVERN,false,false,1833,018,42,8,11,,,04/11/2018 04:05:05 PM,,
"""  # noqa: E501 (rows of the real export, kept verbatim)
EXPORT_HEADER, *EXPORT_ROWS = list(csv.reader(io.StringIO(EXPORT_CSV)))


def body(name: str) -> str:
    return (FIXTURES / name).read_text()


def query(call) -> dict[str, str]:
    """Decoded query string of a recorded request (single-valued params)."""
    return {k: v[0] for k, v in parse_qs(urlsplit(call.request.url).query).items()}


@pytest.fixture
def rsps():
    # OrderedRegistry: responses are served in registration order (503, 503, 200, ...);
    # leaving the block fails the test if a registered response was never requested.
    with responses.RequestsMock(registry=OrderedRegistry) as mock:
        yield mock


def add_pages(rsps: responses.RequestsMock) -> None:
    rsps.get(
        URL,
        body=body("page1.json"),
        content_type="application/json;charset=utf-8",
        match=[matchers.query_param_matcher({"$limit": "3", "$offset": "0", "$order": ":id"})],
    )
    rsps.get(
        URL,
        body=body("page2.json"),
        content_type="application/json;charset=utf-8",
        match=[matchers.query_param_matcher({"$limit": "3", "$offset": "3", "$order": ":id"})],
    )


# -- paging ---------------------------------------------------------------------------------------


def test_paging_stops_on_short_page_and_requests_right_offsets(rsps):
    add_pages(rsps)
    pages = list(SocrataClient(page_size=3).iter_pages())

    assert [len(p) for p in pages] == [3, 1]
    assert [p["id"] for page in pages for p in page] == ["11482392", "11459757", "11497370", "11281462"]
    assert [query(c)["$offset"] for c in rsps.calls] == ["0", "3"]
    assert all(query(c)["$order"] == ":id" and query(c)["$limit"] == "3" for c in rsps.calls)
    assert all("$where" not in query(c) for c in rsps.calls)


def test_full_last_page_costs_one_more_request_and_no_empty_page(rsps):
    rsps.get(URL, body=body("page1.json"))
    rsps.get(URL, body=body("empty.json"))
    pages = list(SocrataClient(page_size=3).iter_pages())

    assert [len(p) for p in pages] == [3]
    assert [query(c)["$offset"] for c in rsps.calls] == ["0", "3"]


def test_progress_reports_cumulative_rows(rsps):
    add_pages(rsps)
    seen: list[int] = []
    df = SocrataClient(page_size=3).fetch(progress=seen.append)

    assert seen == [3, 4]
    assert df.height == 4


# -- query building -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("since", "until", "expected"),
    [
        (
            datetime(2018, 1, 1),
            datetime(2018, 2, 1),
            "date >= '2018-01-01T00:00:00' AND date < '2018-02-01T00:00:00'",
        ),
        (datetime(2018, 1, 1, 6, 30, 15), None, "date >= '2018-01-01T06:30:15'"),
        (None, date(2018, 3, 1), "date < '2018-03-01T00:00:00'"),
        # Aware datetimes are converted to Chicago wall-clock time (CST = UTC-6 in January).
        (datetime(2018, 1, 1, 6, tzinfo=UTC), None, "date >= '2018-01-01T00:00:00'"),
    ],
)
def test_where_is_sent_from_since_until(rsps, since, until, expected):
    rsps.get(URL, body=body("page2.json"))
    SocrataClient(page_size=3).fetch(since=since, until=until)

    (call,) = rsps.calls
    assert query(call)["$where"] == expected
    assert query(call)["$order"] == ":id"


def test_where_rejects_empty_window():
    with pytest.raises(ValueError, match="earlier than"):
        SocrataClient.build_where(datetime(2018, 2, 1), datetime(2018, 1, 1))
    assert SocrataClient.build_where() is None


# -- app token ------------------------------------------------------------------------------------


def test_app_token_header_sent_when_set(rsps):
    rsps.get(URL, body=body("page2.json"), match=[matchers.header_matcher({"X-App-Token": "tok123"})])
    SocrataClient(app_token="tok123", page_size=3).fetch()

    assert rsps.calls[0].request.headers["X-App-Token"] == "tok123"
    assert "tok123" not in rsps.calls[0].request.url  # never leaks into URLs / error messages


def test_app_token_header_absent_when_unset(rsps):
    rsps.get(URL, body=body("page2.json"))
    SocrataClient(page_size=3).fetch()

    assert "X-App-Token" not in rsps.calls[0].request.headers


# -- retries (real HTTP server on 127.0.0.1) ------------------------------------------------------

PATH = "/resource/ijzp-q8t2.json"
RETRY_LOGGER = "features.sources.socrata"
SLACK = 0.01  # clock granularity: a measured gap may fall this far short of the planned wait


@pytest.fixture(scope="module")
def server():
    # Threaded, so a request stalled past the client's timeout does not hold up the retry.
    srv = HTTPServer(host="127.0.0.1", port=0, threaded=True)
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture
def soda(server):
    server.clear()
    yield server
    server.check_assertions()  # no unexpected or out-of-order request


class Script:
    """Serves the given replies in order and records when each request arrived and what it asked."""

    def __init__(self, server: HTTPServer, *replies: Response, stall: dict[int, float] | None = None) -> None:
        self.arrivals: list[float] = []
        self.offsets: list[str | None] = []
        stall = stall or {}
        for i, reply in enumerate(replies):
            server.expect_ordered_request(PATH, method="GET").respond_with_handler(self._handler(reply, stall.get(i, 0.0)))

    def _handler(self, reply: Response, stall: float):
        def handle(request: Request) -> Response:
            self.arrivals.append(time.monotonic())
            self.offsets.append(request.args.get("$offset"))
            time.sleep(stall)
            return reply

        return handle

    @property
    def gaps(self) -> list[float]:
        return [b - a for a, b in pairwise(self.arrivals)]


def ok(name: str = "page2.json") -> Response:
    return Response(body(name), status=200, content_type="application/json;charset=utf-8")


def failure(status: int, text: str = "", **headers: str) -> Response:
    return Response(text, status=status, headers=headers)


def local_client(server: HTTPServer, **kwargs) -> SocrataClient:
    return SocrataClient(domain=f"http://127.0.0.1:{server.port}", page_size=3, **kwargs)


def retry_messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == RETRY_LOGGER and r.levelno == logging.WARNING]


def test_retries_5xx_with_growing_backoff_then_succeeds(soda, caplog):
    caplog.set_level(logging.WARNING, logger=RETRY_LOGGER)
    script = Script(soda, failure(503, "Service Unavailable"), failure(503), failure(502, "Bad Gateway"), ok())
    client = local_client(soda, backoff_seconds=0.05, session=requests.Session())  # a passed-in session retries too
    df = client.fetch()

    assert df["ID"].to_list() == ["11281462"]
    assert len(script.arrivals) == 4
    assert script.offsets == ["0"] * 4  # the same page is retried
    # urllib3 retries the first failure at once, then waits backoff * 2**n.
    assert [g >= want - SLACK for g, want in zip(script.gaps, [0.0, 0.1, 0.2], strict=True)] == [True] * 3
    assert retry_messages(caplog) == [
        "Socrata request failed (HTTP 503 SERVICE UNAVAILABLE), attempt 1 of 6; retrying in 0.0s",
        "Socrata request failed (HTTP 503 SERVICE UNAVAILABLE), attempt 2 of 6; retrying in 0.1s",
        "Socrata request failed (HTTP 502 BAD GATEWAY), attempt 3 of 6; retrying in 0.2s",
    ]


def test_honours_retry_after_and_falls_back_to_backoff(soda, caplog):
    caplog.set_level(logging.WARNING, logger=RETRY_LOGGER)
    script = Script(
        soda,
        failure(429, "Too Many Requests", **{"Retry-After": "1"}),
        failure(503, **{"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}),  # a date in the past: no wait from it
        failure(429, **{"Retry-After": "soon"}),  # unparseable: ignored
        ok(),
    )
    df = local_client(soda, backoff_seconds=0.05).fetch()

    assert df.height == 1
    assert len(script.arrivals) == 4
    # The server's 1 s wins over the backoff; the other two fall back to backoff * 2**n (0.1 s, 0.2 s).
    assert script.gaps[0] >= 1.0 - SLACK
    assert script.gaps[1] >= 0.1 - SLACK and script.gaps[2] >= 0.2 - SLACK
    assert [m.rsplit("retrying in ", 1)[1] for m in retry_messages(caplog)] == ["1.0s", "0.1s", "0.2s"]


def test_retries_read_timeouts(soda, caplog):
    caplog.set_level(logging.WARNING, logger=RETRY_LOGGER)
    script = Script(soda, ok(), ok(), stall={0: 0.6})
    df = local_client(soda, timeout=0.2, backoff_seconds=0.01).fetch()

    assert df["Case Number"].to_list() == ["JB218438"]
    assert len(script.arrivals) == 2
    (message,) = retry_messages(caplog)
    assert "ReadTimeoutError" in message and "attempt 1 of 6" in message


def test_gives_up_after_max_retries_naming_url_status_attempts(soda):
    script = Script(soda, *(failure(503, "Service Unavailable") for _ in range(3)))
    url = f"http://127.0.0.1:{soda.port}{PATH}"

    with pytest.raises(SocrataError) as info:
        local_client(soda, max_retries=2, backoff_seconds=0.05).fetch(since=datetime(2018, 1, 1))

    err = info.value
    assert err.status == 503
    assert err.attempts == 3
    assert err.url.startswith(url) and "%24where=date" in err.url
    assert "HTTP 503" in str(err) and "failed after 3 attempts" in str(err) and url in str(err)
    assert "Service Unavailable" in str(err)  # the last response's body reaches the message
    assert len(script.arrivals) == 3
    assert script.gaps[1] >= 0.1 - SLACK


def test_gives_up_on_persistent_connection_errors_without_status(caplog):
    caplog.set_level(logging.WARNING, logger=RETRY_LOGGER)
    with socket.socket() as sock:  # a port nothing listens on: connection refused
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client = SocrataClient(domain=f"http://127.0.0.1:{port}", page_size=3, max_retries=1, backoff_seconds=0.01)

    with pytest.raises(SocrataError, match="after 2 attempts") as info:
        client.fetch()

    assert info.value.status is None
    assert info.value.attempts == 2
    assert info.value.url.startswith(f"http://127.0.0.1:{port}{PATH}?")
    assert "ConnectionError" in str(info.value) and "Connection refused" in str(info.value)
    (message,) = retry_messages(caplog)
    assert "NewConnectionError" in message and "attempt 1 of 2" in message


def test_client_error_after_a_retry_fails_at_once_with_server_message(soda):
    script = Script(
        soda,
        failure(503),
        Response(body("error_400_no_such_column.json"), status=400, content_type="application/json"),
    )
    with pytest.raises(SocrataError, match="HTTP 400.*No such column: dat") as info:
        local_client(soda, max_retries=5, backoff_seconds=0.01).fetch()

    assert info.value.status == 400
    assert info.value.attempts == 2
    assert len(script.arrivals) == 2


def test_retry_adapter_is_mounted_for_this_domain_only():
    session = requests.Session()
    SocrataClient(session=session, max_retries=4)

    adapter = session.get_adapter(URL)
    assert adapter.max_retries.total == 4
    assert session.get_adapter("https://example.org/").max_retries.total == 0  # requests' default, untouched


# -- client errors --------------------------------------------------------------------------------


def test_400_raises_immediately_with_server_message(rsps):
    rsps.get(URL, status=400, body=body("error_400_no_such_column.json"),
             content_type="application/json;charset=utf-8")
    client = SocrataClient(page_size=3, max_retries=5)

    with pytest.raises(SocrataError) as info:
        client.fetch(since=datetime(2018, 1, 1))

    assert info.value.status == 400
    assert "No such column: dat" in str(info.value)
    assert "query.soql.no-such-column" in str(info.value)
    assert len(rsps.calls) == 1


def test_other_4xx_uses_message_only_error_shape(rsps):
    rsps.get(URL, status=403, json={"error": True, "message": "Invalid app_token specified"})
    with pytest.raises(SocrataError, match="HTTP 403.*Invalid app_token specified") as info:
        SocrataClient(app_token="bad", page_size=3).fetch()

    assert info.value.status == 403
    assert len(rsps.calls) == 1


def test_non_list_success_body_is_an_error(rsps):
    rsps.get(URL, json={"unexpected": "object"})
    with pytest.raises(SocrataError, match="instead of a row list"):
        SocrataClient(page_size=3).fetch()


# -- output format --------------------------------------------------------------------------------


def test_output_matches_portal_export_columns_and_values(rsps):
    add_pages(rsps)
    df = SocrataClient(page_size=3).fetch()

    assert set(df.columns) - {"Year"} == set(EXPORT_HEADER)
    assert [c for c in df.columns if c != "Year"] == EXPORT_HEADER  # same order too
    assert df.columns == DISPLAY_COLUMNS
    assert all(dtype == pl.String for dtype in df.dtypes)
    assert df["Year"].to_list() == ["2018"] * 4
    # Every value, dates included, equals the export; empty export cells are nulls.
    got = [
        ["" if v is None else v for v in row]
        for row in df.drop("Year").rows()
    ]
    assert got == EXPORT_ROWS
    missing = df.filter(pl.col("ID") == "11281462")
    assert missing.select("X Coordinate", "Y Coordinate", "Latitude", "Longitude").row(0) == (None,) * 4
    assert "location" not in df.columns and "Location" not in df.columns


def test_unknown_api_fields_are_ignored(rsps):
    rows = json.loads(body("page2.json"))
    rows[0][":@computed_region_awaf_s7ux"] = "3"  # computed-region columns some responses carry
    rsps.get(URL, json=rows)
    df = SocrataClient(page_size=3).fetch()

    assert df.columns == DISPLAY_COLUMNS
    assert df.row(0)[:3] == ("11281462", "JB218438", "01/02/2018 12:00:00 PM")


def test_empty_result_keeps_all_display_columns(rsps):
    rsps.get(URL, body=body("empty.json"))
    df = SocrataClient(page_size=3).fetch(since=datetime(2030, 1, 1))

    assert df.height == 0
    assert df.columns == DISPLAY_COLUMNS
    assert all(dtype == pl.String for dtype in df.dtypes)


def test_unexpected_timestamp_format_fails_loudly(rsps):
    rows = json.loads(body("page2.json"))
    rows[0]["date"] = "01/02/2018 12:00:00 PM"
    rsps.get(URL, json=rows)
    with pytest.raises(ValueError, match="unexpected timestamp format"):
        SocrataClient(page_size=3).fetch()


@pytest.mark.shared_data
def test_output_columns_match_real_export_file(rsps, chicago_raw_csv):
    export = chicago_raw_csv
    with gzip.open(export, "rt", newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader)
        wanted = {r[0] for r in EXPORT_ROWS}
        real_rows = {}
        for row in reader:
            if row[0] in wanted:
                real_rows[row[0]] = row
                if len(real_rows) == len(wanted):
                    break

    add_pages(rsps)
    df = SocrataClient(page_size=3).fetch()

    assert set(df.columns) - {"Year"} == set(header)
    for row in df.drop("Year").rows():
        assert ["" if v is None else v for v in row] == real_rows[row[0]]


# -- CSV ------------------------------------------------------------------------------------------


def test_fetch_to_csv_writes_portal_header_and_rows(rsps, tmp_path):
    add_pages(rsps)
    out = tmp_path / "nested" / "crimes.csv"
    n = fetch_to_csv(out, page_size=3)

    assert n == 4
    lines = out.read_text().splitlines()
    assert lines[0].split(",") == DISPLAY_COLUMNS
    assert len(lines) == 5
    back = pl.read_csv(out, infer_schema=False)
    assert back.columns == DISPLAY_COLUMNS
    assert back.drop("Year").rows() == [
        tuple(None if v == "" else v for v in row) for row in EXPORT_ROWS
    ]
    assert [p.name for p in out.parent.iterdir()] == ["crimes.csv"]  # no temp file left


def test_fetch_to_csv_passes_window_and_token(rsps, tmp_path):
    rsps.get(
        URL,
        body=body("empty.json"),
        match=[
            matchers.header_matcher({"X-App-Token": "tok"}),
            matchers.query_param_matcher(
                {
                    "$limit": "50000",
                    "$offset": "0",
                    "$order": ":id",
                    "$where": "date >= '2018-01-01T00:00:00' AND date < '2018-01-08T00:00:00'",
                }
            ),
        ],
    )
    out = tmp_path / "empty.csv"
    since = datetime(2018, 1, 1)
    n = fetch_to_csv(out, since=since, until=since + timedelta(days=7), app_token="tok")

    assert n == 0
    assert out.read_text().splitlines() == [",".join(DISPLAY_COLUMNS)]


def test_fetch_to_csv_failure_leaves_no_file(rsps, tmp_path):
    rsps.get(URL, body=body("page1.json"))
    rsps.get(URL, status=400, body=body("error_400_no_such_column.json"))
    out = tmp_path / "crimes.csv"

    with pytest.raises(SocrataError, match="No such column"):
        fetch_to_csv(out, page_size=3)

    assert list(tmp_path.iterdir()) == []
