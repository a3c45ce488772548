#!/usr/bin/env bash
# Make sure a Redis answers on 127.0.0.1:6379: install redis-server when missing, start it when not running.
set -euo pipefail
HOST=127.0.0.1
PORT=${REDIS_PORT:-6379}

redis_answers() {
  # Plain PING over /dev/tcp so this works before redis-cli is installed.
  local reply
  reply=$(timeout 2 bash -c "exec 3<>/dev/tcp/$HOST/$PORT && printf 'PING\r\n' >&3 && head -c 5 <&3" 2>/dev/null || true)
  [[ "$reply" == "+PONG" ]]
}

if redis_answers; then
  echo "redis: answering on $HOST:$PORT"
  exit 0
fi
if ! command -v redis-server >/dev/null 2>&1; then
  echo "redis: redis-server missing, installing with apt-get"
  SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-server >/dev/null
fi
echo "redis: starting redis-server on $HOST:$PORT"
redis-server --daemonize yes --bind "$HOST" --port "$PORT" --save "" --appendonly no \
  --logfile "${TMPDIR:-/tmp}/embedserve-redis.log"
for _ in $(seq 1 50); do
  redis_answers && { echo "redis: up"; exit 0; }
  sleep 0.1
done
echo "redis: did not answer on $HOST:$PORT after starting; see ${TMPDIR:-/tmp}/embedserve-redis.log" >&2
exit 1
