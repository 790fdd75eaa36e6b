#!/usr/bin/env bash
# GPU checks in one call, no network (H100/H200; torch, transformers, peft, accelerate there).
#
#   bash benchmarks/gpu_check.sh [OUT_JSON]
#
# Wheels that the GPU machine lacks travel in benchmarks/wheels/ (fetch them on a machine with
# PyPI access: `bash benchmarks/gpu_check.sh --fetch-wheels`); whichever are there get
# installed offline into a throwaway venv that sees the machine's own packages. Without trl
# the trl comparison is skipped, without bitsandbytes the QLoRA steps; both say so in the JSON.
# Budget: attention check ~1 min, benchmark ~5 min, QLoRA ~1 min; each part is capped.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=benchmarks/wheels

if [[ "${1:-}" == "--fetch-wheels" ]]; then
  mkdir -p "$WHEELS"
  # trl 1.16, datasets and its small dependencies, bitsandbytes: 44 MiB measured (bitsandbytes
  # 0.50.2 is 43 MB of it). datasets also needs pyarrow (~40 MB): if the GPU machine lacks it,
  # leave bitsandbytes out and fetch pyarrow instead (the QLoRA part then reports its absence).
  # Wheels are for the Python that runs this (cp311 here): match the GPU machine's.
  python -m pip download --no-deps -d "$WHEELS" trl==1.16.0 datasets dill xxhash \
    multiprocess psutil bitsandbytes
  du -sh "$WHEELS"
  exit 0
fi

OUT="${1:-gpu_check.json}"
PYTHON=python3
if compgen -G "$WHEELS/*.whl" > /dev/null; then
  python3 -m venv --system-site-packages /tmp/dpo-gpu-venv
  /tmp/dpo-gpu-venv/bin/pip install -q --no-index --no-deps --find-links "$WHEELS" "$WHEELS"/*.whl
  PYTHON=/tmp/dpo-gpu-venv/bin/python
fi
"$PYTHON" - <<'EOF'
import importlib.util
for name in ("torch", "transformers", "peft", "accelerate", "datasets", "pyarrow", "trl",
             "bitsandbytes"):
    print(f"{name}: {'yes' if importlib.util.find_spec(name) else 'MISSING'}")
EOF
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv || true
timeout 470 "$PYTHON" -m benchmarks.gpu_check --out "$OUT" --repeats 2
echo "wrote $OUT"
