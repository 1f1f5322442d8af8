#!/usr/bin/env bash
# `make demo`: a real reconcile of the example fleet, entirely inside .demo/.
#  1. publish hosts/, templates/, scripts/ as a bare desired-state repository
#  2. `reconciler pull` node web1 into a sandbox root (.demo/root); its /etc/hosts
#     keeps the installer's lines and gets the site's names as a managed block;
#     the apps' packages and services are planned, never touched outside /
#  3. pull again: a no-op
#  4. hand-edit a managed file and leave a stray file in nginx's purged conf.d,
#     pull: the drift is reported and repaired, the stray file deleted
#  5. show the report branch that the runs pushed back to the repository
#  6. a secret in git: `reconciler keygen` makes web1's age identity in .demo/,
#     a TLS key encrypted to it is committed and rendered on the host only
set -euo pipefail
cd "$(dirname "$0")/.."
project=$PWD
demo=$project/.demo
reconciler=${RECONCILER:-$project/.venv/bin/reconciler}

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
# Printed quoted as a shell reads it (printf %q): each line can be copied and run again.
run() { local shown; shown=$(printf '%q ' "$@"); printf '$ %s\n' "${shown% }"; "$@"; }

rm -rf "$demo"
mkdir -p "$demo/work" "$demo/root/etc"
# What the installer left in /etc/hosts: the host's own lines, which reconciler
# keeps; the fleet-hosts app adds the site's names as a managed block (SPEC §9).
printf '127.0.0.1\tlocalhost\n127.0.1.1\tweb1.fra1.example.com web1\n' > "$demo/root/etc/hosts"
export GIT_AUTHOR_NAME="Demo Operator" GIT_AUTHOR_EMAIL="ops@example.com"
export GIT_COMMITTER_NAME="Demo Operator" GIT_COMMITTER_EMAIL="ops@example.com"

step "1. The desired-state repository: the example fleet, as a bare git repository"
cp -r hosts templates scripts "$demo/work/"
git -C "$demo/work" init -q -b main
git -C "$demo/work" add -A
git -C "$demo/work" commit -q -m "example fleet"
git clone -q --bare "$demo/work" "$demo/fleet.git"
run "$reconciler" hosts --repo "$demo/work"

cat > "$demo/config.yaml" <<YAML
repo: file://$demo/fleet.git
branch: main
node: web1
root: $demo/root
state_dir: $demo/state
exclude_file: $demo/exclude
identity: $demo/identity.age
facts_dir: $demo/facts.d
YAML
# A local fact (SPEC §10): what only the host knows, read by templates/motd as
# facts.local.location. Writable by its owner only (root or the agent's user), as
# are the directories above it, or it is refused.
mkdir -m 0755 "$demo/facts.d"
printf 'room: DC2 hall B\nrack: R12\n' > "$demo/facts.d/location.yaml"
echo "agent configuration ($demo/config.yaml):"
sed 's/^/    /' "$demo/config.yaml"
export RECONCILER_CONFIG=$demo/config.yaml
# The commands below read it through this variable: shown, so that a copied
# command reads the demo's configuration and not /etc/reconciler/config.yaml.
printf '$ export RECONCILER_CONFIG=%q\n' "$RECONCILER_CONFIG"

step "2. First run: web1 converges into the sandbox root"
run "$reconciler" pull
echo "packages and services (templates/*/app.yaml): listed as planned only, since the"
echo "root is .demo/root; on / they would be installed, enabled, started and reloaded"
echo "/etc/hosts: the installer's lines kept, the site's names added as a managed block:"
sed 's/^/    /' "$demo/root/etc/hosts"

step "3. Second run: nothing changed, nothing rewritten, no new report commit"
run "$reconciler" pull

step "4. Someone hand-edits /etc/motd, loosens /etc/ssh/sshd_config, leaves conf.d/old.conf"
echo "temporary note from a sysadmin" | tee -a "$demo/root/etc/motd" >/dev/null
chmod 0644 "$demo/root/etc/ssh/sshd_config"
# conf.d is purged (templates/nginx/app.yaml directories:): what we do not manage goes.
echo "# left by an old package" >"$demo/root/etc/nginx/conf.d/old.conf"
run "$reconciler" diff
set +e
run "$reconciler" pull --detailed-exitcode
code=$?
set -e
echo "exit code $code (3 = the run succeeded and found changes or drift)"
[ "$code" -eq 3 ]
[ ! -e "$demo/root/etc/nginx/conf.d/old.conf" ]
echo "conf.d/old.conf deleted by the purge (kept in the run's backups)"

step "5. The report branch in the desired-state repository"
run git --git-dir "$demo/fleet.git" log --format='%h %s' reports/web1
run git --git-dir "$demo/fleet.git" ls-tree -r --name-only reports/web1
echo "the drifted motd as it was found, before repair:"
git --git-dir "$demo/fleet.git" show reports/web1:drift/etc/motd | tail -n 3 | sed 's/^/    /'
run "$reconciler" status

step "6. A secret in git: web1's TLS key, encrypted with age to web1's own identity"
printf '$ %s\n' "$reconciler keygen > $demo/work/keys/nodes/web1.pub"
mkdir -p "$demo/work/keys/nodes"
{ "$reconciler" keygen; } > "$demo/work/keys/nodes/web1.pub"
printf -- '- path: templates/nginx/**/*.age\n  to: [web1]\n' > "$demo/work/secrets.yaml"
key=templates/nginx/production/etc/ssl/private/www.example.com.key
# Encrypted with reconciler's own age module (the age CLI reads it: age -d -i).
# A made-up key: DEMO ONLY.
"$project/.venv/bin/python" - "$demo/work/keys/nodes/web1.pub" "$demo/work/$key.age" <<'PY'
import sys
from pathlib import Path
from reconciler.secrets.age import encrypt, parse_recipients
pub, out = Path(sys.argv[1]), Path(sys.argv[2])
out.parent.mkdir(parents=True, exist_ok=True)
plain = b"-----BEGIN PRIVATE KEY-----\nDEMO-ONLY-not-a-real-key-3b7e91\n-----END PRIVATE KEY-----\n"
out.write_bytes(encrypt(plain, parse_recipients(pub.read_bytes(), where=str(pub))))
PY
echo "committed, encrypted ($key.age):"
head -n 2 "$demo/work/$key.age" | sed 's/^/    /'
git -C "$demo/work" add -A
git -C "$demo/work" commit -q -m "web1: TLS key, encrypted to web1 (SPEC §8)"
git -C "$demo/work" push -q "$demo/fleet.git" HEAD:main
run "$reconciler" pull
echo "decrypted on the host only ($demo/root/etc/ssl/private/www.example.com.key):"
sed 's/^/    /' "$demo/root/etc/ssl/private/www.example.com.key"
if git --git-dir "$demo/fleet.git" log -p reports/web1 | grep -q DEMO-ONLY; then
  echo "the plaintext reached the report branch" >&2; exit 1
fi
echo "the report branch names the path only; the plaintext is not in it"

step "Done: everything lives in .demo/ (root/, state/, fleet.git, identity.age). Nothing outside it was touched."
