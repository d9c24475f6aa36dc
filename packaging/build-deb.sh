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
# package (.dsc, .orig.tar.gz, .debian.tar.xz) and its three arch:all .debs:
# portagent (the agent), portagent-broker and python3-portagent-wire (the code
# both share). lintian must report no error and no warning on any of them
# (overrides: packaging/debian/*.lintian-overrides, each justified in a comment).
# The last lines on stdout are the three .deb paths, one a line.
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
cp -a packaging/debian "$build/$tree/debian"

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
for package in portagent portagent-broker python3-portagent-wire; do
	deb=${package}_${debversion}_all.deb
	[[ -f $build/$deb ]] || { echo "build-deb: $deb was not built" >&2; exit 1; }
	debs+=("$out/$deb")
done
for f in "$build"/*; do
	[[ $f == *.orig.tar.gz || $f == *.dsc || $f == *.debian.tar.* || $f == *.deb || $f == *.changes ||
		$f == *.buildinfo ]] && cp "$f" "$out/"
done
printf '%s\n' "${debs[@]}"
