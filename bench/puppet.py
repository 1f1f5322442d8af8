"""Puppet side by side (issue 19, SPEC §7): ``puppet apply`` of the fleet's templates as EPP.

For one node of a fleet made by bench/fleetgen.py, :class:`PuppetSetup` writes,
under a directory of the bench's own (never the machine's /etc/puppet):

* ``code/environments/production/modules/bench/templates/appNN/fNNNN.conf.epp``:
  every template of the node as EPP (:func:`fleetgen.epp_text`, the same
  template as the Jinja2 one, line for line), with the "desired changes"
  committed so far (``changes.json`` of the fleet);
* ``manifest.pp``: the node's merged vars (read from the fleet's work tree:
  _defaults, its meta-nodes, its host file, merged as the product merges
  them) as a literal hash, the directories, and one ``file`` resource per
  managed file (``content => epp(...)``, mode 0644, root:root, as
  reconciler writes them), at absolute paths under the bench's target root;
* ``conf/``, ``var/``, ``log/``, ``run/``: throwaway --confdir/--vardir/… .

:meth:`PuppetSetup.command` is the ``puppet apply --detailed-exitcodes`` to
measure; :func:`changed_paths` reads from its output the managed paths it
changed. :func:`ensure_installed` installs Debian's ``puppet`` package when it
is missing (as root; ``make bench`` documents it).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fleetgen
from naive import node_layers

from reconciler.pipeline.inventory import deep_merge

PUPPET = "/usr/bin/puppet"


def ensure_installed() -> str:
    """The installed Puppet's version; installs Debian's ``puppet`` package first
    when it is missing (``apt-get install --no-install-recommends``, as root;
    idempotent). Returns "" when it is missing and cannot be installed here."""
    if not os.access(PUPPET, os.X_OK):
        if os.geteuid() != 0 or not shutil.which("apt-get"):
            return ""
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        cmd = ["apt-get", "-o", "DPkg::Lock::Timeout=300", "install", "-y", "-q",
               "--no-install-recommends", "puppet"]  # fmt: skip
        if subprocess.run(cmd, env=env, capture_output=True, check=False).returncode != 0:
            # an old package list names versions the mirror no longer has
            subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, check=False)
            subprocess.run(cmd, env=env, capture_output=True, check=False)
        if not os.access(PUPPET, os.X_OK):
            return ""
    out = subprocess.run([PUPPET, "--version"], capture_output=True, text=True, check=False)
    return out.stdout.strip()


def puppet_value(v: Any) -> str:
    """A Puppet literal for a YAML value (str, int, bool, list, dict)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return "'" + v.replace("\\", "\\\\").replace("'", "\\'") + "'"
    if isinstance(v, list):
        return "[" + ", ".join(puppet_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return (
            "{"
            + ", ".join(f"{puppet_value(str(k))} => {puppet_value(x)}" for k, x in v.items())
            + "}"
        )
    raise TypeError(f"no Puppet literal for {type(v).__name__}")


def node_vars(fleet: Path, node: str) -> dict[str, Any]:
    """The node's merged vars as the fleet's work tree holds them now."""
    merged: dict[str, Any] = {}
    for layer in node_layers(fleet / "work" / "hosts", node):
        merged = deep_merge(merged, layer.get("vars") or {})
    return merged


@dataclass
class PuppetSetup:
    """Puppet's code, configuration and manifest for one node of ``fleet``,
    under ``base``, managing files under ``root``."""

    fleet: Path
    spec: fleetgen.FleetSpec
    base: Path
    root: Path
    node: str = "b00000"

    @property
    def templates(self) -> Path:
        return (
            self.base / "code" / "environments" / "production" / "modules" / "bench" / "templates"
        )

    @property
    def manifest(self) -> Path:
        return self.base / "manifest.pp"

    def changes(self) -> list[int]:
        p = self.fleet / "changes.json"
        return list(json.loads(p.read_text())) if p.exists() else []

    def write(self) -> None:
        """Templates (EPP), manifest, empty configuration: the current desired state."""
        for d in ("conf", "var", "log", "run", "code/environments/production/manifests"):
            (self.base / d).mkdir(parents=True, exist_ok=True)
        changes = self.changes()
        for a in range(self.spec.apps):
            for f in range(self.spec.files_per_app):
                p = self.templates / fleetgen.app_name(a) / f"f{f:04d}.conf.epp"
                p.parent.mkdir(parents=True, exist_ok=True)
                p.write_text(fleetgen.epp_text(self.spec, a, f, changes))
        self.write_manifest()

    def write_change(self, k: int) -> str:
        """Desired change K's EPP (already committed to the fleet): the file it edits."""
        (a, f), _ = fleetgen.change_line(self.spec, k)
        p = self.templates / fleetgen.app_name(a) / f"f{f:04d}.conf.epp"
        p.write_text(fleetgen.epp_text(self.spec, a, f, self.changes()))
        return fleetgen.dest_path(a, f)

    def write_manifest(self) -> None:
        """The node's vars (read again: a host file may have changed) and its resources."""
        paths = fleetgen.managed_paths(self.spec)
        dirs = sorted({p.rsplit("/", 1)[0] for p in paths})
        parents = sorted(
            {"/".join(d.split("/")[:i]) for d in dirs for i in range(2, d.count("/") + 1)}
        )
        lines = [
            f"$vars = {puppet_value(node_vars(self.fleet, self.node))}",
            "file { [" + ", ".join(puppet_value(str(self.root) + d) for d in parents + dirs) + "]:",
            "  ensure => directory, mode => '0755', owner => 'root', group => 'root',",
            "}",
        ]
        for a in range(self.spec.apps):
            for f in range(self.spec.files_per_app):
                dest = puppet_value(str(self.root) + fleetgen.dest_path(a, f))
                tpl = f"bench/{fleetgen.app_name(a)}/f{f:04d}.conf.epp"
                lines.append(
                    f"file {{ {dest}: ensure => file, content => epp('{tpl}', $vars),"
                    " mode => '0644', owner => 'root', group => 'root' }"
                )
        self.manifest.write_text("\n".join(lines) + "\n")

    def command(self) -> list[str]:
        """``puppet apply`` of the manifest: this setup's directories, default settings otherwise."""
        b = self.base
        return [
            PUPPET, "apply", "--detailed-exitcodes", "--color=false",
            "--confdir", str(b / "conf"), "--vardir", str(b / "var"),
            "--codedir", str(b / "code"), "--logdir", str(b / "log"),
            "--rundir", str(b / "run"), str(self.manifest),
        ]  # fmt: skip


_CHANGE = re.compile(r"^Notice: /Stage\[main\]/Main/File\[(?P<path>[^\]]+)\]/(?:ensure|content): ")


def changed_paths(output: str, root: Path) -> set[str]:
    """The managed paths (as on the host, without ``root``) that ``puppet apply`` wrote."""
    out = set()
    prefix = str(root)
    for line in output.splitlines():
        m = _CHANGE.match(line)
        if m and m.group("path").startswith(prefix + "/") and m.group("path").endswith(".conf"):
            out.add(m.group("path")[len(prefix) :])
    return out


def succeeded(code: int) -> bool:
    """``--detailed-exitcodes``: 0 nothing changed, 2 changes; 1, 4, 6 failures."""
    return code in (0, 2)
