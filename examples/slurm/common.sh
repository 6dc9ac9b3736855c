# shellcheck shell=bash
# Shared by the sbatch scripts in this folder (sourced, not run). They set resources and the
# environment, then call one entry point through `vcap_srun`; the logic lives in Python.
#
# Where tasks run, chosen by IMAGE:
#   IMAGE=none            on the host: `python` on PATH must import megatron_vcap (a venv with
#                         `pip install -e .`, or a module system); for clusters without pyxis
#                         and for the tests (tests/slurm/)
#   IMAGE=/path/x.sqsh    under pyxis (srun --container-image); also a registry image,
#   IMAGE=nvcr.io#org/img:tag   e.g. one pushed from docker/Dockerfile's build
#   unset                 VCAP_IMAGE from docker/ngc.env: the image built from docker/Dockerfile
#                         (never the bare NGC base, which has no megatron-core)
# Nothing is pip-installed at run time. With an image, the checkout (REPO) is mounted at the
# same path and is the working directory, so configs and relative paths resolve alike.
#
# Other knobs: REPO (the checkout; default: the submit directory), MOUNTS (extra
# src:dst[,src:dst] for pyxis), PYTHON (the host interpreter with IMAGE=none, default python).
#
# Signals: the scripts ask for `--signal=B:USR1@180`, so Slurm signals this batch shell 180 s
# before the time limit; `vcap_srun` forwards USR1 and TERM to the job step (srun relays them to
# every task). The trainer saves at the next step boundary and exits with 75
# (megatron_vcap/trainer/preemption.py). On 75 after a USR1, or without any signal here (the
# trainer's own train.max_wall_minutes), the job requeues itself (`--requeue`) and resumes from
# that checkpoint. A TERM (scancel, preemption, `scontrol requeue`) is left to Slurm: a
# cancelled job stays cancelled, a preempted or requeued one is requeued by Slurm.

VCAP_EXIT_PREEMPTED=75

vcap_die() {
  echo "vcap sbatch: error: $*" >&2
  exit 2
}

# Resolve REPO, IMAGE and the launch prefix; source docker/ngc.env (the one pinned image tag).
vcap_setup() {
  REPO=${REPO:-${SLURM_SUBMIT_DIR:-$(pwd)}}
  [ -f "${REPO}/docker/ngc.env" ] || vcap_die "REPO=${REPO} is not a megatron_vcap checkout (no docker/ngc.env); submit from the checkout or set REPO"
  # shellcheck source=docker/ngc.env
  . "${REPO}/docker/ngc.env"
  IMAGE=${IMAGE:-${VCAP_IMAGE}}
  case "${IMAGE}" in
    *.sqsh) [ "${IMAGE#/}" = "${IMAGE}" ] && IMAGE="${REPO}/${IMAGE}" ;; # pyxis wants absolute paths
  esac
  cd "${REPO}" || vcap_die "cannot cd to ${REPO}"
  VCAP_LAUNCH=()
  VCAP_SRUN_CONTAINER=()
  if [ "${IMAGE}" = none ]; then
    PYTHON=${PYTHON:-python}
    command -v "${PYTHON}" >/dev/null || vcap_die "IMAGE=none: ${PYTHON} not on PATH (activate the environment that has megatron_vcap, or set PYTHON)"
    "${PYTHON}" -c "import megatron_vcap" 2>/dev/null || vcap_die "IMAGE=none: ${PYTHON} cannot import megatron_vcap (pip install -e ${REPO} in that environment first; nothing is installed at run time)"
    VCAP_LAUNCH=("${PYTHON}")
  else
    srun --help 2>/dev/null | grep -q -- "--container-image" || vcap_die "IMAGE=${IMAGE} needs the pyxis plugin (srun --container-image), which this cluster's srun lacks; use IMAGE=none with a host environment"
    case "${IMAGE}" in
      /*) [ -f "${IMAGE}" ] || vcap_die "IMAGE=${IMAGE}: no such file (build it from docker/Dockerfile: README, 'Container')" ;;
    esac
    local mounts="${REPO}:${REPO}"
    [ -n "${MOUNTS:-}" ] && mounts="${mounts},${MOUNTS}"
    VCAP_SRUN_CONTAINER=(--container-image="${IMAGE}" --container-mounts="${mounts}" --container-workdir="${REPO}")
    VCAP_LAUNCH=(python)
  fi
  echo "vcap sbatch: job ${SLURM_JOB_ID:-?} restart ${SLURM_RESTART_COUNT:-0} on ${SLURM_JOB_NODELIST:-?}; IMAGE=${IMAGE}; REPO=${REPO}"
}

# Environment for GPU training steps (harmless on CPU).
vcap_gpu_env() {
  export CUDA_DEVICE_MAX_CONNECTIONS=1 # Megatron's TP comm/compute overlap needs ordered streams
  export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}
  export TOKENIZERS_PARALLELISM=false
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-8}}
}

VCAP_SIGNALLED=""

_vcap_forward() {
  VCAP_SIGNALLED=${VCAP_SIGNALLED:-$1}
  echo "vcap sbatch: $1 at $(date -u +%H:%M:%S), forwarding to the job step" >&2
  # (if, not &&: under set -e a failing kill of an already finished srun would end the script)
  if [ -n "${VCAP_SRUN_PID:-}" ]; then kill -s "$1" "${VCAP_SRUN_PID}" 2>/dev/null || true; fi
  return 0
}

# vcap_step SRUN_ARGS...: run `srun SRUN_ARGS` as a job step in the background, forward USR1 and
# TERM to it, and return its exit code.
vcap_step() {
  trap '_vcap_forward USR1' USR1
  trap '_vcap_forward TERM' TERM
  # Not --kill-on-bad-exit: after a preemption save the ranks exit 75 a moment apart, and
  # killing the slower ones would turn the step's 75 into a failure. --wait bounds how long the
  # other tasks may run on after the first one ended (a crashed rank's peers hang in
  # collectives): VCAP_TASK_EXIT_WAIT seconds, default 120.
  srun --kill-on-bad-exit=0 --wait="${VCAP_TASK_EXIT_WAIT:-120}" "$@" &
  VCAP_SRUN_PID=$!
  local rc
  # `wait` returns early (>128) whenever a trapped signal arrives; wait again until srun ends.
  while :; do
    wait "${VCAP_SRUN_PID}"
    rc=$?
    kill -0 "${VCAP_SRUN_PID}" 2>/dev/null || break
  done
  if [ "${rc}" -gt 128 ]; then
    # The signal and srun's exit raced: collect the real status if it is still there.
    wait "${VCAP_SRUN_PID}" 2>/dev/null
    local again=$?
    [ "${again}" -ne 127 ] && rc=${again}
  fi
  trap - USR1 TERM
  VCAP_SRUN_PID=""
  return "${rc}"
}

# vcap_srun [SRUN_OPTIONS...] -- ARGS...: one job step running `python -m megatron_vcap ARGS`
# in the image or on the host (vcap_setup decides).
vcap_srun() {
  local -a opts=()
  while [ $# -gt 0 ] && [ "$1" != "--" ]; do
    opts+=("$1")
    shift
  done
  [ "${1:-}" = "--" ] && shift
  vcap_step "${opts[@]}" "${VCAP_SRUN_CONTAINER[@]}" "${VCAP_LAUNCH[@]}" -m megatron_vcap "$@"
}

# vcap_finish RC: requeue on the trainer's "saved, come back later" code, then exit with RC.
vcap_finish() {
  local rc=$1
  if [ "${rc}" -eq "${VCAP_EXIT_PREEMPTED}" ] && [ "${VCAP_SIGNALLED}" != TERM ]; then
    echo "vcap sbatch: the trainer saved and stopped early (exit ${rc}); requeueing job ${SLURM_JOB_ID}" >&2
    scontrol requeue "${SLURM_JOB_ID}" || echo "vcap sbatch: requeue failed; resubmit to resume" >&2
  elif [ "${rc}" -eq "${VCAP_EXIT_PREEMPTED}" ]; then
    echo "vcap sbatch: the trainer saved after SIGTERM (exit ${rc}); Slurm decides about a requeue" >&2
  fi
  exit "${rc}"
}

# --- the judge server (vLLM, OpenAI-compatible) -----------------------------------------------
# JUDGE_IMAGE: the vLLM image for pyxis (default below), or none for a `vllm` on the host's PATH.
# JUDGE_CMD overrides the whole server command (it must listen on JUDGE_PORT), e.g. for tests.
VCAP_JUDGE_IMAGE_DEFAULT=vllm/vllm-openai:v0.12.0

# vcap_judge_start MODEL URL_FILE [SRUN_OPTIONS...]: start the server as a background job step,
# then, once it answers on http://HOST:JUDGE_PORT/v1/models, write that base URL to URL_FILE
# (atomically). Sets VCAP_JUDGE_PID (the srun) and VCAP_JUDGE_HOST.
vcap_judge_start() {
  local model=$1 url_file=$2
  shift 2
  local port=${JUDGE_PORT:-8000} tp=${JUDGE_TP:-8} name=${JUDGE_NAME:-Qwen2.5-72B-Instruct}
  local image=${JUDGE_IMAGE:-${VCAP_JUDGE_IMAGE_DEFAULT}}
  local -a cmd container=()
  if [ -n "${JUDGE_CMD:-}" ]; then
    read -r -a cmd <<<"${JUDGE_CMD}"
  else
    cmd=(vllm serve "${model}" --served-model-name "${name}" --tensor-parallel-size "${tp}"
      --host 0.0.0.0 --port "${port}" --max-model-len "${JUDGE_MAX_LEN:-16384}"
      --gpu-memory-utilization 0.9)
  fi
  if [ "${image}" != none ]; then
    srun --help 2>/dev/null | grep -q -- "--container-image" || vcap_die "JUDGE_IMAGE=${image} needs pyxis; use JUDGE_IMAGE=none with vllm on the host"
    container=(--container-image="${image}" --container-mounts="${REPO}:${REPO}${MOUNTS:+,${MOUNTS}}")
  fi
  mkdir -p "$(dirname "${url_file}")"
  rm -f "${url_file}" # a stale URL from an earlier run must not be used
  srun --kill-on-bad-exit=1 --ntasks=1 "$@" "${container[@]}" "${cmd[@]}" &
  VCAP_JUDGE_PID=$!
  # The judge runs on the first node of its component (of the job, outside a heterogeneous one).
  local nodes=${SLURM_JOB_NODELIST_HET_GROUP_0:-${SLURM_JOB_NODELIST:-}}
  VCAP_JUDGE_HOST=$(hostname)
  [ -n "${nodes}" ] && VCAP_JUDGE_HOST=$(scontrol show hostnames "${nodes}" | head -n 1)
  local url="http://${VCAP_JUDGE_HOST}:${port}/v1"
  (
    until curl -s -o /dev/null "${url}/models"; do
      kill -0 "${VCAP_JUDGE_PID}" 2>/dev/null || exit 1
      sleep 5
    done
    printf '%s\n' "${url}" >"${url_file}.tmp" && mv "${url_file}.tmp" "${url_file}"
    echo "vcap sbatch: judge answers at ${url} (written to ${url_file})"
  ) &
}

vcap_judge_stop() {
  if [ -n "${VCAP_JUDGE_PID:-}" ]; then kill -TERM "${VCAP_JUDGE_PID}" 2>/dev/null || true; fi
  if [ -n "${JUDGE_URL_FILE:-}" ]; then rm -f "${JUDGE_URL_FILE}"; fi
  echo "vcap sbatch: judge stopped; ${JUDGE_URL_FILE:-} removed"
  return 0
}
