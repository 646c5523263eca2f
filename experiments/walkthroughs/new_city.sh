#!/usr/bin/env bash
# A new city, from raw export to a served map. The README shows these commands; tests/test_any_city.py runs this
# script on a generated city. Usage: bash experiments/walkthroughs/new_city.sh EXPORT.csv TIME_ZONE
set -euo pipefail
EXPORT=${1:?give the export file}
ZONE=${2:?give the city time zone, e.g. America/Toronto}
# --- walkthrough (shown in the README) ---
hotspots profile init "$EXPORT" --name mycity --timezone "$ZONE" --out mycity.toml
hotspots profile check mycity.toml "$EXPORT" --png mycity-check.png
hotspots run mycity.toml "$EXPORT" --quick --no-serve
# --- end ---
