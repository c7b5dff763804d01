#!/usr/bin/env bash
# Install (Debian's docker.io) and start a Docker engine for the container tests; idempotent.
#
# The engine runs without iptables/bridge networking (CI machines have no netfilter access and
# the tests use --network none) and with the vfs storage driver (works inside any container or
# VM, no overlayfs needed). Log: /var/log/pgbackflow-dockerd.log.
set -euo pipefail

log=/var/log/pgbackflow-dockerd.log
timeout_s=${PGBACKFLOW_DOCKERD_TIMEOUT:-60}
started=$SECONDS

if ! command -v dockerd >/dev/null 2>&1; then
    echo "docker-engine: installing docker.io (Debian)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends docker.io >/dev/null
fi

if docker info >/dev/null 2>&1; then
    echo "docker-engine: engine already running"
    exit 0
fi

# A stale pid file from a dead engine makes dockerd refuse to start.
if [ -f /var/run/docker.pid ] && ! kill -0 "$(cat /var/run/docker.pid)" 2>/dev/null; then
    rm -f /var/run/docker.pid
fi

echo "docker-engine: starting dockerd (log: $log)"
echo "=== $(date -u +%FT%TZ) .ci/docker-engine.sh starts dockerd" >>"$log"
started=$SECONDS
# setsid + nohup + closed stdin: the engine outlives this script and CI's shell.
setsid nohup dockerd \
    --iptables=false --ip-masq=false --bridge=none --storage-driver=vfs \
    </dev/null >>"$log" 2>&1 &
pid=$!

# Our child, or (if setsid had to fork) the engine that wrote its pid file.
engine_alive() {
    kill -0 "$pid" 2>/dev/null ||
        { [ -s /var/run/docker.pid ] && kill -0 "$(cat /var/run/docker.pid)" 2>/dev/null; }
}
fail() {
    echo "docker-engine: $1; last log lines ($log):" >&2
    tail -n 40 "$log" >&2 || true
    exit 1
}
deadline=$((SECONDS + timeout_s))
until docker info >/dev/null 2>&1; do
    engine_alive || fail "dockerd exited during start-up"
    if ((SECONDS >= deadline)); then
        kill "$pid" 2>/dev/null || true # a half-started engine would block the next attempt
        fail "dockerd did not answer within ${timeout_s}s (stopped it)"
    fi
    sleep 0.25
done
echo "docker-engine: engine ready after $((SECONDS - started))s"
