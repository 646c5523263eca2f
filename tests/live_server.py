"""A real `hotspots serve` process for tests that talk HTTP over loopback: started as a user would start it,
awaited on /healthz, stopped with SIGTERM (as systemd or Kubernetes would)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import requests

REPO_ROOT = Path(__file__).resolve().parents[1]


class LiveServer:
    def __init__(self, process: subprocess.Popen, base_url: str, log_path: Path):
        self.process, self.base_url, self.log_path = process, base_url, log_path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM, then the exit code (uvicorn drains requests, runs the shutdown, exits 0)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            self.process.kill()
            self.process.wait()
            raise AssertionError(
                f"the server did not stop within {timeout} s of SIGTERM; log:\n{self.log()[-3000:]}"
            ) from exc


@contextmanager
def hotspots_serve(data_dir: Path, port: int, *extra: str, env: dict[str, str] | None = None,
                   startup_seconds: float = 120.0) -> Iterator[LiveServer]:
    """Run ``hotspots serve --data-dir DATA_DIR --port PORT [extra]`` until /healthz answers; stop it afterwards."""
    log_path = data_dir.parent / f"server-{port}.log"
    environment = {**os.environ, **(env or {})}
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), environment.get("PYTHONPATH")]))
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "serving.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
             "--data-dir", str(data_dir), *extra],
            stdout=log, stderr=subprocess.STDOUT, env=environment, cwd=data_dir.parent,
        )
    server = LiveServer(process, f"http://127.0.0.1:{port}", log_path)
    try:
        deadline = time.monotonic() + startup_seconds
        while True:
            if process.poll() is not None:
                raise AssertionError(f"`hotspots serve` exited with {process.returncode}; log:\n{server.log()[-3000:]}")
            try:
                if requests.get(f"{server.base_url}/healthz", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"/healthz did not answer within {startup_seconds} s; log:\n{server.log()[-3000:]}")
            time.sleep(0.2)
        yield server
    finally:
        if process.poll() is None:
            server.stop()
