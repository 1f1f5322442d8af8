#!/usr/bin/env bash
# `make deb`: build reconciler_<version>_amd64.deb in the top directory with
# dh-virtualenv (debian/rules), then check it with lintian (errors fail the
# build; the warnings left are listed, and the overridden tags are explained
# in debian/reconciler.lintian-overrides). As root on Debian, the build tools
# are installed with apt-get when missing (as tests/system-deps.sh does);
# otherwise one line says what to install.
set -euo pipefail
cd "$(dirname "$0")/.."

tools=(dpkg-dev debhelper dh-virtualenv python3-venv lintian)
missing=()
for pkg in "${tools[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q '^install ok installed$' || missing+=("$pkg")
done
if [[ ${#missing[@]} -gt 0 ]]; then
  if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
    echo "make deb: installing ${missing[*]}" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
  else
    echo "make deb: building the package needs ${missing[*]} — run 'sudo apt-get install ${missing[*]}' (or make deb as root on Debian 12)" >&2
    exit 1
  fi
fi

# One version: pyproject's, with the Debian revision of debian/changelog.
upstream=$(sed -n 's/^version = "\(.*\)"$/\1/p' pyproject.toml)
version=$(dpkg-parsechangelog -S Version)
if [[ ${version%-*} != "$upstream" ]]; then
  echo "make deb: debian/changelog says $version but pyproject.toml says $upstream — add a changelog entry with 'dch -v $upstream-1'" >&2
  exit 1
fi
arch=$(dpkg --print-architecture)
deb=reconciler_${version}_${arch}.deb

# Build from a copy of the files git tracks (and new files not ignored): no
# .venv, caches or earlier builds in the package's source.
work=build/deb
src=$work/reconciler-$upstream
rm -rf "$work"
mkdir -p "$src"
git ls-files -z --cached --others --exclude-standard \
  | while IFS= read -r -d '' f; do [[ -e $f ]] && printf '%s\0' "$f"; done \
  | tar --null -T - -cf - | tar -xf - -C "$src"

(cd "$src" && dpkg-buildpackage -b -us -uc)
mv "$work/$deb" "./$deb"
echo "make deb: built ./$deb ($(du -h "$deb" | cut -f1), installed $(dpkg-deb -f "$deb" Installed-Size) KiB)"

# lintian: errors fail; the remaining warnings are printed.
lintian --fail-on error --no-tag-display-limit "$deb"
