#!/usr/bin/env python3
"""Deterministic synthetic fleet for the benchmark (issue 7).

Writes a desired-state repository (repo-layout/README.md) under ``OUT/work``
and publishes it as the bare repository ``OUT/fleet.git``:

* ``hosts/_defaults.yaml``: every app, and the vars of every app;
* ``hosts/b00000.yaml`` … one small file per node (node_index, node_ip and a
  per-node override of one app's vars);
* meta-nodes ``m00`` … each including a contiguous range of nodes, and ``all``
  including every meta-node (so a node merges _defaults, all, mNN, itself);
* apps ``app00`` … each with ``files_per_node / apps`` *distinct* templates
  ``templates/appNN/default/etc/appNN/conf.d/fNNNN.conf.j2`` of about
  ``--template-lines`` lines: loops, conditionals, macros and filters over
  ``vars`` only (no ``node``/``facts``/``source``), so that Ansible's
  ``template`` module can render the very same files from the same vars.

Everything is a function of the arguments and ``--seed``: the same arguments
give byte-identical trees and the same commit content.

Also here, for the scenarios of bench/run.py:

* ``--change K``: commit "one desired change" number K (one template edited)
  to an existing ``OUT`` and push it to ``OUT/fleet.git``;
* ``--drift-root ROOT``: edit ``--drift-percent`` % of the node's managed
  files under ROOT (drift that the next run must repair).

The git CLI is used here: this is the benchmark's harness, not the product.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

# The product's own merge (SPEC §1 vars): Ansible must get exactly the same vars.
from reconciler.pipeline.inventory import deep_merge

GIT_ENV = {
    "GIT_AUTHOR_NAME": "bench",
    "GIT_AUTHOR_EMAIL": "bench@example.com",
    "GIT_COMMITTER_NAME": "bench",
    "GIT_COMMITTER_EMAIL": "bench@example.com",
    "GIT_AUTHOR_DATE": "2026-01-01T00:00:00Z",
    "GIT_COMMITTER_DATE": "2026-01-01T00:00:00Z",
    "GIT_CONFIG_NOSYSTEM": "1",
}


@dataclass(frozen=True)
class FleetSpec:
    """The generator's arguments: what a fleet directory was made from (fleet.json)."""

    nodes: int = 10
    meta_nodes: int = 10
    apps: int = 10
    files_per_node: int = 200
    template_lines: int = 40
    seed: int = 7

    @property
    def files_per_app(self) -> int:
        return self.files_per_node // self.apps


def node_name(i: int) -> str:
    return f"b{i:05d}"


def app_name(a: int) -> str:
    return f"app{a:02d}"


def dest_path(a: int, f: int) -> str:
    """Absolute destination of file ``f`` of app ``a`` (as the host sees it)."""
    return f"/etc/{app_name(a)}/conf.d/f{f:04d}.conf"


def template_path(a: int, f: int) -> str:
    """Path of that file's template inside the repository."""
    return f"templates/{app_name(a)}/default{dest_path(a, f)}.j2"


def managed_paths(spec: FleetSpec) -> list[str]:
    """Every destination a node of this fleet manages (all nodes run every app)."""
    return [dest_path(a, f) for a in range(spec.apps) for f in range(spec.files_per_app)]


def meta_of(spec: FleetSpec, i: int) -> int:
    """Index of the meta-node that includes node ``i`` (contiguous ranges)."""
    per = -(-spec.nodes // max(1, spec.meta_nodes))
    return i // per


# --------------------------------------------------------------------- vars

RARE = "rare_setting"  # the var of "one variable changed" (SPEC §7: read by 1 % of templates)


def reads_rare(spec: FleetSpec, a: int, f: int) -> bool:
    """True for the 1 % of templates (every 100th of the node's) that read RARE."""
    return (a * spec.files_per_app + f) % 100 == 0


def app_vars(a: int) -> dict[str, Any]:
    return {
        "listen": "0.0.0.0",
        "port": 8000 + 100 * a,
        "workers": 2 + a % 4,
        "tls": a % 2 == 0,
        "tls_protocols": ["TLSv1.2", "TLSv1.3"],
        "log_level": ["info", "warning", "debug"][a % 3],
        "backends": [
            {
                "name": f"be{b}",
                "host": f"10.{a}.0.{10 + b}",
                "port": 9000 + b,
                "weight": 1 + b % 3,
                "backup": b == 3,
            }
            for b in range(4)
        ],
        "options": {"timeout": 30 + a, "retries": 3, "keepalive": True, "buffer_kb": 64},
        "features": ["metrics", "tracing", "gzip", "cache"][: 2 + a % 3],
    }


def defaults_doc(spec: FleetSpec) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "state": "default",
        "apps": [app_name(a) for a in range(spec.apps)],
        "vars": {
            "organization": "Bench Corp",
            "domain": "bench.example.com",
            "site": "none",
            "dns_servers": ["10.255.0.2", "10.255.0.3"],
            "ntp_servers": ["ntp1.bench.example.com", "ntp2.bench.example.com"],
            "node_index": 0,
            "node_ip": "127.0.0.1",
            # read by 1 % of the templates (reads_rare): "one variable changed"
            RARE: "r0",
        },
    }
    for a in range(spec.apps):
        doc["vars"][app_name(a)] = app_vars(a)
    return doc


def all_doc(spec: FleetSpec) -> dict[str, Any]:
    return {
        "include_nodes": [f"m{m:02d}" for m in range(spec.meta_nodes)],
        "vars": {"site": "fra1", "dns_servers": ["10.10.0.2", "10.10.0.3"]},
    }


def meta_doc(spec: FleetSpec, m: int) -> dict[str, Any]:
    per = -(-spec.nodes // max(1, spec.meta_nodes))
    members = [node_name(i) for i in range(m * per, min(spec.nodes, (m + 1) * per))]
    return {
        "include_nodes": members,
        "vars": {"site": f"rack{m:02d}", app_name(m % spec.apps): {"workers": 8}},
    }


def node_doc(spec: FleetSpec, i: int) -> dict[str, Any]:
    return {
        "vars": {
            "node_index": i,
            "node_ip": f"10.{100 + i // 65536}.{i // 256 % 256}.{i % 256}",
            app_name(i % spec.apps): {"log_level": "debug", "options": {"retries": 5}},
        }
    }


def effective_vars(spec: FleetSpec, i: int) -> dict[str, Any]:
    """The merged vars of node ``i``: _defaults, all, its meta-node, itself (for Ansible)."""
    merged = defaults_doc(spec)["vars"]
    for doc in (all_doc(spec), meta_doc(spec, meta_of(spec, i)), node_doc(spec, i)):
        merged = deep_merge(merged, doc["vars"])
    return merged


# ---------------------------------------------------------------- templates


def _template_lines(spec: FleetSpec, a: int, f: int) -> list[tuple[str, str]]:
    """The lines of file ``f`` of app ``a`` as (Jinja2, EPP) pairs: one template, two languages.

    Built from blocks chosen per file (seeded), each using only vars; the
    constants differ per file so no two templates are alike. Each EPP line
    renders, from the same vars, the bytes its Jinja2 line renders
    (bench/run.py checks Puppet's output against reconciler's byte for byte):

    * A Jinja2 line that starts with ``{%-`` strips the newline before it
      (``trim_blocks`` is off, so the newline after its tag stays): its EPP
      line is joined to the previous one (see :func:`epp_text`);
    * Python's ``str(True)`` is ``True`` where Puppet prints ``true``: a
      value that may be a boolean goes through a selector (PY_STR);
    * ``dictsort`` sorts keys without case, Puppet's ``sort`` with it: the
      option keys are lower case;
    * macros are inlined, ``set`` becomes a variable named once per template
      (Puppet variables cannot be re-assigned, and a block may occur twice).
    """
    rng = random.Random(f"{spec.seed}:{a}:{f}")
    A = app_name(a)
    P = f"${A}"  # the app's hash in EPP
    tag = f"{A}_{f:04d}"
    out: list[tuple[str, str]] = [
        (
            f"# {{{{ organization }}}}: {A} file {f:04d} (bench/fleetgen.py)",
            f"# <%= $organization %>: {A} file {f:04d} (bench/fleetgen.py)",
        ),
        (
            "# site {{ site }}, node {{ node_index }} ({{ node_ip }}), domain {{ domain }}",
            "# site <%= $site %>, node <%= $node_index %> (<%= $node_ip %>), domain <%= $domain %>",
        ),
        (f"[{tag}]", f"[{tag}]"),
    ]
    if reads_rare(spec, a, f):
        out.append((f"rare = {{{{ {RARE} }}}}", f"rare = <%= ${RARE} %>"))
    uses = iter(range(1000))  # one name per `set` in the EPP text

    def b_listen() -> list[tuple[str, str]]:
        k = 1 + f % 3
        return [
            (
                f"listen = {{{{ {A}.listen }}}}:{{{{ {A}.port + {f} }}}}",
                f"listen = <%= {P}['listen'] %>:<%= {P}['port'] + {f} %>",
            ),
            (
                f"workers = {{{{ ({A}.workers * {k}) if {A}.workers > 2 else 1 }}}}",
                f"workers = <%= if {P}['workers'] > 2 {{ {P}['workers'] * {k} }} else {{ 1 }} %>",
            ),
            (
                f"log_level = {{{{ {A}.log_level | upper }}}}",
                f"log_level = <%= upcase({P}['log_level']) %>",
            ),
        ]

    def b_tls() -> list[tuple[str, str]]:
        return [
            (f"{{%- if {A}.tls %}}", f"<% if {P}['tls'] {{ %>"),
            (f"tls_cert = /etc/{A}/tls/{f:04d}.pem",) * 2,
            (
                f'tls_protocols = {{{{ {A}.tls_protocols | join(" ") }}}}',
                f"tls_protocols = <%= join({P}['tls_protocols'], ' ') %>",
            ),
            ("{%- else %}", "<% } else { %>"),
            (f"tls = off  # {tag}",) * 2,
            ("{%- endif %}", "<% } %>"),
        ]

    def b_backends() -> list[tuple[str, str]]:
        return [
            (f"{{%- for b in {A}.backends %}}", f"<% {P}['backends'].each |$b| {{ %>"),
            (
                f"backend {{{{ b.name }}}}_{f} {{{{ b.host }}}}:{{{{ b.port + {f % 7} }}}}"
                " weight={{ b.weight }}{% if b.backup %} backup{% endif %}",
                f"backend <%= $b['name'] %>_{f} <%= $b['host'] %>:<%= $b['port'] + {f % 7} %>"
                " weight=<%= $b['weight'] %><% if $b['backup'] { %> backup<% } %>",
            ),
            ("{%- endfor %}", "<% } %>"),
        ]

    def b_options() -> list[tuple[str, str]]:
        group = rng.choice(["net", "io", "rt", "q"])
        return [
            (
                f"{{%- for k, v in {A}.options | dictsort %}}",
                f"<% sort(keys({P}['options'])).each |$k| {{ $v = {P}['options'][$k] %>",
            ),
            (f"option.{group}.{{{{ k }}}} = {{{{ v }}}}", f"option.{group}.<%= $k %> = {PY_STR}"),
            ("{%- endfor %}", "<% } %>"),
        ]

    def b_features() -> list[tuple[str, str]]:
        return [
            (
                f"{{%- for feature in {A}.features %}}",
                f"<% {P}['features'].each |$i, $feature| {{ %>",
            ),
            (
                f"feature[{{{{ loop.index }}}}] = {{{{ feature }}}}"
                f"{{% if loop.last %}}  # {len(A) + f} in total{{% endif %}}",
                f"feature[<%= $i + 1 %>] = <%= $feature %>"
                f"<% if $i == length({P}['features']) - 1 {{ %>  # {len(A) + f} in total<% }} %>",
            ),
            ("{%- endfor %}", "<% } %>"),
        ]

    def b_servers() -> list[tuple[str, str]]:
        return [
            ("{%- for s in dns_servers %}", "<% $dns_servers.each |$i, $s| { %>"),
            (
                f"resolver{{{{ loop.index0 }}}} = {{{{ s }}}}  # {tag}",
                f"resolver<%= $i %> = <%= $s %>  # {tag}",
            ),
            ("{%- endfor %}", "<% } %>"),
            ("{%- for s in ntp_servers %}", "<% $ntp_servers.each |$s| { %>"),
            ("ntp = {{ s }}", "ntp = <%= $s %>"),
            ("{%- endfor %}", "<% } %>"),
        ]

    def b_macro() -> list[tuple[str, str]]:
        # The macro is inlined in EPP: its definition renders nothing.
        return [
            (
                f"{{%- macro kv(key, value) %}}{{{{ key }}}}.{f} = {{{{ value }}}}{{% endmacro %}}",
                "",
            ),
            (f"{{{{ kv('port', {A}.port) }}}}", f"port.{f} = <%= {P}['port'] %>"),
            (
                f"{{{{ kv('timeout', {A}.options.timeout * {1 + f % 5}) }}}}",
                f"timeout.{f} = <%= {P}['options']['timeout'] * {1 + f % 5} %>",
            ),
            (
                f"{{{{ kv('name', '{tag}' | replace('_', '-')) }}}}",
                f"name.{f} = <%= regsubst('{tag}', '_', '-', 'G') %>",
            ),
        ]

    def b_weights() -> list[tuple[str, str]]:
        total = f"$total_{next(uses)}"
        limit = rng.randint(3, 9)
        return [
            (
                f"{{%- set total = {A}.backends | map(attribute='weight') | sum %}}",
                f"<% {total} = {P}['backends'].map |$x| {{ $x['weight'] }}"
                ".reduce(0) |$m, $w| { $m + $w } %>",
            ),
            (
                f"total_weight = {{{{ total + {f % 11} }}}}",
                f"total_weight = <%= {total} + {f % 11} %>",
            ),
            (f"{{%- if total > {limit} %}}", f"<% if {total} > {limit} {{ %>"),
            ("balance = weighted",) * 2,
            ("{%- else %}", "<% } else { %>"),
            ("balance = round-robin",) * 2,
            ("{%- endif %}", "<% } %>"),
        ]

    def b_primaries() -> list[tuple[str, str]]:
        primary = f"$primary_{next(uses)}"
        return [
            (
                f"{{%- set primary = {A}.backends | rejectattr('backup') | list %}}",
                f"<% {primary} = {P}['backends'].filter |$x| {{ !$x['backup'] }} %>",
            ),
            (
                "primaries = {{ primary | map(attribute='host') | join(',') }}",
                f"primaries = <%= join({primary}.map |$x| {{ $x['host'] }}, ',') %>",
            ),
            (
                f"spare = {{{{ {A}.backends | selectattr('backup') | map(attribute='name') | first"
                " | default('none') }}",
                f"spare = <%= ({P}['backends'].filter |$x| {{ $x['backup'] }}"
                ".map |$x| { $x['name'] } + ['none'])[0] %>",
            ),
        ]

    blocks = [
        b_listen, b_tls, b_backends, b_options, b_features, b_servers, b_macro, b_weights,
        b_primaries,
    ]  # fmt: skip
    # Keep adding shuffled blocks until the template is about template_lines long.
    order = list(range(len(blocks)))
    while len(out) < spec.template_lines - 1:
        rng.shuffle(order)
        for k in order:
            if len(out) >= spec.template_lines - 1:
                break
            out.extend(blocks[k]())
    out.append((f"# end of {tag}",) * 2)
    return out


# Python's str() of a value that may be a boolean (Jinja2 prints True, Puppet true).
PY_STR = "<%= $v ? { true => 'True', false => 'False', default => $v } %>"


def template_text(spec: FleetSpec, a: int, f: int) -> str:
    """The Jinja2 template of file ``f`` of app ``a`` (about ``spec.template_lines`` lines)."""
    return "\n".join(j for j, _ in _template_lines(spec, a, f)) + "\n"


def _epp_join(pairs: Iterable[tuple[str, str]]) -> str:
    """EPP text of (Jinja2, EPP) line pairs: a line whose Jinja2 starts with
    ``{%-`` is joined to the one before (that tag strips the newline before it)."""
    text = ""
    for jinja, epp in pairs:
        text += epp if jinja.startswith("{%-") and text else ("\n" if text else "") + epp
    return text + "\n"


def epp_text(spec: FleetSpec, a: int, f: int, changes: Iterable[int] = ()) -> str:
    """The EPP equivalent of :func:`template_text` for Puppet (bench/puppet.py),
    with the "desired change" K of each K in ``changes`` that edits this file."""
    pairs = _template_lines(spec, a, f)
    pairs += [change_line(spec, k)[1] for k in changes if change_line(spec, k)[0] == (a, f)]
    return _epp_join(pairs)


def change_line(spec: FleetSpec, k: int) -> tuple[tuple[int, int], tuple[str, str]]:
    """Desired change K: ((app, file) it edits, the (Jinja2, EPP) line it appends)."""
    a, f = k % spec.apps, (k * 7919) % spec.files_per_app
    A = app_name(a)
    return (a, f), (
        f"# desired change {k}: timeout {{{{ {A}.options.timeout }}}}",
        f"# desired change {k}: timeout <%= ${A}['options']['timeout'] %>",
    )


# ---------------------------------------------------------------- writing


def _yaml(doc: Any) -> str:
    """Block-style YAML, as people write host files (libyaml's emitter when present)."""
    import yaml

    dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
    return str(yaml.dump(doc, Dumper=dumper, sort_keys=False, default_flow_style=False))


def _load_yaml(text: str) -> Any:
    import yaml

    return yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def git(args: Iterable[str], cwd: Path | None = None, quiet: bool = True) -> str:
    env = {**os.environ, **GIT_ENV}
    proc = subprocess.run(
        ["git", *args],
        cwd=cwd,
        env=env,
        check=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE if quiet else None,
        text=True,
    )
    return proc.stdout.strip()


def generate(spec: FleetSpec, out: Path) -> None:
    """Write OUT/work (a git repository, one commit) and publish it as OUT/fleet.git."""
    out = out.resolve()
    if out.exists():
        shutil.rmtree(out)
    work = out / "work"
    hosts = work / "hosts"
    hosts.mkdir(parents=True)
    (hosts / "_defaults.yaml").write_text(_yaml(defaults_doc(spec)))
    (hosts / "all.yaml").write_text(_yaml(all_doc(spec)))
    for m in range(spec.meta_nodes):
        (hosts / f"m{m:02d}.yaml").write_text(_yaml(meta_doc(spec, m)))
    for i in range(spec.nodes):
        (hosts / f"{node_name(i)}.yaml").write_text(_yaml(node_doc(spec, i)))
    for a in range(spec.apps):
        for f in range(spec.files_per_app):
            p = work / template_path(a, f)
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(template_text(spec, a, f))
    (out / "fleet.json").write_text(json.dumps(asdict(spec), indent=1) + "\n")
    git(["init", "-q", "-b", "main"], cwd=work)
    git(["add", "-A"], cwd=work)
    git(["commit", "-q", "-m", f"synthetic fleet {asdict(spec)}"], cwd=work)
    git(["init", "-q", "--bare", str(out / "fleet.git")])
    git(["push", "-q", str(out / "fleet.git"), "main:main"], cwd=work)
    git(["symbolic-ref", "HEAD", "refs/heads/main"], cwd=out / "fleet.git")


def load_spec(out: Path) -> FleetSpec:
    return FleetSpec(**json.loads((out / "fleet.json").read_text()))


def commit_change(out: Path, k: int) -> str:
    """The "one desired change": edit one template (chosen by ``k``), commit, push.

    Returns the path of the destination that changes. A different template
    each time, so every call is a real change of the desired state.
    """
    out = out.resolve()
    spec = load_spec(out)
    work = out / "work"
    (a, f), (line, _) = change_line(spec, k)
    p = work / template_path(a, f)
    p.write_text(p.read_text() + line + "\n")
    changes = out / "changes.json"  # for Puppet's EPP copy of the templates
    done = json.loads(changes.read_text()) if changes.exists() else []
    changes.write_text(json.dumps([*done, k]) + "\n")
    git(["commit", "-q", "-am", f"one desired change {k}"], cwd=work)
    git(["push", "-q", str(out / "fleet.git"), "main:main"], cwd=work)
    return dest_path(a, f)


def commit_host_change(out: Path, k: int) -> str:
    """Another node's host file edited (not the measured node's): a new commit that
    changes none of the measured node's files. Returns that node's name."""
    out = out.resolve()
    spec = load_spec(out)
    work = out / "work"
    i = 1 + k % max(1, spec.nodes - 1)
    p = work / "hosts" / f"{node_name(i)}.yaml"
    doc = _load_yaml(p.read_text())
    doc["vars"]["node_index"] = i + 100000 * (k + 1)
    p.write_text(_yaml(doc))
    git(["commit", "-q", "-am", f"edit {node_name(i)} ({k})"], cwd=work)
    git(["push", "-q", str(out / "fleet.git"), "main:main"], cwd=work)
    return node_name(i)


def commit_var_change(out: Path, k: int) -> list[str]:
    """ "One variable changed": RARE set to a new value in the measured node's host
    file (node 0), commit, push. Returns the destinations that change: those of
    the 1 % of templates that read it (:func:`reads_rare`)."""
    out = out.resolve()
    spec = load_spec(out)
    work = out / "work"
    p = work / "hosts" / f"{node_name(0)}.yaml"
    doc = _load_yaml(p.read_text())
    doc["vars"][RARE] = f"r{k + 1}"
    p.write_text(_yaml(doc))
    git(["commit", "-q", "-am", f"one variable changed ({k})"], cwd=work)
    git(["push", "-q", str(out / "fleet.git"), "main:main"], cwd=work)
    return [
        dest_path(a, f)
        for a in range(spec.apps)
        for f in range(spec.files_per_app)
        if reads_rare(spec, a, f)
    ]


def drift(spec: FleetSpec, root: Path, percent: float, seed: int) -> list[str]:
    """Edit ``percent`` % of the managed files under ``root`` (append a line); return them."""
    paths = managed_paths(spec)
    count = max(1, round(len(paths) * percent / 100))
    chosen = random.Random(seed).sample(paths, count)
    for path in chosen:
        with open(root / path.lstrip("/"), "a", encoding="utf-8") as fh:
            fh.write(f"# local edit by hand ({seed})\n")
    return chosen


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", type=int, default=10)
    p.add_argument("--meta-nodes", type=int, default=10)
    p.add_argument("--apps", type=int, default=10)
    p.add_argument("--files-per-node", type=int, default=200)
    p.add_argument("--template-lines", type=int, default=40)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--out", type=Path, required=True, help="fleet directory (work/, fleet.git)")
    p.add_argument("--change", type=int, metavar="K", help="commit desired change K to OUT")
    p.add_argument("--drift-root", type=Path, metavar="ROOT", help="drift files under ROOT")
    p.add_argument("--drift-percent", type=float, default=1.0)
    p.add_argument("--print-vars", metavar="NODE_INDEX", type=int, help="effective vars, JSON")
    args = p.parse_args(argv)
    if args.change is not None:
        print(commit_change(args.out, args.change))
        return 0
    if args.drift_root is not None:
        for path in drift(load_spec(args.out), args.drift_root, args.drift_percent, args.seed):
            print(path)
        return 0
    if args.print_vars is not None:
        print(json.dumps(effective_vars(load_spec(args.out), args.print_vars), indent=1))
        return 0
    if args.files_per_node % args.apps:
        p.error("--files-per-node must be a multiple of --apps")
    spec = FleetSpec(
        nodes=args.nodes,
        meta_nodes=min(args.meta_nodes, args.nodes),
        apps=args.apps,
        files_per_node=args.files_per_node,
        template_lines=args.template_lines,
        seed=args.seed,
    )
    generate(spec, args.out)
    print(f"{args.out}: {spec.nodes} nodes, {spec.files_per_node} files per node")
    return 0


if __name__ == "__main__":
    sys.exit(main())
