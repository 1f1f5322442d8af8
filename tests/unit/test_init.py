"""``reconciler init`` (issue 12): the configuration it writes, what it refuses, the
deploy key and the next steps it prints.

Real files in temp directories, the real ``ssh-keygen``, the real
``install-units``; ``main`` is called in-process (the subprocess path and a
real pull with the written configuration: tests/integration/test_init.py).
"""

from __future__ import annotations

import io
import json
import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from reconciler.cli.main import main
from reconciler.config import load_config


def run_cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(list(argv), out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


@pytest.fixture
def umask() -> Iterator[object]:
    saved = os.umask(0o022)
    os.umask(saved)
    yield os.umask
    os.umask(saved)


@pytest.fixture
def site(tmp_path: Path) -> dict[str, Path]:
    """Where one host's files go: none of them exists yet."""
    return {
        "config": tmp_path / "etc" / "reconciler" / "config.yaml",
        "state": tmp_path / "var" / "reconciler",
        "units": tmp_path / "units",
        "root": tmp_path,
    }


def init(site: dict[str, Path], *args: str) -> tuple[int, str, str]:
    return run_cli(
        "init",
        "--config",
        str(site["config"]),
        "--state-dir",
        str(site["state"]),
        "--units-dir",
        str(site["units"]),
        *args,
    )


SSH_URL = "ssh://git@git.example.com:2222/fleet.git"


def test_init_writes_a_config_a_run_loads_with_the_deploy_key_and_state_dir(site, umask):
    umask(0o002)  # modes must not depend on the operator's umask
    code, out, err = init(site, "--repo", SSH_URL, "--node", "web1", "--root", str(site["root"]))

    assert (code, err) == (0, "")
    config = load_config(str(site["config"]), environ={})
    etc = site["config"].parent
    assert config.repo == SSH_URL
    assert config.node == "web1"
    assert config.branch == "main"
    assert config.root == str(site["root"])
    assert config.state_dir == str(site["state"])
    assert config.auth.ssh_key == str(etc / "ssh" / "id_ed25519")
    assert config.auth.known_hosts == str(etc / "known_hosts")
    assert mode_of(site["config"]) == 0o600
    # Empty until the operator pins the server: a run then names the key it was offered.
    assert (etc / "known_hosts").read_bytes() == b"" and mode_of(etc / "known_hosts") == 0o644
    assert mode_of(site["state"]) == 0o700
    key = etc / "ssh" / "id_ed25519"
    assert mode_of(key) == 0o600 and mode_of(key.parent) == 0o700
    public = Path(f"{key}.pub").read_text().strip()
    assert public.startswith("ssh-ed25519 ") and public.endswith(" reconciler@web1")
    # The key printed is the .pub file, on a line of its own, under a numbered step.
    assert f"     {public}\n" in out
    assert "1. Give this host's deploy key read access to branch main" in out
    assert "write access to reports/web1" in out
    # Its private half really is the pair of that public key.
    derived = subprocess.run(
        ["ssh-keygen", "-y", "-f", str(key)], capture_output=True, text=True, check=True
    ).stdout
    assert derived.split()[:2] == public.split()[:2]
    # A file for humans: comments, and every key it sets is there once.
    text = site["config"].read_text()
    assert text.startswith("# reconciler agent configuration, written by `reconciler init`")
    assert "# mode: enforce" in text and "docs/configuration.md" in text
    # Next steps: pin the host key (a port off 22 is scanned on that port), then the node.
    assert f"ssh-keyscan -p 2222 git.example.com >> {etc / 'known_hosts'}\n" in out
    assert "out of band" in out
    assert "hosts/web1.yaml" in out
    assert f"pull --dry-run --config {site['config']}\n" in out
    assert "systemctl enable --now reconciler-boot.service reconciler-pull.timer" in out
    assert "Traceback" not in out + err


def test_init_refuses_to_overwrite_a_configuration_byte_for_byte(site):
    assert init(site, "--repo", SSH_URL, "--node", "web1")[0] == 0
    before = site["config"].read_bytes()
    stat_before = site["config"].stat()

    code, out, err = init(site, "--repo", "git://other.example.com/x.git", "--node", "db1")

    assert code == 1
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"reconciler: {site['config']}: a configuration is already there")
    assert f"mv {site['config']} {site['config']}.old" in lines[0]
    assert site["config"].read_bytes() == before
    assert site["config"].stat().st_ino == stat_before.st_ino
    assert sorted(p.name for p in site["config"].parent.iterdir()) == [
        "config.yaml",
        "known_hosts",
        "ssh",
    ]


def test_init_refuses_a_hand_written_configuration_too(site):
    site["config"].parent.mkdir(parents=True)
    site["config"].write_text("repo: file:///srv/fleet.git\n")

    code, _, err = init(site, "--repo", SSH_URL)

    assert code == 1 and "already there" in err
    assert site["config"].read_text() == "repo: file:///srv/fleet.git\n"
    assert not site["state"].exists()
    assert not (site["config"].parent / "ssh").exists()


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--repo", "htps://git.example.com/fleet.git"], "unknown scheme htps://"),
        (["--repo", "ftp://git.example.com/fleet.git"], "unknown scheme ftp://"),
        (["--repo", "ssh://git.example.com"], "needs a host and a path"),
        (["--repo", "https:///fleet.git"], "needs a host and a path"),
        (["--repo", "ssh://git@git.example.com:99999/fleet.git"], "--repo"),
        (["--repo", "git@git.example.com:fleet .git"], "not a repository URL"),
        (["--repo", "/nonexistent/fleet.git"], "not a directory"),
        (["--repo", "file:///nonexistent/fleet.git"], "not a directory"),
        (["--repo", ""], "--repo"),
        ([], "--repo URL is required"),
        (["--repo", SSH_URL, "--node", "web 1"], "cannot name its report branch"),
        (["--repo", SSH_URL, "--node", "web..1"], "cannot name its report branch"),
        (["--repo", SSH_URL, "--node", ".hidden"], "not a valid node name"),
        (["--repo", SSH_URL, "--node", "a/b"], "not a valid node name"),
        (["--repo", SSH_URL, "--root", "/nonexistent/root"], "--root"),
        (["--repo", "https://git.example.com/f.git", "--ssh-key", "/k"], "--ssh-key: only for"),
        (["--repo", "git://git.example.com/f.git", "--known-hosts", "/k"], "--known-hosts"),
        (["--repo", SSH_URL, "--token-file", "/t"], "--token-file: only for an https://"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else None,
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(site, args, says):
    code, out, err = init(site, *args)

    assert code == 2, (out, err)
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert says in lines[0], lines[0]
    assert "Traceback" not in err
    # No configuration, no directory for it, no state directory, no key.
    assert not site["config"].parent.parent.exists()
    assert not site["state"].exists()


def test_the_key_is_generated_once_and_reused_by_an_init_elsewhere(site, tmp_path):
    key = tmp_path / "keys" / "deploy"
    code, first, _ = init(site, "--repo", SSH_URL, "--node", "web1", "--ssh-key", str(key))
    assert code == 0 and "generated deploy key" in first
    private, public = key.read_bytes(), Path(f"{key}.pub").read_text()
    inode = key.stat().st_ino

    other = {**site, "config": tmp_path / "other" / "config.yaml", "state": tmp_path / "s2"}
    pinned = tmp_path / "pinned"
    pinned.write_text("[git.example.com]:2222 ssh-ed25519 AAAA\n")
    argv = [
        "--repo",
        SSH_URL,
        "--node",
        "web1",
        "--ssh-key",
        str(key),
        "--known-hosts",
        str(pinned),
    ]
    code, second, err = init(other, *argv)

    assert (code, err) == (0, "")
    assert f"using the existing deploy key {key}" in second
    assert key.read_bytes() == private and key.stat().st_ino == inode
    assert Path(f"{key}.pub").read_text() == public
    assert f"     {public.strip()}\n" in second
    assert load_config(str(other["config"]), environ={}).auth.ssh_key == str(key)
    assert pinned.read_text() == "[git.example.com]:2222 ssh-ed25519 AAAA\n"  # never truncated


def test_an_existing_key_without_its_pub_file_is_read_with_ssh_keygen(site, tmp_path):
    key = tmp_path / "id_ed25519"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "k", "-f", str(key)], check=True
    )
    public = Path(f"{key}.pub").read_text().split()
    Path(f"{key}.pub").unlink()

    code, out, err = init(site, "--repo", "git@git.example.com:fleet.git", "--ssh-key", str(key))

    assert (code, err) == (0, "")
    assert f"     {public[0]} {public[1]}" in out  # ssh-keygen -y: the comment too, if any
    assert not Path(f"{key}.pub").exists()  # the operator's key is left as it was


def test_a_key_with_a_passphrase_is_refused_before_anything_is_written(site, tmp_path):
    key = tmp_path / "locked"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "secret-pass", "-f", str(key)], check=True
    )

    code, out, err = init(site, "--repo", SSH_URL, "--ssh-key", str(key))

    assert code == 2 and out == ""
    assert len(err.splitlines()) == 1 and err.startswith(f"reconciler: {key}: ")
    assert "without a passphrase" in err and "secret-pass" not in err
    assert not site["config"].parent.parent.exists() and not site["state"].exists()


def test_a_pub_file_that_is_not_the_keys_half_is_refused(site, tmp_path):
    for name in ("a", "b"):
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / name)], check=True
        )
    os.replace(tmp_path / "b.pub", tmp_path / "a.pub")

    code, _, err = init(site, "--repo", SSH_URL, "--ssh-key", str(tmp_path / "a"))

    assert code == 2 and f"{tmp_path / 'a.pub'}: not the public half" in err
    assert not site["config"].exists()


def test_an_existing_state_dir_is_kept_and_made_root_only(site, umask):
    umask(0o022)
    site["state"].mkdir(parents=True, mode=0o755)
    (site["state"] / "state.json").write_text("{}")

    assert init(site, "--repo", "git://git.example.com/fleet.git")[0] == 0

    assert mode_of(site["state"]) == 0o700
    assert (site["state"] / "state.json").read_text() == "{}"


def test_local_and_git_sources_need_no_credentials(site, tmp_path, monkeypatch):
    repo = tmp_path / "fleet.git"
    repo.mkdir()
    monkeypatch.chdir(tmp_path)  # a relative path is written absolute: the units run from /

    code, out, _ = init(site, "--repo", "fleet.git", "--node", "web1")

    assert code == 0
    config = load_config(str(site["config"]), environ={})
    assert config.repo == str(repo)
    assert config.auth.ssh_key is None and config.auth.token_file is None
    assert "auth:" not in site["config"].read_text()
    assert "deploy key" not in out and "ssh-keyscan" not in out
    assert not (site["config"].parent / "ssh").exists()


def test_https_says_where_the_token_goes(site):
    code, out, _ = init(site, "--repo", "https://git.example.com/fleet.git", "--node", "web1")

    assert code == 0
    token = site["config"].parent / "token"
    assert load_config(str(site["config"]), environ={}).auth.token_file == str(token)
    assert f"install -m 0600 /dev/stdin {token}\n" in out
    assert "write on reports/web1" in out
    assert "deploy key" not in out


def test_the_units_step_follows_what_is_installed(site, tmp_path):
    # None installed (a virtualenv install): install-units first, into the dir looked at.
    code, out, _ = init(site, "--repo", "git://git.example.com/fleet.git")
    assert code == 0
    assert f"install-units --dest {site['units']} --config {site['config']}\n" in out

    # Units that read another file (a package's: the default path) must be rewritten.
    assert run_cli("install-units", "--dest", str(site["units"]), "--config", "/dev/null")[0] == 0
    other = {**site, "config": tmp_path / "b" / "config.yaml"}
    code, out, _ = init(other, "--repo", "git://git.example.com/fleet.git")
    assert code == 0
    assert f"The units in {site['units']} read /dev/null, not {other['config']}" in out
    assert f"install-units --dest {site['units']} --config {other['config']}\n" in out

    # Units that read this file: only enabling is left.
    argv = ["install-units", "--dest", str(site["units"]), "--config", str(other["config"])]
    assert run_cli(*argv)[0] == 0
    third = {**site, "config": other["config"]}
    other["config"].unlink()
    code, out, _ = init(third, "--repo", "git://git.example.com/fleet.git", "--format", "json")
    assert code == 0
    data = json.loads(out)
    assert data["units_dir"] == str(site["units"])
    commands = [c for step in data["steps"] for c in step["commands"]]
    assert not any("install-units" in c for c in commands), commands
    assert commands[-1] == "systemctl enable --now reconciler-boot.service reconciler-pull.timer"


def test_json_output_names_the_files_and_the_key(site):
    code, out, _ = init(site, "--repo", SSH_URL, "--node", "web1", "--format", "json")

    assert code == 0
    data = json.loads(out)
    key = site["config"].parent / "ssh" / "id_ed25519"
    assert data["config"] == str(site["config"])
    assert data["node"] == "web1"
    assert data["ssh_key"] == str(key)
    assert data["public_key"] == Path(f"{key}.pub").read_text().strip()
    assert data["key_generated"] is True
    assert data["state_dir"] == str(site["state"])
    assert all(step["title"] for step in data["steps"])


def test_the_config_path_comes_from_reconciler_config(site, monkeypatch):
    monkeypatch.setenv("RECONCILER_CONFIG", str(site["config"]))

    code, _, err = run_cli(
        "init", "--repo", "git://git.example.com/fleet.git", "--state-dir", str(site["state"])
    )

    assert (code, err) == (0, "")
    assert load_config(None).repo == "git://git.example.com/fleet.git"


def test_every_key_the_file_shows_commented_out_is_a_key_a_run_takes(site, tmp_path):
    # The pointers must not rot: uncommented, the file still loads (no unknown key,
    # no wrong type) — a key renamed in config.py without this file fails here.
    assert init(site, "--repo", SSH_URL, "--node", "web1")[0] == 0
    text = site["config"].read_text()
    body = text.split("\n\n", 1)[1]  # past the header
    shown = [line[2:] for line in body.splitlines() if line.startswith("# ")]
    uncommented = tmp_path / "all.yaml"
    keys = [line for line in body.splitlines() if not line.startswith("#")] + shown
    uncommented.write_text("\n".join(keys) + "\n")

    config = load_config(str(uncommented), environ={})

    assert config.node == "web1"
    assert config.report.webhook_token_file == "/etc/reconciler/webhook-token"
    assert config.metrics.textfile is not None and config.backups.keep == 10
    assert len(shown) >= 15, shown


def test_an_scp_like_address_with_an_absolute_path_is_an_ssh_source(site):
    # git takes git@host:/srv/fleet.git as SSH; init refused it as "not a directory".
    url = "git@git.example.com:/srv/git/fleet.git"
    code, out, err = init(site, "--repo", url, "--node", "web1")

    assert (code, err) == (0, "")
    config = load_config(str(site["config"]), environ={})
    assert config.repo == url
    assert config.auth.ssh_key is not None
    assert "ssh-keyscan git.example.com >> " in out
