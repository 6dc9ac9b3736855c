#!/usr/bin/env bash
# Run the GPU kit: install the carried wheels (if any), then every section of tools/gpu/kit.py,
# writing report.json, report.md and kit.log to $OUT (or --out DIR).
#   bash tools/gpu/run.sh [--dry-run] [--no-install] [--out DIR] [--budget-s S] [--sections a,b]
# --dry-run: the same sections on CPU with tiny shapes, nothing installed. --no-install: use this
# environment's packages (an NGC image, a venv), not .gpu_kit/wheels. Exit status 0 = all passed.
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 2

kit_dir=.gpu_kit
install=1
args=()
while [ "$#" -gt 0 ]; do
  case "$1" in
    --dry-run) install=0; args+=("$1") ;;
    --no-install) install=0 ;;
    --kit-dir) kit_dir="$2"; args+=("$1" "$2"); shift ;;
    *) args+=("$1") ;;
  esac
  shift
done

py="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=disabled
export TOKENIZERS_PARALLELISM=false
pythonpath="$PWD"
wheels=("$kit_dir"/wheels/*.whl)
if [ "$install" = 1 ] && [ -e "${wheels[0]}" ]; then
  version=$("$py" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
  if [ "$version" != "3.12" ]; then
    echo "[run.sh] the carried wheels are for Python 3.12, this is $version: not installing" >&2
  else
    site="${VCAP_KIT_SITE:-/tmp/vcap_kit_site}"
    start=$(date +%s)
    if ! "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$site" "${wheels[@]}"; then
      echo "[run.sh] installing the carried wheels failed" >&2
      exit 3
    fi
    echo "[run.sh] installed ${#wheels[@]} wheels into $site in $(($(date +%s) - start)) s"
    pythonpath="$PWD:$site"
  fi
elif [ "$install" = 1 ]; then
  echo "[run.sh] no wheels in $kit_dir/wheels (run tools/gpu/prepare.sh): using this environment"
fi
export PYTHONPATH="$pythonpath${PYTHONPATH:+:$PYTHONPATH}"
exec "$py" -m tools.gpu.kit ${args[@]+"${args[@]}"}
