"""``reconciler init``: a server's first day (issue 12) — its configuration, state
directory and deploy key, and the steps left to the operator.

Host side, before any run. Takes what the operator gave (:class:`InitRequest`:
the repository URL, the node name, where the files go); produces the files —
``config.yaml`` (commented YAML, loaded back by
:func:`reconciler.config.load_config` before it is put in place, never over an
existing one), the state directory (0700, :meth:`StateDir.ensure`), an
ed25519 deploy key for an SSH source — and an :class:`InitResult` whose
numbered :class:`Step` list says what remains: give the key access, pin the
git server's host key, describe the node in the repository, try a dry run,
install and enable the units. Like ``puppet ssl bootstrap`` and ``flux
bootstrap`` it prepares the host and prints what the operator must do
elsewhere; unlike ``flux bootstrap`` it never trusts a host key on first
sight (the operator pins and verifies it) and it starts nothing: enabling
the units is the operator's act, after the dry run.

Every check that can refuse (exit 2: a bad URL or node name, a key that
cannot be used; exit 1: a configuration already there) runs before the first
write, so bad input changes nothing on disk. The configuration is written
last: a run stopped half-way leaves no configuration, and ``init`` run again
reuses the key and state directory it made.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from reconciler.config import DEFAULT_CONFIG_PATH, AgentConfig, build_config, load_config
from reconciler.errors import ConfigError, ConfigExistsError, UsageError
from reconciler.host.statedir import StateDir
from reconciler.host.system import fsync_dir, write_temp

# Where the systemd units may already be: a package puts them in /lib (Debian)
# or /usr/lib; `reconciler install-units` writes /etc/systemd/system, which
# overrides both (systemd.unit(5) load path). Searched in that order.
UNIT_DIRS = (
    Path("/etc/systemd/system"),
    Path("/lib/systemd/system"),
    Path("/usr/lib/systemd/system"),
)
# The units ``init`` tells the operator to enable: a run at boot, then the timer.
# reconciler.service (the long-running agent) is the alternative to the timer.
PULL_UNIT = "reconciler-pull.service"
ENABLE = ("reconciler-boot.service", "reconciler-pull.timer")
SCHEMES = ("ssh", "https", "http", "git", "file")


@dataclass(frozen=True, slots=True, kw_only=True)
class InitRequest:
    """An InitRequest is what the operator asked ``reconciler init`` for, paths absolute.

    ``ssh_key``, ``known_hosts``, ``token_file``: None for the defaults beside
    the configuration (``<config dir>/ssh/id_ed25519``, ``<config
    dir>/known_hosts``, ``<config dir>/token``). ``units_dirs``: where to look
    for installed units.
    """

    config_path: Path
    repo: str
    branch: str | None = None
    node: str | None = None
    root: str | None = None
    state_dir: str | None = None
    ssh_key: Path | None = None
    known_hosts: Path | None = None
    token_file: Path | None = None
    units_dirs: tuple[Path, ...] = UNIT_DIRS
    prog: str = "reconciler"


@dataclass(frozen=True, slots=True, kw_only=True)
class Step:
    """A Step is one thing left to the operator: what and why, the exact commands."""

    title: str
    commands: tuple[str, ...] = ()
    note: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"title": self.title, "commands": list(self.commands), "note": self.note}


@dataclass(frozen=True, slots=True, kw_only=True)
class DeployKey:
    """A DeployKey is the SSH key pair the agent authenticates with: its private key's
    path, its public line (``ssh-ed25519 AAAA… comment``) and whether init made it."""

    path: Path
    public: str
    generated: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class InitResult:
    """An InitResult is what ``init`` wrote and what is left to do."""

    config_path: Path
    config: AgentConfig
    scheme: str
    deploy_key: DeployKey | None
    units_dir: Path | None
    steps: tuple[Step, ...] = field(default_factory=tuple)

    def to_json(self) -> dict[str, Any]:
        key = self.deploy_key
        return {
            "config": str(self.config_path),
            "node": self.config.node,
            "repo": self.config.repo,
            "branch": self.config.branch,
            "state_dir": self.config.state_dir,
            "ssh_key": str(key.path) if key else None,
            "public_key": key.public if key else None,
            "key_generated": key.generated if key else False,
            "known_hosts": self.config.auth.known_hosts,
            "token_file": self.config.auth.token_file,
            "units_dir": str(self.units_dir) if self.units_dir else None,
            "steps": [s.to_json() for s in self.steps],
        }


# ------------------------------------------------------------------ the URL


def check_repo(url: str) -> tuple[str, str]:
    """``(scheme, url)`` for a source the agent can fetch: ``ssh``, ``https``, ``http``,
    ``git`` or ``file``; a plain path comes back absolute (the units run from ``/``).

    Refused with UsageError (exit 2), naming the URL and the forms accepted: an
    unknown scheme (``htps://``), a network URL without a host or a path, a
    bad port, whitespace, and a local path that is not a directory (SPEC §2
    ``repo``: file://, git://, ssh://, https://).
    """
    from reconciler.git.url import parse_remote

    forms = (
        "give ssh://[user@]host[:port]/path, user@host:path, https://, git://, file:// or a path"
    )
    if not url or any(c.isspace() or ord(c) < 32 for c in url):
        raise UsageError(f"--repo {url!r}: not a repository URL — {forms}")
    try:
        endpoint = parse_remote(url)
    except ConfigError as exc:  # urlsplit's port or host: ssh://host:99999/x, https://[::1/x
        raise UsageError(f"--repo {exc.problem} — {forms}") from None
    scheme = endpoint.scheme
    if scheme not in SCHEMES:
        raise UsageError(f"--repo {url}: unknown scheme {scheme}:// — {forms}")
    if scheme == "file":
        path = urlsplit(url).path if url.startswith("file:") else url
        if not os.path.isdir(path):
            raise UsageError(f"--repo {url}: no repository there (not a directory) — {forms}")
        return scheme, url if url.startswith("file:") else os.path.abspath(url)
    path = urlsplit(url).path if "://" in url else url.split(":", 1)[1]
    if not endpoint.host or path.strip("/") == "":
        raise UsageError(f"--repo {url}: a {scheme} URL needs a host and a path — {forms}")
    return scheme, url


# ------------------------------------------------------------- the SSH key


def _ssh_keygen(*args: str) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            ["ssh-keygen", *args], capture_output=True, text=True, timeout=30, check=False
        )
    except FileNotFoundError:
        raise ConfigError(
            "ssh-keygen not found — install the OpenSSH client (apt-get install "
            "openssh-client) or give an existing key with --ssh-key"
        ) from None


def read_deploy_key(path: Path) -> DeployKey:
    """The existing private key at ``path`` as a DeployKey (generated False).

    The public line is ``path.pub`` when it is there, else derived by
    ``ssh-keygen -y``. Raises ConfigError (exit 2) when the key cannot be
    read without a passphrase (the agent runs unattended: libgit2 is given
    an empty one) or when ``path.pub`` is not its public half.
    """
    proc = _ssh_keygen("-y", "-P", "", "-f", str(path))
    if proc.returncode != 0:
        reason = " ".join(proc.stderr.split()) or f"ssh-keygen exit {proc.returncode}"
        raise ConfigError(
            f"not a private key usable without a passphrase ({reason})",
            where=str(path),
            hint="the agent runs unattended: give --ssh-key a key without passphrase, "
            "or a new path for init to generate one",
        )
    derived = proc.stdout.strip()
    pub = Path(f"{path}.pub")
    if not pub.exists():
        return DeployKey(path=path, public=derived, generated=False)
    public = pub.read_text(encoding="utf-8", errors="replace").strip()
    if public.split()[:2] != derived.split()[:2]:
        raise ConfigError(
            f"not the public half of {path}",
            where=str(pub),
            hint=f"replace it: ssh-keygen -y -f {path} > {pub}",
        )
    return DeployKey(path=path, public=public, generated=False)


def generate_deploy_key(path: Path, *, comment: str) -> DeployKey:
    """Make an ed25519 key pair without passphrase at ``path`` and ``path.pub``.

    The directory is made 0700 if missing; the private key is 0600
    (ssh-keygen's own mode). Generated in a temp directory beside it and
    renamed into place, the public half first, so a key is either whole or
    absent. Raises ConfigError when ssh-keygen fails, OSError when the
    directory cannot be made.
    """
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    work = Path(tempfile.mkdtemp(prefix=".reconciler-key.", dir=path.parent))
    try:
        tmp = work / "key"
        proc = _ssh_keygen("-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(tmp))
        if proc.returncode != 0:
            reason = " ".join(proc.stderr.split()) or f"exit {proc.returncode}"
            raise ConfigError(
                f"ssh-keygen could not make a key ({reason})",
                where=str(path),
                hint="give an existing key with --ssh-key",
            )
        os.rename(f"{tmp}.pub", f"{path}.pub")
        os.rename(tmp, path)
        fsync_dir(path.parent)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    public = Path(f"{path}.pub").read_text(encoding="utf-8").strip()
    return DeployKey(path=path, public=public, generated=True)


def host_pinned(known_hosts: Path, url: str) -> bool:
    """True when ``known_hosts`` exists and lists a key for the URL's host (and port),
    as the agent looks it up (:func:`reconciler.git.auth.known_host_keys`)."""
    from reconciler.git.auth import known_host_keys
    from reconciler.git.url import parse_remote

    if not known_hosts.is_file():
        return False
    endpoint = parse_remote(url)
    allowed, _ = known_host_keys(known_hosts, endpoint.host, endpoint.port)
    return bool(allowed)


# ------------------------------------------------------------ the units


def installed_units(dirs: tuple[Path, ...]) -> tuple[Path, str | None] | None:
    """``(directory, the --config its units pass or None)`` of the first of ``dirs``
    holding reconciler's units; None when none does.

    ``install-units`` appends ``--config PATH`` to each ExecStart when it was
    given one; packaged units carry none and so read the default path.
    """
    for directory in dirs:
        unit = directory / PULL_UNIT
        if not all((directory / name).is_file() for name in (PULL_UNIT, *ENABLE)):
            continue
        for line in unit.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("ExecStart="):
                words = shlex.split(line.removeprefix("ExecStart="))
                named = [b for a, b in zip(words, words[1:], strict=False) if a == "--config"]
                return directory, (named[-1] if named else None)
        return directory, None
    return None


# ------------------------------------------------------------- the file


def _scalar(key: str, value: object) -> str:
    """``key: value`` as YAML, quoted only where YAML needs it (a node named ``yes``)."""
    return yaml.safe_dump({key: value}, default_flow_style=False, width=10_000).strip()


def render_config(config: AgentConfig, *, scheme: str, written_at: str) -> str:
    """The commented YAML ``init`` writes for ``config``: the keys it sets, then the
    others commented out with their defaults, and where they are documented."""
    auth = config.auth
    lines = [
        f"# reconciler agent configuration, written by `reconciler init` at {written_at}.",
        "# Every key also exists as a flag (--state-dir for state_dir); a flag wins.",
        "# All keys, their defaults and meanings: docs/configuration.md of reconciler",
        "# (the Debian package also installs /etc/reconciler/config.yaml.example).",
        "# Unknown keys and wrong types are an error (exit 2).",
        "",
        _scalar("repo", config.repo) + "   # the desired-state repository",
        _scalar("branch", config.branch) + "   # the branch this host applies",
        _scalar("node", config.node) + "   # hosts/<node>.yaml; reports go to reports/<node>",
        _scalar("root", config.root) + "   # destinations are written under this directory",
        _scalar("state_dir", config.state_dir) + "   # cache, journal, backups (root only)",
    ]
    if scheme == "ssh":
        lines += [
            "auth:",
            "  "
            + _scalar("ssh_key", auth.ssh_key)
            + "   # deploy key; its .pub goes to the server",
            "  "
            + _scalar("known_hosts", auth.known_hosts)
            + "   # the git server's pinned host key",
        ]
    elif scheme in ("https", "http"):
        lines += [
            "auth:",
            "  " + _scalar("token_file", auth.token_file) + "   # the access token, one line",
            "  # ca_file: /etc/reconciler/ca.pem   # CA bundle of a private git server",
        ]
    lines += [
        "",
        "# mode: enforce          # audit: report drift, change nothing",
        "# interval: 5m           # reconciler run / the timer: period between runs",
        "# splay: 30s             # random delay before each periodic run",
        "# exclude_file: /etc/reconciler/exclude   # host-local paths never touched",
        "# lock_timeout: 60s",
        "# boot_timeout: 5m       # pull --boot: how long to retry the first fetch",
        "# net_timeout: 60s",
        "# identity: /etc/reconciler/identity.age   # age identity for secrets (reconciler keygen)",
        "# verify:",
        "#   allowed_signers: /etc/reconciler/allowed_signers   # apply signed commits only",
        "# report:",
        "#   push: true",
        "#   heartbeat: 24h",
        "#   webhook: https://…",
        "#   webhook_token_file: /etc/reconciler/webhook-token",
        "#   max_capture: 1MiB",
        "# metrics:",
        "#   textfile: /var/lib/node_exporter/textfile_collector/reconciler.prom",
        "# backups:",
        "#   keep: 10",
        "",
    ]
    return "\n".join(lines)


def _default_path(request: InitRequest, given: Path | None, name: str) -> Path:
    return given if given is not None else request.config_path.parent / name


def plan_config(request: InitRequest, *, scheme: str, repo: str) -> AgentConfig:
    """The configuration ``init`` will write, checked as a run would read it.

    Raises ConfigError (exit 2) for a bad node name or value, naming the flag.
    Touches nothing on disk.
    """
    # A flag that would be silently ignored is refused: it says the operator
    # expects another kind of source than the URL is.
    for flag, value, schemes in (
        ("--ssh-key", request.ssh_key, ("ssh",)),
        ("--known-hosts", request.known_hosts, ("ssh",)),
        ("--token-file", request.token_file, ("https", "http")),
    ):
        if value is not None and scheme not in schemes:
            kinds = "an ssh:// or user@host:path" if schemes == ("ssh",) else "an https://"
            raise UsageError(
                f"{flag}: only for {kinds} source, not {scheme} (--repo {repo}) — drop {flag} "
                "or correct --repo"
            )
    auth: dict[str, object] = {}
    if scheme == "ssh":
        auth = {
            "ssh_key": str(_default_path(request, request.ssh_key, "ssh/id_ed25519")),
            "known_hosts": str(_default_path(request, request.known_hosts, "known_hosts")),
        }
    elif scheme in ("https", "http"):
        auth = {"token_file": str(_default_path(request, request.token_file, "token"))}
    overrides = {
        "repo": repo,
        "branch": request.branch,
        "node": request.node,
        "root": os.path.abspath(request.root) if request.root else None,
        "state_dir": os.path.abspath(request.state_dir) if request.state_dir else None,
    }
    raw: dict[str, object] = {"auth": auth} if auth else {}
    return build_config(raw, overrides, where="reconciler init")


def write_new_config(path: Path, text: str, expected: AgentConfig) -> None:
    """Write ``text`` at ``path`` only if nothing is there, loading it back first.

    The temp file beside ``path`` (0600) is read by :func:`load_config`; it must
    give ``expected`` before it is linked into place — ``link``, not
    ``rename``, so that a file someone made meanwhile is never replaced.
    Raises ConfigExistsError, ConfigError, OSError; the temp file never stays.
    """
    tmp = Path(write_temp(path, text.encode(), mode=0o600))
    try:
        loaded = load_config(str(tmp), environ={})
        if loaded != expected:
            raise ConfigError(
                "the file written does not read back as intended",
                where=str(path),
                hint="report this as a bug; nothing was written",
            )
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise _exists(path) from None
        fsync_dir(path.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _exists(path: Path) -> ConfigExistsError:
    return ConfigExistsError(
        "a configuration is already there; init never overwrites one",
        where=str(path),
        hint=f"edit it, or move it away (mv {path} {path}.old) and run init again",
    )


# ------------------------------------------------------------- the whole


def init_host(request: InitRequest, *, written_at: str) -> InitResult:
    """Write the configuration, make the state directory and the deploy key.

    Checks first, then writes: UsageError/ConfigError (exit 2) for a bad
    URL, node or key and ConfigExistsError (exit 1) when the configuration
    exists, all before anything is written. ``written_at``: the UTC time
    stamped in the file's header. Returns the result with the next steps.
    """
    scheme, repo = check_repo(request.repo)
    config = plan_config(request, scheme=scheme, repo=repo)
    if config.root != "/" and not os.path.isdir(config.root):
        raise UsageError(f"--root {config.root}: not a directory — make it first")
    path = request.config_path
    if os.path.lexists(path):
        raise _exists(path)
    key: DeployKey | None = None
    key_path = Path(config.auth.ssh_key) if config.auth.ssh_key else None
    if key_path is not None and os.path.lexists(key_path):
        key = read_deploy_key(key_path)  # checked before anything is written
    text = render_config(config, scheme=scheme, written_at=written_at)
    build_config(yaml.safe_load(text), where=str(path))  # the text itself, still in memory

    path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    if key_path is not None and key is None:
        key = generate_deploy_key(key_path, comment=f"reconciler@{config.node}")
    if config.auth.known_hosts:
        # Empty, so that a run before the host key is pinned says "unknown host
        # … (key SHA256:…) — verify it and add it", with the fingerprint offered,
        # rather than that the file is missing. Never truncated if it exists.
        known = Path(config.auth.known_hosts)
        known.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        with contextlib.suppress(FileExistsError):
            os.close(os.open(known, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
    StateDir.at(config.state_dir).ensure()
    write_new_config(path, text, config)
    units = installed_units(request.units_dirs)
    return InitResult(
        config_path=path,
        config=config,
        scheme=scheme,
        deploy_key=key,
        units_dir=units[0] if units else None,
        steps=next_steps(request, config, scheme=scheme, key=key, units=units),
    )


def next_steps(
    request: InitRequest,
    config: AgentConfig,
    *,
    scheme: str,
    key: DeployKey | None,
    units: tuple[Path, str | None] | None,
) -> tuple[Step, ...]:
    """What is left to the operator, in order, with exact commands.

    The commands carry ``--config PATH`` unless the file is at the default
    path (the units and a later shell would otherwise read another file).
    Units: none installed → ``install-units`` first (a virtualenv install);
    installed but reading another file than ours → ``install-units --config``
    again (into /etc/systemd/system, which overrides a package's); then
    enable the boot run and the timer — never done here.
    """
    from reconciler.git.auth import host_spec
    from reconciler.git.url import parse_remote

    path = request.config_path
    named = "" if path == DEFAULT_CONFIG_PATH else f" --config {shlex.quote(str(path))}"
    prog = request.prog
    node, branch = config.node, config.branch
    steps: list[Step] = []
    if scheme == "ssh" and key is not None:
        steps.append(
            Step(
                title=(
                    f"Give this host's deploy key read access to branch {branch} and write "
                    f"access to reports/{node} only, on the git server "
                    "(docs/least-privilege.md shows the rules):"
                ),
                commands=(key.public,),
            )
        )
        known = Path(config.auth.known_hosts or "")
        if not host_pinned(known, repo_of(config)):
            endpoint = parse_remote(repo_of(config))
            port = "" if endpoint.port in (None, 22) else f" -p {endpoint.port}"
            steps.append(
                Step(
                    title=(
                        f"Pin the git server's host key ({host_spec(endpoint.host, endpoint.port)}"
                        f") in {known}:"
                    ),
                    commands=(
                        f"ssh-keyscan{port} {shlex.quote(endpoint.host)} >> {shlex.quote(str(known))}",
                        f"ssh-keygen -lf {shlex.quote(str(known))}",
                    ),
                    note=(
                        "compare every fingerprint with the server's own, obtained out of band "
                        "— on the git server: ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub; "
                        "a scan trusts whoever answers, and a run refuses any other key"
                    ),
                )
            )
    elif scheme in ("https", "http"):
        token = Path(config.auth.token_file or "")
        if not token.is_file():
            steps.append(
                Step(
                    title=(
                        f"Put an access token in {token} (read on branch {branch}, write on "
                        f"reports/{node}); paste it, then Ctrl-D:"
                    ),
                    commands=(f"install -m 0600 /dev/stdin {shlex.quote(str(token))}",),
                    note=(
                        "http:// sends the token in clear: prefer https://"
                        if scheme == "http"
                        else ""
                    ),
                )
            )
    steps.append(
        Step(
            title=(
                f"Describe this node in the repository: commit hosts/{node}.yaml on branch "
                f"{branch} (repo-layout/README.md), then check the repository in its clone:"
            ),
            # Run where the clone is (a laptop, the repository's CI), not on this host.
            commands=("reconciler validate --repo .",),
        )
    )
    steps.append(
        Step(
            title="See what the first run would do, changing nothing:",
            commands=(f"{prog} pull --dry-run{named}",),
        )
    )
    if units is None:
        dest = "" if request.units_dirs == UNIT_DIRS else f" --dest {request.units_dirs[0]}"
        steps.append(
            Step(
                title="Install the systemd units (none found in "
                + ", ".join(str(d) for d in request.units_dirs)
                + "):",
                commands=(f"{prog} install-units{dest}{named}", "systemctl daemon-reload"),
            )
        )
    elif (units[1] or str(DEFAULT_CONFIG_PATH)) != str(path):
        dest = "/etc/systemd/system" if request.units_dirs == UNIT_DIRS else str(units[0])
        steps.append(
            Step(
                title=(
                    f"The units in {units[0]} read "
                    f"{units[1] or DEFAULT_CONFIG_PATH}, not {path}: install units that read it"
                    + (" (they override the packaged ones):" if dest != str(units[0]) else ":")
                ),
                commands=(
                    f"{prog} install-units --dest {dest}{named}",
                    "systemctl daemon-reload",
                ),
            )
        )
    steps.append(
        Step(
            title="Converge at boot and every interval (init starts nothing itself):",
            commands=(f"systemctl enable --now {' '.join(ENABLE)}",),
            note=("or reconciler.service, the long-running agent, instead of the timer — not both"),
        )
    )
    return tuple(steps)


def repo_of(config: AgentConfig) -> str:
    """The configured repository URL (init always sets one)."""
    return config.primary_repo() or ""
