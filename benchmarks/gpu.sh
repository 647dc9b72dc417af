#!/usr/bin/env bash
# lmforge on one GPU, one command, under 8 minutes (sized for one H200):
#   - bf16 training throughput and MFU of the GPT-2 124M and Llama-1B presets,
#     eager and torch.compile'd, FSDP2 on one GPU (a 1-process torchrun);
#   - a 200-step loss comparison, bf16 vs fp32, on the same batches.
# No downloads: synthetic Markov-chain tokens. Needs torch, numpy, pyyaml, safetensors.
#
#   benchmarks/gpu.sh [OUT_DIR]          # default: $OUT, else runs/gpu-bench
#   DRY_RUN=1 benchmarks/gpu.sh [OUT_DIR]  # same code path on CPU, tiny presets, < 1 minute
#   ONLY="gpt2-eager gpt2-compile" benchmarks/gpu.sh  # rerun some configurations only
#
# Writes OUT_DIR/gpu.md (Markdown tables), OUT_DIR/results.jsonl, OUT_DIR/logs/*.log.
# A run that fails or runs out of its time slot is listed as failed; the others still report.
set -uo pipefail

cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT:-runs/gpu-bench}}"
mkdir -p "$OUT_DIR/logs"
rm -f "$OUT_DIR/results.jsonl"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
# Fewer allocator retries for the 1B model's large, changing activation sizes.
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"
PY="${PYTHON:-$(command -v python || command -v python3)}"
BUDGET_S="${BUDGET_S:-470}"  # the whole script: 8 minutes minus start-up margin
START=$(date +%s)

if [ "${DRY_RUN:-0}" = "1" ]; then
    # Same runs, tiny, on CPU, in one process (see DRY_RUN in gpu_bench.py).
    timeout 300 "$PY" -m torch.distributed.run --standalone --nproc_per_node 1 \
        benchmarks/gpu_bench.py dry-run --out "$OUT_DIR" 2>&1 | grep -v "^step "
    rc=${PIPESTATUS[0]}
    echo "dry run: exit $rc, $(($(date +%s) - START))s; table in $OUT_DIR/gpu.md"
    exit "$rc"
fi

GPT2=(--preset gpt2-124m --micro-batch 16 --steps 40 --warmup-steps 10 --log-every 5)
LLAMA=(--preset llama-1b --micro-batch 4 --accum 2 --steps 30 --warmup-steps 10 --log-every 5)
LOSS=(--preset gpt2-124m --micro-batch 8 --steps 200)

# run NAME LIMIT_S ARGS...: one torchrun per configuration, so a crash or OOM stays contained.
run() {
    local name=$1 limit=$2
    shift 2
    if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]]; then
        return  # ONLY="name ..." reruns just those configurations
    fi
    local left=$((BUDGET_S - ($(date +%s) - START) - 10))
    if [ "$left" -lt 20 ]; then
        echo "{\"name\": \"$name\", \"error\": \"skipped: time budget spent\"}" >>"$OUT_DIR/results.jsonl"
        echo "$name: skipped (time budget spent)"
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "$name: running (limit ${limit}s) ..."
    local t0=$(date +%s)
    timeout --signal=TERM --kill-after=20 "$limit" \
        "$PY" -m torch.distributed.run --standalone --nproc_per_node 1 \
        benchmarks/gpu_bench.py "$@" --name "$name" --out "$OUT_DIR" \
        >"$OUT_DIR/logs/$name.log" 2>&1
    local rc=$?
    if [ $rc -ne 0 ]; then
        local why="exit $rc"
        [ $rc -eq 124 ] && why="timed out after ${limit}s"
        echo "{\"name\": \"$name\", \"error\": \"$why, see logs/$name.log\"}" >>"$OUT_DIR/results.jsonl"
        echo "$name: FAILED ($why); last lines of $OUT_DIR/logs/$name.log:"
        tail -n 5 "$OUT_DIR/logs/$name.log"
    else
        echo "$name: done in $(($(date +%s) - t0))s"
    fi
}

run gpt2-eager 120 throughput "${GPT2[@]}"
run llama-1b-eager 150 throughput "${LLAMA[@]}"
run loss-bf16 120 losses --dtype bf16 "${LOSS[@]}"
run loss-fp32 150 losses --dtype fp32 "${LOSS[@]}"
run gpt2-compile 180 throughput --compile "${GPT2[@]}"
run llama-1b-compile 240 throughput --compile "${LLAMA[@]}"

"$PY" benchmarks/gpu_bench.py table --out "$OUT_DIR"
echo "total $(($(date +%s) - START))s; table in $OUT_DIR/gpu.md"
