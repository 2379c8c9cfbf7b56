#!/usr/bin/env bash
# Idempotent setup on Debian 12 (as root, or with sudo): the system packages the demo and the
# tests drive for real (HAProxy, nginx, wrk, hey, and systemd for systemd-analyze, which checks the
# unit in deploy/systemd; Debian's container images lack it), a virtualenv in .venv, and the
# project with its test extras. Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
for pair in haproxy:haproxy nginx:nginx-light wrk:wrk hey:hey systemd-analyze:systemd promtool:prometheus \
    debootstrap:debootstrap curl:curl; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || [ -x "/usr/sbin/${pair%%:*}" ] || need+=("${pair#*:}")
done
# --- issue 16: Debian's Docker engine and CLI, for tests/test_container.py (started below), and
# docker-compose, whose `config` checks compose.yaml in tests/test_compose.py ---
command -v dockerd >/dev/null 2>&1 || [ -x /usr/sbin/dockerd ] || need+=(docker.io)
command -v docker-compose >/dev/null 2>&1 || need+=(docker-compose)
# --- end issue 16 ---
if [ ${#need[@]} -gt 0 ]; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -q
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends "${need[@]}"
fi

# HAProxy 3.2 beside Debian 12's 2.6, so that every HAProxy test runs on both (scripts/haproxy-sid.sh).
bash scripts/haproxy-sid.sh

# The virtualenv belongs to this checkout: a .venv that is a symlink, or whose interpreter lives
# outside the checkout, was made on another machine or for another clone (a tracked symlink once
# made every fresh clone fail), so it is replaced rather than trusted.
python=${PYTHON:-python3}
if [ -L .venv ] || { [ -e .venv ] && [ "$(cd .venv && pwd -P)" != "$(pwd -P)/.venv" ]; }; then
    echo "setup: .venv is a link out of this checkout; replacing it with a virtualenv of its own" >&2
    rm -f .venv
fi
if [ -d .venv ] && ! .venv/bin/python -c 'import sys; sys.exit(0)' >/dev/null 2>&1; then
    echo "setup: .venv is broken (its interpreter does not run); rebuilding it" >&2
    rm -rf .venv
fi
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -e ".[test,bench]"

# --- issue 16: the Docker engine (started when it can; tests/test_container.py skips, saying why,
# when it cannot) and the containers' local base image (debootstrap, cached in /var/cache/spoa-mirror).
if bash scripts/dockerd.sh; then
    bash scripts/container-base.sh || echo "setup: could not make the container base image" >&2
else
    echo "setup: no Docker engine on this machine; tests/test_container.py will be skipped" >&2
fi
# --- end issue 16 ---
