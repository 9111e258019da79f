#!/usr/bin/env bash
# The realized-vs-MAC benchmarks (early exit, sparse conv, dynamic parameters, MoE/routing, skipping, channel gating,
# Skip-RNN) on a quiet machine with many cores: two lanes, each pinned (taskset) to two CPUs of distinct physical
# cores (no hyper-thread siblings shared, no lane on another's cores), 2 threads, quick settings where a benchmark
# trains; each lane runs its benchmarks one after the other. Logs go to $OUT/<name>.txt.
#   OUT=/tmp/quiet LIMIT=200 bash scripts/quiet_bench.sh
set -u
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
PY=${PY:-python3}
OUT=${OUT:-/tmp/quiet_bench}
LIMIT=${LIMIT:-300}           # seconds per benchmark
mkdir -p "$OUT"
# one CPU per physical core, in core order; lanes take two each, skipping the first core (the shell, the GPU driver)
mapfile -t CPUS < <(lscpu -p=CPU,CORE | grep -v '^#' | sort -t, -k2,2n -u | cut -d, -f1)
if [ "${#CPUS[@]}" -lt 5 ]; then
    echo "quiet_bench.sh needs 5 physical cores or more (found ${#CPUS[@]}); run the benchmarks one by one instead" >&2
    exit 2
fi
LANE1=${CPUS[1]},${CPUS[2]}
LANE2=${CPUS[3]},${CPUS[4]}
echo "cpus per core: ${CPUS[*]}; lane 1 on $LANE1, lane 2 on $LANE2" | tee "$OUT/lanes.txt"
run() {   # run CPUS NAME ARGS...
    local cores=$1 name=$2; shift 2
    timeout "$LIMIT" taskset -c "$cores" $PY "$@" > "$OUT/$name.txt" 2>&1
    echo "exit $?" >> "$OUT/$name.txt"
}
(run "$LANE1" early_exit benchmarks/bench_early_exit.py --threads 2 --repeats 9
 run "$LANE1" sparse_conv benchmarks/bench_sparse_conv.py --threads 2
 run "$LANE1" dynamic_params benchmarks/bench_dynamic_params.py --threads 2 --repeats 15) &
(run "$LANE2" channel_gating benchmarks/bench_channel_gating.py --quick --threads 2
 run "$LANE2" skipping benchmarks/bench_skipping.py --quick --threads 2
 run "$LANE2" moe_routing benchmarks/bench_moe_routing.py --quick --threads 2
 run "$LANE2" skiprnn benchmarks/bench_skiprnn.py --quick --threads 2) &
wait
