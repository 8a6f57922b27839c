#!/usr/bin/env bash
# One prepared GPU check for fmap's TensorRT path (run from the repo root on a CUDA machine):
#   1. installs the tensorrt wheel matching torch's CUDA major (tensorrt-cu12 / tensorrt-cu13),
#   2. runs the gpu-marked tests (real engines: fp16 vs torch, int8 from a QDQ model),
#   3. runs recipes/resnet18-trt.yaml with require: true, so a skipped engine fails loudly,
#   4. prints engine build metrics and verify's latencies per artifact x backend.
# Usage: scripts/gpu_check.sh [--quick]   (--quick: fewer latency iterations, smaller eval set)
# Env: PY (python, default .venv/bin/python), TRT_SPEC (pip spec override, e.g. "tensorrt-cu12==10.13.3.9").
set -euo pipefail
PY=${PY:-.venv/bin/python}
QUICK=0; [[ "${1:-}" == "--quick" ]] && QUICK=1
RUN_DIR=${RUN_DIR:-runs}

"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: nothing to check here')"
CUDA_MAJOR=$("$PY" -c "import torch; print((torch.version.cuda or '12').split('.')[0])")
TRT_SPEC=${TRT_SPEC:-"tensorrt-cu${CUDA_MAJOR}>=10.0"}
echo "== installing ${TRT_SPEC} (torch CUDA ${CUDA_MAJOR})"
"$PY" -m pip install --only-binary=:all: -q "${TRT_SPEC}"
"$PY" - <<'PY'
import tensorrt as trt, torch
from pipeline.backends.tensorrt import available, ort_gpu_providers
print(f"tensorrt {trt.__version__} on {torch.cuda.get_device_name()}; "
      f"typing: {'weak (FP16/INT8 flags)' if hasattr(trt.BuilderFlag, 'FP16') else 'strong'}")
print("available():", available() or "yes", "| onnxruntime GPU providers:", ort_gpu_providers())
PY

echo "== gpu tests"
"$PY" -m pytest tests/test_tensorrt.py -m gpu -q -p no:cacheprovider

echo "== resnet18-trt recipe"
mkdir -p "${RUN_DIR}"
SETS=(--set stages.tensorrt.require=true)
if [[ $QUICK == 1 ]]; then
  SETS+=(--set data.eval.samples=64 --set stages.verify.latency.iterations=20 --set stages.verify.latency.warmup=5)
fi
"$PY" -m pipeline.cli run recipes/resnet18-trt.yaml "${SETS[@]}" --json > "${RUN_DIR}/resnet18-trt.result.json" || {
  rc=$?; echo "fmap run exited ${rc}"; exit "${rc}"; }

echo "== engines and latencies"
"$PY" - "${RUN_DIR}/resnet18-trt.result.json" <<'PY'
import json, sys
from pathlib import Path
report = json.loads(Path(json.loads(Path(sys.argv[1]).read_text())["report"]).read_text())
def walk(obj, key):
    """Every value stored under `key` anywhere in the report (its layout belongs to the report module)."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k == key:
                yield v
            yield from walk(v, key)
    elif isinstance(obj, list):
        for v in obj:
            yield from walk(v, key)
for trt in walk(report, "tensorrt"):
    if isinstance(trt, dict) and "engines" in trt:
        for prec, e in trt["engines"].items():
            print(f"engine {prec}: {e.get('status')} build {e.get('build_s')}s size {e.get('size_mb')} MB "
                  f"layers {e.get('layers')} not-in-{prec} {e.get('mismatched_count')} {e.get('reason', '')}")
for rows in walk(report, "results"):
    for r in rows if isinstance(rows, list) else []:
        if isinstance(r, dict) and "backend" in r:
            print(f"{r.get('artifact'):>14} @ {r.get('backend'):<12} latency {json.dumps(r.get('latency'))[:160]}")
PY
