#!/bin/bash
# Prove the README's set-up on a clean Debian 12 root: nothing installed by hand
# on this machine may make it pass.
#
#   scripts/clean-root-check.sh [TREE-ISH]      (root; `make test-clean-root`)
#
# TREE-ISH defaults to HEAD. To check uncommitted changes of tracked files:
#   scripts/clean-root-check.sh "$(git stash create)"
#
# How: the packaging test's cached bookworm rootfs (tests/packaging/rootfs.sh:
# debootstrap minbase + systemd, no make, no python) under a throwaway overlay;
# `git archive TREE-ISH` unpacked at /root/portagent (no .venv, no .cache, no
# generated *_pb2.py); then, in a non-booted `systemd-nspawn --pipe --as-pid2`
# that shares this machine's network (to reach the package registries), as root,
# the commands of the README's "Quick start" block verbatim, then `make proto-lint`.
# Namespace tests inside create their own network namespaces, exactly as on a
# host; nothing here touches this machine's firewall.
#
# Only downloads are cached between runs (apt archives and lists, pip's HTTP
# cache, npm's cache, under $PORTAGENT_PACKAGING_CACHE/clean-root-cache), never
# build results: pip's wheel cache stays in the overlay, so a missing build
# dependency (libsystemd-dev, pkg-config, gcc) fails on every run, not only the
# first. The container reaches the same registries as this machine: its pip
# configuration files (and the local paths they name), PIP_* and proxy
# variables, its CA bundle, npm's registry and apt's proxy are passed in.
#
# Exit status: 0 when every command passed; the in-container log is kept at
# $PORTAGENT_PACKAGING_CACHE/clean-root-last.log.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
rev=${1:-HEAD}
: "${CLEAN_ROOT_TIMEOUT:=2400}"   # seconds for everything inside the container

say() { echo "clean-root: $*" >&2; }
die() { say "$*"; exit 2; }

[[ $(id -u) == 0 ]] || die "run as root (overlay mount, systemd-nspawn)"
for tool in systemd-nspawn debootstrap git; do
	command -v "$tool" >/dev/null || die "missing $tool (make test-clean-root installs it)"
done
tree=$(git -C "$repo" rev-parse --verify --quiet "$rev^{tree}") || die "not a tree: $rev"

cache=${PORTAGENT_PACKAGING_CACHE:-$repo/.cache/packaging}
mkdir -p "$cache"
cache=$(cd "$cache" && pwd)
downloads=$cache/clean-root-cache
log=$cache/clean-root-last.log

# One check at a time per cache (they share the download caches).
exec 8>"$cache/.clean-root.lock"
flock -w 3600 8 || die "timed out waiting for $cache/.clean-root.lock"

# A run killed before its clean-up (SIGKILL) left its overlay mounted: undo it.
for stale in "$cache"/clean-root-run-*; do
	[[ -d $stale ]] || continue
	if mountpoint -q "$stale/merged"; then
		umount "$stale/merged" 2>/dev/null || umount --lazy "$stale/merged"
	fi
	rm -rf "$stale"
done

start=$SECONDS
base=$(bash "$repo/tests/packaging/rootfs.sh" "$cache")
say "base rootfs $base ($((SECONDS - start)) s)"

run=$(mktemp -d "$cache/clean-root-run-XXXXXX")
merged=$run/merged
nspawn_pid=
cleanup() {
	local rc=$?
	trap - EXIT INT TERM
	if [[ -n $nspawn_pid ]] && kill -0 "$nspawn_pid" 2>/dev/null; then
		# SIGTERM ends the container (and with its pid namespace every process in it).
		kill -TERM "$nspawn_pid" 2>/dev/null || true
		for _ in $(seq 100); do kill -0 "$nspawn_pid" 2>/dev/null || break; sleep 0.2; done
		kill -KILL "$nspawn_pid" 2>/dev/null || true
		wait "$nspawn_pid" 2>/dev/null || true
	fi
	if mountpoint -q "$merged"; then
		for _ in $(seq 50); do umount "$merged" 2>/dev/null && break; sleep 0.1; done
		mountpoint -q "$merged" && umount --lazy "$merged"
	fi
	rm -rf "$run"
	rmdir "/run/systemd/nspawn/propagate/${run##*/}" 2>/dev/null || true
	exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

mkdir -p "$run/upper" "$run/work" "$merged"
mount -t overlay overlay -o "lowerdir=$base,upperdir=$run/upper,workdir=$run/work" "$merged"

# The clean clone: tracked files of TREE-ISH only.
mkdir -p "$merged/root/portagent"
git -C "$repo" archive --format=tar "$tree" | tar -x -C "$merged/root/portagent"

# The README's own set-up: the first ```sh block after "## Quick start", verbatim,
# each line announced and timed.
quickstart=$(awk '/^## Quick start/ { q = 1; next }
	q && /^```sh/ { b = 1; next }
	b && /^```/ { exit }
	b' "$merged/root/portagent/README.md")
[[ -n $quickstart ]] || die "README.md has no \"## Quick start\" \`\`\`sh block"
script=$run/check.sh
{
	echo 'set -euo pipefail'
	echo 'cd /root/portagent'
	while IFS= read -r line; do
		[[ $line =~ ^[[:space:]]*(#.*)?$ ]] && continue
		printf 'echo %q; t=$SECONDS\n' "clean-root: \$ $line"
		printf '%s\n' "$line"
		printf 'echo "clean-root: ok ($((SECONDS - t)) s)"\n'
	done <<<"$quickstart"
	# buf from npm: proves the Makefile installs npm where it is missing.
	printf 'echo %q; t=$SECONDS\n' "clean-root: \$ make proto-lint"
	echo 'make proto-lint'
	printf 'echo "clean-root: ok ($((SECONDS - t)) s)"\n'
} >"$script"

# ---- what the container needs to reach this machine's registries ------------------
args=(-q -D "$merged" --machine="${run##*/}" --register=no --keep-unit --pipe --as-pid2
	--capability=CAP_NET_ADMIN   # nspawn drops it when sharing the network; netns tests need it
	--bind-ro=/etc/hosts --bind-ro=/etc/resolv.conf
	--bind-ro="$script:/run/clean-root/check.sh"
	--setenv=LANG=C.UTF-8 --setenv=HOME=/root)

# Download caches only (see the header: no wheel cache).
mkdir -p "$downloads"/{apt-archives/partial,apt-lists/partial,pip-http,pip-http-v2,npm}
args+=(--bind="$downloads/apt-archives:/var/cache/apt/archives"
	--bind="$downloads/apt-lists:/var/lib/apt/lists"
	--bind="$downloads/pip-http:/root/.cache/pip/http"
	--bind="$downloads/pip-http-v2:/root/.cache/pip/http-v2"
	--bind="$downloads/npm:/root/.npm")

declare -A bound=()
bind_ro() {   # bind a host path read-only at the same path inside, once
	[[ -e $1 && -z ${bound[$1]:-} ]] || return 0
	bound[$1]=1
	args+=(--bind-ro="$1")
}
# Local paths a pip setting names (find-links, file:// indexes, constraints):
# bound at the same path. A file:// index's parent goes in whole: its pages link
# to the files beside it (../files/). System trees stay the container's own; the
# CA bundle is passed below.
bind_named_paths() {
	local path
	while read -r path; do
		if [[ $path == file://* ]]; then
			path=${path#file://}
			path=${path%/}
			path=${path%/*}
		fi
		path=${path%/}
		case $path in
		/ | /etc | /etc/ssl* | /usr* | /proc* | /sys* | /dev* | /run* | /var | /root | /tmp) continue ;;
		esac
		bind_ro "$path"
	done < <(grep -oE '(file://)?/[^[:space:]"'"'"',;]+' || true)
}

pip_configs=(/etc/xdg/pip/pip.conf /etc/pip.conf "$HOME/.pip/pip.conf" "$HOME/.config/pip/pip.conf")
[[ -n ${PIP_CONFIG_FILE:-} && $PIP_CONFIG_FILE != /dev/null ]] && pip_configs+=("$PIP_CONFIG_FILE")
for conf in "${pip_configs[@]}"; do
	[[ -f $conf ]] || continue
	case $conf in
	"$HOME"/*) args+=(--bind-ro="$conf:/root/${conf#"$HOME"/}") ;;   # the container's HOME is /root
	*) bind_ro "$conf" ;;
	esac
	bind_named_paths <"$conf"
done

# The host's CA bundle (a proxy that re-signs TLS needs it), for pip and npm.
ca=
for candidate in "${PIP_CERT:-}" "${SSL_CERT_FILE:-}" "${REQUESTS_CA_BUNDLE:-}" \
	/etc/ssl/certs/ca-certificates.crt; do
	[[ -n $candidate && -f $candidate ]] && { ca=$candidate; break; }
done
if [[ -n $ca ]]; then
	args+=(--bind-ro="$ca:/run/clean-root/ca.crt" --setenv=PIP_CERT=/run/clean-root/ca.crt
		--setenv=NODE_EXTRA_CA_CERTS=/run/clean-root/ca.crt)
fi
while IFS='=' read -r name value; do
	case $name in
	PIP_CERT | PIP_CONFIG_FILE) ;;   # handled above
	PIP_* | http_proxy | https_proxy | no_proxy | all_proxy | HTTP_PROXY | HTTPS_PROXY | NO_PROXY | ALL_PROXY)
		args+=(--setenv="$name=$value")
		bind_named_paths <<<"$value" ;;
	esac
done < <(env)

# npm: a registry other than npm's default.
if command -v npm >/dev/null; then
	registry=$(timeout 30 npm config get registry 2>/dev/null || true)
	if [[ -n $registry && $registry != https://registry.npmjs.org/ ]]; then
		args+=(--setenv="npm_config_registry=$registry")
	fi
fi
# apt: the host's proxy settings, if any.
# (apt-config dump prints them as configuration lines: `Acquire::http::Proxy "...";`)
proxies=$(apt-config dump 2>/dev/null | grep -E '^Acquire::[a-z]+::Proxy( |::)' || true)
if [[ -n $proxies ]]; then
	printf '%s\n' "$proxies" >"$merged/etc/apt/apt.conf.d/99host-proxy"
fi

# ---- run ---------------------------------------------------------------------------
say "checking $rev (tree ${tree:0:12}) in a clean bookworm root; log: $log"
printf '%s\n' "$quickstart" | sed 's/^/clean-root:   /' >&2
checked=$SECONDS
# nspawn 252 complains when /run is not a tmpfs (as on this VM) while it removes
# its propagation directory; harmless, and it would read like a failure.
exec 7> >(grep --line-buffered -v '^Attempted to remove disk file system under "/run/systemd/nspawn/propagate/' |
	tee "$log")
tee_pid=$!
set +e
# /proc/sys/net writable: the daemon turns on conntrack accounting in its namespaces.
# setpriv: nspawn hands its processes every capability as *inheritable* too, which a
# root shell on a real host does not have; with it, dropping a capability from the
# bounding set (as tests do to act like the systemd service) would not drop it.
# In the background, so that the traps run while it lasts.
SYSTEMD_NSPAWN_API_VFS_WRITABLE=network \
	timeout --kill-after=30 "$CLEAN_ROOT_TIMEOUT" \
	systemd-nspawn "${args[@]}" \
	setpriv --inh-caps=-all /bin/bash /run/clean-root/check.sh </dev/null >&7 2>&1 &
nspawn_pid=$!
wait "$nspawn_pid"
rc=$?
nspawn_pid=
set -e
exec 7>&-
wait "$tee_pid" 2>/dev/null || true
if [[ $rc == 0 ]]; then
	say "PASSED in $((SECONDS - checked)) s (total $((SECONDS - start)) s)"
else
	[[ $rc == 124 ]] && say "timed out after $CLEAN_ROOT_TIMEOUT s"
	say "FAILED (exit $rc) after $((SECONDS - checked)) s; last lines of $log:"
	tail -n 25 "$log" | sed 's/^/clean-root: | /' >&2
fi
exit "$rc"
