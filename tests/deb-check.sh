#!/usr/bin/env bash
# CI check of the Debian package (docs/install.md; `make deb-check`, run by
# .ci/run after `make test`, never inside it): build it, install it with
# apt-get, run the installed /usr/bin/reconciler against a git daemon on
# loopback, purge it and check that what remains is what docs/install.md says.
# Needs root. Refuses to run where reconciler is installed (the purge would
# remove it) or where /etc/reconciler exists (an operator's configuration).
set -euo pipefail
cd "$(dirname "$0")/.."
project=$PWD

fail() { echo "deb-check: $*" >&2; exit 1; }
[[ $(id -u) -eq 0 ]] || fail "installs and purges a package — run it as root (CI does)"
if dpkg-query -W -f='${Status}' reconciler 2>/dev/null | grep -q 'installed'; then
  fail "a reconciler package is installed on this machine and this check would purge it — run it on a throwaway machine"
fi
for path in /opt/reconciler /usr/bin/reconciler /etc/reconciler; do
  [[ -e $path || -L $path ]] && fail "$path exists (not from a package): this check would overwrite or remove it — run it on a throwaway machine"
done
# A state directory already there is kept; the purge only removes its caches.
state_existed=0
[[ -e /var/lib/reconciler ]] && state_existed=1

tmp=$(mktemp -d /tmp/deb-check.XXXXXX)
daemon_pid=
installed=0
cleanup() {
  local rc=$?
  [[ -n $daemon_pid ]] && kill -- "-$daemon_pid" 2>/dev/null || true
  if [[ $installed -eq 1 ]]; then
    DEBIAN_FRONTEND=noninteractive apt-get purge -y -qq reconciler >/dev/null 2>&1 || true
  fi
  # What this check put in the directories the purge keeps.
  rm -rf /etc/reconciler "/var/lib/reconciler/backups/deb-check-$$"
  rmdir /var/lib/reconciler/backups 2>/dev/null || true
  [[ $state_existed -eq 0 ]] && rmdir /var/lib/reconciler 2>/dev/null || true
  rm -rf "$tmp"
  exit "$rc"
}
trap cleanup EXIT

step() { printf "\n== deb-check: %s (at %ds)\n" "$*" "$SECONDS"; }

step "build"
make deb
version=$(dpkg-parsechangelog -S Version)
deb=./reconciler_${version}_$(dpkg --print-architecture).deb
[[ -f $deb ]] || fail "make deb did not produce $deb"

step "install $deb"
installed=1
DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$deb"
[[ $(command -v reconciler) == /usr/bin/reconciler ]] || fail "reconciler on PATH is $(command -v reconciler), not /usr/bin/reconciler"
out=$(/usr/bin/reconciler --version)
echo "$out"
[[ $out == "reconciler ${version%-*}" ]] || fail "reconciler --version printed '$out', expected 'reconciler ${version%-*}'"

step "units"
units=(/lib/systemd/system/reconciler*.service /lib/systemd/system/reconciler*.timer)
[[ ${#units[@]} -eq 4 ]] || fail "expected 4 units in /lib/systemd/system, found ${units[*]}"
systemd-analyze verify "${units[@]}"
for unit in /lib/systemd/system/reconciler*.service; do
  grep -q '^ExecStart=/usr/bin/reconciler ' "$unit" || fail "$unit: ExecStart does not run /usr/bin/reconciler"
done
# `systemctl help reconciler.service` opens the unit's Documentation=: the file
# must be there as named (dh_compress once made it install.md.gz), and the
# pages install.md links to must be beside it.
for unit in "${units[@]}"; do
  doc=$(sed -n 's|^Documentation=file:||p' "$unit")
  [[ -n $doc && -f $doc ]] || fail "$unit: Documentation=file:$doc is not installed"
done
for page in $(grep -o '](\([a-z-]*\.md\)' /usr/share/doc/reconciler/install.md | sed 's/^](//' | sort -u); do
  [[ -f /usr/share/doc/reconciler/$page ]] || fail "install.md links to $page, not installed in /usr/share/doc/reconciler"
done
# Nothing enabled (or started) on install.
enabled=$(find /etc/systemd/system -name 'reconciler*' 2>/dev/null)
[[ -z $enabled ]] || fail "units enabled on install: $enabled"

step "state directory"
[[ $(stat -c '%a %U:%G' /var/lib/reconciler) == "700 root:root" ]] || fail "/var/lib/reconciler is $(stat -c '%a %U:%G' /var/lib/reconciler), not 700 root:root"

step "a pull with the installed reconciler from git daemon on 127.0.0.1"
export GIT_AUTHOR_NAME=deb-check GIT_AUTHOR_EMAIL=deb-check@example.com
export GIT_COMMITTER_NAME=deb-check GIT_COMMITTER_EMAIL=deb-check@example.com
mkdir -p "$tmp/work" "$tmp/srv" "$tmp/root"
cp -r hosts templates scripts "$tmp/work/"
git -C "$tmp/work" init -q -b main
git -C "$tmp/work" add -A
git -C "$tmp/work" commit -q -m "example fleet"
git clone -q --bare "$tmp/work" "$tmp/srv/fleet.git"
port=$(/usr/bin/python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
# Its own process group: git daemon forks a child per connection.
setsid git daemon --reuseaddr --base-path="$tmp/srv" --export-all --enable=receive-pack \
  --listen=127.0.0.1 --port="$port" "$tmp/srv" >"$tmp/daemon.log" 2>&1 &
daemon_pid=$!
url=git://127.0.0.1:$port/fleet.git
for _ in $(seq 50); do git ls-remote "$url" >/dev/null 2>&1 && break; sleep 0.1; done
git ls-remote "$url" >/dev/null || fail "git daemon did not come up: $(cat "$tmp/daemon.log")"
cat >"$tmp/config.yaml" <<YAML
repo: $url
branch: main
node: web1
root: $tmp/root
state_dir: $tmp/state
exclude_file: $tmp/exclude
YAML
/usr/bin/reconciler pull --config "$tmp/config.yaml" --root "$tmp/root" --state-dir "$tmp/state"
[[ -s $tmp/root/etc/motd ]] || fail "the pull did not write $tmp/root/etc/motd"
git --git-dir "$tmp/srv/fleet.git" rev-parse -q --verify reports/web1 >/dev/null \
  || fail "the pull pushed no report branch reports/web1"
# The second run is a no-op (exit 0 with --detailed-exitcode: nothing changed).
/usr/bin/reconciler pull --config "$tmp/config.yaml" --root "$tmp/root" --state-dir "$tmp/state" --detailed-exitcode \
  || fail "the second pull was not a no-op (exit $?)"

step "reconciler init finds the package's units"
# The operator's first day (docs/install.md): init writes the configuration
# at the default path the units read, so it has no install-units step.
init_out=$(/usr/bin/reconciler init --repo "$url" --node web1 --root "$tmp/root" --state-dir "$tmp/state")
echo "$init_out"
[[ -f /etc/reconciler/config.yaml ]] || fail "reconciler init wrote no /etc/reconciler/config.yaml"
grep -q 'install-units' <<<"$init_out" && fail "reconciler init asks for install-units although the package installed the units"
grep -q 'systemctl enable --now reconciler-boot.service' <<<"$init_out" || fail "reconciler init does not say which units to enable"

step "upgrade"
# The same files under a higher version: the maintainer scripts' upgrade path
# (prerm upgrade removes the byte code, postinst compiles it again).
dpkg-deb -R "$deb" "$tmp/next"
sed -i "s/^Version: .*/Version: ${version}+check1/" "$tmp/next/DEBIAN/control"
dpkg-deb --root-owner-group -b "$tmp/next" "$tmp/reconciler_next.deb" >/dev/null
config_sum=$(sha256sum /etc/reconciler/config.yaml)
DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$tmp/reconciler_next.deb"
[[ $(dpkg-query -W -f='${Version}' reconciler) == "${version}+check1" ]] || fail "the upgrade did not install ${version}+check1"
[[ $(/usr/bin/reconciler --version) == "reconciler ${version%-*}" ]] || fail "reconciler --version fails after the upgrade"
[[ $(sha256sum /etc/reconciler/config.yaml) == "$config_sum" ]] || fail "the upgrade changed /etc/reconciler/config.yaml"
[[ $(stat -c '%a' /var/lib/reconciler) == 700 ]] || fail "the upgrade changed the mode of /var/lib/reconciler"
[[ -n $(find /opt/reconciler -name '*.pyc' -print -quit) ]] || fail "postinst compiled no byte code"

# What an operator and the agent would have left besides init's
# configuration: a run's backups, a cache.
mkdir -p "/var/lib/reconciler/backups/deb-check-$$/files" /var/lib/reconciler/jinja-cache
echo old >"/var/lib/reconciler/backups/deb-check-$$/files/probe"
echo cache >/var/lib/reconciler/jinja-cache/probe

# The operator enables units (offline: systemctl only makes the links).
systemctl enable reconciler-boot.service reconciler-pull.timer
[[ -L /etc/systemd/system/timers.target.wants/reconciler-pull.timer ]] || fail "systemctl enable made no link for reconciler-pull.timer"

step "remove"
DEBIAN_FRONTEND=noninteractive apt-get remove -y -q reconciler
for path in /opt/reconciler /usr/bin/reconciler /lib/systemd/system/reconciler.service /usr/share/doc/reconciler; do
  [[ -e $path || -L $path ]] && fail "$path remains after remove"
done
for path in /etc/reconciler/config.yaml.example /etc/reconciler/config.yaml /var/lib/reconciler/jinja-cache/probe; do
  [[ -e $path ]] || fail "remove took $path (only purge may)"
done

step "purge"
DEBIAN_FRONTEND=noninteractive apt-get purge -y -q reconciler
installed=0
dpkg-query -W -f='${Status}' reconciler 2>/dev/null | grep -q 'installed' && fail "reconciler is still installed after purge"
# Gone: everything the package shipped or made for itself (docs/install.md).
for path in /opt/reconciler /usr/bin/reconciler /lib/systemd/system/reconciler.service \
  /lib/systemd/system/reconciler-boot.service /lib/systemd/system/reconciler-pull.service \
  /lib/systemd/system/reconciler-pull.timer /etc/reconciler/config.yaml.example \
  /usr/share/doc/reconciler /var/lib/reconciler/jinja-cache; do
  [[ -e $path || -L $path ]] && fail "$path remains after purge"
done
enabled=$(find /etc/systemd/system -name 'reconciler*' 2>/dev/null)
[[ -z $enabled ]] || fail "links to the removed units remain after purge: $enabled"
# Kept: the operator's configuration and the backups (no data is ever lost).
[[ -f /etc/reconciler/config.yaml ]] || fail "purge removed /etc/reconciler/config.yaml (the operator's file)"
[[ -f /var/lib/reconciler/backups/deb-check-$$/files/probe ]] || fail "purge removed the backups in /var/lib/reconciler"
[[ -s $tmp/root/etc/motd ]] || fail "purge touched the managed root"

step "ok: built, installed, ran, purged"
