#!/usr/bin/env bash
# Run a DeepSpeed entry point as N "nodes" on this machine, one rank per node.
#
#   launch/local_multinode.sh [--nodes N] [--port P] [--dir DIR] SCRIPT [ARGS...]
#   launch/local_multinode.sh --nodes 4 launch/pretrain.py --preset tiny data.path=... train.run_dir=...
#
# It writes DIR/hostfile with the aliases node0 ... node<N-1> (slots=1 each) and starts one
# launcher per node, `python -m bumblebee_dist.launching --hostfile DIR/hostfile --num_nodes N
# --num_gpus 1 --no_ssh --node_rank R --master_addr 127.0.0.1 --master_port P SCRIPT ARGS`, the
# way each node of a cluster starts its own launcher without ssh. The N ranks rendezvous on
# 127.0.0.1:P and form one world over gloo, so the multi-node code paths (node ranks, a hostfile,
# a world spread over launchers) run without a cluster. Launcher R writes its output to
# DIR/node<R>.log; the script exits with the first non-zero status, after stopping the others.
#
# Defaults: N=4, P a free port, DIR a new temporary folder. Run from anywhere with the project's
# environment active (or .venv present in the repository).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
nodes=4
port=""
dir=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --nodes) nodes="$2"; shift 2 ;;
        --port) port="$2"; shift 2 ;;
        --dir) dir="$2"; shift 2 ;;
        -h|--help) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) break ;;
    esac
done
if [[ $# -lt 1 ]]; then
    echo "usage: $0 [--nodes N] [--port P] [--dir DIR] SCRIPT [ARGS...]" >&2
    exit 2
fi

python="python"
if [[ -x "$repo/.venv/bin/python" && -z "${VIRTUAL_ENV:-}" ]]; then
    python="$repo/.venv/bin/python"
fi
dir="${dir:-$(mktemp -d -t bumblebee-nodes-XXXXXX)}"
mkdir -p "$dir"
port="${port:-$("$python" -c 'from bumblebee_dist.launching import free_port; print(free_port())')}"

: > "$dir/hostfile"
for ((rank = 0; rank < nodes; rank++)); do
    echo "node$rank slots=1" >> "$dir/hostfile"
done

# One core per rank at most: N ranks share this machine.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
export PYTHONUNBUFFERED=1

pids=()
stop_all() {
    for pid in "${pids[@]}"; do
        kill -- "-$pid" 2>/dev/null || true
    done
}
trap 'stop_all; exit 130' INT TERM

for ((rank = 0; rank < nodes; rank++)); do
    # setsid gives each launcher its own process group, so stop_all reaches its ranks too.
    setsid "$python" -m bumblebee_dist.launching --hostfile "$dir/hostfile" --num_nodes "$nodes" \
        --num_gpus 1 --no_ssh --node_rank "$rank" --master_addr 127.0.0.1 --master_port "$port" \
        "$@" > "$dir/node$rank.log" 2>&1 &
    pids+=("$!")
done
echo "started $nodes launchers (rendezvous 127.0.0.1:$port); logs in $dir/node<R>.log" >&2

status=0
for ((index = 0; index < nodes; index++)); do
    code=0
    wait -n || code=$?
    if [[ $code -ne 0 ]]; then
        status=$code
        echo "a launcher failed (exit status $status); stopping the others, see $dir/node*.log" >&2
        stop_all
        break
    fi
done
wait || true
exit "$status"
