#!/bin/bash
# Build (once) and cache a bookworm rootfs for the packaging test.
#
#   tests/packaging/rootfs.sh [CACHE_DIR]     prints the rootfs path on stdout
#   tests/packaging/rootfs.sh --print-mirrors the Debian and security mirrors it uses
#
# CACHE_DIR defaults to $PORTAGENT_PACKAGING_CACHE, else .cache/packaging in the
# repository (gitignored). Point the variable outside the work tree to keep the
# cache across fresh clones (CI).
#
# The rootfs is debootstrap's minbase plus systemd and dbus, with apt lists
# fetched and the .deb files of the run-time dependencies of portagent's packages
# *downloaded but not installed*: each test run installs the packages with apt into
# a fresh overlay of this tree, so apt really resolves the Depends: fields, offline.
# The cache key is this file's own hash plus the mirrors: edit the lists below (or
# move the host to another mirror) and the next run rebuilds it (about two
# minutes); otherwise it is reused as is.
#
# The Debian mirror is the host's own (its apt sources, deb822 *.sources or
# classic *.list), so a machine that can only reach a local mirror or proxy still
# builds; PORTAGENT_DEBIAN_MIRROR overrides it (security updates then come from
# the same host's debian-security).
set -euo pipefail

SUITE=bookworm
APT_ETC=${PORTAGENT_APT_ETC:-/etc/apt}   # tests point this at sample sources
# Debian suite names, to tell the host's Debian entries from third-party ones
# (nodesource, cloud SDKs) when the host runs another release than $SUITE.
DEBIAN_SUITES=" buster bullseye bookworm trixie forky sid oldstable stable testing unstable "

# Print "URI SUITE" for every enabled binary (deb) http(s) source of the host that
# looks like the Debian archive (component main; signed by Debian's archive keyring
# or by no key of its own: third-party repositories such as Docker's also call
# their suite "bookworm"), in apt's reading order: sources.list, then
# sources.list.d/ alphabetically.
host_sources() {
	local f
	[[ -f $APT_ETC/sources.list ]] && set -- "$APT_ETC/sources.list" || set --
	for f in "$APT_ETC"/sources.list.d/*; do
		[[ -f $f ]] && set -- "$@" "$f"
	done
	for f in "$@"; do
		case $f in
		*.list)
			# One-line style: deb [option=value ...] URI SUITE COMPONENT...
			awk '{
				sub(/#.*/, ""); if ($1 != "deb") next
				opts = ""; i = 2
				if ($2 ~ /^\[/) { for (; i <= NF; i++) { opts = opts " " $i; if ($i ~ /\]$/) { i++; break } } }
				uri = $i; suite = $(i + 1); comps = ""
				for (j = i + 2; j <= NF; j++) comps = comps " " $j
				if (comps ~ / main( |$)/ && (opts !~ /signed-by=/ || opts ~ /debian-archive/)) print uri, suite
			}' "$f" ;;
		*.sources)
			# deb822: stanzas separated by blank lines.
			awk '
				function flush(   i, j, nu, ns, u, s) {
					if (f["types"] ~ /(^| )deb( |$)/ && tolower(f["enabled"]) != "no" &&
					    f["components"] ~ /(^| )main( |$)/ &&
					    (f["signed-by"] == "" || f["signed-by"] ~ /debian-archive/)) {
						nu = split(f["uris"], u, " "); ns = split(f["suites"], s, " ")
						for (i = 1; i <= nu; i++) for (j = 1; j <= ns; j++) print u[i], s[j]
					}
					delete f
				}
				/^[ \t]*#/ { next }
				/^[ \t]*$/ { flush(); next }
				/^[ \t]/ { next }   # continuation line (an inline Signed-By key block)
				{ line = $0; sub(/^[^:]*:[ \t]*/, "", line); key = tolower($1); sub(/:$/, "", key); f[key] = line }
				END { flush() }
			' "$f" ;;
		esac
	done | awk '$1 ~ /^https?:\/\//'
}

# The host's URI for suite $1 (bookworm or bookworm-security): the entry for
# exactly that suite, else the first Debian entry of the same kind (a trixie host's
# mirror serves bookworm too); empty when the host has none.
host_uri() {
	local want=$1 uri suite kind
	local sources
	sources=$(host_sources)
	while read -r uri suite; do
		[[ $suite == "$want" ]] && { echo "${uri%/}"; return; }
	done <<<"$sources"
	kind=${want#"$SUITE"}    # "" or "-security"
	while read -r uri suite; do
		[[ $suite == *"$kind" ]] || continue
		[[ $DEBIAN_SUITES == *" ${suite%"$kind"} "* ]] && { echo "${uri%/}"; return; }
	done <<<"$sources"
	return 0   # none: the caller falls back
}

if [[ -n ${PORTAGENT_DEBIAN_MIRROR:-} ]]; then
	MIRROR=${PORTAGENT_DEBIAN_MIRROR%/}
	SECURITY=${MIRROR%/debian}/debian-security
else
	MIRROR=$(host_uri "$SUITE")
	MIRROR=${MIRROR:-http://deb.debian.org/debian}
	SECURITY=$(host_uri "$SUITE-security")
	SECURITY=${SECURITY:-${MIRROR%/debian}/debian-security}
fi
if [[ ${1:-} == --print-mirrors ]]; then
	echo "$MIRROR"
	echo "$SECURITY"
	exit 0
fi
BOOT_PACKAGES=systemd,systemd-sysv,dbus,libpam-systemd,iproute2
# What the Depends: of the four binary packages pull in (kept in step with
# packaging/debian/control): python3-portagent-wire needs python3-grpcio, -protobuf and
# -cryptography; portagent-broker also the service's python3-starlette, -uvicorn,
# -sqlalchemy, -alembic, -psycopg and PyJWT (python3-jwt; cedarpy is in the package, its
# libc6 and libgcc-s1 are in minbase); portagent also nftables, python3-nftables,
# -pyroute2, -psutil and -systemd (and systemd-sysusers, from systemd: in BOOT_PACKAGES);
# portagent-request only python3.
DEPENDS="python3 python3-grpcio python3-protobuf python3-cryptography
python3-starlette python3-uvicorn python3-sqlalchemy python3-alembic python3-psycopg python3-psycopg2
python3-jwt python3-nftables python3-pyroute2 python3-psutil python3-systemd nftables adduser"

here=$(cd "$(dirname "$0")" && pwd)
cache=${1:-${PORTAGENT_PACKAGING_CACHE:-$here/../../.cache/packaging}}
mkdir -p "$cache"
cache=$(cd "$cache" && pwd)
key=$( { cat "$0"; echo "$MIRROR $SECURITY"; } | sha256sum | cut -c1-12)
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
echo "rootfs.sh: debootstrap $SUITE from $MIRROR (security: $SECURITY) into $tmp (cold cache, ~2 min)" >&2
timeout 900 debootstrap --variant=minbase --include="$BOOT_PACKAGES" "$SUITE" "$tmp" "$MIRROR" >&2

# apt inside the rootfs: same mirror, plus security updates; keep downloaded .debs.
cat >"$tmp/etc/apt/sources.list" <<SOURCES
deb $MIRROR $SUITE main
deb $MIRROR $SUITE-updates main
deb $SECURITY $SUITE-security main
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
