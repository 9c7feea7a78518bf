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

# The README's first example must work offline: a busybox image from Debian's busybox-static.
scripts/import-busybox.sh husk.local/busybox:latest
