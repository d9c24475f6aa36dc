#!/bin/bash
# Build (once) and cache a bookworm rootfs for the packaging test.
#
#   tests/packaging/rootfs.sh [CACHE_DIR]     prints the rootfs path on stdout
#
# CACHE_DIR defaults to $PORTAGENT_PACKAGING_CACHE, else .cache/packaging in the
# repository (gitignored). Point the variable outside the work tree to keep the
# cache across fresh clones (CI).
#
# The rootfs is debootstrap's minbase plus systemd and dbus, with apt lists
# fetched and the .deb files of portagent's run-time dependencies *downloaded
# but not installed*: each test run installs portagent with apt into a fresh
# overlay of this tree, so apt really resolves the Depends: field, offline.
# The cache key is this file's own hash: edit the lists below and the next run
# rebuilds it (about two minutes); otherwise it is reused as is.
set -euo pipefail

SUITE=bookworm
MIRROR=${PORTAGENT_DEBIAN_MIRROR:-http://deb.debian.org/debian}
BOOT_PACKAGES=systemd,systemd-sysv,dbus,libpam-systemd,iproute2
# What portagent's Depends: will pull in (kept in step with packaging/debian/control).
DEPENDS="python3 python3-grpcio python3-protobuf python3-nftables python3-pyroute2 python3-psutil
python3-systemd python3-cryptography nftables adduser"

here=$(cd "$(dirname "$0")" && pwd)
cache=${1:-${PORTAGENT_PACKAGING_CACHE:-$here/../../.cache/packaging}}
mkdir -p "$cache"
cache=$(cd "$cache" && pwd)
key=$(sha256sum "$0" | cut -c1-12)
root=$cache/rootfs-$SUITE-$key

if [[ -f $root/.portagent-rootfs-ready ]]; then
	echo "$root"
	exit 0
fi

[[ $(id -u) == 0 ]] || { echo "rootfs.sh: run as root" >&2; exit 1; }
# One builder at a time; a second one waits and then finds the rootfs ready.
exec 9>"$cache/.rootfs.lock"
flock -w 900 9 || { echo "rootfs.sh: timed out waiting for $cache/.rootfs.lock" >&2; exit 1; }
if [[ -f $root/.portagent-rootfs-ready ]]; then
	echo "$root"
	exit 0
fi
tmp=$root.tmp
rm -rf "$tmp"
trap 'rm -rf "$tmp"' EXIT
echo "rootfs.sh: debootstrap $SUITE into $tmp (cold cache, ~2 min)" >&2
timeout 900 debootstrap --variant=minbase --include="$BOOT_PACKAGES" "$SUITE" "$tmp" "$MIRROR" >&2

# apt inside the rootfs: same mirror, plus security updates; keep downloaded .debs.
cat >"$tmp/etc/apt/sources.list" <<SOURCES
deb $MIRROR $SUITE main
deb $MIRROR $SUITE-updates main
deb ${MIRROR%/debian}/debian-security $SUITE-security main
SOURCES
echo 'APT::Keep-Downloaded-Packages "true";' >"$tmp/etc/apt/apt.conf.d/90keep"
rm -f "$tmp/etc/apt/apt.conf.d/docker-clean"
# Boot quietly and fast: no getty on the console, no machine-id churn.
echo portagent-test >"$tmp/etc/hostname"
: >"$tmp/etc/machine-id"
ln -sf /dev/null "$tmp/etc/systemd/system/console-getty.service"
ln -sf /dev/null "$tmp/etc/systemd/system/getty@.service"
ln -sf /dev/null "$tmp/etc/systemd/system/systemd-networkd-wait-online.service"

# Name resolution inside: the host's view (its /etc/hosts may map the mirror).
timeout 600 systemd-nspawn -q -D "$tmp" --register=no --keep-unit \
	--bind-ro=/etc/hosts --bind-ro=/etc/resolv.conf --setenv=DEBIAN_FRONTEND=noninteractive \
	/bin/sh -c "apt-get update -qq && apt-get install -y -qq --download-only --no-install-recommends $(echo $DEPENDS)" >&2
apt_clean_marker=$(find "$tmp/var/cache/apt/archives" -name '*.deb' | wc -l)
echo "rootfs.sh: $apt_clean_marker packages cached for offline install" >&2

touch "$tmp/.portagent-rootfs-ready"
trap - EXIT
# Drop older generations of the cache, then publish atomically.
find "$cache" -maxdepth 1 -name "rootfs-$SUITE-*" ! -name "rootfs-$SUITE-$key*" -exec rm -rf {} +
mv "$tmp" "$root"
echo "$root"
