#!/usr/bin/env bash
# Start Debian's Docker engine (docker.io) when none answers, for the container tests
# (tests/test_container.py); a no-op when one already runs. CI machines have no init system running
# services, so dockerd is started here, in the background, logging to $DOCKERD_LOG. Exits 0 once
# `docker info` answers, 1 (with the log's tail on stderr) when the engine cannot start on this
# machine (no privileges, no overlay or cgroup support...): the container tests then say why.
set -uo pipefail
docker=/usr/bin/docker            # Debian's CLI, the same release as its dockerd
log=${DOCKERD_LOG:-/var/log/spoa-mirror-dockerd.log}
"$docker" info >/dev/null 2>&1 && exit 0
if ! command -v dockerd >/dev/null 2>&1; then
    echo "dockerd.sh: dockerd is not installed (apt-get install docker.io)" >&2
    exit 1
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "dockerd.sh: starting dockerd needs root" >&2
    exit 1
fi
setsid dockerd >>"$log" 2>&1 < /dev/null &
for _ in $(seq 60); do
    "$docker" info >/dev/null 2>&1 && exit 0
    kill -0 $! 2>/dev/null || break
    sleep 0.5
done
echo "dockerd.sh: the Docker engine did not start; the end of $log:" >&2
tail -n 20 "$log" >&2
exit 1
