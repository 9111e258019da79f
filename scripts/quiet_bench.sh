#!/usr/bin/env bash
# The realized-vs-MAC benchmarks (early exit, sparse conv, dynamic parameters, MoE/routing, skipping, channel gating,
# Skip-RNN) on a quiet machine with many cores: each in its own lane of 2 pinned cores (taskset), 2 threads, quick
# settings where a benchmark trains, so that they finish in a few minutes together. Logs go to $OUT/<name>.txt.
#   OUT=/tmp/quiet bash scripts/quiet_bench.sh
set -u
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
PY=${PY:-python3}
OUT=${OUT:-/tmp/quiet_bench}
LIMIT=${LIMIT:-420}
mkdir -p "$OUT"
lane() {   # lane CORES NAME ARGS...: one benchmark pinned to CORES, stopped after $LIMIT seconds
    local cores=$1 name=$2; shift 2
    (timeout "$LIMIT" taskset -c "$cores" $PY "$@" > "$OUT/$name.txt" 2>&1; echo "exit $?" >> "$OUT/$name.txt") &
}
lane 2,3 early_exit benchmarks/bench_early_exit.py --threads 2 --repeats 9
lane 4,5 sparse_conv benchmarks/bench_sparse_conv.py --threads 2
lane 6,7 dynamic_params benchmarks/bench_dynamic_params.py --threads 2 --repeats 15
lane 8,9 moe_routing benchmarks/bench_moe_routing.py --quick --threads 2
lane 10,11 skipping benchmarks/bench_skipping.py --quick --threads 2
lane 12,13 channel_gating benchmarks/bench_channel_gating.py --quick --threads 2
lane 14,15 skiprnn benchmarks/bench_skiprnn.py --quick --threads 2
wait
