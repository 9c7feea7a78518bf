#!/usr/bin/env bash
# Installs everything husk needs on Debian 12: system packages, the Python package
# (with its test dependencies) and the guest bundle. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")"

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

packages=$(grep -Ev '^\s*(#|$)' packaging/apt-packages.txt | tr '\n' ' ')
as_root apt-get update -q
# shellcheck disable=SC2086
as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $packages

python3 -m pip install -q --disable-pip-version-check -e '.[test]'

husk bundle build

# Every user boots this copy unless they build their own (README, "Without root"): root-owned,
# world-readable, swapped in whole so that a reader never sees half of an old and a new one.
system_bundle=/usr/local/share/husk/bundle
built=$(husk bundle info --json | python3 -c 'import json, os, sys; print(os.path.dirname(json.load(sys.stdin)["kernel"]))')
as_root install -d -m 0755 /usr/local/share/husk
as_root rm -rf "$system_bundle.new" "$system_bundle.old"
as_root install -d -m 0755 "$system_bundle.new"
as_root install -m 0644 "$built/vmlinux" "$built/initramfs.cpio" "$built/manifest.json" "$system_bundle.new/"
if [ -d "$system_bundle" ]; then as_root mv -T "$system_bundle" "$system_bundle.old"; fi
as_root mv -T "$system_bundle.new" "$system_bundle"
as_root rm -rf "$system_bundle.old"

# The README's first example must work offline: a busybox image from Debian's busybox-static.
scripts/import-busybox.sh husk.local/busybox:latest

# ...and for every user (README, "Without root"): each user has an image store of their own,
# and a husk.local/ name found under /usr/local/share/husk/images is loaded on first use.
images=/usr/local/share/husk/images/husk.local/busybox
saved=$(mktemp)
husk save -o "$saved" husk.local/busybox:latest
as_root install -d -m 0755 /usr/local/share/husk/images /usr/local/share/husk/images/husk.local "$images"
as_root install -m 0644 "$saved" "$images/latest.tar.new"
as_root mv -f "$images/latest.tar.new" "$images/latest.tar"
rm -f "$saved"
