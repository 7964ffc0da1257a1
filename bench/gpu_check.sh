#!/usr/bin/env bash
# GPU check: the real sota-implementations/grpo/grpo-sync.py on one GPU (bf16, full fine-tuning with a
# KL reference and a checkpoint, a resume from it, LoRA) on a Qwen2.5-0.5B-shaped model built locally;
# prints generation and training tokens/s, MFU, peak GPU memory and the resumed run's metrics
# against the uninterrupted run's (bench/gpu_check.py says how they are counted). No downloads.
#
#   bash bench/gpu_check.sh --fetch-wheels   # where PyPI is reachable: the wheels a bare GPU image lacks
#                                            #   -> bench/.wheels/ (git-ignored, ~4.5 MiB; carry it along)
#   bash bench/gpu_check.sh                  # on the GPU machine: installs the missing ones, runs (~4-6 min)
#   bash bench/gpu_check.sh --cpu --tiny     # dry run on the CPU (under a minute)
#
# Any other argument goes to bench/gpu_check.py (e.g. --runs lora, --steps 8). The recipe's local
# sync path with the transformers backend imports torchrl, tensordict (with pyvers, orjson and
# cloudpickle), hydra-core, omegaconf and antlr4 at start, plus torch, transformers, safetensors,
# peft (LoRA) and matplotlib (the reward curve); never Ray or vLLM, and the reward libraries
# (math-verify, langdetect, nltk, rouge-score, sacrebleu) only for the datasets that use them (this
# check uses the bundled quick-start task). Each carried module that does not import is installed
# from bench/.wheels into a directory of its own put first on PYTHONPATH (nothing in the image
# changes); a missing module that is not carried is a one-line error. The wheels are the versions
# the test suite runs (torchrl 0.14.1 with tensordict 0.14.3: torchrl's C++ extension, built against
# another torch, is only loaded by prioritized replay buffers, which the recipe does not use; the
# compiled part of tensordict does not link against torch).
# The whole run is limited to GPU_CHECK_TIMEOUT seconds (default 460).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WHEELS=${GPU_CHECK_WHEELS:-$ROOT/bench/.wheels}
SITE=${GPU_CHECK_SITE:-${TMPDIR:-/tmp}/gpu-check-site}
PY=${PYTHON:-python3}
# module to import : wheel file prefix : pin (pure-Python wheels but torchrl, tensordict and orjson,
# built for the GPU image's CPython 3.12; GPU_CHECK_PYVER picks another)
PACKAGES=(
  "torchrl:torchrl-:torchrl==0.14.1"
  "tensordict:tensordict-:tensordict==0.14.3"
  "pyvers:pyvers-:pyvers==0.2.3"
  "orjson:orjson-:orjson==3.13.0"
  "cloudpickle:cloudpickle-:cloudpickle==3.1.3"
  "hydra:hydra_core-:hydra-core==1.3.8"
  "omegaconf:omegaconf-:omegaconf==2.3.1"
  "antlr4:antlr4_python3_runtime-:antlr4-python3-runtime==4.9.3"
)
# Imported by the same path, expected in a GPU image (not carried).
EXPECTED=(torch transformers safetensors peft matplotlib yaml tqdm numpy packaging)

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

# One interpreter start for all the checks: which modules are not installed (find_spec imports nothing).
absent=" $("$PY" -c 'import importlib.util as u, sys; print(" ".join(m for m in sys.argv[1:] if u.find_spec(m) is None))' \
  "${PACKAGES[@]%%:*}" "${EXPECTED[@]}") "
for module in "${EXPECTED[@]}"; do
  if [[ $absent == *" $module "* ]]; then
    echo "gpu_check: '$module' is not installed for $PY; install it (the recipe imports it)" >&2
    exit 2
  fi
done
missing=()
for entry in "${PACKAGES[@]}"; do
  module=${entry%%:*}
  rest=${entry#*:}
  prefix=${rest%%:*}
  if [[ $absent == *" $module "* ]]; then
    wheel=$(ls "$WHEELS"/"$prefix"*.whl 2>/dev/null | head -n 1 || true)
    if [[ -z "$wheel" ]]; then
      echo "gpu_check: '$module' is not installed and $WHEELS has no $prefix*.whl;" \
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

# The recipe imports grpo_utils from this checkout (nothing is pip-installed on the GPU machine).
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
exec timeout -k 10 "${GPU_CHECK_TIMEOUT:-460}" "$PY" "$ROOT/bench/gpu_check.py" "$@"
