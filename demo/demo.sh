#!/usr/bin/env bash
# `make demo`: a real reconcile of the example fleet, entirely inside .demo/.
#  1. publish hosts/, templates/, scripts/ as a bare desired-state repository
#  2. `reconciler pull` node web1 into a sandbox root (.demo/root)
#  3. pull again: a no-op
#  4. hand-edit a managed file, pull: the drift is reported and repaired
#  5. show the report branch that the runs pushed back to the repository
set -euo pipefail
cd "$(dirname "$0")/.."
project=$PWD
demo=$project/.demo
reconciler=${RECONCILER:-$project/.venv/bin/reconciler}

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
run() { printf '$ %s\n' "$*"; "$@"; }

rm -rf "$demo"
mkdir -p "$demo/work" "$demo/root"
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
YAML
echo "agent configuration ($demo/config.yaml):"
sed 's/^/    /' "$demo/config.yaml"
export RECONCILER_CONFIG=$demo/config.yaml

step "2. First run: web1 converges into the sandbox root"
run "$reconciler" pull

step "3. Second run: nothing changed, nothing rewritten, no new report commit"
run "$reconciler" pull

step "4. Someone hand-edits /etc/motd and loosens /etc/ssh/sshd_config"
echo "temporary note from a sysadmin" | tee -a "$demo/root/etc/motd" >/dev/null
chmod 0644 "$demo/root/etc/ssh/sshd_config"
run "$reconciler" diff
set +e
run "$reconciler" pull --detailed-exitcode
code=$?
set -e
echo "exit code $code (3 = the run succeeded and found changes or drift)"
[ "$code" -eq 3 ]

step "5. The report branch in the desired-state repository"
run git --git-dir "$demo/fleet.git" log --format='%h %s' reports/web1
run git --git-dir "$demo/fleet.git" ls-tree -r --name-only reports/web1
echo "the drifted motd as it was found, before repair:"
git --git-dir "$demo/fleet.git" show reports/web1:drift/etc/motd | tail -n 3 | sed 's/^/    /'
run "$reconciler" status

step "Done: everything lives in .demo/ (root/, state/, fleet.git). Nothing outside it was touched."
