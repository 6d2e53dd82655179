#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# Install what the QEMU guest tests need on a Debian bookworm host:
#   qemu-system-x86_64 (from bookworm-backports, so it coexists with the
#   preinstalled qemu-utils 10.0), qemu-utils (qemu-storage-daemon),
#   busybox-static, cpio, gzip.
# Idempotent: exits quickly when everything is already present.
set -euo pipefail

die() { echo "install-deps: ERROR: $*" >&2; exit 1; }
have() { command -v "$1" >/dev/null 2>&1; }

# Everything the guest scripts use on the host side.
need_qemu=0; need_pkgs=()
have qemu-system-x86_64 || need_qemu=1
# qemu-storage-daemon (qemu-utils) is the reference vhost-user-blk backend.
have qemu-storage-daemon || need_qemu=1
pkg_ok() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'ok installed'; }
# The initramfs needs the *static* busybox (copied as the guest's only binary).
pkg_ok busybox-static || need_pkgs+=(busybox-static)
have cpio || need_pkgs+=(cpio)
have gzip || need_pkgs+=(gzip)
have dpkg-deb || die "dpkg-deb missing: this script expects a Debian host"

if [ "$need_qemu" = 0 ] && [ "${#need_pkgs[@]}" = 0 ]; then
    echo "install-deps: all present ($(qemu-system-x86_64 --version | head -n1))"
    exit 0
fi

[ "$(id -u)" = 0 ] || SUDO=sudo
SUDO=${SUDO:-}
apt_get() { $SUDO env DEBIAN_FRONTEND=noninteractive apt-get -y -q "$@"; }

if [ "$need_qemu" = 1 ]; then
    . /etc/os-release
    [ "${VERSION_CODENAME:-}" = bookworm ] ||
        echo "install-deps: warning: not bookworm (${VERSION_CODENAME:-?}); trying anyway" >&2
    src=/etc/apt/sources.list.d/vbk-backports.sources
    if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
        # Reuse the mirror the machine already uses for bookworm.
        mirror=$(grep -rhs '^URIs:.*debian/\?$' /etc/apt/sources.list.d/*.sources | head -n1 | awk '{print $2}')
        mirror=${mirror:-http://deb.debian.org/debian}
        echo "install-deps: adding bookworm-backports from $mirror"
        printf 'Types: deb\nURIs: %s\nSuites: bookworm-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
            "$mirror" | $SUDO tee "$src" >/dev/null
    fi
    apt_get update || die "apt-get update failed"
    apt_get install -t bookworm-backports --no-install-recommends \
        qemu-system-x86 qemu-system-common qemu-system-data seabios qemu-utils ||
        die "installing qemu-system-x86 from bookworm-backports failed"
else
    apt_get update >/dev/null || die "apt-get update failed"
fi
if [ "${#need_pkgs[@]}" -gt 0 ]; then
    apt_get install --no-install-recommends "${need_pkgs[@]}" ||
        die "installing ${need_pkgs[*]} failed"
fi
for c in qemu-system-x86_64 qemu-storage-daemon; do have $c || die "$c still missing after install"; done
echo "install-deps: done ($(qemu-system-x86_64 --version | head -n1))"
