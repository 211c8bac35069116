#!/usr/bin/env bash
# Everything CI runs: install, lint, format check, type check, tests (extra args go to pytest).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

run_step() {
  local name=$1
  shift
  local start=$SECONDS
  echo "==> $name"
  if "$@"; then
    echo "==> $name ok ($((SECONDS - start))s)"
  else
    local rc=$?
    echo "==> FAILED: $name (exit $rc, after $((SECONDS - start))s)" >&2
    exit "$rc"
  fi
}

# Tests start their own private RabbitMQ node, so they need the server binaries, not a
# running service. amqp-tools gives the fault tests a second, independent client. The web
# page's tests drive Debian's chromium (Playwright never downloads a browser).
ensure_packages() {
  local missing=()
  command -v rabbitmqctl >/dev/null || [[ -x /usr/sbin/rabbitmqctl ]] || missing+=(rabbitmq-server)
  command -v amqp-publish >/dev/null || missing+=(amqp-tools)
  [[ -x /usr/bin/chromium ]] || missing+=(chromium)
  # OpenCV, under the second OCR engine (RapidOCR), loads libGL and GLib.
  ldconfig -p | grep -q 'libGL\.so\.1' || missing+=(libgl1)
  ldconfig -p | grep -q 'libglib-2\.0\.so\.0' || missing+=(libglib2.0-0)
  ((${#missing[@]} == 0)) && return 0
  local sudo=()
  if [[ $(id -u) -ne 0 ]]; then
    sudo=(sudo)
  fi
  echo "installing ${missing[*]} (apt)"
  "${sudo[@]}" apt-get update -qq || return 1
  DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends \
    "${missing[@]}" >/dev/null
}

run_step "install" bash scripts/install.sh
run_step "system packages" ensure_packages
run_step "ruff check" .venv/bin/ruff check .
run_step "ruff format --check" .venv/bin/ruff format --check .
run_step "mypy" .venv/bin/mypy
run_step "import-linter" .venv/bin/lint-imports
# The CPU default embedder's INT8 model, made once and cached (~/.cache/sluice/onnx): made here
# rather than inside the first test pipeline whose embed stage starts.
run_step "model cache" .venv/bin/python -m stages.backends.onnx_embedder
# Two workers, each taking whole files (a module's pipeline stays in one worker, with its own
# RabbitMQ node): most tests wait on real processes, so two run in about the time of one.
# SLUICE_TEST_WORKERS=0 runs them in this process, one after another.
run_step "pytest" .venv/bin/pytest -n "${SLUICE_TEST_WORKERS:-2}" --dist loadfile "$@"
echo "==> all steps passed"
