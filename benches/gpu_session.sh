#!/usr/bin/env bash
# One GPU session's measurements, in stages that each fit one `run` call (10 minutes):
#
#   bash benches/gpu_session.sh STAGE [STAGE ...]
#
#   tests    every `cuda` test (pytest -m cuda, 6 workers when pytest-xdist
#            is carried; failures rerun alone), log and JUnit XML       ~3 min on an H200 (6 workers)
#            (TEST_PATHS="tests/test_a.py ...": those files only)
#   tune     the linear sweep, the selection table written from it and
#            checked at every entry (tests/test_linear_table.py)         ~4-5 min
#   modules  bench_modules.py, with the table `tune` wrote if there is one ~1 min
#   load     a Llama-3-8B-shaped checkpoint, then bench_load.py (warm and
#            cold, every peer, the ceilings; cold: LOAD_COLD_REPEAT=3 loads each,
#            round robin; LOAD_SWEEP=8,12,16: a thread sweep too (past the limit); LOAD_DEADLINE_S=520:
#            no round started that would end later)                      ~8 min
#   probe    probe_pipeline.py: the engine's consumer variants, round robin, and a
#            process's first load (fresh processes)                       ~4 min
#   decode   bench_decode.py, merged into the modules JSON                ~6 min
#            (DECODE_MODELS=llama8b: one model; DECODE_HOST=gc_frozen,skip_guards,deferred_stop:
#            each step also timed with the host's share trimmed; DECODE_ORDER=fp8,bf16)
#   tp       bench_load_tp.py at tp 1 and 2 (nvidia-h200-x2; NCCL, NVLS off) ~4 min
#            (TP_SIZES="1,2", TP_REPEAT=3, TP_VARIANTS="default,quantize_on=host": round robin)
#   tpcold   the same, the page cache evicted before every load (default,method=pread, 1 each) ~3 min
#
# Everything lands under $OUT (logs, JSON, markdown), and all of it again in $OUT/0-all.tgz
# (only 8 files come back, the first by name); a stage that fails is reported and the next
# one still runs; the exit status says whether any failed. Run it on the device
# machine after carrying `.whl` and `.wheels` (benches/README.md), e.g.
#   run(command="bash benches/gpu_session.sh tests modules", carry=[".whl", ".wheels"])
set -uo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the folder that comes back}"
source benches/device_env.sh || { echo "device_env.sh failed" >&2; exit 1; }
GPU=$(python3 -c 'import torch; n = torch.cuda.get_device_name(); print(n.split()[-1].lower())' 2>/dev/null || echo gpu)
CKPT=${FASTFP8_BENCH_CKPT:-/root/ckpt}
TABLE=$OUT/linear_table.json
failed=()

stage() {  # stage NAME LIMIT_S COMMAND...: run it with a time limit, its output teed to $OUT/NAME.log
    local name=$1 limit=$2; shift 2
    local t0=$SECONDS
    echo "=== $name (limit ${limit}s): $*"
    timeout --signal=INT --kill-after=20 "$limit" "$@" 2>&1 | tee -a "$OUT/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "=== $name: exit $rc after $((SECONDS - t0)) s"
    [ "$rc" = 0 ] || failed+=("$name")
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
for s in "$@"; do
    case $s in
    tests)
        # in parallel (pytest-xdist, carried in .whl: compiling the kernels is most of the
        # time and takes the CPU), then whatever failed again alone, one test at a time: a
        # test that fails only beside others is reported as such, not hidden
        workers=()
        python3 -c "import xdist" 2>/dev/null && workers=(-n "${FASTFP8_TEST_WORKERS:-6}")
        stage cuda_tests 540 python3 -m pytest -q -m cuda -p no:cacheprovider ${workers[@]+"${workers[@]}"} \
            --junitxml="$OUT/cuda_tests.xml" ${TEST_PATHS:-tests}
        if [ "${failed[*]: -1}" = cuda_tests ] && [ ${#workers[@]} -gt 0 ] && [ -f "$OUT/cuda_tests.xml" ]; then
            stage cuda_tests_rerun 300 python3 benches/rerun_failed.py "$OUT/cuda_tests.xml" \
                --junitxml "$OUT/cuda_tests_rerun.xml" &&
                [ "${failed[*]: -1}" != cuda_tests_rerun ] && unset 'failed[-1]' &&
                echo "=== cuda_tests: the tests that failed in parallel pass alone (cuda_tests_rerun.log)"
        fi ;;
    tune)
        stage tune_linear 330 python3 benches/tune_linear.py --out "$OUT/tune_linear.json" --budget-s 240
        stage tune_linear 30 python3 benches/tune_linear.py --table "$OUT/tune_linear.json" --table-out "$TABLE"
        stage linear_table_tests 120 env FASTFP8_LINEAR_TABLE="$TABLE" \
            python3 -m pytest -q -m cuda -p no:cacheprovider tests/test_linear_table.py ;;
    modules)
        if [ -f "$TABLE" ]; then export FASTFP8_LINEAR_TABLE=$TABLE; fi
        stage modules 240 python3 benches/bench_modules.py --rep-ms 40 --out "$OUT/modules_$GPU.json" ;;
    load)
        [ -f "$CKPT/model.safetensors.index.json" ] ||
            stage make_checkpoint 120 python3 benches/make_checkpoint.py "$CKPT" --layers 32 --fsync
        sync
        sweep=${LOAD_SWEEP-}
        # cold: three loads a loader, round robin (a disk's rate drifts over the run); a round
        # that would end past LOAD_DEADLINE_S is skipped (recorded), so the stage ends with its JSON
        stage load 555 python3 benches/bench_load.py "$CKPT" --out "$OUT/load_$GPU.json" \
            --cold-repeat "${LOAD_COLD_REPEAT:-3}" --round-robin --deadline-s "${LOAD_DEADLINE_S:-520}" \
            ${sweep:+--sweep-threads "$sweep"} ;;
    probe)
        # the consumer's variants against each other, round robin, caches emptied as in
        # bench_load.py; then a process's first load in fresh processes
        [ -f "$CKPT/model.safetensors.index.json" ] ||
            stage make_checkpoint 120 python3 benches/make_checkpoint.py "$CKPT" --layers 32 --fsync
        sync
        stage probe_pipeline 300 python3 benches/probe_pipeline.py "$CKPT" --out "$OUT/probe_consumer_$GPU.json" \
            --repeat "${PROBE_REPEAT:-5}" --empty-cache --timeline --first-load "default,FASTFP8_PINNED=thp" \
            --variants "${PROBE_VARIANTS:-default,quantize_on=device,engine.DRIVER_COPY=0 engine.MERGE_SHARE=4 engine.RESERVE_OUTPUTS=0 quantize_on=device,quantize_on=split host_share=0.2,quantize_on=split host_share=0.4,no quant (copy only)}" ;;
    decode)
        if [ -f "$TABLE" ]; then export FASTFP8_LINEAR_TABLE=$TABLE; fi
        [ -f "$OUT/modules_$GPU.json" ] || echo '{}' > "$OUT/modules_$GPU.json"
        stage decode 540 python3 benches/bench_decode.py --out "$OUT/modules_$GPU.json" \
            ${DECODE_HOST:+--decode-host "$DECODE_HOST"} ${DECODE_MODELS:+--models "$DECODE_MODELS"} \
            ${DECODE_ORDER:+--order "$DECODE_ORDER"} ;;
    tp)
        [ -f "$CKPT/model.safetensors.index.json" ] ||
            stage make_checkpoint 120 python3 benches/make_checkpoint.py "$CKPT" --layers 32 --fsync
        sync
        stage load_tp 480 env NCCL_NVLS_ENABLE=0 python3 benches/bench_load_tp.py "$CKPT" --tp "${TP_SIZES:-1,2}" \
            --repeat "${TP_REPEAT:-3}" ${TP_VARIANTS:+--variants "$TP_VARIANTS"} \
            --out "$OUT/load_tp_${GPU}x$(nvidia-smi -L | wc -l).json" ;;
    tpcold)
        [ -f "$CKPT/model.safetensors.index.json" ] ||
            stage make_checkpoint 120 python3 benches/make_checkpoint.py "$CKPT" --layers 32 --fsync
        sync
        stage load_tp_cold 480 env NCCL_NVLS_ENABLE=0 python3 benches/bench_load_tp.py "$CKPT" --cold --no-verify \
            --tp "${TP_SIZES:-1,2}" --repeat "${TP_REPEAT:-1}" --variants "${TP_VARIANTS:-default,method=pread}" \
            --out "$OUT/load_tp_cold_${GPU}x$(nvidia-smi -L | wc -l).json" ;;
    *)
        echo "unknown stage: $s (tests, tune, modules, load, probe, decode, tp, tpcold)" >&2; failed+=("$s") ;;
    esac
done
# At most 8 files come back from $OUT, the first 8 by name: everything goes into one archive
# named to sort first, so a stage's JSON left out of the 8 still comes back inside it.
tar -czf "$OUT/0-all.tgz" -C "$OUT" --exclude=0-all.tgz . 2>/dev/null
if [ ${#failed[@]} -gt 0 ]; then
    echo "failed stages: ${failed[*]}"
    exit 1
fi
echo "every stage passed"
