"""The example plugin packages in examples/, as a third party would ship them: each is built as a
wheel and installed into a fresh virtual environment next to mailrelay (installed from this
directory, not editable); `relay plugins` there lists them and a daemon started from there uses
them. The examples' own test suites run there too, through the SDK's pytest plugin."""

from __future__ import annotations

import json
import os
import re
import shutil
import smtplib
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from conftest import ROOT, free_port, wait_for_port

EXAMPLES = {"greylist": "mailrelay-greylist", "archive-id": "mailrelay-archive-id"}
MSG = b"From: alice@example.test\r\nTo: bob@example.org\r\nSubject: hi\r\n\r\nbody\r\n"


@dataclass
class Venv:
    path: Path
    sources: Path   # copies of the example packages (built from here, so examples/ stays clean)

    def bin(self, name: str) -> str:
        return str(self.path / "bin" / name)

    def relay(self, *args: str, **kw) -> subprocess.CompletedProcess:
        env = {"PATH": f"{self.path / 'bin'}:/usr/bin:/bin", "HOME": str(self.path.parent)}
        return subprocess.run([self.bin("relay"), *args], capture_output=True, text=True, timeout=60,
                              env=env, **kw)


def _pip(python: str, *args: str, timeout: float = 600) -> None:
    result = subprocess.run([python, "-m", "pip", "--disable-pip-version-check", "-q", *args],
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"pip {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"


@pytest.fixture(scope="session")
def plugin_venv(tmp_path_factory) -> Venv:
    """One fresh venv for the whole session (installing mailrelay and its dependencies is slow)."""
    base = tmp_path_factory.mktemp("plugin-venv")
    sources, wheels = base / "src", base / "wheels"
    for package in EXAMPLES.values():
        shutil.copytree(ROOT / "examples" / package, sources / package,
                        ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__", ".pytest_cache"))
    # A plugin that needs a mailrelay from the future, made from the template like the others.
    made = subprocess.run([sys.executable, "-m", "mailrelay", "new-plugin", "too-new", "-d", str(sources)],
                          capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    module = sources / "mailrelay-too-new" / "src" / "mailrelay_too_new" / "__init__.py"
    module.write_text(module.read_text().replace('requires_core = ">=0.1"', 'requires_core = ">=99"'))
    for package in [*EXAMPLES.values(), "mailrelay-too-new"]:
        _pip(sys.executable, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(sources / package))
    venv = base / "venv"
    created = subprocess.run([sys.executable, "-m", "venv", str(venv)], capture_output=True, text=True, timeout=120)
    assert created.returncode == 0, created.stderr
    python = str(venv / "bin" / "python")
    _pip(python, "install", str(ROOT), *map(str, sorted(wheels.glob("*.whl"))), "pytest>=8", "setuptools>=77")
    return Venv(venv, sources)


@pytest.fixture
def venv_relay(plugin_venv: Venv, tmp_path: Path) -> Iterator:
    """Factory: the venv's `relay` daemon in the foreground on a free port; stopped at teardown."""
    started: list[subprocess.Popen] = []

    def start(*args: str) -> tuple[int, Path]:
        port, spool = free_port(), tmp_path / f"spool{len(started)}"
        log_path = tmp_path / f"relay{len(started)}.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen([plugin_venv.bin("relay"), "--no-daemon", "--log", "--no-syslog", "--port",
                                     str(port), "--spool-dir", str(spool), "--domain", "relay.test", *args],
                                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        started.append(proc)
        try:
            wait_for_port(port, proc)
        except RuntimeError as e:
            raise AssertionError(f"{e}:\n{log_path.read_text()}") from None
        return port, spool

    yield start
    for proc in started:
        proc.terminate()
        proc.wait(20)


def test_relay_plugins_in_the_venv_lists_the_examples(plugin_venv):
    result = plugin_venv.relay("plugins", "--json")
    assert result.returncode == 0, result.stderr
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    for name, package in EXAMPLES.items():
        assert (rows[name]["package"], rows[name]["version"], rows[name]["enabled"]) == (package, "0.1.0", False)
        assert not rows[name]["builtin"]
    enabled = {row["name"]: row for row in json.loads(
        plugin_venv.relay("--plugins", "greylist,archive-id", "plugins", "--json").stdout)}
    assert {"on_rcpt_to", "relay_startup", "relay_config_schema"} <= set(enabled["greylist"]["hooks"])
    assert "on_receive" in enabled["archive-id"]["hooks"]
    assert "mailrelay-greylist 0.1.0" in plugin_venv.relay("plugins").stdout


def test_the_venv_daemon_greylists(plugin_venv, venv_relay, tmp_path):
    conf = tmp_path / "relay.conf"
    conf.write_text('[plugins]\nenable = ["greylist"]\n\n[greylist]\ndelay = 1\n')
    port, spool = venv_relay("-c", str(conf))

    def attempt() -> dict:
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
            return client.sendmail("alice@example.test", ["bob@example.org"], MSG)

    for _ in range(2):  # the first attempt, and a retry that comes too early
        with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
            attempt()
        code, text = refused.value.recipients["bob@example.org"]
        assert code == 451 and text.startswith(b"4.7.1 Greylisted, please try again in ")
    time.sleep(1.1)
    assert attempt() == {}
    [content] = spool.glob("*.content")
    assert content.read_bytes().endswith(b"Subject: hi\r\n\r\nbody\r\n")
    assert (spool / "greylist.sqlite3").is_file()


def test_the_venv_daemon_stamps_an_archive_id(plugin_venv, venv_relay):
    port, spool = venv_relay("--plugins", "archive-id")
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.sendmail("alice@example.test", ["bob@example.org"], b"X-Archive-Id: chosen-by-client\r\n" + MSG)
    [content] = [p.read_bytes() for p in spool.glob("*.content")]
    [archive_id] = re.findall(rb"^X-Archive-Id: ([0-9a-f]{32})\r$", content, re.M)
    assert b"chosen-by-client" not in content and content.endswith(b"Subject: hi\r\n\r\nbody\r\n")


def test_a_plugin_needing_a_newer_mailrelay_is_refused_at_start_up(plugin_venv, tmp_path):
    port = free_port()
    result = plugin_venv.relay("--no-daemon", "--port", str(port), "--spool-dir", str(tmp_path / "spool"),
                               "--plugins", "greylist,too-new")
    assert result.returncode == 1
    assert ("plugin 'too-new' (mailrelay-too-new 0.1.0) needs mailrelay >=99; this is mailrelay 0.1.0"
            in result.stderr)
    listed = {row["name"]: row for row in json.loads(plugin_venv.relay("plugins", "--json").stdout)}
    assert listed["too-new"]["enabled"] is False  # still listed; just never loaded


def test_the_examples_own_tests_pass_in_the_venv(plugin_venv):
    """Each package's tests use the SDK's fixtures, found through the pytest11 entry point."""
    for package in EXAMPLES.values():
        result = subprocess.run([plugin_venv.bin("python"), "-m", "pytest", "-q", "-p", "no:cacheprovider"],
                                cwd=plugin_venv.sources / package, capture_output=True, text=True, timeout=300,
                                env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
        assert result.returncode == 0, f"{package}:\n{result.stdout}\n{result.stderr}"
        assert " passed" in result.stdout and "failed" not in result.stdout


def test_new_plugin_from_the_installed_package_is_a_working_package(plugin_venv, tmp_path):
    """The template ships inside the wheel: a plugin made from an ordinary install builds and tests."""
    made = plugin_venv.relay("new-plugin", "house-rules", "-d", str(tmp_path))
    assert made.returncode == 0, made.stderr
    package = tmp_path / "mailrelay-house-rules"
    assert {p.relative_to(package).as_posix() for p in package.rglob("*") if p.is_file()} == {
        "pyproject.toml", "README.md", ".gitignore", ".github/workflows/ci.yml",
        "src/mailrelay_house_rules/__init__.py", "src/mailrelay_house_rules/py.typed", "tests/test_plugin.py"}
    # Its tests run against the source tree, with the entry point registered by an editable install.
    _pip(plugin_venv.bin("python"), "install", "--no-deps", "--no-build-isolation", "-e", str(package))
    try:
        result = subprocess.run([plugin_venv.bin("python"), "-m", "pytest", "-q", "-p", "no:cacheprovider"],
                                cwd=package, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
        assert "2 passed" in result.stdout
    finally:
        _pip(plugin_venv.bin("python"), "uninstall", "-y", "mailrelay-house-rules")
