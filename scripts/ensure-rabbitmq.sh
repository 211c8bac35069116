#!/usr/bin/env bash
# Make a RabbitMQ answer at SLUICE_AMQP_URL: leave a running one alone, otherwise install and
# start the Debian rabbitmq-server with the management and Prometheus plugins.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

URL="${SLUICE_AMQP_URL:-amqp://guest:guest@localhost:5672/}"
# Several brokers of one cluster (comma separated): the first is the one to check.
URL="${URL%%,*}"

# host and port from amqp[s]://user:pass@host:port/vhost
hostport="${URL#*://}"
hostport="${hostport##*@}"
hostport="${hostport%%/*}"
hostport="${hostport%%\?*}"
if [[ "$hostport" == \[*\]* ]]; then # [ipv6]:port
  HOST="${hostport%%]*}"
  HOST="${HOST#[}"
  rest="${hostport#*]}"
  PORT="${rest#:}"
else
  HOST="${hostport%%:*}"
  PORT=""
  [[ "$hostport" == *:* ]] && PORT="${hostport##*:}"
fi
HOST="${HOST:-localhost}"
if [[ -z "$PORT" ]]; then
  if [[ "$URL" == amqps://* ]]; then PORT=5671; else PORT=5672; fi
fi

accepts_tcp() {
  timeout 2 bash -c "exec 3<>/dev/tcp/$HOST/$PORT" 2>/dev/null
}

if accepts_tcp; then
  echo "ensure-rabbitmq: something already listens at $HOST:$PORT; using it"
  exit 0
fi

case "$HOST" in
  localhost | 127.0.0.1 | ::1) ;;
  *)
    echo "ensure-rabbitmq: nothing answers at $HOST:$PORT, and it is not this machine;" >&2
    echo "ensure-rabbitmq: start that broker, or unset SLUICE_AMQP_URL to run one locally" >&2
    exit 1
    ;;
esac
if [[ "$PORT" != 5672 ]]; then
  echo "ensure-rabbitmq: the local rabbitmq-server listens on 5672, but SLUICE_AMQP_URL says" >&2
  echo "ensure-rabbitmq: port $PORT; start a broker there yourself or use port 5672" >&2
  exit 1
fi

SUDO=()
if [[ $(id -u) -ne 0 ]]; then
  command -v sudo >/dev/null || { echo "ensure-rabbitmq: need root or sudo" >&2; exit 1; }
  SUDO=(sudo)
fi

if ! command -v rabbitmq-server >/dev/null && [[ ! -x /usr/sbin/rabbitmq-server ]]; then
  echo "ensure-rabbitmq: installing rabbitmq-server (apt)"
  "${SUDO[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get install -y -qq rabbitmq-server >/dev/null
fi
export PATH="$PATH:/usr/sbin"

# The package may start the service on install; that's fine, the checks below are idempotent.
"${SUDO[@]}" rabbitmq-plugins enable --offline rabbitmq_management rabbitmq_prometheus >/dev/null

NODE="rabbit@$(hostname -s)"
LOG_DIR=/var/log/rabbitmq

boot_failed() {
  echo "ensure-rabbitmq: $NODE did not come up: $1" >&2
  local f
  for f in "$LOG_DIR/startup_err" "$LOG_DIR/$NODE.log"; do
    if [[ -s "$f" ]]; then
      echo "--- tail of $f" >&2
      tail -n 15 "$f" >&2
    fi
  done
  exit 1
}

# True once the init script's node crashed during this attempt (e.g. a port already in use).
crashed_since() {
  [[ -f "$LOG_DIR/startup_err" ]] && (($(stat -c %Y "$LOG_DIR/startup_err") >= $1)) &&
    grep -q "BOOT FAILED" "$LOG_DIR/startup_err"
}

# Kill a process and all its descendants, children first (su in between starts new sessions,
# so a process-group or session kill misses them).
kill_tree() {
  local child
  for child in $(ps -o pid= --ppid "$1" 2>/dev/null); do
    kill_tree "$child"
  done
  "${SUDO[@]}" kill -KILL "$1" 2>/dev/null || true
}

# No systemd in containers, but the init script works. It waits up to 10 minutes for a node
# that already crashed, so we watch it and kill it early.
start_with_service() {
  command -v service >/dev/null || return 1
  local t0=$SECONDS since
  since=$(date +%s)
  "${SUDO[@]}" service rabbitmq-server start >/dev/null 2>&1 &
  local pid=$!
  while kill -0 "$pid" 2>/dev/null; do
    if ((SECONDS - t0 > 90)) || crashed_since "$since"; then
      kill_tree "$pid"
      wait "$pid" 2>/dev/null || true
      return 1
    fi
    sleep 0.5
  done
  wait "$pid"
}

wait_until_ready() {
  local t0=$SECONDS
  # await_startup fails at once while the node is not reachable yet, so retry it.
  until "${SUDO[@]}" rabbitmqctl -q -n "$NODE" await_startup --timeout 30 >/dev/null 2>&1; do
    ((SECONDS - t0 < 90)) || return 1
    sleep 1
  done
  until accepts_tcp; do
    ((SECONDS - t0 < 90)) || return 1
    sleep 0.2
  done
}

if ! accepts_tcp; then
  echo "ensure-rabbitmq: starting rabbitmq-server"
  if ! start_with_service; then
    echo "ensure-rabbitmq: 'service rabbitmq-server start' failed; trying rabbitmq-server -detached"
    "${SUDO[@]}" rabbitmq-server -detached || boot_failed "rabbitmq-server -detached failed"
  fi
fi
wait_until_ready || boot_failed "not ready within 90s (await_startup / TCP $HOST:$PORT)"

echo "ensure-rabbitmq: RabbitMQ is up at amqp://$HOST:$PORT/"
echo "ensure-rabbitmq: management UI http://localhost:15672 (guest/guest, from this machine only)"
echo "ensure-rabbitmq: stop it with: ${SUDO[*]:+${SUDO[*]} }rabbitmqctl -n $NODE stop"
