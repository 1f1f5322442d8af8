"""Auth: how fetch and push authenticate the server and themselves (issue #5).

Takes a remote URL and the ``auth`` section of the agent configuration;
produces pygit2 RemoteCallbacks that present a deploy key (SSH), a key from
ssh-agent (an operator's laptop) or a token (HTTPS) and, for SSH, check the
server's host key against ``known_hosts``. Only :mod:`reconciler.git.remote`
uses them.

Why the host-key check is done here (docs/field-notes.md): with pygit2's default
callbacks a fetch from a server whose host key does not match known_hosts
*succeeds* — pygit2's C-level certificate callback returns "accept" for SSH,
and Python code only ever sees ``certificate=None``. libgit2 does hand the
key over in C: ``git_cert_hostkey`` carries the SHA-256 of the host key blob
at bytes 44–75 (libgit2 1.9 layout; pygit2's cdef of the struct is shorter,
so it is read as bytes). :func:`install_hostkey_check` re-registers that
callback once per process: for SSH it asks our callbacks object to verify
the key, and refuses when the object cannot (fail closed, never "accept");
everything else goes to pygit2's own callback. The pygit2 version range is
pinned in pyproject.toml because of this layout, and on any other libgit2 an
SSH source is refused (:func:`require_hostkey_layout`) rather than read wrongly.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pygit2

from reconciler.config import AuthConfig
from reconciler.errors import ConfigError, SourceError
from reconciler.git.url import Endpoint, parse_remote, token_host
from reconciler.host.system import read_regular

log = logging.getLogger(__name__)

GIT_CERT_SSH_SHA256 = 1 << 2  # git_cert_ssh_t flag: hash_sha256 is filled in
HOSTKEY_STRUCT_SIZE = 96  # sizeof(git_cert_hostkey) in libgit2 1.9
SHA256_OFFSET = 44
HOSTKEY_LAYOUT_LIBGIT2 = (1, 9)  # the libgit2 minor whose layout the offsets above describe


def hostkey_layout_supported(version: tuple[int, ...]) -> bool:
    """True when libgit2 ``version`` (``pygit2.LIBGIT2_VER``) is the 1.9 series, whose
    ``git_cert_hostkey`` layout the host-key check reads by offset (module docstring)."""
    return tuple(version[:2]) == HOSTKEY_LAYOUT_LIBGIT2


def require_hostkey_layout(url: str, version: tuple[int, ...] = pygit2.LIBGIT2_VER) -> None:
    """Refuse an SSH source when libgit2 is not the version the host-key check knows.

    Another libgit2 may lay the struct out differently: reading it by the 1.9
    offsets would compare the wrong bytes, so SSH fails closed instead (docs/field-notes.md).
    Raises ConfigError (exit 2) naming the version and the way out.
    """
    if not hostkey_layout_supported(version):
        found = ".".join(str(part) for part in version)
        want = ".".join(str(part) for part in HOSTKEY_LAYOUT_LIBGIT2)
        raise ConfigError(
            f"repo: {url}: pygit2 is built on libgit2 {found}, but the SSH host-key check reads "
            f"libgit2 {want}'s layout — install the pygit2 version pinned in pyproject.toml for "
            "ssh:// sources (https://, git:// and file:// sources keep working)"
        )


def token_allowed(endpoint: Endpoint, hosts: tuple[str, ...]) -> bool:
    """True when the token may go to ``endpoint``: its ``host:port``, or its host for an
    entry without a port, is in ``hosts`` (``auth.token_hosts``, the primary's host
    included). git's credential helpers scope a password to its URL's host the same
    way; a token offered to any server that asks would go to a mirror or a reports
    URL named by an unverified commit (SPEC §12: a mirror needs no trust)."""
    wanted = {h.lower() for h in hosts}
    return token_host(endpoint) in wanted or endpoint.host.lower() in wanted


def is_ssh(url: str) -> bool:
    """True for ``ssh://`` and scp-like ``[user@]host:path`` remotes (git's rule)."""
    return parse_remote(url).scheme == "ssh"


def host_spec(host: str, port: int | None) -> str:
    """How known_hosts names a host: ``host``, or ``[host]:port`` off port 22."""
    return host if port in (None, 22) else f"[{host}]:{port}"


def known_host_keys(
    known_hosts: Path, host: str, port: int | None
) -> tuple[set[bytes], set[bytes]]:
    """SHA-256 digests of the keys ``known_hosts`` accepts and revokes for a host.

    Lookup is done by OpenSSH's own ``ssh-keygen -F`` (hashed names, patterns,
    ``[host]:port``). Raises ConfigError when the file is unreadable or
    ssh-keygen is missing.
    """
    if not known_hosts.is_file():
        # The key is set (an unset one is refused earlier): say how to make the file.
        raise ConfigError(
            f"auth.known_hosts {known_hosts}: file not found — pin the server's host key "
            f"there: ssh-keyscan {'-p ' + str(port) + ' ' if port not in (None, 22) else ''}"
            f"{host} >> {known_hosts}, then compare ssh-keygen -lf {known_hosts} with the "
            "server's own fingerprint"
        )
    try:
        proc = subprocess.run(
            ["ssh-keygen", "-F", host_spec(host, port), "-f", str(known_hosts)],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except FileNotFoundError:
        raise ConfigError(
            "ssh-keygen not found — install the OpenSSH client to use ssh:// sources"
        ) from None
    allowed: set[bytes] = set()
    revoked: set[bytes] = set()
    for line in proc.stdout.splitlines():
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        marker = None
        if fields[0].startswith("@"):
            marker, fields = fields[0], fields[1:]
        if len(fields) < 3:
            continue
        try:
            blob = base64.b64decode(fields[2], validate=True)
        except ValueError:
            continue
        digest = hashlib.sha256(blob).digest()
        if marker == "@revoked":
            revoked.add(digest)
        elif marker is None:
            allowed.add(digest)
        # @cert-authority lines are not supported: they never admit a key.
    return allowed, revoked


def fingerprint(digest: bytes) -> str:
    """OpenSSH's ``SHA256:…`` rendering of a key digest."""
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


class Callbacks(pygit2.RemoteCallbacks):
    """Callbacks present our credentials and pin the SSH host key; they also
    collect push rejections."""

    def __init__(self, url: str, auth: AuthConfig, *, ssh_agent: bool = False) -> None:
        super().__init__()
        self.url = url
        self.auth = auth
        self.ssh_agent = ssh_agent  # an operator's key: from ssh-agent, not auth.ssh_key
        self.endpoint = parse_remote(url)
        self.rejected: dict[str, str] = {}
        self._offered = 0  # credentials handed out on the current connection

    def begin(self) -> None:
        """A new connection starts: credentials may be offered once again."""
        self._offered = 0
        self.rejected = {}

    def refusal(self, kind: str) -> str:
        """The one line saying what to do when the server refused our credentials
        (``kind="auth"``) or we refused its TLS certificate (``"certificate"``);
        trying again cannot help. The kind comes from the error's type
        (:func:`reconciler.git.errors.map_git_errors`) or from these callbacks,
        never from libgit2's text."""
        if kind == "auth" and self.endpoint.scheme == "ssh" and self.ssh_agent:
            return (
                f"{self.url}: authentication refused for the keys in ssh-agent — add your "
                "public key to the server's authorized keys for this repository"
            )
        if kind == "auth" and self.endpoint.scheme == "ssh":
            return (
                f"{self.url}: authentication refused for deploy key {self.auth.ssh_key} — add "
                f"{self.auth.ssh_key}.pub to the server's authorized keys for this repository"
            )
        if (
            kind == "auth"
            and self.endpoint.scheme in ("http", "https")
            and not self.auth.token_file
        ):
            return (
                f"{self.url}: the server asks for credentials (401) and auth.token_file is not "
                "set — set auth.token_file to a file holding the token"
            )
        if kind == "auth" and self.endpoint.scheme in ("http", "https"):
            where = self.auth.token_file
            return (
                f"{self.url}: authentication refused: the server did not accept the token in "
                f"{where} (401) — replace it"
            )
        if kind == "certificate" and self.endpoint.scheme == "https":
            return (
                f"{self.url}: the server's TLS certificate is not trusted — set auth.ca_file "
                "to the CA bundle that signed it"
            )
        what = "authentication refused" if kind == "auth" else "certificate not trusted"
        return f"{self.url}: {what}"

    # -- SSH host key (called from the re-registered C callback) --------

    def check_ssh_hostkey(self, digest: bytes, host: str) -> bool:
        """Accept ``digest`` only if known_hosts lists it for this host.

        Raises SourceError naming the host, the offered fingerprint and what to
        do; the message survives pygit2 and reaches the report.
        """
        if not self.auth.known_hosts:
            raise SourceError(
                f"{self.url}: no auth.known_hosts configured — refusing to trust "
                f"{host}'s host key {fingerprint(digest)}"
            )
        allowed, revoked = known_host_keys(
            Path(self.auth.known_hosts), self.endpoint.host, self.endpoint.port
        )
        spec = host_spec(self.endpoint.host, self.endpoint.port)
        if digest in revoked:
            raise SourceError(
                f"{self.url}: host key {fingerprint(digest)} of {spec} is marked @revoked in "
                f"{self.auth.known_hosts} — refusing to connect"
            )
        if digest in allowed:
            return True
        if allowed:
            raise SourceError(
                f"{self.url}: HOST KEY CHANGED for {spec}: offered {fingerprint(digest)}, "
                f"{self.auth.known_hosts} has another — verify the server, then update "
                "known_hosts (someone may be intercepting the connection)"
            )
        raise SourceError(
            f"{self.url}: unknown host {spec} (key {fingerprint(digest)}) — verify it and add "
            f"it to {self.auth.known_hosts} (ssh-keyscan -p PORT HOST)"
        )

    # -- credentials ----------------------------------------------------

    def ssh_user(self, username_from_url: str | None) -> str:
        """The SSH login: the URL's ``user@``, else ``auth.ssh_user``, else ``git``."""
        return username_from_url or self.endpoint.user or self.auth.ssh_user or "git"

    def credentials(self, url: str, username_from_url: str | None, allowed_types: Any) -> Any:
        """Answer libgit2's credential ask: a login name, a deploy key or a token.

        For an ``ssh://host/path`` URL without ``user@`` libgit2 first asks for
        the login name alone (``allowed_types`` is exactly USERNAME), then, on
        the same connection, for a key. The name is not a secret and is not
        counted: only keys and tokens are offered once per connection.
        Raises SourceError on a second ask (the server refused) or when the
        configuration lacks what the URL's scheme needs.
        """
        if allowed_types == pygit2.enums.CredentialType.USERNAME:
            return pygit2.Username(self.ssh_user(username_from_url))
        # libgit2 asks again after every refusal: a second ask on one connection
        # means the server said no. Stop there rather than replay a bad token
        # (servers ban clients after a few failed logins).
        self._offered += 1
        if self._offered > 1:
            raise SourceError(self.refusal("auth"))
        if self.endpoint.scheme == "ssh" and self.ssh_agent:
            return pygit2.KeypairFromAgent(username_from_url or self.endpoint.user or "git")
        if self.endpoint.scheme == "ssh":
            if not self.auth.ssh_key:
                raise SourceError(f"{self.url}: auth.ssh_key is not set — configure a deploy key")
            private = self.auth.ssh_key
            public = private + ".pub"
            user = self.ssh_user(username_from_url)
            return pygit2.Keypair(user, public if os.path.exists(public) else None, private, "")
        if self.auth.token_file and not token_allowed(self.endpoint, self.auth.token_hosts):
            raise SourceError(
                f"{self.url}: the server asks for credentials, and auth.token_file is offered "
                f"only to {', '.join(self.auth.token_hosts) or 'no host'}"
                f" — add {token_host(self.endpoint)} to auth.token_hosts if it should get it"
            )
        if self.auth.token_file:
            try:
                token = read_regular(self.auth.token_file).decode("utf-8").strip()
            except OSError as exc:
                raise SourceError(
                    f"{self.auth.token_file}: cannot read the token: {exc.strerror}"
                ) from None
            except UnicodeDecodeError:
                raise SourceError(f"{self.auth.token_file}: the token is not UTF-8 text") from None
            user = username_from_url or self.endpoint.user or "x-access-token"
            return pygit2.UserPass(user, token)
        # Nothing to offer: answering None made pygit2 raise TypeError ("credential
        # does not implement interface"), an internal error instead of a refusal.
        raise SourceError(self.refusal("auth"))

    def push_update_reference(self, refname: str, message: str | None) -> None:
        if message:
            self.rejected[refname] = message


_installed = [False]


def install_hostkey_check() -> None:
    """Route libgit2's certificate callback through :meth:`Callbacks.check_ssh_hostkey`.

    Idempotent. After it, no SSH connection made through pygit2 in this
    process is accepted without a known_hosts match (see module docstring).
    """
    if _installed[0]:
        return
    from pygit2 import callbacks as pygit2_callbacks
    from pygit2._libgit2 import ffi
    from pygit2._libgit2 import lib as C  # noqa: N812 (libgit2's C namespace)

    original = pygit2_callbacks._certificate_check_cb

    def certificate_check(cert: Any, valid: int, host: Any, payload: Any) -> int:
        data = ffi.from_handle(payload)
        if cert.cert_type != C.GIT_CERT_HOSTKEY_LIBSSH2:
            if not valid and hasattr(data, "refusal"):
                # An untrusted TLS certificate: refuse with a message that says what to do.
                data._stored_exception = SourceError(data.refusal("certificate"))
                return int(C.GIT_EUSER)
            return int(original(cert, valid, host, payload))
        try:
            check = getattr(data, "check_ssh_hostkey", None)
            if check is None:
                return int(C.GIT_ECERTIFICATE)  # never accept an unchecked SSH host
            require_hostkey_layout(ffi.string(host).decode())  # never read an unknown layout
            raw = bytes(ffi.buffer(ffi.cast("unsigned char *", cert), HOSTKEY_STRUCT_SIZE))
            kinds = int.from_bytes(raw[4:8], sys.byteorder)
            if not kinds & GIT_CERT_SSH_SHA256:
                raise SourceError(f"{ffi.string(host).decode()}: no SHA-256 host key hash offered")
            digest = raw[SHA256_OFFSET : SHA256_OFFSET + 32]
            ok = check(digest, ffi.string(host).decode())
            return 0 if ok else int(C.GIT_ECERTIFICATE)
        except BaseException as exc:  # re-raised by pygit2 after the call returns
            data._stored_exception = exc
            return int(C.GIT_EUSER)

    ffi.def_extern(name="_certificate_check_cb")(certificate_check)
    _installed[0] = True


def set_net_timeout(seconds: float) -> None:
    """Bound libgit2's connect and each socket read/write to ``seconds`` (config
    ``net_timeout``). Process-wide, like every libgit2 option; 0 means no limit."""
    ms = max(0, int(seconds * 1000))
    pygit2.settings.server_connect_timeout = ms
    pygit2.settings.server_timeout = ms


def check_auth(url: str, auth: AuthConfig, *, operator: bool = False) -> AuthConfig:
    """Check what an SSH or token source needs; the auth settings to use for ``url``.

    Raises ConfigError (exit 2) for an SSH source without ``auth.ssh_key`` or
    ``auth.known_hosts`` or on an unknown libgit2 (:func:`require_hostkey_layout`),
    a token with a cleartext ``http://`` URL (anyone on the path could read
    it and replay it), or a missing CA bundle. With ``operator`` (a laptop,
    SPEC §6) an SSH source without ``auth.ssh_key`` takes its key from
    ssh-agent, and host keys are checked against ``~/.ssh/known_hosts``
    unless ``auth.known_hosts`` names another file. Installs the host-key
    check and the CA bundle, both process-wide libgit2 settings.
    """
    install_hostkey_check()
    endpoint = parse_remote(url)
    if operator and endpoint.scheme == "ssh" and not auth.ssh_key:
        require_hostkey_layout(url)
        return replace(
            auth, known_hosts=auth.known_hosts or str(Path.home() / ".ssh" / "known_hosts")
        )
    if endpoint.scheme == "http" and auth.token_file:
        raise ConfigError(
            f"repo: {url}: auth.token_file would be sent in cleartext over http:// — use the "
            "server's https:// URL"
        )
    if endpoint.scheme == "ssh":
        require_hostkey_layout(url)
        if not auth.known_hosts:
            raise ConfigError(
                f"repo: {url}: an ssh source needs auth.known_hosts (host keys are always "
                "checked) — add the server's key with ssh-keyscan"
            )
        if not auth.ssh_key:
            raise ConfigError(f"repo: {url}: an ssh source needs auth.ssh_key (a deploy key)")
        if not Path(auth.known_hosts).is_file():
            known_host_keys(Path(auth.known_hosts), endpoint.host, endpoint.port)  # says how
    if auth.ca_file:
        if not Path(auth.ca_file).is_file():
            raise ConfigError(f"{auth.ca_file}: auth.ca_file not found")
        pygit2.settings.set_ssl_cert_locations(auth.ca_file, None)
    return auth
