#!/usr/bin/env bash
# `make demo-rollout`: a progressive rollout (SPEC §13) of the example fleet in three
# waves — canary web1, then 10 % of the rest, then everyone — on one machine, entirely
# inside .demo-rollout/: four hosts (web1, web2, db1, dhcp), each with its own sandbox
# root and state directory, pulling from a real `git daemon` on loopback.
#  1. publish the example fleet with `rollout:` in fleet.yaml (soak: 2s); first runs
#  2. a change for everyone: the canary applies it, the others hold and report pending
#  3. after the soak, wave 2 applies; wave 3 waits for wave 2 to soak
#  4. the operator halts the rollout: wave 3 holds, whatever the soak
#  5. the operator resumes: wave 3 applies; the rollout is complete
#  6. a revert commit is the way back, and rolls out through the same waves
# `reconciler rollout status` is printed at each step. Nothing outside .demo-rollout/.
set -euo pipefail
cd "$(dirname "$0")/.."
project=$PWD
demo=$project/.demo-rollout
reconciler=${RECONCILER:-$project/.venv/bin/reconciler}
python=${PYTHON:-$project/.venv/bin/python}
nodes=(web1 web2 db1 dhcp)

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
# Printed quoted as a shell reads it (printf %q): each line can be copied and run again.
run() { local shown; shown=$(printf '%q ' "$@"); printf '$ %s\n' "${shown% }"; "$@"; }

rm -rf "$demo"
mkdir -p "$demo/work" "$demo/served"
for node in "${nodes[@]}"; do mkdir -p "$demo/$node/root"; done
export GIT_AUTHOR_NAME="Demo Operator" GIT_AUTHOR_EMAIL="ops@example.com"
export GIT_COMMITTER_NAME="Demo Operator" GIT_COMMITTER_EMAIL="ops@example.com"
# Every command below takes its settings as flags: never /etc/reconciler/config.yaml.
export RECONCILER_CONFIG=/dev/null

# A real git daemon on loopback (git://), in its own process group, stopped on exit.
port=$("$python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
setsid git daemon --reuseaddr --base-path="$demo/served" --export-all --enable=receive-pack \
  --listen=127.0.0.1 --port="$port" "$demo/served" >"$demo/git-daemon.log" 2>&1 &
daemon=$!
trap 'kill -TERM -- -"$daemon" 2>/dev/null || true' EXIT
url=git://127.0.0.1:$port/fleet.git
for _ in $(seq 50); do
  git ls-remote "git://127.0.0.1:$port/" >/dev/null 2>&1 && break
  (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
  sleep 0.1
done

# One host: its own root and state directory under .demo-rollout/<node>/.
pull() {
  local node=$1
  "$reconciler" pull --repo "$url" --node "$node" --root "$demo/$node/root" \
    --state-dir "$demo/$node/state" --exclude-file "$demo/$node/exclude" \
    --facts-dir "$demo/$node/facts.d" --format json
}
# One line of a pull's JSON report: node, result, applied commit, the commit held back.
read -r -d '' show <<'PY' || true
import json, sys
r = json.load(sys.stdin)
applied = (r.get("applied_commit") or "-")[:12]
line = f"  {r['node']:<5} {r['result']:<8} applied {applied}"
held = r.get("rollout")
if held:
    line += f"  {held['state'].upper()} {held['commit'][:12]} (wave {held['wave']}): {held['reason']}"
print(line)
PY
# Every host runs once, all at the same time (as their timers would, each every
# interval); then one line each: the commit it enforces, and the one it holds back.
pull_all() {
  printf '$ reconciler pull   # on %s, at the same time\n' "${nodes[*]}"
  local node pids=()
  for node in "${nodes[@]}"; do
    pull "$node" >"$demo/$node/report.json" &
    pids+=($!)
  done
  wait "${pids[@]}"  # the pulls only: the git daemon is a child of this shell too
  for node in "${nodes[@]}"; do "$python" -c "$show" <"$demo/$node/report.json"; done
}
status() { run "$reconciler" rollout status --repo "$url" --state-dir "$demo/operator"; }
commit() {
  git -C "$demo/work" add -A
  git -C "$demo/work" commit -q -m "$1"
  git -C "$demo/work" push -q origin HEAD:main
  echo "committed and pushed $(git -C "$demo/work" rev-parse --short=12 HEAD): $1"
}
motd_line() { head -n 1 "$demo/$1/root/etc/motd"; }

step "1. The example fleet, with rollout: in fleet.yaml, served by git daemon at $url"
cp -r hosts templates scripts "$demo/work/"
cat >"$demo/work/fleet.yaml" <<'YAML'
# Progressive rollout (SPEC §13): a new commit reaches web1 first, then 10 % of the
# other nodes (by a stable hash of the name), then everyone; each wave must be
# healthy for 2 seconds (15m in real life) before the next applies.
rollout:
  waves:
    - {name: canary, nodes: [web1]}
    - {name: ten-percent, percent: 10}
    - {name: everyone, percent: 100}
  soak: 2s
  max_failed: 0
YAML
sed 's/^/    /' "$demo/work/fleet.yaml"
git -C "$demo/work" init -q -b main
git init -q --bare "$demo/served/fleet.git"
git -C "$demo/work" remote add origin "$demo/served/fleet.git"
commit "example fleet, rolled out in waves"
run "$reconciler" validate --repo "$demo/work"
echo "first runs: a brand-new host converges at once (there is nothing older to keep)"
pull_all
status

step "2. A change for every node: the canary applies it, the others hold and report pending"
sed -i 's/^  organization: Example Corp$/  organization: Example Corp (new motd)/' "$demo/work/hosts/_defaults.yaml"
commit "motd: new organization line"
pull_all
echo "web1's /etc/motd: $(motd_line web1)"
echo "db1's  /etc/motd: $(motd_line db1)"
status

step "3. Two seconds later the canary has soaked: wave 2 (ten-percent) applies"
sleep 2
pull_all
status

step "4. Something looks wrong: the operator halts the rollout"
run "$reconciler" rollout halt --repo "$url" --state-dir "$demo/operator" --reason "checking the new motd on web1"
sleep 2
pull_all
status

step "5. All good: the operator resumes; wave 3 (everyone) applies"
run "$reconciler" rollout resume --repo "$url" --state-dir "$demo/operator" --reason "motd checked"
pull_all
status
run git --git-dir "$demo/served/fleet.git" log --format='%h %an: %s' rollout/control

step "6. The way back is a revert commit: it rolls out through the same waves"
git -C "$demo/work" revert --no-edit HEAD >/dev/null
git -C "$demo/work" push -q origin HEAD:main
echo "committed and pushed $(git -C "$demo/work" rev-parse --short=12 HEAD): the revert"
pull_all
status

echo "web1's /etc/motd: $(motd_line web1)"
echo "db1's  /etc/motd: $(motd_line db1)   (its wave waits for the canary to soak)"
case "$(motd_line web1)" in *"new motd"*) echo "web1 did not take the revert" >&2; exit 1 ;; esac
case "$(motd_line db1)" in *"new motd"*) ;; *) echo "db1 did not wait for its wave" >&2; exit 1 ;; esac
step "Done: everything lives in .demo-rollout/ (the hosts' roots and state, the served repository). Nothing outside it was touched."
