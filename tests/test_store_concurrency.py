"""Issue 11, finding 1: writers in separate processes never corrupt or lose the store.

- N ingests of disjoint real slices (Toronto MCI) run at once, several rounds: every process exits cleanly,
  every summary balances, and the store holds exactly the union (the same rows as ingesting them one by one).
- ``kill -9`` in the middle of a store write: the store is the old or the new version, never torn, and the
  dead writer's lock does not block the next one.
- A second writer waits with a message, or refuses with ``--no-wait``.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from features.pipeline import ingest_file
from features.profile import load_profile
from features.sources.toronto import materialise
from features.store import IncidentStore, leftovers
from features.storelock import StoreBusy, StoreError, write_lock
from features.verify import verify_store

REPO = Path(__file__).resolve().parents[1]
TESTVILLE = Path(__file__).parent / "fixtures" / "profiles" / "testville.toml"
# 1,000 rows a slice (was 2,500): each slice's rows still fall in 43-64 monthly partitions and every pair of slices
# shares 4-29 of them (was 77-98), so writers still rewrite each other's partitions; an ingest costs about the
# partitions and rows it rewrites
N_WRITERS, ROUNDS, SLICE_ROWS = 4, 3, 1_000

# one process = ROUNDS ingests, each into its own data folder, each released by a line on its stdin so that the N
# processes hit the store at the same moment (imports are paid once, before the first round; a writer waiting for
# the line blocks instead of polling a file); after each ingest its summary is the next line on its stdout
WRITER = """
import json, sys
from pathlib import Path
from features.pipeline import ingest_file
from features.profile import load_profile
from features.store import IncidentStore
profile = load_profile("toronto-mci")
file, *rounds = sys.argv[1:]
print("ready", flush=True)
for round_dir in rounds:
    assert sys.stdin.readline() == "go\\n"
    s = ingest_file(file, profile, IncidentStore(Path(round_dir) / "data"))
    print(json.dumps({"new": s.stored_new, "updated": s.updated, "already": s.already_stored,
                      "quarantined": s.quarantined_total, "input": s.input_rows, "balanced": s.balanced}), flush=True)
"""


@pytest.fixture(scope="module")
def toronto_slices(tmp_path_factory) -> list[Path]:
    """N disjoint slices of the real Toronto export, each with the header."""
    root = tmp_path_factory.mktemp("slices")
    full = materialise(root / "toronto-mci.csv")
    with full.open("rb") as fh:
        header = fh.readline()
        body = [fh.readline() for _ in range(N_WRITERS * SLICE_ROWS)]
    paths = []
    for i in range(N_WRITERS):
        path = root / f"slice{i}.csv"
        path.write_bytes(header + b"".join(body[i * SLICE_ROWS:(i + 1) * SLICE_ROWS]))
        paths.append(path)
    return paths


def line_within(process: subprocess.Popen, seconds: float) -> str:
    """The process's next stdout line, failing (with its stderr) if none comes within ``seconds``. (select sees
    the pipe, not the reader's buffer: fine here, as a writer prints nothing more until it is sent the next line.)"""
    ready, _, _ = select.select([process.stdout], [], [], seconds)
    if not ready:
        process.kill()
        raise AssertionError(f"no line in {seconds} s: {process.communicate()}")
    return process.stdout.readline()


def python_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "POLARS_MAX_THREADS": "1"}


def test_parallel_ingests_never_corrupt_or_lose_a_row(toronto_slices, tmp_path):
    profile = load_profile("toronto-mci")
    reference = IncidentStore(tmp_path / "reference")
    for path in toronto_slices:
        ingest_file(path, profile, reference)
    expected = reference.read("toronto-mci").sort("incident_id")
    expected_quarantine = reference.read_quarantine("toronto-mci").sort("file", "source_row")
    assert expected.height > N_WRITERS * SLICE_ROWS * 0.95

    rounds = [tmp_path / f"round{r}" for r in range(ROUNDS)]
    for folder in rounds:
        folder.mkdir()
    writers = [
        subprocess.Popen([sys.executable, "-c", WRITER, str(path), *map(str, rounds)], cwd=REPO, env=python_env(),
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for path in toronto_slices
    ]
    # every writer has paid its imports before the first round is released (a fixed sleep under-waited on a busy
    # machine and over-waited on a quiet one)
    assert [line_within(w, 120) for w in writers] == ["ready\n"] * N_WRITERS
    summaries: list[list[dict]] = [[] for _ in writers]
    for _folder in rounds:
        for w in writers:
            w.stdin.write("go\n")
            w.stdin.flush()
        # next round only when every writer of this one is done, so the rounds do not overlap each other
        for w, mine in zip(writers, summaries):
            line = line_within(w, 60)
            assert line, w.communicate()
            mine.append(json.loads(line))
    outputs = [w.communicate(timeout=60) for w in writers]
    for writer, (out, err) in zip(writers, outputs):
        assert writer.returncode == 0, err
        assert "Traceback" not in err and out == ""

    for r, folder in enumerate(rounds):
        store = IncidentStore(folder / "data")
        got = store.read("toronto-mci").sort("incident_id")
        assert got.equals(expected), f"round {r}: the store is not the union of the slices"
        quarantine = store.read_quarantine("toronto-mci").sort("file", "source_row")
        assert quarantine.equals(expected_quarantine), f"round {r}"
        this_round = [s[r] for s in summaries]
        assert all(s["balanced"] for s in this_round)
        assert sum(s["input"] for s in this_round) == N_WRITERS * SLICE_ROWS
        # every row is stored exactly once across the N writers (disjoint slices: none is updated)
        assert sum(s["new"] for s in this_round) + sum(s["already"] for s in this_round) == (
            sum(s["input"] - s["quarantined"] for s in this_round))
        assert sum(s["new"] for s in this_round) == expected.height
        assert sum(s["updated"] for s in this_round) == 0
        assert [f.level for f in verify_store(folder / "data")].count("error") == 0
        assert not list((folder / "data" / "incidents").rglob(".*.tmp"))


# --- kill -9 during a write ---------------------------------------------------------------------------------

KILLED_WRITER = """
import sys
from pathlib import Path
from features.pipeline import ingest_file
from features.profile import load_profile
from features.store import IncidentStore
profile = load_profile(sys.argv[1])
store = IncidentStore(sys.argv[2])
print("ready", flush=True)
while True:  # every ingest revises every row: each one rewrites the whole store
    for file in sys.argv[3:]:
        ingest_file(file, profile, store)
"""


def versions(tmp_path: Path, n: int = 40_000) -> tuple[Path, Path]:
    """Two exports of the same n incidents, the second with every location corrected."""
    rng = np.random.default_rng(0)
    ids = [f"K-{i:06d}" for i in range(n)]
    times = [f"2021-06-{1 + i % 28:02d} {i % 24:02d}:00:00" for i in range(n)]
    lat = np.round(rng.uniform(40.70, 40.85, n), 6)
    lon = np.round(rng.uniform(-74.00, -73.92, n), 6)
    paths = []
    for k, shift in enumerate((0.0, 0.001)):
        frame = pl.DataFrame({"incident_no": ids, "occurred": times, "offence": ["THEFT"] * n,
                              "lat": lat + shift, "lon": lon})
        path = tmp_path / f"version{k}.csv"
        frame.write_csv(path)
        paths.append(path)
    return paths[0], paths[1]


def mid_write(store: IncidentStore) -> list[Path]:
    """Signs of a write in progress: temporary files, or partition files the committed manifest does not name
    (new ones not yet swapped in, or old ones not yet deleted)."""
    folder = store.path("testville")
    try:
        named = leftovers(folder, store.manifest(folder.name))
    except StoreError:
        named = []
    return [*folder.rglob(".*.tmp"), *named]


def test_kill_9_during_a_write_leaves_old_or_new_and_no_lock(tmp_path):
    profile = load_profile(TESTVILLE)
    a, b = versions(tmp_path)
    expected = []
    for path in (a, b):
        ref = IncidentStore(tmp_path / f"ref-{path.stem}")
        ingest_file(path, profile, ref)
        expected.append(ref.read("testville").sort("incident_id"))
    data = tmp_path / "data"
    store = IncidentStore(data)
    killed_mid_write = 0
    for trial in range(3):
        writer = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(TESTVILLE), str(data), str(a), str(b)],
                                  cwd=REPO, env=python_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        # the polling below starts once the writer has paid its imports: polling every millisecond through them
        # cost a core for a second or more per trial
        assert line_within(writer, 120) == "ready\n"
        deadline = time.monotonic() + 60
        # wait for the store to exist, then for a temporary file of the store: a write in progress
        while not (store.manifest_path("testville").is_file() and mid_write(store)):
            assert writer.poll() is None, writer.stderr.read()
            assert time.monotonic() < deadline, "no store write seen in 60 s"
            time.sleep(0.001)
        time.sleep(0.005 * trial)
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=30)
        assert writer.returncode == -signal.SIGKILL
        killed_mid_write += bool(mid_write(store))

        got = store.read("testville").sort("incident_id")  # readable, and one whole version
        assert got.equals(expected[0]) or got.equals(expected[1]), f"trial {trial}: a torn store"
        store.read_revisions("testville")  # readable
        assert [f.level for f in verify_store(data)].count("error") == 0

        # the dead writer's lock is gone with it: the next writer gets it at once, and tidies the temp file
        quick = IncidentStore(data, wait=False)
        summary = ingest_file(a, profile, quick)
        assert summary.balanced and summary.stored_new == 0
        assert quick.read("testville").sort("incident_id").equals(expected[0])
        assert not mid_write(quick)
    assert killed_mid_write >= 1, "no kill landed while a temporary file was being written"


# --- a second writer ------------------------------------------------------------------------------------------


def cli(*args) -> list[str]:
    return [str(Path(sys.executable).parent / "hotspots"), *map(str, args)]


def test_second_writer_refuses_with_no_wait_or_waits_with_a_message(tmp_path):
    data = tmp_path / "data"
    file = REPO / "tests" / "fixtures" / "malformed" / "dst.csv"
    env = {**python_env(), "COLUMNS": "1000"}
    with write_lock(data, what="a test holding the lock"):
        refused = subprocess.run(cli("ingest", TESTVILLE, file, "--data-dir", data, "--no-wait"), cwd=REPO,
                                 env=env, capture_output=True, text=True, timeout=120)
        assert refused.returncode == 2, refused.stdout + refused.stderr
        last = refused.stdout.rstrip().splitlines()[-1]
        assert last.startswith("error: the data folder") and "is being written by another process" in last
        assert f"(pid {os.getpid()}: a test holding the lock" in last and "without --no-wait to wait" in last
        assert "Traceback" not in refused.stdout + refused.stderr
        assert not (data / "incidents").exists()

        log = tmp_path / "waiting.log"
        with log.open("w") as out:
            waiting = subprocess.Popen(cli("ingest", TESTVILLE, file, "--data-dir", data), cwd=REPO, env=env,
                                       stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while "waiting for it to finish" not in log.read_text():
            assert waiting.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        time.sleep(0.3)
        assert waiting.poll() is None  # still waiting while the lock is held
        assert not (data / "incidents").exists()
    assert waiting.wait(timeout=60) == 0, log.read_text()
    assert "stored (new)              6" in log.read_text()
    assert IncidentStore(data).count("testville") == 6


def test_lock_is_exclusive_across_processes_and_reentrant_within_one(tmp_path):
    data = tmp_path / "data"
    probe = ("import sys\nfrom features.storelock import write_lock, StoreBusy\n"
             "try:\n    with write_lock(sys.argv[1], wait=False): print('got it')\n"
             "except StoreBusy: print('busy')\n")
    with write_lock(data):
        with write_lock(data, wait=False):  # the same process again: no deadlock
            out = subprocess.run([sys.executable, "-c", probe, str(data)], cwd=REPO, env=python_env(),
                                 capture_output=True, text=True, timeout=60).stdout
            assert out.strip() == "busy"
    out = subprocess.run([sys.executable, "-c", probe, str(data)], cwd=REPO, env=python_env(),
                         capture_output=True, text=True, timeout=60).stdout
    assert out.strip() == "got it"
    with pytest.raises(StoreBusy):
        holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom features.storelock import "
                                   "write_lock\nwith write_lock(sys.argv[1]):\n    print('held', flush=True)\n"
                                   "    time.sleep(30)\n", str(data)], cwd=REPO, env=python_env(),
                                  stdout=subprocess.PIPE, text=True)
        try:
            assert holder.stdout.readline().strip() == "held"
            with write_lock(data, wait=False):
                pass
        finally:
            holder.kill()
            holder.wait()

