#!/usr/bin/env bash
# Imports Debian's busybox-static as an image, with no registry involved, so that
#   husk run --rm husk.local/busybox echo hello
# works on a machine that reaches no container registry (the README's first example).
#
# Usage: scripts/import-busybox.sh [IMAGE_NAME]   (default: husk.local/busybox:latest)
# Environment: BUSYBOX (default /bin/busybox, from the busybox-static package),
#              HUSK (the husk command, default: husk; may have arguments).
# The layer is reproducible (fixed mtimes, sorted entries): when the image already holds
# exactly this layer, nothing is imported again, so running this twice is harmless.
set -euo pipefail

name=${1:-husk.local/busybox:latest}
busybox=${BUSYBOX:-/bin/busybox}
read -r -a husk <<<"${HUSK:-husk}"
fixed_mtime=1700000000

if [ ! -x "$busybox" ]; then
    echo "import-busybox: $busybox is missing; install the Debian package busybox-static" >&2
    exit 1
fi
if ! "$busybox" --list-full >/dev/null 2>&1; then
    echo "import-busybox: $busybox does not list its applets; is it busybox-static?" >&2
    exit 1
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
root=$work/rootfs

mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,etc,dev,proc,sys,tmp,var/tmp,root,home,www}
chmod 1777 "$root/tmp" "$root/var/tmp"
chmod 700 "$root/root"
install -m 0755 "$busybox" "$root/bin/busybox"

# Every applet as a relative link to /bin/busybox, where busybox itself says it belongs.
"$busybox" --list-full | while read -r applet; do
    [ -n "$applet" ] && [ "$applet" != "bin/busybox" ] || continue
    depth=$(($(tr -cd '/' <<<"$applet" | wc -c)))
    up=$(printf '../%.0s' $(seq 1 "$depth"))
    mkdir -p "$root/$(dirname "$applet")"
    ln -sf "${up}bin/busybox" "$root/$applet"
done

cat >"$root/etc/passwd" <<'PASSWD'
root:x:0:0:root:/root:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
PASSWD
cat >"$root/etc/group" <<'GROUP'
root:x:0:
nogroup:x:65534:
GROUP
echo husk >"$root/etc/hostname"
printf '127.0.0.1\tlocalhost\n::1\tlocalhost\n' >"$root/etc/hosts"
: >"$root/etc/resolv.conf"
echo '<h1>husk</h1>' >"$root/www/index.html"

tar --sort=name --owner=0 --group=0 --numeric-owner --mtime="@$fixed_mtime" \
    -C "$root" -cf "$work/rootfs.tar" .

layer_id="sha256:$(sha256sum "$work/rootfs.tar" | cut -d' ' -f1)"
if "${husk[@]}" image inspect "$name" 2>/dev/null | grep -q "\"$layer_id\""; then
    echo "$name is up to date"
    exit 0
fi

"${husk[@]}" import \
    -c 'CMD ["sh"]' \
    -c 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    -m "busybox-static $("$busybox" 2>&1 | head -n 1 | awk '{print $2}')" \
    "$work/rootfs.tar" "$name" >/dev/null
echo "imported $name"
