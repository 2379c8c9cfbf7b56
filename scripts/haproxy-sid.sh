#!/usr/bin/env bash
# HAProxy 3.2 for the tests, without building anything: Debian sid's own haproxy package, in a
# minimal sid tree made by debootstrap (about 65 s and 240 MB, once per machine), cached outside the
# clone so that every checkout and CI run on the machine shares it. scripts/haproxy-sid runs its
# binary like any haproxy. Idempotent: a cached tree whose haproxy runs (`-vv`) is kept; a missing
# or broken one is rebuilt into a temporary directory, then swapped in with one atomic rename of a
# symlink, so a reader never sees half a tree. A lock serialises concurrent runs.
#
#   SPOA_MIRROR_HAPROXY_SID   where the tree is (default /var/cache/spoa-mirror/haproxy-sid,
#                             a symlink to the current haproxy-sid.<date> directory beside it)
set -euo pipefail
cd "$(dirname "$0")/.."
link=${SPOA_MIRROR_HAPROXY_SID:-/var/cache/spoa-mirror/haproxy-sid}
cache=$(dirname "$link")
wrapper=$(pwd)/scripts/haproxy-sid
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"

works() {  # works TREE: its haproxy runs and is a 3.x
    local out
    out=$(SPOA_MIRROR_HAPROXY_SID=$1 "$wrapper" -vv 2>/dev/null) && [[ $out == "HAProxy version 3."* ]]
}

$sudo mkdir -p "$cache"
lock=$cache/.haproxy-sid.lock
[ -w "$cache" ] || lock=${TMPDIR:-/tmp}/spoa-mirror-haproxy-sid.lock
exec 9>>"$lock"
flock 9
if works "$link"; then
    echo "setup: $(SPOA_MIRROR_HAPROXY_SID=$link "$wrapper" -v | head -1) in $(readlink -f "$link")" >&2
    exit 0
fi
command -v debootstrap >/dev/null 2>&1 || [ -x /usr/sbin/debootstrap ] || {
    echo "setup: debootstrap is missing (apt-get install debootstrap)" >&2
    exit 1
}
echo "setup: fetching HAProxy 3.x from Debian sid into $cache (debootstrap, about a minute)" >&2
tree=$($sudo mktemp -d "$link.$(date -u +%Y%m%dT%H%M%S).XXXX")
$sudo chmod 755 "$tree"  # mktemp makes it 0700; the tests may run as another user
log=$(mktemp "${TMPDIR:-/tmp}/haproxy-sid-debootstrap.XXXX")  # ours, not root's: written without sudo
if ! $sudo debootstrap --variant=minbase --include=haproxy sid "$tree" >"$log" 2>&1 || ! works "$tree"; then
    echo "setup: debootstrap of Debian sid with haproxy failed; its log: $log" >&2
    tail -n 20 "$log" >&2
    $sudo rm -rf "$tree"
    exit 1
fi
old=""  # what the link replaces: the previous tree, removed once the new one is in place
if [ -L "$link" ]; then
    old=$(readlink -f "$link")
elif [ -e "$link" ]; then  # a plain directory, e.g. made by hand: set it aside first
    old=$link.old.$$
    $sudo mv -T "$link" "$old"
fi
$sudo ln -sfn "$(basename "$tree")" "$link.new"
$sudo mv -T "$link.new" "$link"
[ -z "$old" ] || [ "$old" = "$tree" ] || $sudo rm -rf "$old"
rm -f "$log"
echo "setup: $("$wrapper" -v | head -1) in $tree" >&2
