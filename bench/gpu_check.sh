#!/usr/bin/env bash
# GPU check: the local sync training path on one GPU with FSDP2 (world size 1), LoRA and bf16 on a
# Qwen2.5-0.5B-shaped model built locally; prints generation and training tokens/s, peak GPU memory
# and MFU (bench/gpu_check.py says how they are counted). No downloads on the GPU machine.
#
#   bash bench/gpu_check.sh --fetch-wheels   # on a machine with PyPI: the wheels a bare GPU image lacks
#                                            #   -> bench/.wheels/ (git-ignored, ~1.7 MiB; carry it along)
#   bash bench/gpu_check.sh                  # on the GPU machine: installs the missing ones, runs (~2-3 min)
#   bash bench/gpu_check.sh --cpu --tiny     # dry run on the CPU (seconds)
#
# Any other argument goes to bench/gpu_check.py (e.g. --variants lora, --iterations 5). The GPU
# image has torch and transformers but no tensordict, omegaconf (the trainer and its rank group
# import them) or maybe peft: each that does not import is installed from bench/.wheels into a
# directory of its own put first on PYTHONPATH (nothing in the image changes). tensordict 0.12.4 is
# the release of torch 2.11's time; its compiled part does not link against torch (checked with
# ldd), and the trainer passes the dry run with it. torchrl, Ray, vLLM and Hydra are not needed.
# The whole run is limited to GPU_CHECK_TIMEOUT seconds (default 450).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WHEELS=${GPU_CHECK_WHEELS:-$ROOT/bench/.wheels}
SITE=${GPU_CHECK_SITE:-${TMPDIR:-/tmp}/gpu-check-site}
PY=${PYTHON:-python3}
# module to import : wheel file prefix : pin (pure-Python wheels but tensordict and orjson, built for
# the GPU image's CPython 3.12)
PACKAGES=(
  "tensordict:tensordict-:tensordict==0.12.4"
  "pyvers:pyvers-:pyvers==0.2.3"
  "orjson:orjson-:orjson==3.13.0"
  "omegaconf:omegaconf-:omegaconf==2.3.1"
  "antlr4:antlr4_python3_runtime-:antlr4-python3-runtime==4.9.3"
  "peft:peft-:peft==0.21.2"
)

if [[ "${1:-}" == "--fetch-wheels" ]]; then
  pyver=${GPU_CHECK_PYVER:-3.12}
  mkdir -p "$WHEELS"
  for entry in "${PACKAGES[@]}"; do
    pin=${entry##*:}
    if [[ $pin == antlr4-python3-runtime* ]]; then
      # Published as a source archive only: build the (pure-Python) wheel here.
      "$PY" -m pip wheel -q --no-deps -w "$WHEELS" "$pin"
    else
      "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$pyver" --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$WHEELS" "$pin"
    fi
  done
  du -sh "$WHEELS"
  ls "$WHEELS"
  exit 0
fi

missing=()
for entry in "${PACKAGES[@]}"; do
  module=${entry%%:*}
  rest=${entry#*:}
  prefix=${rest%%:*}
  if ! "$PY" -c "import $module" 2>/dev/null; then
    wheel=$(ls "$WHEELS"/"$prefix"*.whl 2>/dev/null | head -n 1 || true)
    if [[ -z "$wheel" ]]; then
      echo "gpu_check: '$module' does not import and $WHEELS has no $prefix*.whl;" \
           "run 'bash bench/gpu_check.sh --fetch-wheels' where PyPI is reachable and carry bench/.wheels" >&2
      exit 2
    fi
    missing+=("$wheel")
  fi
done
if (( ${#missing[@]} )); then
  echo "gpu_check: installing into $SITE: ${missing[*]##*/}"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "${missing[@]}"
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi

export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
exec timeout -k 10 "${GPU_CHECK_TIMEOUT:-450}" "$PY" "$ROOT/bench/gpu_check.py" "$@"
