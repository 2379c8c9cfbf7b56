#!/usr/bin/env bash
# Install spoa-mirror as a systemd service, from this checkout (as root):
#
#   deploy/systemd/install.sh                      # pip install from the checkout (needs an index)
#   deploy/systemd/install.sh --wheels DIR         # offline, from `pip wheel --wheel-dir DIR .`
#   deploy/systemd/install.sh --root DIR           # into DIR/opt, DIR/etc... (packaging, tests)
#
# Creates /opt/spoa-mirror (a venv with the agent), /etc/systemd/system/spoa-mirror.service,
# /usr/share/doc/spoa-mirror/README.md, and, only when absent, /etc/spoa-mirror/config.yaml (a
# starter) and /etc/spoa-mirror/hmac.key (32 random bytes, base64, mode 0600). Run again to upgrade:
# the config and the key are kept.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
checkout="$(cd "$here/../.." && pwd)"
root=""
wheels=""
while [ $# -gt 0 ]; do
    case "$1" in
        --root) root="$2"; shift 2 ;;
        --wheels) wheels="$2"; shift 2 ;;
        *) echo "install.sh: unknown argument $1 (expected --root DIR, --wheels DIR)" >&2; exit 2 ;;
    esac
done
python=${PYTHON:-python3}
venv="$root/opt/spoa-mirror"

"$python" -m venv "$venv"
if [ -n "$wheels" ]; then
    "$venv/bin/python" -m pip install -q --no-index --find-links "$wheels" spoa-mirror
else
    "$venv/bin/python" -m pip install -q "$checkout"
fi
install -D -m 0644 "$here/spoa-mirror.service" "$root/etc/systemd/system/spoa-mirror.service"
install -D -m 0644 "$checkout/README.md" "$root/usr/share/doc/spoa-mirror/README.md"
install -d -m 0755 "$root/etc/spoa-mirror"
[ -e "$root/etc/spoa-mirror/config.yaml" ] || install -m 0644 "$here/config.yaml" "$root/etc/spoa-mirror/config.yaml"
if [ ! -e "$root/etc/spoa-mirror/hmac.key" ]; then
    (umask 077 && head -c 32 /dev/urandom | base64 > "$root/etc/spoa-mirror/hmac.key")
fi
"$venv/bin/spoa-mirror" check-config "$root/etc/spoa-mirror/config.yaml" >/dev/null
if [ -z "$root" ] && [ -d /run/systemd/system ]; then
    systemctl daemon-reload
fi
echo "installed: edit the targets in $root/etc/spoa-mirror/config.yaml, then: systemctl enable --now spoa-mirror"
