#!/usr/bin/env bash
# The whole GPU run in ONE call of the device tool (10 minutes a command), from the repo root:
#
#   here, once:  /work/shared/tools/device-wheels.sh .whl gitdb smmap wcwidth platformdirs
#                bash benchmarks/run_gpu.sh --pack-cueq     (.whl-cueq/ops.tar.xz, 27 MB)
#                bash benchmarks/run_gpu.sh --pack-oeq      (.whl-oeq/oeq.tar.xz, OpenEquivariance's sources)
#   device call: bash benchmarks/run_gpu.sh          (carry: [".whl", ".whl-cueq"], and ".whl-oeq" for its rows)
#   (the whole suite needs two calls now: NOTES.md, "The next GPU run")
#
# 1. installs the carried wheels (.whl/: mace-torch, e3nn 0.4.4, ase, cuequivariance, ...)
#    into build/gpu-site (ignored; PYTHONPATH), since the GPU image has torch and triton but no
#    mace, and unpacks .whl-cueq/*.tar.xz there: cuEquivariance's ops wheels are 73 MB as
#    wheels, over one call's 64 MiB, but 27 MB unpacked and recompressed with xz (--pack-cueq);
#    OpenEquivariance (carried .whl-oeq/oeq.tar.xz) goes to build/oeq-site instead, outside
#    the path, since MACE imports it when importable and its import compiles its extension
#    (torch's JIT build, about a minute; no wheel exists): that build starts in the
#    background, and only the suite's oeq_fused rows import it (SPARSEKERN_OEQ_SITE);
# 2. builds the package and its CUDA extension (pip install -e ., no network, no deps);
# 3. runs the suite (benchmarks/gpu_suite.py: kernels, parity, end to end; TESTS_S seconds
#    kept back), then the GPU-marked tests, then the pytest-benchmark microbenchmarks of the
#    small system, each inside the time left;
# 4. writes everything straight into $OUT (when set; else benchmarks/results/), as it goes, so
#    that a call the device tool stops still brings back what it measured: the suite's JSON
#    and markdown, this script's whole output (run_gpu_*.log), the GPU tests' log, the
#    microbenchmarks' JSON, OpenEquivariance's build log, and the auto table where the suite
#    rewrote it from this run's timings (SUITE_ARGS defaults to --update-auto).
#    RUN_GPU_BUDGET_S (default 570) is the call's time: the suite, tests and microbenchmarks
#    fit in it (two calls of one session: NOTES.md, "The next GPU run", gives each its own).
#
# --cpu-smoke: the same steps on this CPU machine with TRITON_INTERPRET=1 and tiny shapes
# (no install, no build: checks the script, measures nothing).
set -uo pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)
BUDGET=${RUN_GPU_BUDGET_S:-570}  # the device tool stops a command at 600 s
left() { echo $(( BUDGET - ($(date +%s) - START) )); }
RES=${OUT:-benchmarks/results}  # (the device tool brings back at most 8 files from $OUT)
mkdir -p "$RES"
stamp=$(date -u +%Y%m%d_%H%M%S)
PY=${PYTHON:-python3}
mode=${1:-}
SITE=build/gpu-site  # under build/, which git ignores: it stays on a warm machine between calls

log() { echo "== [run_gpu $(( $(date +%s) - START ))s] $*"; }

pack_cueq() {  # here, with network: the ops wheels of the pinned cuequivariance, for the GPU image
  local v tmp
  v=$(grep -o 'cuequivariance==[0-9.]*' pyproject.toml | head -1 | cut -d= -f3)
  tmp=$(mktemp -d)
  for p in cuequivariance-ops-torch-cu13 cuequivariance-ops-cu13; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
      -d "$tmp/w" "$p==$v" || { log "pack-cueq: could not download $p==$v (this needs the package index)"; return 1; }
  done
  mkdir -p "$tmp/site" .whl-cueq
  for w in "$tmp"/w/*.whl; do unzip -q -o "$w" -d "$tmp/site" || return 1; done
  grep -qxF "/.whl-cueq/" .git/info/exclude 2>/dev/null || echo "/.whl-cueq/" >> .git/info/exclude
  tar -C "$tmp/site" -cf - . | xz -T2 -9 > .whl-cueq/ops.tar.xz.tmp && mv .whl-cueq/ops.tar.xz.tmp .whl-cueq/ops.tar.xz
  rm -rf "$tmp"
  log "packed cuEquivariance ops $v: $(du -h .whl-cueq/ops.tar.xz | cut -f1)"
}

OEQ_VERSION=0.7.0  # its sdist's build downloads libtorch, so a carried copy of its sources instead

pack_oeq() {  # here, with network: OpenEquivariance's package as its sdist holds it, with its metadata
  local tmp src site
  tmp=$(mktemp -d)
  python3 -m pip download -q --no-deps --no-binary=:all: -d "$tmp" "openequivariance==$OEQ_VERSION" \
    || { log "pack-oeq: could not download openequivariance==$OEQ_VERSION (this needs the package index)"; return 1; }
  tar -C "$tmp" -xzf "$tmp/openequivariance-$OEQ_VERSION.tar.gz" || return 1
  src="$tmp/openequivariance-$OEQ_VERSION" site="$tmp/site"
  mkdir -p "$site/openequivariance-$OEQ_VERSION.dist-info" .whl-oeq
  cp -r "$src/openequivariance" "$site/" && cp "$src/PKG-INFO" "$site/openequivariance-$OEQ_VERSION.dist-info/METADATA" \
    || return 1
  grep -qxF "/.whl-oeq/" .git/info/exclude 2>/dev/null || echo "/.whl-oeq/" >> .git/info/exclude
  tar -C "$site" -cf - . | xz -T2 -9 > .whl-oeq/oeq.tar.xz.tmp && mv .whl-oeq/oeq.tar.xz.tmp .whl-oeq/oeq.tar.xz
  rm -rf "$tmp"
  log "packed OpenEquivariance $OEQ_VERSION: $(du -h .whl-oeq/oeq.tar.xz | cut -f1)"
}

install_oeq() {  # unpacked outside the path; its extension built in the background (log in $RES)
  [ -f .whl-oeq/oeq.tar.xz ] || return 0
  rm -rf build/oeq-site && mkdir -p build/oeq-site && tar -C build/oeq-site -xJf .whl-oeq/oeq.tar.xz || return 1
  export SPARSEKERN_OEQ_SITE="$PWD/build/oeq-site" TORCH_EXTENSIONS_DIR="$PWD/build/torch-extensions"
  log "OpenEquivariance: building its extension in the background"
  (PYTHONPATH="$SPARSEKERN_OEQ_SITE${PYTHONPATH:+:$PYTHONPATH}" timeout 400 $PY -c \
    "import openequivariance as o; print('oeq imported; extension:', getattr(o, 'BUILT_EXTENSION', '?'),
          getattr(o, 'BUILT_EXTENSION_ERROR', ''))" \
    > "$RES/oeq_build_$stamp.log" 2>&1 &)
}

install_wheels() {
  local wheels=(.whl/*.whl .whl-*/*.whl)
  local found=()
  for w in "${wheels[@]}"; do [ -f "$w" ] && found+=("$w"); done
  if [ ${#found[@]} -eq 0 ]; then log "no carried wheels (.whl/)"; return 0; fi
  log "installing ${#found[@]} wheels into $SITE"
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "${found[@]}" || return 1
  for t in .whl-cueq/*.tar.xz; do
    [ -f "$t" ] || continue
    log "unpacking $t into $SITE"
    tar -C "$SITE" -xJf "$t" || return 1
  done
}

if [ "$mode" = "--pack-cueq" ]; then pack_cueq; exit $?; fi
if [ "$mode" = "--pack-oeq" ]; then pack_oeq; exit $?; fi

if [ "$mode" = "--cpu-smoke" ]; then
  export TRITON_INTERPRET=1
  PY=${PYTHON:-.venv-mace/bin/python}
  log "cpu smoke: GPU tests (expect skips)"
  $PY -m pytest tests/ops/test_triton_element_linear.py -m gpu -q -p no:cacheprovider || exit 1
  log "cpu smoke: suite"
  $PY benchmarks/gpu_suite.py --cpu-smoke --ops conv1,skip_tp1,linear1,products1 --e2e-atoms 8 || exit 1
  log "cpu smoke: microbenchmarks (skip without a GPU)"
  $PY -m pytest benchmarks/test_kernels_bench.py -q -p no:cacheprovider
  rc=$?; [ $rc -eq 0 ] || [ $rc -eq 5 ] || exit 1  # 5: all skipped, nothing collected
  log "cpu smoke passed"
  exit 0
fi

exec > >(tee -a "$RES/run_gpu_$stamp.log") 2>&1  # the whole output, kept as it goes
mkdir -p build && cp sparsekern/ops/auto.json build/auto.before.json
install_wheels || { log "wheel install failed"; exit 1; }
export PYTHONPATH="$PWD/$SITE${PYTHONPATH:+:$PYTHONPATH}"
install_oeq || log "OpenEquivariance unpack failed (its rows will say so)"
[ "$mode" = "--install-only" ] && exit 0

log "device"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv || true
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"

log "build: pip install -e . (CUDA extension)"
$PY -m pip install -q --no-build-isolation --no-deps --no-index -e . 2>&1 | tail -20
$PY -c "import sparsekern.ops.cuda.element_linear as c; print('cuda extension available:', c.available())" || true

log "suite (time left $(left) s)"
export PYTHONUNBUFFERED=1
suite_s=$(( $(left) - ${TESTS_S:-150} )); [ $suite_s -lt 60 ] && suite_s=60
timeout $suite_s $PY benchmarks/gpu_suite.py --out "$RES" ${SUITE_ARGS---update-auto}
log "suite exit $?"
cmp -s sparsekern/ops/auto.json build/auto.before.json || cp sparsekern/ops/auto.json "$RES/auto.json"

# the kernels' tests first: the time left may stop the rest (whole fine-tuning runs)
if [ "${TESTS_S:-150}" -gt 0 ]; then
  log "GPU tests"
  { echo "$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null), $(date -u -Iseconds), git $(git \
      rev-parse --short HEAD 2>/dev/null): pytest -m gpu (run_gpu.sh, SUITE_ARGS=${SUITE_ARGS---update-auto})"
    timeout $(( $(left) - 30 )) $PY -m pytest tests/ops $(ls -d tests/*/ | grep -v '^tests/ops/$') tests/test_*.py \
      -m gpu -q -p no:cacheprovider --maxfail=5 --durations=8 2>&1; } | tee "$RES/gpu_tests_$stamp.log" | tail -15
fi

if [ "$(left)" -gt 60 ]; then
  log "pytest-benchmark, small system (time left $(left) s)"
  timeout $(( $(left) - 20 )) $PY -m pytest benchmarks/test_kernels_bench.py -k small_300at -q -p no:cacheprovider \
    --benchmark-json="$RES/kernels_bench_$stamp.json" --benchmark-columns=median,min,max,rounds 2>&1 | tail -40
fi

log "done"
