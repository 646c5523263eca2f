"""A planner's client asking for the whole city, in a process of its own (as another user's machine would be), so
that what it costs the server is not mixed with the cost of receiving megabytes in the measuring test's process.

Usage: ``python bulk_client.py BASE_URL KEY CITY SHIFT``; prints ``ready``, then reads commands from stdin:
- ``pair K``: GET /v1/hotspots and then /v1/hotspots.geojson with k=K;
- ``flood K``: the same requests back to back (k = K, K - 1, ... so that each body is new) until the next line.
For each command it prints ``started`` once the first request is sent, then one line with every request as
``status:bytes:seconds``.
"""

from __future__ import annotations

import http.client
import sys
import threading
import time
import urllib.parse

PATHS = ("/v1/hotspots", "/v1/hotspots.geojson")


def send(connection: http.client.HTTPConnection, key: str, path: str, **params) -> None:
    connection.request("GET", f"{path}?{urllib.parse.urlencode(params)}", headers={"X-API-Key": key})


def receive(connection: http.client.HTTPConnection) -> tuple[http.client.HTTPResponse, bytes]:
    response = connection.getresponse()
    return response, response.read()


def main(base_url: str, key: str, city: str, shift: str) -> None:
    url = urllib.parse.urlsplit(base_url)
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=60)

    def fetch(i: int, k: int) -> str:
        started = time.perf_counter()
        send(connection, key, PATHS[i % 2], city=city, k=k, shift=shift)
        if i == 0:
            print("started", flush=True)
        response, body = receive(connection)
        return f"{response.status}:{len(body)}:{time.perf_counter() - started:.4f}"

    print("ready", flush=True)
    for line in sys.stdin:
        command, k = line.split()
        if command == "pair":
            done = [fetch(i, int(k)) for i in range(2)]
        elif command == "flood":
            stop = threading.Event()
            threading.Thread(target=_set_on_next_line, args=(stop,), daemon=True).start()
            done, i = [], 0
            while not stop.is_set() or not done:
                done.append(fetch(i, int(k) - i // 2))
                i += 1
        else:
            raise SystemExit(f"unknown command {command!r}")
        print(" ".join(done), flush=True)


def _set_on_next_line(stop: threading.Event) -> None:
    sys.stdin.readline()
    stop.set()


if __name__ == "__main__":
    main(*sys.argv[1:5])
