#!/usr/bin/env bash
# The GPU benchmark (bench/README.md "GPU"): the raw model at several batch sizes in fp16 and
# fp32, then the real embed stage draining a queued backlog, printed as one table. Installs
# what it needs first, the CUDA build of torch included. Arguments go to bench/gpu.py:
# `--device cpu` runs the same steps on CPU, `--quick` with tiny sizes.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

device=cuda
previous=""
for arg in "$@"; do
  case "$arg" in
  --device=*) device=${arg#--device=} ;;
  *) [[ "$previous" == --device ]] && device=$arg ;;
  esac
  previous=$arg
done

if [[ "$device" == cuda* ]]; then
  # Refused before minutes of installing: no driver, no GPU it lists, nothing to measure.
  if ! command -v nvidia-smi >/dev/null || ! nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then
    echo "gpu.sh: no CUDA device is visible (nvidia-smi lists no GPU); run this on a" \
      "machine with an NVIDIA GPU and its driver, or pass --device cpu for a small run on CPU" >&2
    exit 2
  fi
  # PyPI's Linux wheel of torch is the CUDA build: install.sh must not be pointed at a
  # CPU-only index for this machine.
  unset SLUICE_TORCH_INDEX_URL
fi

# OCR's system package is no part of this benchmark.
SLUICE_OCR=false bash scripts/install.sh

if [[ "$device" == cuda* ]] &&
  ! .venv/bin/python -c 'import sys, torch; sys.exit(torch.version.cuda is None)'; then
  # A .venv made with the CPU wheel: its version (2.13.0+cpu) already satisfies the pin, so
  # pip would keep it; replace it with PyPI's own (CUDA) build.
  echo "gpu.sh: replacing the CPU build of torch with PyPI's CUDA build"
  .venv/bin/python -m pip --quiet --disable-pip-version-check uninstall -y torch
  .venv/bin/python -m pip --quiet --disable-pip-version-check install \
    "torch==$(sed -n 's/^TORCH_VERSION=//p' scripts/install.sh)"
fi

# The benchmark starts its own RabbitMQ node, so it needs the server binaries, not a service.
if ! command -v rabbitmqctl >/dev/null && [[ ! -x /usr/sbin/rabbitmqctl ]]; then
  sudo=()
  if [[ $(id -u) -ne 0 ]]; then
    sudo=(sudo)
  fi
  echo "gpu.sh: installing rabbitmq-server (apt)"
  "${sudo[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends \
    rabbitmq-server >/dev/null
fi

exec .venv/bin/python -m bench.gpu "$@"
