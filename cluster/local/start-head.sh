#!/usr/bin/env bash
# Start the Ray head node for lion-ray on this machine, with token authentication on.
#
#   . .venv/bin/activate
#   cluster/local/start-head.sh [--port 6379] [--dashboard-port 8265] [--num-cpus N] [--temp-dir /tmp/ray]
#       [--agent-port 52365] [--no-dashboard]
#
# Then start workers (cluster/local/start-worker.sh HEAD_IP:6379) and submit the loop:
#   RAY_AUTH_MODE=token ray job submit --address http://HEAD_IP:8265 --working-dir . -- \
#       python jobs/distill.py --config configs/demo.yaml
# A submit in the first seconds after start may answer "No available agent to submit job":
# the head's dashboard agent is still registering; submit again a few seconds later. It
# answers that for good when the agent could not bind its port (--agent-port, Ray's 52365)
# because another Ray on this machine holds it: give each node on one machine its own.
# --no-dashboard starts the head without the dashboard's web modules (fewer processes and less
# idle CPU, for small machines and CI): drivers connect to HEAD_IP:6379 as before, but
# `ray job submit` and the web UI need the dashboard.
#
# Ray 2.60 turns token auth on for local clusters: every node and every client must agree
# on RAY_AUTH_MODE and share the token. On one machine the token file ~/.ray/auth_token is
# shared automatically; across machines copy it (or set RAY_AUTH_TOKEN from a secret store).
set -euo pipefail

port=6379
dashboard_port=8265
dashboard_host=0.0.0.0
num_cpus=""
temp_dir=/tmp/ray
agent_port=""
include_dashboard=true
while [ $# -gt 0 ]; do
  case "$1" in
    --port) port="$2"; shift 2 ;;
    --dashboard-port) dashboard_port="$2"; shift 2 ;;
    --dashboard-host) dashboard_host="$2"; shift 2 ;;
    --num-cpus) num_cpus="$2"; shift 2 ;;
    --temp-dir) temp_dir="$2"; shift 2 ;;
    --agent-port) agent_port="$2"; shift 2 ;;
    --no-dashboard) include_dashboard=false; shift ;;
    -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
    *) echo "start-head.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done

command -v ray >/dev/null || { echo "start-head.sh: 'ray' not on PATH; activate the venv (. .venv/bin/activate)" >&2; exit 1; }
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
if [ "$RAY_AUTH_MODE" = token ] && [ -z "${RAY_AUTH_TOKEN:-}" ]; then
  ray get-auth-token --generate >/dev/null  # creates ~/.ray/auth_token once
fi

ray start --head --port "$port" --dashboard-host "$dashboard_host" --dashboard-port "$dashboard_port" \
  --temp-dir "$temp_dir" --disable-usage-stats --include-dashboard "$include_dashboard" \
  ${num_cpus:+--num-cpus "$num_cpus"} \
  ${agent_port:+--dashboard-agent-listen-port "$agent_port"}

ip=$(hostname -I 2>/dev/null | awk '{print $1}')
dashboard="http://${ip:-127.0.0.1}:$dashboard_port"
[ "$include_dashboard" = true ] || dashboard="none (--no-dashboard)"
echo "head started: address ${ip:-127.0.0.1}:$port, dashboard $dashboard (RAY_AUTH_MODE=$RAY_AUTH_MODE)"
