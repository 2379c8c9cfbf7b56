#!/usr/bin/env bash
# A local base image for the container tests, made without any registry (Docker Hub may be out of
# reach): a minimal Debian bookworm with Python (debootstrap --variant=minbase, python3 and
# python3-venv), imported as `spoa-mirror-base:bookworm`. The root filesystem tarball is cached in
# $CACHE (/var/cache/spoa-mirror), so later runs only `docker import` it (or nothing, when the image
# exists). Needs root, debootstrap, a Debian mirror the first time, and a running Docker engine.
set -euo pipefail
cache=${CACHE:-/var/cache/spoa-mirror}
image=${IMAGE:-spoa-mirror-base:bookworm}
mirror=${MIRROR:-http://deb.debian.org/debian}
docker=/usr/bin/docker
tarball="$cache/base-bookworm-python3.tar"

if "$docker" image inspect "$image" >/dev/null 2>&1; then
    exit 0
fi
if [ ! -s "$tarball" ]; then
    mkdir -p "$cache"
    work=$(mktemp -d "$cache/base.XXXXXX")
    trap 'rm -rf "$work"' EXIT
    debootstrap --variant=minbase --include=python3,python3-venv bookworm "$work/root" "$mirror" \
        >"$work/debootstrap.log" 2>&1 || { tail -n 30 "$work/debootstrap.log" >&2; exit 1; }
    # Nothing the image needs at run time: apt lists and caches, docs, man pages.
    rm -rf "$work/root"/var/lib/apt/lists/* "$work/root"/var/cache/apt/* \
        "$work/root"/usr/share/doc/* "$work/root"/usr/share/man/*
    tar -C "$work/root" --numeric-owner -cf "$tarball.tmp" .
    mv "$tarball.tmp" "$tarball"
fi
"$docker" import --change 'CMD ["python3"]' "$tarball" "$image" >/dev/null
echo "container-base.sh: $image imported from $tarball"
