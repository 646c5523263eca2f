"""A planner's client asking for the whole city, in a process of its own (as another user's machine would be), so
that what it costs the server is not mixed with the cost of receiving megabytes in the measuring test's process.

Usage: ``python bulk_client.py BASE_URL KEY CITY SHIFT``; prints ``ready``, then reads commands from stdin:
- ``pair K``: GET /v1/hotspots and then /v1/hotspots.geojson with k=K, and print one line for the two;
- ``flood K``: the same requests back to back (k = K, K - 1, ... so that each body is new) until the next line.
Each request is printed as ``status:bytes:seconds``.
"""

from __future__ import annotations

import http.client
import sys
import threading
import time
import urllib.parse

PATHS = ("/v1/hotspots", "/v1/hotspots.geojson")


def main(base_url: str, key: str, city: str, shift: str) -> None:
    url = urllib.parse.urlsplit(base_url)
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=60)

    def fetch(path: str, k: int) -> str:
        started = time.perf_counter()
        connection.request("GET", f"{path}?{urllib.parse.urlencode(dict(city=city, k=k, shift=shift))}",
                           headers={"X-API-Key": key})
        response = connection.getresponse()
        body = response.read()
        return f"{response.status}:{len(body)}:{time.perf_counter() - started:.4f}"

    print("ready", flush=True)
    for line in sys.stdin:
        command, k = line.split()
        if command == "pair":
            print(" ".join(fetch(path, int(k)) for path in PATHS), flush=True)
        elif command == "flood":
            stop = threading.Event()
            threading.Thread(target=_set_on_next_line, args=(stop,), daemon=True).start()
            done, i = [], 0
            while not stop.is_set():
                done.append(fetch(PATHS[i % 2], int(k) - i // 2))
                i += 1
            print(" ".join(done), flush=True)
        else:
            raise SystemExit(f"unknown command {command!r}")


def _set_on_next_line(stop: threading.Event) -> None:
    sys.stdin.readline()
    stop.set()


if __name__ == "__main__":
    main(*sys.argv[1:5])
