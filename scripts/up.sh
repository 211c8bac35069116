#!/usr/bin/env bash
# Install, make sure RabbitMQ runs, then run the gateway and the four stages in the foreground.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/install.sh
bash scripts/ensure-rabbitmq.sh
exec .venv/bin/sluice up "$@"
