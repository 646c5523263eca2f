#!/usr/bin/env bash
# The project's two commands on a fresh machine (README, first screen); CI's .ci/run calls `./dev.sh test`.
#
#   ./dev.sh run [ARGS...]    set up .venv, then the main job: hotspots run toronto-mci ARGS (--quick, --no-serve, ...)
#   ./dev.sh test [ARGS...]   set up .venv, Chromium and a throwaway PostgreSQL, then: python -m pytest -n 2 ARGS
#                             (without ARGS, ruff and mypy first: ./dev.sh lint)
#
# Re-running reuses .venv while pyproject.toml is unchanged (a stamp of its hash in .venv). System packages
# (Debian: chromium; python3-venv, postgresql only as fallbacks) are installed with apt-get only when missing,
# which needs root (sudo is used when not root).
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python3}
STAMP=.venv/.hotspots-install
FULL_RUN_MINUTES=5    # `hotspots run toronto-mci` from an empty folder on 2 cores: median 1 min 41 s (2026-12-01), 3 min 26 s on a slower machine
QUICK_RUN_MINUTES=3   # --quick: 2 min 36 s measured from ingest to a serving map (fresh clone, load 1.1)

say() { printf '==> %s\n' "$*"; }
die() { printf 'dev.sh: %s\n' "$*" >&2; exit 1; }

usage() {  # to stdout when asked for, to stderr after a mistake
  [ "${1:-0}" -eq 0 ] || exec >&2
  cat <<'USAGE'
usage: ./dev.sh run [ARGS...]    set up .venv, then: hotspots run toronto-mci ARGS (--quick, --no-serve, --port ...)
       ./dev.sh test [ARGS...]   set up .venv, Chromium and PostgreSQL, then: python -m pytest -n 2 ARGS
       ./dev.sh lint             ruff and mypy (also the start of ./dev.sh test without ARGS)
USAGE
  exit "${1:-0}"
}

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"
  elif command -v sudo >/dev/null; then sudo "$@"
  else die "'$*' needs root and sudo is missing: run it as root, or install what it installs yourself"
  fi
}

apt_updated=""
apt_install() {
  command -v apt-get >/dev/null || die "$* missing and this is not a Debian/Ubuntu system: install it with your package manager"
  say "installing Debian packages (needs root): $*"
  if [ -z "$apt_updated" ]; then
    as_root apt-get update -qq || say "apt-get update failed: trying the package lists already on this machine"
    apt_updated=1
  fi
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null \
    || die "apt-get install $* failed: install it by hand (see the message above) and re-run"
}

# --- the Python environment -----------------------------------------------------------------------------
ensure_venv() {  # $1: the extras this command needs ("toronto" or "dev,toronto")
  local extras=$1 hash started=$SECONDS
  hash=$(cksum < pyproject.toml | cut -d' ' -f1)
  if [ -x .venv/bin/python ] && .venv/bin/python -c '' 2>/dev/null && [ -f "$STAMP" ] \
     && { grep -qxF "$hash $extras" "$STAMP" || grep -qxF "$hash dev,toronto" "$STAMP"; }; then
    say "reusing .venv (installed for this pyproject.toml)"
    return
  fi
  if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c '' 2>/dev/null; then
    command -v "$PYTHON" >/dev/null || die "$PYTHON not found: install Python 3.11 or newer, or set PYTHON=/path/to/python3"
    "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
      || die "$PYTHON is Python $("$PYTHON" -c 'import platform; print(platform.python_version())'); hotspots needs 3.11 or newer: set PYTHON=/path/to/python3.11"
    "$PYTHON" -c 'import ensurepip, venv' 2>/dev/null || apt_install python3-venv
    say "creating .venv with $("$PYTHON" -c 'import sys; print(sys.executable, sys.version.split()[0])')"
    rm -rf .venv
    "$PYTHON" -m venv .venv
  fi
  say "installing hotspots with extras [$extras] into .venv (1-2 min on an idle machine the first time, longer on a busy one)"
  .venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[$extras]" \
    || die "pip install -e \".[$extras]\" failed (see above): fix the cause and re-run; delete .venv to start over"
  printf '%s %s\n' "$hash" "$extras" > "$STAMP"
  say "installed in $((SECONDS - started)) s"
}

# --- ./dev.sh run ---------------------------------------------------------------------------------------
estimate() {  # how long the run takes here: the measured 2-core figure, scaled by the cores it can get now
  local minutes=$FULL_RUN_MINUTES what="the full run" arg
  for arg in "$@"; do [ "$arg" = "--quick" ] && { minutes=$QUICK_RUN_MINUTES; what="the quick look"; }; done
  awk -v n="$(nproc)" -v load="$(cut -d' ' -f1 /proc/loadavg)" -v m="$minutes" -v what="$what" 'BEGIN {
    share = n * 2 / (load + 2); if (share > 2) share = 2; if (share > n) share = n   # cores it can expect
    printf "==> %s takes about %d min on 2 idle cores; this machine has %d cores at load %.1f: expect about %d min\n",
           what, m, n, load, m * 2 / share + 0.5 }'
}

cmd_run() {
  ensure_venv toronto
  estimate "$@"
  say "running: hotspots run toronto-mci $*   (writes ./data; the service starts at the end unless --no-serve)"
  exec .venv/bin/hotspots run toronto-mci "$@"
}

# --- ./dev.sh test --------------------------------------------------------------------------------------
ensure_chromium() {  # the map page's browser test drives Debian's Chromium through Playwright
  if [ -n "${HOTSPOTS_CHROMIUM:-}" ]; then
    [ -x "$HOTSPOTS_CHROMIUM" ] || die "HOTSPOTS_CHROMIUM=$HOTSPOTS_CHROMIUM is not an executable: point it at Chromium or unset it"
  else
    command -v chromium >/dev/null || apt_install chromium
    HOTSPOTS_CHROMIUM=$(command -v chromium || echo /usr/bin/chromium)
    export HOTSPOTS_CHROMIUM
  fi
  say "browser for the map page test: $HOTSPOTS_CHROMIUM"
}

PGDIR=""
stop_pip_postgres() {
  [ -n "$PGDIR" ] && .venv/bin/python tests/throwaway_postgres.py stop "$PGDIR" || true
}

pip_postgres() {  # a throwaway server from the pgserver wheel; 0 when started, 1 when dev.sh should fall back
  local url status
  .venv/bin/python -c 'import pgserver' 2>/dev/null || { say "pgserver (pip) is not installed for this Python/platform"; return 1; }
  PGDIR=$(mktemp -d "${TMPDIR:-/tmp}/hotspots-pg.XXXXXX")
  trap stop_pip_postgres EXIT
  url=$(.venv/bin/python tests/throwaway_postgres.py start "$PGDIR") && {
    export HOTSPOTS_TEST_DATABASE_URL=$url
    say "PostgreSQL for the tests: pgserver in $PGDIR (stopped and deleted at the end)"
    return 0
  }
  status=$?
  stop_pip_postgres; PGDIR=""
  say "pgserver did not start (exit $status, see above)"
  return 1
}

debian_postgres() {  # Debian's cluster on loopback with a hotspots role and database (left running, idempotent)
  local version port
  command -v pg_ctlcluster >/dev/null || apt_install postgresql
  version=$(ls /usr/lib/postgresql | sort -V | tail -1)
  if ! as_root pg_lsclusters -h | grep -q "^$version main .* online"; then
    as_root pg_lsclusters -h | grep -q "^$version main" || as_root pg_createcluster "$version" main >/dev/null
    as_root pg_ctlcluster "$version" main start
  fi
  port=$(as_root pg_lsclusters -h | awk -v v="$version" '$1 == v && $2 == "main" { print $3 }')
  as_postgres() { as_root runuser -u postgres -- "$@"; }
  for _ in $(seq 1 30); do as_postgres psql -p "$port" -qtAc 'SELECT 1' >/dev/null 2>&1 && break; sleep 1; done
  as_postgres psql -p "$port" -qtAc "SELECT 1 FROM pg_roles WHERE rolname = 'hotspots'" | grep -q 1 \
    || as_postgres psql -p "$port" -qc "CREATE ROLE hotspots LOGIN PASSWORD 'hotspots' CREATEDB"
  as_postgres psql -p "$port" -qtAc "SELECT 1 FROM pg_database WHERE datname = 'hotspots_test'" | grep -q 1 \
    || as_postgres createdb -p "$port" -O hotspots hotspots_test
  export HOTSPOTS_TEST_DATABASE_URL="postgresql+psycopg://hotspots:hotspots@127.0.0.1:$port/hotspots_test"
  say "PostgreSQL for the tests: Debian's cluster $version/main on port $port"
}

ensure_postgres() {  # the service's PostgreSQL tests read HOTSPOTS_TEST_DATABASE_URL
  if [ -n "${HOTSPOTS_TEST_DATABASE_URL:-}" ]; then
    say "PostgreSQL for the tests: HOTSPOTS_TEST_DATABASE_URL (yours)"
    return
  fi
  case ${HOTSPOTS_TEST_POSTGRES:-pip} in
    pip) pip_postgres || { say "falling back to Debian's PostgreSQL"; debian_postgres; } ;;
    debian) debian_postgres ;;
    *) die "HOTSPOTS_TEST_POSTGRES=${HOTSPOTS_TEST_POSTGRES} is not pip or debian: set one of them, or unset it" ;;
  esac
}

cmd_lint() {  # the layer contracts run inside the suite (tests/test_architecture.py); lint and types here
  ensure_venv dev,toronto
  say "running: ruff check, mypy"
  .venv/bin/ruff check features forecasting serving experiments tests
  .venv/bin/mypy
}

cmd_test() {
  [ $# -eq 0 ] && cmd_lint  # the whole suite starts with lint and types; a chosen test file does not
  ensure_venv dev,toronto
  ensure_chromium
  ensure_postgres
  say "running: python -m pytest -n 2 $*"
  .venv/bin/python -m pytest -n 2 "$@"
}

case ${1:-} in
  run) shift; cmd_run "$@" ;;
  test) shift; cmd_test "$@" ;;
  lint) shift; cmd_lint ;;
  -h|--help|help) usage 0 ;;
  "") usage 2 ;;
  *) printf 'dev.sh: unknown command %q: use run or test\n' "$1" >&2; usage 2 ;;
esac
