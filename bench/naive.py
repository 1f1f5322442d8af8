#!/usr/bin/env python3
"""The "naive Python + Jinja2 loop" baseline of SPEC §7.

From a checkout of the desired-state repository: read the host files, merge
the node's vars (defaults, the meta-nodes that contain it, the node), then
render *every* template of the node's apps with a plain
``Environment(FileSystemLoader)``, compare each result with the disk and write
the ones that differ. No caches, no stat signatures, no fsync (which makes it
faster than a durable agent on writes): what one would write in an afternoon.

Prints one JSON line: ``{"rendered": N, "written": M, "seconds": S}``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import jinja2
import yaml

Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # naive, but not gratuitously slow


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def node_layers(hosts: Path, node: str) -> list[dict[str, Any]]:
    """_defaults, the meta-nodes containing ``node`` (outermost first), the node."""
    docs = {p.stem: yaml.load(p.read_text(), Loader=Loader) or {} for p in hosts.glob("*.yaml")}
    parents: dict[str, list[str]] = {}
    for name, doc in docs.items():
        for member in doc.get("include_nodes") or []:
            parents.setdefault(member, []).append(name)
    depth: dict[str, int] = {}

    def ancestors(name: str, d: int) -> None:
        for meta in parents.get(name, []):
            depth[meta] = max(depth.get(meta, 0), d)
            ancestors(meta, d + 1)

    ancestors(node, 1)
    metas = sorted(depth, key=lambda m: (-depth[m], m))  # outermost (deepest) first
    return [docs.get("_defaults", {}), *(docs[m] for m in metas), docs[node]]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkout", type=Path, required=True, help="working tree of the repository")
    p.add_argument("--node", required=True)
    p.add_argument("--root", type=Path, required=True)
    args = p.parse_args(argv)
    start = time.perf_counter()

    variables: dict[str, Any] = {}
    apps: list[str] = []
    for layer in node_layers(args.checkout / "hosts", args.node):
        variables = merge(variables, layer.get("vars") or {})
        for app in layer.get("apps") or []:
            name = app if isinstance(app, str) else next(iter(app))
            if name not in apps:
                apps.append(name)

    templates = args.checkout / "templates"
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(templates)),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,
    )
    rendered = written = 0
    for app in apps:
        base = templates / app / "default"
        for dirpath, _dirs, files in os.walk(base):
            for fname in sorted(files):
                src = Path(dirpath) / fname
                rel = src.relative_to(base)
                if fname.endswith(".j2"):
                    name = src.relative_to(templates).as_posix()
                    data = env.get_template(name).render(variables).encode()
                    rel = rel.with_name(fname[:-3])
                else:
                    data = src.read_bytes()
                rendered += 1
                dest = args.root / rel
                try:
                    if dest.read_bytes() == data:
                        continue
                except FileNotFoundError:
                    dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(data)
                written += 1
    seconds = time.perf_counter() - start
    print(json.dumps({"rendered": rendered, "written": written, "seconds": round(seconds, 4)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
