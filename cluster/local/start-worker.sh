#!/usr/bin/env bash
# Join this machine to a lion-ray Ray cluster as a worker node.
#
#   . .venv/bin/activate
#   cluster/local/start-worker.sh HEAD_IP:6379 [--num-cpus N] [--num-gpus G] [--temp-dir DIR]
#       [--agent-port P]
#
# Use the same RAY_AUTH_MODE (and token) as the head. Several workers may run on one machine
# (for testing): each needs its own --temp-dir, or the nodes garbage-collect each other's
# runtime environments (a job's working directory disappears under its driver). The default
# temp dir is unique per invocation for that reason; and its own --agent-port (the dashboard
# agent's HTTP port, 52365 by default), or the job server may find no agent to run a job.
set -euo pipefail

[ $# -ge 1 ] || { sed -n '2,12p' "$0"; exit 2; }
address="$1"; shift
num_cpus=""
num_gpus=""
temp_dir="/tmp/ray-worker-$$"
agent_port=""
while [ $# -gt 0 ]; do
  case "$1" in
    --num-cpus) num_cpus="$2"; shift 2 ;;
    --num-gpus) num_gpus="$2"; shift 2 ;;
    --temp-dir) temp_dir="$2"; shift 2 ;;
    --agent-port) agent_port="$2"; shift 2 ;;
    *) echo "start-worker.sh: unknown option $1" >&2; exit 2 ;;
  esac
done

command -v ray >/dev/null || { echo "start-worker.sh: 'ray' not on PATH; activate the venv (. .venv/bin/activate)" >&2; exit 1; }
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
ray start --address "$address" --temp-dir "$temp_dir" --disable-usage-stats \
  ${num_cpus:+--num-cpus "$num_cpus"} ${num_gpus:+--num-gpus "$num_gpus"} \
  ${agent_port:+--dashboard-agent-listen-port "$agent_port"}
echo "worker joined $address (temp dir $temp_dir)"
