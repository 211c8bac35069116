#!/usr/bin/env bash
# The side-by-side benchmark (bench/README.md): install, then run every phase against a
# private RabbitMQ node of its own. Extra arguments go to bench/run.py (e.g. --scale 0.5).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/install.sh
echo "bench.sh: installing the bench extra (celery, matplotlib, psutil)"
.venv/bin/python -m pip --quiet --disable-pip-version-check install -e '.[bench]'

# The benchmark starts its own node, so it needs the server binaries, not a running service.
if ! command -v rabbitmqctl >/dev/null && [[ ! -x /usr/sbin/rabbitmqctl ]]; then
  sudo=()
  if [[ $(id -u) -ne 0 ]]; then
    sudo=(sudo)
  fi
  echo "bench.sh: installing rabbitmq-server (apt)"
  "${sudo[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends \
    rabbitmq-server >/dev/null
fi

exec .venv/bin/python -m bench.run "$@"
