#!/bin/bash
# Build the portagent Debian source and binary packages, then run lintian.
#
#   packaging/build-deb.sh [OUT_DIR]        (default: dist/)
#
# The repository root stays a plain Python project: this script assembles a
# Debian build tree under build/deb/ from the project's files (tracked and
# untracked-but-not-ignored, so generated code never leaks in), writes the
# upstream tarball portagent_VERSION.orig.tar.gz, adds packaging/debian/ as
# debian/ and runs dpkg-buildpackage. The result is a proper 3.0 (quilt) source
# package (.dsc, .orig.tar.gz, .orig-vendor.tar.gz, .debian.tar.xz) and its four
# .debs: portagent (the agent), python3-portagent-wire (the code agent and broker
# share), portagent-request (the requester's client; all three arch:all) and
# portagent-broker (amd64: it carries cedarpy's compiled module). lintian must report
# no error and no warning on any of them (overrides: packaging/debian/*.lintian-overrides,
# each justified in a comment). The last lines on stdout are the four .deb paths, one a
# line.
#
# cedarpy is not in Debian: its wheels, pinned by SHA-256 in packaging/vendor-wheels.sha256,
# are downloaded once with pip (network needed the first time), cached in
# .cache/vendor-wheels/ and shipped in the source package as its second upstream tarball
# (component "vendor"), so the .dsc builds offline; debian/rules checks them again and
# unpacks them into the broker's package.
set -euo pipefail
# Debian's toolchain and Debian's python3 only (not a pyenv or a venv on PATH).
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
unset PYTHONPATH VIRTUAL_ENV PYTHONHOME

repo=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-$repo/dist}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$repo"
for f in README.md CHANGELOG.md docs/operations.md; do
	[[ -f $f ]] || { echo "build-deb: $f is missing (the package ships it)" >&2; exit 1; }
done

upstream=$(python3 -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')
debversion=$(dpkg-parsechangelog -l packaging/debian/changelog -S Version)
if [[ ${debversion%-*} != "$upstream" ]]; then
	echo "build-deb: packaging/debian/changelog is at $debversion, pyproject.toml at $upstream" >&2
	exit 1
fi
if ! grep -q "^## \[$upstream\]" CHANGELOG.md; then
	echo "build-deb: CHANGELOG.md has no '## [$upstream]' section" >&2
	exit 1
fi

# The maintainer (docs/adr/0004-packaging.md): PORTAGENT_MAINTAINER="Name <local@domain>",
# else Debian's DEBFULLNAME + DEBEMAIL (DEBEMAIL may hold "Name <addr>" itself); unset,
# packaging/debian/control's placeholder stands. It lands in the control file and in the
# changelog trailers, so it must be one "Name <local@domain>" and nothing else.
placeholder='portagent developers <portagent@example.org>'
maintainer=${PORTAGENT_MAINTAINER:-}
if [[ -z $maintainer && -n ${DEBEMAIL:-} ]]; then
	if [[ $DEBEMAIL == *'<'* ]]; then
		maintainer=$DEBEMAIL
	elif [[ -n ${DEBFULLNAME:-} ]]; then
		maintainer="$DEBFULLNAME <$DEBEMAIL>"
	else
		echo "build-deb: DEBEMAIL is set but DEBFULLNAME is not (or set PORTAGENT_MAINTAINER=\"Name <local@domain>\")" >&2
		exit 1
	fi
fi
if [[ -n $maintainer ]]; then
	name_re='[^<>,[:cntrl:]]*[^<>,[:space:][:cntrl:]]'
	addr_re='[^<>@,[:space:][:cntrl:]]+@[^<>@,[:space:][:cntrl:]]+\.[^<>@,[:space:][:cntrl:]]+'
	if [[ $maintainer == *$'\n'* || ! $maintainer =~ ^[^[:space:]]${name_re}\ \<${addr_re}\>$ ]]; then
		printf 'build-deb: maintainer %q: expected one line "Name <local@domain>" (from %s)\n' \
			"$maintainer" "$([[ -n ${PORTAGENT_MAINTAINER:-} ]] && echo PORTAGENT_MAINTAINER || echo DEBFULLNAME/DEBEMAIL)" >&2
		exit 1
	fi
	echo "build-deb: maintainer $maintainer" >&2
fi

# The vendored wheels: each pinned file from the cache, else downloaded; never used
# unless its SHA-256 is the pinned one.
pins=packaging/vendor-wheels.sha256
wheels=$repo/.cache/vendor-wheels
mkdir -p "$wheels"
sha256_of() { sha256sum "$1" | cut -d' ' -f1; }
while read -r want wheel; do
	[[ -f $wheels/$wheel && $(sha256_of "$wheels/$wheel") == "$want" ]] && continue
	# cedarpy-4.12.2-cp311-cp311-manylinux...whl: name, version and CPython version from the name.
	IFS=- read -r name version tag _ <<<"$wheel"
	[[ $tag =~ ^cp3([0-9]+)$ ]] || { echo "build-deb: $pins: $wheel is not a cp3XX wheel" >&2; exit 1; }
	pyversion=3.${BASH_REMATCH[1]}
	python3 -m pip --version >/dev/null 2>&1 || {
		echo "build-deb: $wheel is not in $wheels and python3 -m pip is missing (apt install python3-pip)" >&2
		exit 1; }
	echo "build-deb: downloading $name==$version for CPython $pyversion (pinned in $pins)" >&2
	tmp=$(mktemp -d)
	timeout 300 python3 -m pip download --quiet --disable-pip-version-check --no-deps \
		--only-binary=:all: --platform manylinux2014_x86_64 --python-version "$pyversion" \
		--implementation cp --dest "$tmp" "$name==$version" >&2 || {
		rm -rf "$tmp"
		echo "build-deb: pip could not download $name==$version (the first build needs network access to PyPI)" >&2
		exit 1; }
	if [[ ! -f $tmp/$wheel ]]; then
		echo "build-deb: pip downloaded $(ls "$tmp"), not $wheel" >&2
		rm -rf "$tmp"; exit 1
	fi
	got=$(sha256_of "$tmp/$wheel")
	if [[ $got != "$want" ]]; then
		rm -rf "$tmp"
		echo "build-deb: SHA-256 mismatch for $wheel: downloaded $got, $pins pins $want; not used" >&2
		exit 1
	fi
	mv "$tmp/$wheel" "$wheels/$wheel"
	rm -rf "$tmp"
done < <(grep -v -e '^#' -e '^[[:space:]]*$' "$pins")

# Reproducible: every timestamp is the changelog's.
SOURCE_DATE_EPOCH=$(dpkg-parsechangelog -l packaging/debian/changelog -S Timestamp)
export SOURCE_DATE_EPOCH

build=$repo/build/deb
rm -rf "$build"
mkdir -p "$build"
tree=portagent-$upstream

# The upstream tree: the project's own files, without the Debian directory.
git ls-files -z --cached --others --exclude-standard |
	grep -zv -e '^packaging/debian/' -e '^\.ci/' |
	sort -z >"$build/files"
tar --create --no-recursion --sort=name --mtime="@$SOURCE_DATE_EPOCH" --owner=0 --group=0 \
	--numeric-owner --mode='u+rw,go+r,go-w' --transform="s,^,$tree/," \
	--null --files-from="$build/files" |
	gzip -n -9 >"$build/portagent_$upstream.orig.tar.gz"
tar -xzf "$build/portagent_$upstream.orig.tar.gz" -C "$build"
# The wheels: the upstream tarball of component "vendor" (unpacked as vendor/ in the tree).
grep -v -e '^#' -e '^[[:space:]]*$' "$pins" | cut -d' ' -f3 | sort |
	tar --create --sort=name --mtime="@$SOURCE_DATE_EPOCH" --owner=0 --group=0 --numeric-owner \
		--mode=0644 -C "$wheels" --transform='s,^,vendor/,' --files-from=- |
	gzip -n -9 >"$build/portagent_$upstream.orig-vendor.tar.gz"
tar -xzf "$build/portagent_$upstream.orig-vendor.tar.gz" -C "$build/$tree"
cp -a packaging/debian "$build/$tree/debian"
if [[ -n $maintainer ]]; then
	# Literal replacement (no sed: a name may hold & or /): the Maintainer line, and the
	# changelog trailers that carry the placeholder.
	python3 - "$build/$tree/debian" "$placeholder" "$maintainer" <<'PY'
import pathlib, sys
debian, old, new = pathlib.Path(sys.argv[1]), sys.argv[2], sys.argv[3]
control = debian / "control"
text = control.read_text()
line = "Maintainer: " + old + "\n"
if text.count(line) != 1:
    sys.exit(f"build-deb: {control}: no line {line.strip()!r} to replace")
control.write_text(text.replace(line, "Maintainer: " + new + "\n"))
changelog = debian / "changelog"
lines = changelog.read_text().splitlines(keepends=True)
trailer = " -- " + old + "  "
changelog.write_text("".join(
    " -- " + new + "  " + x[len(trailer):] if x.startswith(trailer) else x for x in lines
))
PY
fi

echo "build-deb: dpkg-buildpackage in $build/$tree" >&2
(cd "$build/$tree" && dpkg-buildpackage --no-sign --build=full -j2) >"$build/build.log" 2>&1 || {
	tail -60 "$build/build.log" >&2
	echo "build-deb: dpkg-buildpackage failed; full log in $build/build.log" >&2
	exit 1
}
grep -E '^import-check:|^portagentd ' "$build/build.log" >&2 || true

changes=$build/portagent_${debversion}_amd64.changes
[[ -f $changes ]] || changes=$(ls "$build"/portagent_"$debversion"_*.changes | head -1)
echo "build-deb: lintian $(basename "$changes")" >&2
# Errors and warnings fail the build; info and pedantic tags are shown, not fatal.
lintian --fail-on error,warning --display-info --info "$changes" | tee "$build/lintian.log" >&2 || {
	echo "build-deb: lintian reported errors or warnings (see above)" >&2
	exit 1
}

debs=()
for package in portagent portagent-broker portagent-request python3-portagent-wire; do
	arch=all
	[[ $package == portagent-broker ]] && arch=amd64
	deb=${package}_${debversion}_$arch.deb
	[[ -f $build/$deb ]] || { echo "build-deb: $deb was not built" >&2; exit 1; }
	debs+=("$out/$deb")
done
for f in "$build"/*; do
	[[ $f == *.orig.tar.gz || $f == *.orig-vendor.tar.gz || $f == *.dsc || $f == *.debian.tar.* || $f == *.deb || $f == *.changes ||
		$f == *.buildinfo ]] && cp "$f" "$out/"
done
printf '%s\n' "${debs[@]}"
