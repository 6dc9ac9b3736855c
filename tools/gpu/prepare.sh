#!/usr/bin/env bash
# Prepare the GPU kit here (no GPU needed): wheels + fixtures into .gpu_kit/, sizes checked, and
# the device call printed. Options: see `bash tools/gpu/prepare.sh --help` (tools/gpu/prepare.py).
set -euo pipefail
cd "$(dirname "$0")/../.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python3}" -m tools.gpu.prepare "$@"
