#!/usr/bin/env bash
# Runs on a CUDA machine without network access, from the repository root:
#   bash bench/device.sh            (writes logs and the benchmark CSV under $OUT)
# Installs fastsae without network (building the CUDA extension ahead of time, and the experimental CUTLASS
# one where the wheels under .whl/ include nvidia-cutlass: its headers; with it the install was still building
# after four minutes on a 16-core H100 machine while the select's kernels were one translation unit, before
# 3493284 split them by group width; setup.log says when the install ended), runs the gpu tests,
# compute-sanitizer (memcheck, racecheck, initcheck) over the CUDA death-statistics ops and every Triton
# kernel, the determinism and soak run (bench/soak.py), the training-step profile and the benchmarks.
# Knobs (environment):
#   FASTSAE_RUN_TESTS / FASTSAE_SANITIZE / FASTSAE_SOAK / FASTSAE_RUN_BENCH=0   skip a step
#   FASTSAE_SANITIZE_SHAPES  bench.sanitize_kernels shapes for every tool (default small,odd,wide)
#   FASTSAE_SANITIZE_LARGE_TOOLS  the tools that also run at `large` (default memcheck: racecheck instruments
#                            cuBLAS's GEMMs there at about a minute a launch)
#   FASTSAE_SANITIZE_KERNEL_ARGS  extra bench.sanitize_kernels arguments (e.g. --filter-configs first, or --only
#                            cutlass: the CUTLASS routes alone)
#   FASTSAE_SANITIZER_ARGS   extra compute-sanitizer arguments (e.g. to leave out cuBLAS's kernels)
#   FASTSAE_SANITIZE_TOOLS   which tools (default "memcheck racecheck initcheck")
#   FASTSAE_SANITIZE_TIMEOUT seconds per check (default 1800; a cut check keeps its log)
#   FASTSAE_SOAK_STEPS       training steps of the soak run (default 20000)
#   FASTSAE_TESTS            pytest targets, or FASTSAE_TEST_GROUPS: ';'-separated targets run in parallel
#   FASTSAE_TEST_WORKERS     pytest-xdist workers per group when xdist is installed (default 5)
#   FASTSAE_TESTS_BESIDE_SANITIZE=1  the test groups run while compute-sanitizer does (one GPU serves both;
#                            the step takes as long as the slower of the two, not their sum)
#   FASTSAE_PYTEST_ARGS      extra pytest arguments
#   FASTSAE_PROFILE          shapes for bench.profile_train (off when unset; FASTSAE_PROFILE_ARGS, e.g.
#                            --modes eager,compile --auxk on)
#   FASTSAE_PROFILE_ENCODE   shapes for bench.profile_encode (off when unset)
#   FASTSAE_NCU              a shape for bench.ncu_encode under Nsight Compute (off when unset): each kernel's
#                            details in ncu_details.txt, the warp selects' and the CUTLASS GEMM's executed
#                            instructions by SASS line in ncu_select_sass.csv and ncu_gemm_sass.csv
#                            (FASTSAE_NCU_ARGS, e.g. --filter-gemm: the filter GEMMs instead)
#   FASTSAE_AB               a switch for bench.ab_step, e.g. fastsae.ops.auxk.ENTRIES_PER_THREAD=8,16 (off
#                            when unset; FASTSAE_AB_SHAPES, default gpt2,af3; FASTSAE_AB_ARGS, e.g. --retune,
#                            --rounds 2 or --steps fastsae,fastsae_module_compile): its rows go to $OUT/results.csv
#   FASTSAE_DISTRIBUTED=1    bench.bench_distributed over every GPU (FASTSAE_DISTRIBUTED_CASES: dp,dp_graph,shard;
#                            FASTSAE_DISTRIBUTED_PROFILE=1: rank 0's profile of the multi-GPU steps)
#   FASTSAE_BENCH            benchmark families; FASTSAE_BENCH_SHAPES: the shapes (bench.run --shapes: of
#                            bench/harness.py SHAPES, or a family's own d<d>_F<F>_B<B>_k<k>, e.g. the encode sweep's);
#                            FASTSAE_BENCH_PROVIDERS: of the providers (bench.run --providers)
#   FASTSAE_TEST_TIMEOUT / FASTSAE_BENCH_TIMEOUT   seconds per test group / for the profile and the bench
#   FASTSAE_GIT_SHA          the commit for the CSV (the device's git metadata can be stale: pass it literally)
set -uo pipefail
SECONDS=0  # each step's header says when it began, in seconds from the start: what each step costs
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
status=0

if [ -d .whl ]; then  # packages the machine lacks, brought along as wheels in .whl/
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site
fi

{
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
    python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} 2>&1 | tee "$OUT/setup.log"

# Few files under $OUT, for runners that copy back only a handful: the machine and the install in
# setup.log, every compute-sanitizer check in sanitize.log.
echo "== install (at $SECONDS s)" | tee -a "$OUT/setup.log"
python3 -m pip install --no-deps --no-build-isolation -e . >>"$OUT/setup.log" 2>&1 || { tail -30 "$OUT/setup.log"; exit 1; }
python3 -c "import fastsae; print('ext', fastsae.ext_info())" 2>&1 | tee -a "$OUT/setup.log"

if [ "${FASTSAE_RUN_TESTS:-1}" = 1 ]; then
    echo "== gpu tests (at $SECONDS s)"
    # Compiling the Triton kernels (CPU-bound) dominates most tests' time on a fresh machine, and the CUDA
    # property tests (full shapes against fp64) and the module's training tests (200-step runs, tuned in
    # fp32) are the longest: each runs as a group of its own beside the rest. Groups separated by ';' run
    # as parallel pytest processes, each with pytest-xdist workers sharing the GPU.
    workers=""
    python3 -c "import xdist" 2>/dev/null && workers="-n ${FASTSAE_TEST_WORKERS:-5}"
    default_groups="tests --ignore=tests/test_properties.py --ignore=tests/test_sae.py;tests/test_sae.py;tests/test_properties.py"
    IFS=';' read -ra groups <<<"${FASTSAE_TEST_GROUPS:-${FASTSAE_TESTS:-$default_groups}}"
    pids=()
    for i in "${!groups[@]}"; do
        # -v: a line per finished test, so a group cut by its time limit still names what failed
        eval "timeout ${FASTSAE_TEST_TIMEOUT:-1800} python3 -m pytest -m gpu -v -rfE -p no:cacheprovider $workers ${FASTSAE_PYTEST_ARGS:-} ${groups[i]}" >"/tmp/fastsae_tests_$i.log" 2>&1 &
        pids+=($!)
    done
fi
finish_tests() {  # waits for the test groups and reports them
    for i in "${!groups[@]}"; do
        wait "${pids[i]}" || status=1
        { echo "== group $i: ${groups[i]}"; cat "/tmp/fastsae_tests_$i.log"; } >>"$OUT/tests.log"
        echo "group $i: $(tail -1 "/tmp/fastsae_tests_$i.log")"
        grep -E " (FAILED|ERROR) " "/tmp/fastsae_tests_$i.log" | sed 's/^/    /' | head -20
    done
}
[ "${FASTSAE_RUN_TESTS:-1}" = 1 ] && [ "${FASTSAE_TESTS_BESIDE_SANITIZE:-0}" != 1 ] && finish_tests

if [ "${FASTSAE_SANITIZE:-1}" = 1 ] && command -v compute-sanitizer >/dev/null; then
    echo "== compute-sanitizer (at $SECONDS s)"
    # Each check is a process of its own, all started at once: the sanitizers are CPU-bound and one GPU
    # serves them all, so the whole step takes as long as its slowest check, not their sum. Without the
    # caching allocator every tensor has its own bounds for memcheck to check.
    export PYTORCH_NO_CUDA_MEMORY_CACHING=1
    checks=()
    sanitize() {  # NAME TOOL COMMAND...: compute-sanitizer's log in /tmp/fastsae_sanitizer_NAME.log
        local name=$1 tool=$2
        shift 2
        timeout "${FASTSAE_SANITIZE_TIMEOUT:-1800}" compute-sanitizer --tool "$tool" --error-exitcode 3 "$@" \
            >"/tmp/fastsae_sanitizer_$name.log" 2>&1 &
        checks+=("$name:$!")
    }
    for tool in ${FASTSAE_SANITIZE_TOOLS:-memcheck racecheck initcheck}; do
        sanitize "ext_$tool" "$tool" python3 bench/sanitize_ext.py
        IFS=',' read -ra shapes <<<"${FASTSAE_SANITIZE_SHAPES:-small,odd,wide}"
        [[ " ${FASTSAE_SANITIZE_LARGE_TOOLS-memcheck} " == *" $tool "* ]] && shapes+=(large)
        for shape in "${shapes[@]}"; do
            # shellcheck disable=SC2086  # the extra arguments are words
            sanitize "kernels_${tool}_$shape" "$tool" ${FASTSAE_SANITIZER_ARGS:-} \
                python3 -m bench.sanitize_kernels --shapes "$shape" ${FASTSAE_SANITIZE_KERNEL_ARGS:-}
        done
    done
    # initcheck does not see cuBLAS's stores on every stack (bench/initcheck_cublas.py shows it with torch's
    # own kernels): the summary names the kernels initcheck reported, to tell those reads from a kernel's own.
    sanitize cublas_probe_initcheck initcheck python3 bench/initcheck_cublas.py
    for check in "${checks[@]}"; do
        name=${check%%:*} log="/tmp/fastsae_sanitizer_${check%%:*}.log"
        wait "${check#*:}"
        code=$?
        summary=$(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$log" | tail -1)
        [ $code = 124 ] && summary="cut by FASTSAE_SANITIZE_TIMEOUT; $summary"
        grep -q 'every kernel ran and matched' "$log" && summary="$summary; every kernel ran and matched"
        echo "$name exit $code: $summary"
        case $name in kernels_initcheck_*)
            echo "    initcheck reported in: $(grep -A1 'Uninitialized' "$log" | grep -oE ' at [A-Za-z_0-9]+' | sort | uniq -c | tr '\n' ' ')" ;;
        esac
        # its first reports and its summary (a check that fails reports each error, often thousands)
        { echo "== $name exit $code"; head -n 300 "$log"; echo "[...]"; tail -n 20 "$log"; } >>"$OUT/sanitize.log"
    done
    unset PYTORCH_NO_CUDA_MEMORY_CACHING
fi
[ "${FASTSAE_RUN_TESTS:-1}" = 1 ] && [ "${FASTSAE_TESTS_BESIDE_SANITIZE:-0}" = 1 ] && finish_tests

if [ "${FASTSAE_SOAK:-1}" = 1 ]; then
    echo "== determinism and soak (at $SECONDS s)"
    timeout ${FASTSAE_BENCH_TIMEOUT:-3600} python3 -m bench.soak --steps "${FASTSAE_SOAK_STEPS:-20000}" --out "$OUT" \
        >"$OUT/soak.log" 2>&1 || status=1
    grep -E "^determinism|^soak" "$OUT/soak.log"
fi

if [ -n "${FASTSAE_PROFILE:-}" ]; then  # shapes for bench.profile_train's kernel tables
    echo "== profile (at $SECONDS s)"
    timeout ${FASTSAE_BENCH_TIMEOUT:-3600} python3 -m bench.profile_train --shapes "$FASTSAE_PROFILE" --rows 18 ${FASTSAE_PROFILE_ARGS:-} >"$OUT/profile.log" 2>&1
    grep "^==" "$OUT/profile.log"
fi

if [ -n "${FASTSAE_PROFILE_ENCODE:-}" ]; then  # shapes for bench.profile_encode's per-launch breakdown
    echo "== encode profile (at $SECONDS s)"
    timeout ${FASTSAE_BENCH_TIMEOUT:-3600} python3 -m bench.profile_encode --shapes "$FASTSAE_PROFILE_ENCODE" >"$OUT/profile_encode.log" 2>&1
    grep -E "^==|GEMM|select|thresholds|centre" "$OUT/profile_encode.log"
fi

if [ -n "${FASTSAE_NCU:-}" ]; then  # Nsight Compute's counters of the row filter's kernels at one shape
    echo "== ncu (at $SECONDS s)"
    # The report itself (tens of MB) stays on the machine; its two pages come back as text.
    timeout ${FASTSAE_BENCH_TIMEOUT:-3600} ncu --clock-control none --profile-from-start off --set full --import-source yes \
        -f -o /tmp/fastsae_ncu python3 -m bench.ncu_encode --shape "$FASTSAE_NCU" ${FASTSAE_NCU_ARGS:-} >"$OUT/ncu.log" 2>&1 \
        || status=1
    tail -3 "$OUT/ncu.log"
    ncu --import /tmp/fastsae_ncu.ncu-rep --page details >"$OUT/ncu_details.txt" 2>&1
    ncu --import /tmp/fastsae_ncu.ncu-rep --page source --csv --print-source sass --kernel-name regex:select_topk \
        >"$OUT/ncu_select_sass.csv" 2>&1
    ncu --import /tmp/fastsae_ncu.ncu-rep --page source --csv --print-source sass --kernel-name regex:device_kernel \
        >"$OUT/ncu_gemm_sass.csv" 2>&1
    grep -E "^  [a-zA-Z_]|Duration|Executed Ipc Active|Registers Per Thread|Achieved Occupancy" "$OUT/ncu_details.txt" | cut -c1-120
fi

if [ -n "${FASTSAE_AB:-}" ]; then  # a training step (the captured one unless --steps) under each value of one switch
    echo "== A/B of $FASTSAE_AB (at $SECONDS s)"
    timeout ${FASTSAE_BENCH_TIMEOUT:-3600} python3 -m bench.ab_step "$FASTSAE_AB" --shapes "${FASTSAE_AB_SHAPES:-gpt2,af3}" \
        --csv "$OUT/results.csv" ${FASTSAE_AB_ARGS:-} 2>&1 | tee "$OUT/ab.log" | grep train_step_ab
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi

if [ "${FASTSAE_DISTRIBUTED:-0}" = 1 ]; then  # a machine with several GPUs: bench.bench_distributed
    echo "== distributed (at $SECONDS s)"
    gpus=$(nvidia-smi -L | wc -l)
    # Expandable segments: the 2^21-feature case fills most of each GPU, with no room for fragmentation.
    PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True timeout ${FASTSAE_BENCH_TIMEOUT:-3600} torchrun --standalone --nproc-per-node "$gpus" -m bench.bench_distributed \
        --csv "$OUT/results.csv" ${FASTSAE_DISTRIBUTED_CASES:+--cases $FASTSAE_DISTRIBUTED_CASES} \
        $([ "${FASTSAE_DISTRIBUTED_PROFILE:-0}" = 1 ] && echo --profile) 2>&1 | tee "$OUT/distributed.log" | tail -20
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi

if [ "${FASTSAE_RUN_BENCH:-1}" = 1 ]; then
    echo "== benchmarks (at $SECONDS s)"
    # Only the rows: the report is rendered where they are merged into bench/results (python -m bench.report).
    timeout ${FASTSAE_BENCH_TIMEOUT:-3600} python3 -m bench.run --csv "$OUT/results.csv" --no-render ${FASTSAE_BENCH:+--only $FASTSAE_BENCH} ${FASTSAE_BENCH_SHAPES:+--shapes $FASTSAE_BENCH_SHAPES} \
        ${FASTSAE_BENCH_PROVIDERS:+--providers $FASTSAE_BENCH_PROVIDERS} 2>&1 | tee "$OUT/bench.log" | tail -40
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi
echo "== done (at $SECONDS s)" | tee -a "$OUT/setup.log"
exit $status
