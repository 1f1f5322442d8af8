#!/usr/bin/env bash
# The system packages the test suite needs beyond python3, git and make: the
# one list `make test` and CI share (README, Tests). As root on a Debian or
# Ubuntu machine the missing ones are installed with apt-get; otherwise one
# line says what to install, and the script fails.
#
#   tests/system-deps.sh           install what is missing (root), else say what
#   tests/system-deps.sh --check   only say what is missing (exit 1 if anything)
set -euo pipefail

# "package:probe" — a probe is a command on PATH, an absolute path, or
# "python3 -m MODULE" (importable by the python3 on PATH).
NEEDS=(
  # Debian's python3 has the venv module but not ensurepip, without which
  # `python3 -m venv .venv` (the next thing make test does) fails.
  "python3-venv:python3 -m ensurepip"
  "systemd:systemd-analyze"            # the shipped units are checked by systemd-analyze verify
  "chromium:chromium"                  # the fleet page is opened in headless Chromium
  "openssh-server:/usr/sbin/sshd"      # transports: a real sshd on loopback
  "openssh-client:ssh-keygen"          # host keys, SSH-signed commits
  "gitolite3:gitolite"                 # per-ref rules for report branches
  "nginx-light:nginx"                  # git http-backend behind nginx with a test CA
  "fcgiwrap:/usr/sbin/fcgiwrap"
  "openssl:openssl"
  "gnupg:gpg"                          # GPG-signed commits
  "strace:strace"                      # the report-durability test watches fsyncs
  "age:age"                            # secrets (SPEC §8): interop with the reference age CLI
  "dpkg-dev:dpkg-scanpackages"         # packages (SPEC §11): the test's own apt repository
  "puppet:/usr/bin/puppet"             # bench (SPEC §7): the EPP copy of the templates, byte for byte
  "systemd-container:systemd-nspawn"   # services (SPEC §11): a throwaway systemd booted by the test
)

missing=()
for need in "${NEEDS[@]}"; do
  pkg=${need%%:*} probe=${need#*:}
  if [[ $probe == "python3 -m "* ]]; then
    python3 -c "import ${probe#python3 -m }" >/dev/null 2>&1 && continue
  elif [[ $probe == /* ]]; then
    [[ -x $probe ]] && continue
  else
    command -v "$probe" >/dev/null 2>&1 && continue
    [[ $probe == nginx && -x /usr/sbin/nginx ]] && continue
  fi
  missing+=("$pkg")
done
# `git daemon` ships in Debian's git package; a git without it cannot be fixed here.
[[ -x "$(git --exec-path)/git-daemon" ]] || { echo "tests/system-deps.sh: git has no 'git daemon' — install Debian's git package" >&2; exit 1; }

[[ ${#missing[@]} -eq 0 ]] && exit 0
if [[ ${1:-} != --check && $(id -u) -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
  echo "tests/system-deps.sh: installing ${missing[*]}" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
  exit 0
fi
echo "tests/system-deps.sh: the tests need ${missing[*]} — run 'make test' as root to install them, or 'sudo apt-get install ${missing[*]}' (a laptop can run parts: make unit; make integration PYTEST_ARGS='-m \"not sshd and not chromium\"')" >&2
exit 1
