"""Real git servers on 127.0.0.1 for the transport and trust tests (issue #5).

Nothing is mocked: ``sshd`` from openssh-server with a ``git-shell`` user,
``sshd`` with a gitolite3 user, ``nginx`` + ``fcgiwrap`` + ``git http-backend``
over TLS with a CA made by ``openssl``, and a byte-counting TCP relay in front
of ``git daemon``. Each server runs as a subprocess on a free loopback port and
is stopped (by its own process group) at teardown.

A missing Debian package is a test FAILURE naming the package (CI installs
them: openssh-server openssh-client gitolite3 nginx-light fcgiwrap openssl
gnupg git), never a skip. The servers need root (``useradd``, sshd), as in CI.

Base directories come from ``tempfile.mkdtemp(dir="/tmp")`` and are made 0755:
pytest's tmp dirs are 0700, and the git user that sshd switches to could not
traverse them.
"""

from __future__ import annotations

import base64
import contextlib
import os
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from tests.conftest import GIT_ENV, Fleet, free_port, git

SSHD = "/usr/sbin/sshd"
NGINX = "/usr/sbin/nginx"
FCGIWRAP = "/usr/sbin/fcgiwrap"
HTTP_BACKEND = "/usr/lib/git-core/git-http-backend"
GIT_SHELL = "/usr/bin/git-shell"


# ------------------------------------------------------------------ basics


def require(program: str, package: str) -> str:
    """The path of ``program``; FAIL (never skip) naming the Debian ``package`` if missing."""
    path = program if os.path.isabs(program) else shutil.which(program)
    if not path or not os.access(path, os.X_OK):
        pytest.fail(
            f"{program} not found — install the Debian package {package} "
            f"(apt-get install -y {package}); CI installs it, these tests never skip",
            pytrace=False,
        )
    return path


def require_root(why: str) -> None:
    if os.geteuid() != 0:
        pytest.fail(f"{why} needs root (useradd, sshd); CI runs as root", pytrace=False)


def run(argv: list[str], *, env: dict[str, str] | None = None) -> str:
    """Run a harness command; raise with its stderr when it fails."""
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, check=False, timeout=60)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr}")
    return str(proc.stdout)


def public_base() -> Path:
    """A fresh directory under /tmp that other users can traverse (0755)."""
    base = Path(tempfile.mkdtemp(prefix="rc-", dir="/tmp"))
    base.chmod(0o755)
    return base


def keygen(path: Path, comment: str = "") -> str:
    """A new ed25519 key pair at ``path`` / ``path.pub``; returns ``"<type> <base64>"``."""
    require("ssh-keygen", "openssh-client")
    run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)])
    path.chmod(0o600)
    kind, blob = path.with_name(path.name + ".pub").read_text().split()[:2]
    return f"{kind} {blob}"


def write_config(path: Path, **sections: object) -> Path:
    """An agent configuration file (SPEC §2) for ``pull --config PATH``."""
    path.write_text(yaml.safe_dump(sections, sort_keys=False))
    return path


def server_git(bare: Path, *args: str, check: bool = True) -> str:
    """The git CLI on a server-side bare repository, whoever owns it."""
    proc = subprocess.run(
        ["git", "-c", "safe.directory=*", f"--git-dir={bare}", *args],
        env={**os.environ, **GIT_ENV},
        capture_output=True,
        text=True,
        check=False,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"git {' '.join(args)} in {bare} failed: {proc.stderr}")
    return proc.stdout


def ssh_command(key: Path, known_hosts: Path) -> str:
    """GIT_SSH_COMMAND for the git CLI: this key only, this known_hosts only, strict."""
    return (
        f"ssh -F /dev/null -i {key} -o IdentitiesOnly=yes -o BatchMode=yes "
        f"-o UserKnownHostsFile={known_hosts} -o StrictHostKeyChecking=yes"
    )


def _stop_group(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def _wait_port(port: int, proc: subprocess.Popen[bytes]) -> bool:
    """True once ``port`` accepts connections and ``proc`` still runs (it did bind it)."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        except OSError:
            time.sleep(0.05)
            continue
        time.sleep(0.1)  # a server that lost the port to someone else exits at once
        return proc.poll() is None
    return False


# ------------------------------------------------------------------ users


def make_user(name: str, home: Path, shell: str) -> None:
    """A system user sshd will let in with a key: useradd leaves it locked (``!``)."""
    require("useradd", "passwd")
    run(["useradd", "--create-home", "--home-dir", str(home), "--shell", shell, name])
    run(["usermod", "-p", "*", name])  # docs/field-notes.md: a locked account is refused by sshd


def remove_user(name: str) -> None:
    subprocess.run(["userdel", name], capture_output=True, check=False)


# ------------------------------------------------------------------ sshd


@dataclass
class Sshd:
    """A running OpenSSH server on 127.0.0.1 with its own host key and config."""

    base: Path
    port: int
    proc: subprocess.Popen[bytes]
    log: Path
    host_key: str  # "<type> <base64>" of the server's host key

    def known_hosts_line(self, key: str | None = None, *, marker: str = "") -> str:
        spec = f"[127.0.0.1]:{self.port}"
        return f"{marker + ' ' if marker else ''}{spec} {key or self.host_key}\n"

    def connections(self) -> int:
        """How many TCP connections sshd has accepted so far (LogLevel VERBOSE)."""
        return self.log.read_text(errors="replace").count("Connection from ")

    def stop(self) -> None:
        _stop_group(self.proc)


def start_sshd(base: Path, *, user: str, authorized_keys: str) -> Sshd:
    """sshd -D on a free loopback port, per docs/field-notes.md; FAIL naming the package if missing."""
    require_root("sshd on loopback")
    require(SSHD, "openssh-server")
    Path("/run/sshd").mkdir(parents=True, exist_ok=True)  # privilege separation dir
    hostkey = base / "hostkey"
    host_key = keygen(hostkey, "reconciler-test-host")
    log = base / "sshd.log"
    for _ in range(5):
        port = free_port()
        config = base / "sshd_config"
        config.write_text(
            f"Port {port}\n"
            "ListenAddress 127.0.0.1\n"
            f"HostKey {hostkey}\n"
            f"PidFile {base / 'sshd.pid'}\n"
            "UsePAM no\n"
            "PasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\n"
            "PubkeyAuthentication yes\n"
            "StrictModes no\n"
            f"AuthorizedKeysFile {authorized_keys}\n"
            f"AllowUsers {user}\n"
            "LogLevel VERBOSE\n"
            "MaxStartups 200\n"
            "MaxSessions 200\n"
        )
        proc = subprocess.Popen(
            [SSHD, "-D", "-f", str(config), "-E", str(log)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        if _wait_port(port, proc):
            return Sshd(base=base, port=port, proc=proc, log=log, host_key=host_key)
        _stop_group(proc)
    text = log.read_text(errors="replace") if log.exists() else ""
    raise AssertionError(f"sshd did not start: {text[-2000:]}")


@dataclass
class SshGitServer:
    """sshd + a ``git-shell`` user owning bare repositories; one deploy key authorized."""

    base: Path
    user: str
    sshd: Sshd
    deploy_key: Path  # private key; its .pub is in authorized_keys
    repos: Path

    @property
    def port(self) -> int:
        return self.sshd.port

    def url(self, bare: Path) -> str:
        return f"ssh://{self.user}@127.0.0.1:{self.port}{bare}"

    def known_hosts(self, path: Path, text: str | None = None) -> Path:
        path.write_text(self.sshd.known_hosts_line() if text is None else text)
        return path

    def admin_ssh(self, known_hosts: Path) -> str:
        return ssh_command(self.deploy_key, known_hosts)


@pytest.fixture(scope="session", name="ssh_server")
def ssh_server_fixture() -> Iterator[SshGitServer]:
    """A ``git-shell`` user and an sshd for it, once per session (docs/field-notes.md recipe)."""
    require_root("the ssh server")
    require(SSHD, "openssh-server")
    require(GIT_SHELL, "git")
    base = public_base()
    user = f"rcgit{os.getpid()}"
    deploy = base / "deploy"
    deploy_pub = keygen(deploy, "deploy@fleet")
    (base / "authorized_keys").write_text(deploy_pub + "\n")
    repos = base / "repos"
    make_user(user, base / "home", GIT_SHELL)
    sshd = None
    try:
        repos.mkdir()
        shutil.chown(repos, user, user)
        sshd = start_sshd(base, user=user, authorized_keys=str(base / "authorized_keys"))
        yield SshGitServer(base=base, user=user, sshd=sshd, deploy_key=deploy, repos=repos)
    finally:
        if sshd is not None:
            sshd.stop()
        remove_user(user)
        shutil.rmtree(base, ignore_errors=True)


class ServerFleet(Fleet):
    """The ``fleet`` fixture's repository, served by another server (sshd, gitolite, nginx).

    The operator's working clone pushes there (``commit()``); the report helpers
    read the server's own bare repository.
    """

    def __init__(self, fleet: Fleet, *, bare: Path, url: str) -> None:
        self.daemon = fleet.daemon
        self.name = bare.name
        self.bare = bare
        self.work = fleet.work
        self.url = url

    def report(self, node: str) -> dict:
        import json

        return json.loads(server_git(self.bare, "show", f"refs/heads/reports/{node}:report.json"))

    def report_log(self, node: str) -> list[str]:
        out = server_git(
            self.bare, "log", "--format=%s", f"refs/heads/reports/{node}", "--", check=False
        )
        return [line for line in out.splitlines() if line]

    def report_files(self, node: str) -> list[str]:
        return server_git(
            self.bare, "ls-tree", "-r", "--name-only", f"refs/heads/reports/{node}"
        ).split()

    def refs(self) -> dict[str, str]:
        """Every ref on the server: name → commit."""
        out = server_git(self.bare, "for-each-ref", "--format=%(refname) %(objectname)")
        pairs = (line.split(" ", 1) for line in out.splitlines())
        return {name: oid for name, oid in pairs}

    def ref(self, name: str) -> str | None:
        return self.refs().get(name)


_served = [0]


@pytest.fixture(name="ssh_fleet")
def ssh_fleet_fixture(fleet: Fleet, ssh_server: SshGitServer) -> ServerFleet:
    """The example fleet on the sshd server, owned by the git user; the operator pushes over SSH."""
    _served[0] += 1
    bare = ssh_server.repos / f"fleet-{_served[0]}.git"
    git("clone", "-q", "--bare", str(fleet.bare), str(bare))
    run(["chown", "-R", f"{ssh_server.user}:{ssh_server.user}", str(bare)])
    url = ssh_server.url(bare)
    known = fleet.work.parent / "operator_known_hosts"
    ssh_server.known_hosts(known)
    git("remote", "set-url", "origin", url, cwd=fleet.work)
    git("config", "core.sshCommand", ssh_server.admin_ssh(known), cwd=fleet.work)
    return ServerFleet(fleet, bare=bare, url=url)


# ------------------------------------------------------------------ HTTPS


@dataclass
class HttpsGitServer:
    """nginx (TLS, token check) → fcgiwrap → git http-backend, serving ``repos``."""

    base: Path
    port: int
    repos: Path
    ca_file: Path
    token: str
    user: str
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def url(self, name: str) -> str:
        return f"https://127.0.0.1:{self.port}/{name}"

    def authorization(self) -> str:
        raw = f"{self.user}:{self.token}".encode()
        return "Basic " + base64.b64encode(raw).decode()

    def stop(self) -> None:
        for proc in reversed(self.procs):
            _stop_group(proc)


def make_ca(base: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for IP 127.0.0.1 signed by it: (ca.pem, cert, key)."""
    openssl = require("openssl", "openssl")
    ca_key, ca = base / "ca.key", base / "ca.pem"
    key, csr, cert = base / "server.key", base / "server.csr", base / "server.pem"
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run([openssl, "req", "-x509", *ec, "-keyout", str(ca_key), "-out", str(ca)]
        + ["-days", "2", "-subj", "/CN=reconciler test CA"])  # fmt: skip
    run([openssl, "req", *ec, "-keyout", str(key), "-out", str(csr), "-subj", "/CN=127.0.0.1"])
    ext = base / "server.ext"
    ext.write_text(
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n"
    )
    run([openssl, "x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key)]
        + ["-CAcreateserial", "-out", str(cert), "-days", "2", "-extfile", str(ext)])  # fmt: skip
    return ca, cert, key


NGINX_CONF = """\
worker_processes 1;
user root root;
daemon off;
pid {base}/nginx.pid;
error_log {base}/nginx-error.log info;
events {{ worker_connections 512; }}
http {{
  access_log {base}/nginx-access.log;
  client_body_temp_path {base}/tmp/body;
  fastcgi_temp_path {base}/tmp/fastcgi;
  proxy_temp_path {base}/tmp/proxy;
  uwsgi_temp_path {base}/tmp/uwsgi;
  scgi_temp_path {base}/tmp/scgi;
  server {{
    listen 127.0.0.1:{port} ssl;
    ssl_certificate {cert};
    ssl_certificate_key {key};
    client_max_body_size 0;
    location / {{
      if ($http_authorization != "{authorization}") {{
        add_header WWW-Authenticate 'Basic realm="fleet"' always;
        return 401;
      }}
      fastcgi_pass unix:{base}/fcgiwrap.sock;
      fastcgi_param SCRIPT_FILENAME {backend};
      fastcgi_param GIT_PROJECT_ROOT {repos};
      fastcgi_param GIT_HTTP_EXPORT_ALL "";
      fastcgi_param PATH_INFO $uri;
      fastcgi_param QUERY_STRING $query_string;
      fastcgi_param REQUEST_METHOD $request_method;
      fastcgi_param CONTENT_TYPE $content_type;
      fastcgi_param CONTENT_LENGTH $content_length;
      fastcgi_param REMOTE_ADDR $remote_addr;
      fastcgi_param SERVER_PROTOCOL $server_protocol;
      fastcgi_param GATEWAY_INTERFACE CGI/1.1;
      fastcgi_param HTTPS on;
    }}
  }}
}}
"""


@pytest.fixture(scope="session", name="https_server")
def https_server_fixture() -> Iterator[HttpsGitServer]:
    """nginx + fcgiwrap + git http-backend over TLS on loopback, once per session."""
    nginx = require(NGINX, "nginx-light")
    fcgiwrap = require(FCGIWRAP, "fcgiwrap")
    require(HTTP_BACKEND, "git")
    base = public_base()
    repos = base / "repos"
    repos.mkdir()
    for sub in ("body", "fastcgi", "proxy", "uwsgi", "scgi"):
        (base / "tmp" / sub).mkdir(parents=True)
    ca, cert, key = make_ca(base)
    token = "tok-" + base64.b32encode(os.urandom(15)).decode().lower()
    server = HttpsGitServer(
        base=base, port=0, repos=repos, ca_file=ca, token=token, user="x-access-token"
    )
    try:
        sock = base / "fcgiwrap.sock"
        with open(base / "fcgiwrap.log", "wb") as errlog:
            fcgi = subprocess.Popen(
                [fcgiwrap, "-c", "4", "-s", f"unix:{sock}"],
                stdout=subprocess.DEVNULL,
                stderr=errlog,
                start_new_session=True,
            )
        server.procs.append(fcgi)
        deadline = time.monotonic() + 10
        while not sock.exists() and time.monotonic() < deadline and fcgi.poll() is None:
            time.sleep(0.05)
        assert sock.exists(), "fcgiwrap did not create its socket"
        for _ in range(5):
            port = free_port()
            conf = base / "nginx.conf"
            conf.write_text(
                NGINX_CONF.format(
                    base=base,
                    port=port,
                    cert=cert,
                    key=key,
                    authorization=server.authorization(),
                    backend=HTTP_BACKEND,
                    repos=repos,
                )
            )
            with open(base / "nginx-stderr.log", "ab") as errlog:
                proc = subprocess.Popen(
                    [nginx, "-c", str(conf), "-p", str(base)],
                    stdout=subprocess.DEVNULL,
                    stderr=errlog,
                    start_new_session=True,
                )
            if _wait_port(port, proc):
                server.procs.append(proc)
                server.port = port
                break
            _stop_group(proc)
        else:
            errors = (base / "nginx-error.log").read_text(errors="replace")
            raise AssertionError(f"nginx did not start: {errors[-2000:]}")
        yield server
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(name="https_fleet")
def https_fleet_fixture(fleet: Fleet, https_server: HttpsGitServer) -> ServerFleet:
    """The example fleet served over HTTPS; pushes allowed (http.receivepack)."""
    _served[0] += 1
    name = f"fleet-{_served[0]}.git"
    bare = https_server.repos / name
    git("clone", "-q", "--bare", str(fleet.bare), str(bare))
    server_git(bare, "config", "http.receivepack", "true")
    url = https_server.url(name)
    git("remote", "set-url", "origin", url, cwd=fleet.work)
    git("config", "http.sslCAInfo", str(https_server.ca_file), cwd=fleet.work)
    git(
        "config",
        "http.extraHeader",
        f"Authorization: {https_server.authorization()}",
        cwd=fleet.work,
    )
    return ServerFleet(fleet, bare=bare, url=url)


# ------------------------------------------------------------------ byte counting


class CountingRelay:
    """A TCP relay 127.0.0.1:port → target that counts the bytes each way.

    Put in front of ``git daemon`` it measures what a poll costs the server:
    ``to_client`` is what the host received, ``to_server`` what it sent.
    ``refuse = N`` resets the next N connections at once (RST, the way a git
    server at its connection limit drops a client); ``refused`` counts them.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.to_client = 0
        self.to_server = 0
        self.connections = 0
        self.refuse = 0
        self.refused = 0
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self._stop = False
        self._sockets: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def reset(self) -> None:
        with self._lock:
            self.to_client = self.to_server = self.connections = 0

    def _accept(self) -> None:
        while not self._stop:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                self.connections += 1
                drop = self.refuse > 0
                if drop:
                    self.refuse -= 1
                    self.refused += 1
            if drop:
                # SO_LINGER 0: close() sends RST, the client sees "connection reset by peer".
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                client.close()
                continue
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            with self._lock:
                self._sockets += [client, upstream]
            for src, dst, up in ((client, upstream, True), (upstream, client, False)):
                threading.Thread(target=self._pipe, args=(src, dst, up), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, up: bool) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                with self._lock:
                    if up:
                        self.to_server += len(data)
                    else:
                        self.to_client += len(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self._stop = True
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        self._listener.close()
        self._thread.join(timeout=5)
        with self._lock:
            for sock in self._sockets:
                sock.close()


# ------------------------------------------------------------------ gitolite


GITOLITE_CONF = """\
# Hosts read the whole desired state and write only their own report branch.
@hosts = web1 db1

repo gitolite-admin
    RW+     = admin

repo fleet
    RW+                             = admin
    R                               = @hosts
    RW  refs/heads/reports/web1$    = web1
    RW  refs/heads/reports/db1$     = db1
"""


@dataclass
class GitoliteServer:
    """gitolite3 behind sshd: admin, web1 and db1 keys; repo ``fleet`` per GITOLITE_CONF."""

    base: Path
    user: str
    sshd: Sshd
    keys: Path  # <name> private keys, <name>.pub public keys
    known_hosts: Path

    @property
    def repositories(self) -> Path:
        return self.base / "home" / "repositories"

    def url(self, repo: str) -> str:
        return f"ssh://{self.user}@127.0.0.1:{self.sshd.port}/{repo}.git"

    def key(self, name: str) -> Path:
        return self.keys / name

    def git_as(self, name: str, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
        """The git CLI over SSH with ``name``'s key (never raises: callers check refusals)."""
        env = {
            **os.environ,
            **GIT_ENV,
            "GIT_SSH_COMMAND": ssh_command(self.key(name), self.known_hosts),
        }
        return subprocess.run(
            ["git", *args],
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )


@pytest.fixture(scope="session", name="gitolite_server")
def gitolite_server_fixture() -> Iterator[GitoliteServer]:
    """A gitolite3 user set up with an admin key, sshd for it, and GITOLITE_CONF pushed."""
    require_root("gitolite on loopback")
    require(SSHD, "openssh-server")
    require("gitolite", "gitolite3")
    base = public_base()
    user = f"rcgl{os.getpid()}"
    keys = base / "keys"
    keys.mkdir()
    keys.chmod(0o755)
    for name in ("admin", "web1", "db1"):
        keygen(keys / name, f"{name}@fleet")
    make_user(user, base / "home", "/bin/sh")
    sshd = None
    try:
        setup = subprocess.run(
            ["su", "-", user, "-c", f"gitolite setup -pk {keys / 'admin.pub'}"],
            capture_output=True,
            text=True,
            check=False,
            timeout=120,
        )
        if setup.returncode != 0:
            pytest.fail(f"gitolite setup failed: {setup.stderr}{setup.stdout}", pytrace=False)
        sshd = start_sshd(base, user=user, authorized_keys="%h/.ssh/authorized_keys")
        known = base / "known_hosts"
        known.write_text(sshd.known_hosts_line())
        server = GitoliteServer(base=base, user=user, sshd=sshd, keys=keys, known_hosts=known)
        admin = base / "gitolite-admin"
        proc = server.git_as("admin", "clone", "-q", server.url("gitolite-admin"), str(admin))
        assert proc.returncode == 0, f"cannot clone gitolite-admin: {proc.stderr}"
        (admin / "conf" / "gitolite.conf").write_text(GITOLITE_CONF)
        for name in ("web1", "db1"):
            shutil.copy(keys / f"{name}.pub", admin / "keydir" / f"{name}.pub")
        git("add", "-A", cwd=admin)
        git("commit", "-q", "-m", "fleet: hosts read, write their own report branch", cwd=admin)
        proc = server.git_as("admin", "push", "-q", "origin", "HEAD:master", cwd=admin)
        assert proc.returncode == 0, f"cannot push the gitolite config: {proc.stderr}"
        yield server
    finally:
        if sshd is not None:
            sshd.stop()
        remove_user(user)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(name="gitolite_fleet")
def gitolite_fleet_fixture(fleet: Fleet, gitolite_server: GitoliteServer) -> ServerFleet:
    """The example fleet pushed (by admin) to gitolite's ``fleet`` repo, no report branches."""
    url = gitolite_server.url("fleet")
    push = gitolite_server.git_as(
        "admin", "push", "-q", "-f", url, "HEAD:refs/heads/main", cwd=fleet.work
    )
    assert push.returncode == 0, push.stderr
    bare = gitolite_server.repositories / "fleet.git"
    for ref in server_git(
        bare, "for-each-ref", "--format=%(refname)", "refs/heads/reports/"
    ).split():
        gone = gitolite_server.git_as("admin", "push", "-q", url, f":{ref}", cwd=fleet.work)
        assert gone.returncode == 0, gone.stderr
    git("remote", "set-url", "origin", url, cwd=fleet.work)
    git(
        "config",
        "core.sshCommand",
        ssh_command(gitolite_server.key("admin"), gitolite_server.known_hosts),
        cwd=fleet.work,
    )
    return ServerFleet(fleet, bare=bare, url=url)


@contextlib.contextmanager
def serving(handle: Callable[[socket.socket], None]) -> Iterator[int]:
    """A TCP server on 127.0.0.1 that runs ``handle(conn)`` in a thread per connection.

    Yields the port. At exit the accept loop stops, handlers are waited for
    (they should watch their own stop signal) and every connection is closed.
    """
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.1)
    stop = threading.Event()
    conns: list[socket.socket] = []
    threads: list[threading.Thread] = []

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conns.append(conn)
            thread = threading.Thread(target=handle, args=(conn,), daemon=True)
            thread.start()
            threads.append(thread)

    acceptor = threading.Thread(target=accept, daemon=True)
    acceptor.start()
    try:
        yield int(listener.getsockname()[1])
    finally:
        stop.set()
        acceptor.join(timeout=5)
        for thread in threads:
            thread.join(timeout=5)
        for conn in conns:
            conn.close()
        listener.close()


@contextlib.contextmanager
def tarpit() -> Iterator[tuple[int, list[socket.socket]]]:
    """A server that accepts connections and never answers: (port, accepted sockets)."""
    held: list[socket.socket] = []
    with serving(held.append) as port:
        yield port, held
