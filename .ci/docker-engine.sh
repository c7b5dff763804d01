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
started=$SECONDS
# setsid + nohup + closed stdin: the engine outlives this script and CI's shell.
setsid nohup dockerd \
    --iptables=false --ip-masq=false --bridge=none --storage-driver=vfs \
    </dev/null >>"$log" 2>&1 &

deadline=$((SECONDS + timeout_s))
until docker info >/dev/null 2>&1; do
    if ((SECONDS >= deadline)); then
        echo "docker-engine: dockerd did not answer within ${timeout_s}s; last log lines:" >&2
        tail -n 40 "$log" >&2 || true
        exit 1
    fi
    sleep 0.5
done
echo "docker-engine: engine ready after $((SECONDS - started))s"
