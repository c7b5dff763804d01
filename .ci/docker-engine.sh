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

# Start dockerd with a storage driver; 0 when it answers, 1 when it died or timed out.
start_engine() {
    local driver=$1
    echo "docker-engine: starting dockerd with storage driver $driver (log: $log)"
    echo "=== $(date -u +%FT%TZ) .ci/docker-engine.sh starts dockerd ($driver)" >>"$log"
    # setsid + nohup + closed stdin: the engine outlives this script and CI's shell.
    setsid nohup dockerd \
        --iptables=false --ip-masq=false --bridge=none --storage-driver="$driver" \
        </dev/null >>"$log" 2>&1 &
    pid=$!
    local deadline=$((SECONDS + timeout_s))
    until docker info >/dev/null 2>&1; do
        if ! engine_alive; then
            return 1
        fi
        if ((SECONDS >= deadline)); then
            kill "$pid" 2>/dev/null || true # a half-started engine would block the next attempt
            return 1
        fi
        sleep 0.25
    done
}

started=$SECONDS
# overlay2 is what production engines use and creates containers in ~10 ms; vfs (a full copy
# of the image per container, ~1-3 s) works everywhere, so it is the fallback.
if ! start_engine overlay2; then
    sleep 1
    rm -f /var/run/docker.pid
    start_engine vfs || fail "dockerd did not start with overlay2 nor vfs"
fi
echo "docker-engine: engine ready after $((SECONDS - started))s ($(docker info --format '{{.Driver}}'))"
