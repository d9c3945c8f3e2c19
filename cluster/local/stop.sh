#!/usr/bin/env bash
# Stop every Ray process (head or worker) on this machine.
set -euo pipefail
command -v ray >/dev/null || { echo "stop.sh: 'ray' not on PATH; activate the venv" >&2; exit 1; }
ray stop "$@"
