#!/usr/bin/env bash
# Build and run the embedapi container: ./run.sh [cpu|gpu]   (see usage below)
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: ./run.sh [cpu|gpu]

Builds the embedapi image (embedapi:cpu from Dockerfile.cpu, or embedapi:gpu from Dockerfile)
and runs it in the foreground (Ctrl-C stops it). Default: cpu.

Environment:
  APP_PORT         host port to publish (default 8000); the container listens on 8000
  PRELOAD_MODELS   space-separated model ids to bake into the image at build time,
                   e.g. PRELOAD_MODELS="cl-nagoya/ruri-v3-30m cl-nagoya/ruri-v3-reranker-310m"
  EMBEDAPI_*       every EMBEDAPI_* variable set here is passed to the container.
                   EMBEDAPI_MODELS_FILE / EMBEDAPI_API_KEYS_FILE naming a file on this host are
                   mounted read-only under /etc/embedapi/ and passed as that path.

The Hugging Face cache lives in the named volume embedapi-hf-cache (/cache/huggingface).
gpu needs the NVIDIA Container Toolkit (docker run --gpus all).
EOF
}

if (($# > 1)); then
  usage >&2
  exit 2
fi

variant="${1:-cpu}"
case "${variant}" in
  cpu)
    dockerfile=Dockerfile.cpu
    gpu_args=()
    ;;
  gpu)
    dockerfile=Dockerfile
    gpu_args=(--gpus all)
    ;;
  -h | --help | help)
    usage
    exit 0
    ;;
  *)
    echo "run.sh: unknown variant '${variant}'" >&2
    usage >&2
    exit 2
    ;;
esac

# Pass through the EMBEDAPI_* variables that are set; files named by *_FILE variables are
# mounted when they exist on this host (relative paths: from the caller's directory, so this
# runs before the cd below).
env_args=()
mount_args=()
while IFS= read -r name; do
  value="${!name}"
  if [[ "${name}" == *_FILE && -f "${value}" ]]; then
    host_file="$(cd "$(dirname "${value}")" && pwd)/$(basename "${value}")"
    container_file="/etc/embedapi/$(basename "${value}")"
    mount_args+=(-v "${host_file}:${container_file}:ro")
    env_args+=(-e "${name}=${container_file}")
  else
    env_args+=(-e "${name}")
  fi
done < <(compgen -e | grep '^EMBEDAPI_' || true)

# The build context is the repository, wherever the script is called from.
cd "$(dirname "${BASH_SOURCE[0]}")"

image="embedapi:${variant}"
host_port="${APP_PORT:-8000}"

build_args=()
if [[ -n "${PRELOAD_MODELS:-}" ]]; then
  build_args+=(--build-arg "PRELOAD_MODELS=${PRELOAD_MODELS}")
fi

echo "run.sh: building ${image} from ${dockerfile}" >&2
# ${arr[@]+...}: an empty array is fine under `set -u` in bash < 4.4 (macOS) too.
docker build -f "${dockerfile}" -t "${image}" ${build_args[@]+"${build_args[@]}"} .

echo "run.sh: starting ${image} on http://127.0.0.1:${host_port}" >&2
# --stop-timeout: longer than Gunicorn's graceful_timeout (60 s), so accepted requests finish on stop.
exec docker run --rm \
  --name "embedapi-${variant}" \
  -p "${host_port}:8000" \
  -v embedapi-hf-cache:/cache/huggingface \
  --stop-timeout 75 \
  ${gpu_args[@]+"${gpu_args[@]}"} \
  ${mount_args[@]+"${mount_args[@]}"} \
  ${env_args[@]+"${env_args[@]}"} \
  "${image}"
