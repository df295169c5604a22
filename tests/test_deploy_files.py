"""deploy/: the systemd units (systemd-analyze verify and security, then the unit's own command
line started the way its socket units would start it), the configurations they ship (each passes
``relay check-config``), and the Kubernetes manifests (structure, the names that must agree
across files, and the probes answered by a relay running the ConfigMap's relay.conf)."""

from __future__ import annotations

import json
import re
import shlex
import signal
import socket
import subprocess
import sys
import tomllib
import urllib.request
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, free_port, require, submit, wait_for_port, wait_until
from mailrelay.systemd import LISTENER_NAMES
from test_socket_activation import NotifySocket

SYSTEMD = ROOT / "deploy" / "systemd"
K8S = ROOT / "deploy" / "k8s"
UNITS = ("relay.service", "relay.socket", "relay-submission.socket", "relay-pop.socket")
RELAY_BIN = str(Path(sys.executable).parent / "relay")
INSTALLED_RELAY = "/opt/mailrelay/bin/relay"


def unit(name: str) -> dict[str, dict[str, list[str]]]:
    """A unit file as ``{section: {key: [values]}}`` (keys may repeat)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for line in (SYSTEMD / name).read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key, []).append(value)
    return sections


def check_config(path: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mailrelay", "check-config", str(path)], capture_output=True,
                          text=True, timeout=60, env=env)


# ---------------------------------------------------------------- systemd
@pytest.fixture
def units_here(tmp_path: Path) -> Path:
    """The units, with ExecStart pointing at this checkout's relay instead of /opt/mailrelay."""
    for name in UNITS:
        (tmp_path / name).write_text((SYSTEMD / name).read_text().replace(INSTALLED_RELAY, RELAY_BIN))
    return tmp_path


def test_systemd_analyze_verify_accepts_the_units(units_here):
    analyze = require("systemd-analyze")
    result = subprocess.run([analyze, "verify", "--man=no", *[str(units_here / n) for n in UNITS]],
                            capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_the_service_is_hardened(units_here):
    analyze = require("systemd-analyze")
    result = subprocess.run([analyze, "security", "--offline=yes", "--no-pager", str(units_here / "relay.service")],
                            capture_output=True, text=True, timeout=60)
    exposure = float(re.search(r"Overall exposure level for relay\.service: ([\d.]+)", result.stdout).group(1))
    assert exposure <= 2.0, result.stdout  # systemd's scale: 0 (locked down) to 10 ("UNSAFE")
    service = unit("relay.service")["Service"]
    assert service["User"] == ["mailrelay"] and service["CapabilityBoundingSet"] == [""]
    assert service["NoNewPrivileges"] == ["yes"] and service["ProtectSystem"] == ["strict"]


def test_the_service_is_type_notify_in_the_foreground():
    service = unit("relay.service")["Service"]
    assert service["Type"] == ["notify"] and service["NotifyAccess"] == ["main"]
    [exec_start] = service["ExecStart"]
    argv = shlex.split(exec_start)
    assert argv[0] == INSTALLED_RELAY and "--no-daemon" in argv
    assert unit("relay.service")["Unit"]["Requires"] == ["relay.socket"]


def test_each_socket_unit_names_its_sockets_for_the_relay():
    expected = {"relay.socket": ("smtp", "25"), "relay-submission.socket": ("submission", "587"),
                "relay-pop.socket": ("pop", "110")}
    for name, (fd_name, port) in expected.items():
        socket_section = unit(name)["Socket"]
        assert socket_section["FileDescriptorName"] == [fd_name] and fd_name in LISTENER_NAMES
        assert socket_section["Service"] == ["relay.service"]
        assert socket_section["ListenStream"] == [f"0.0.0.0:{port}", f"[::]:{port}"]
        assert socket_section["BindIPv6Only"] == ["ipv6-only"]  # IPv4 clients keep plain addresses
        assert unit(name)["Install"]["WantedBy"] == ["sockets.target"]


def test_the_systemd_relay_conf_is_valid():
    result = check_config(SYSTEMD / "relay.conf")
    assert result.returncode == 0, result.stderr
    assert "plugins: forward, relay-control; spool /var/lib/mailrelay/spool" in result.stdout
    conf = tomllib.loads((SYSTEMD / "relay.conf").read_text())
    assert "interface" not in conf["smtp"]  # the sockets come from the socket units
    assert conf["spool"]["dir"].startswith("/var/lib/mailrelay/")  # StateDirectory=mailrelay


def test_the_units_command_line_serves_the_socket_units_sockets(tmp_path):
    """ExecStart as written, its config a copy of deploy/systemd/relay.conf, started the way
    relay.socket and relay-submission.socket would start it: READY=1, then mail on both."""
    tool = require("systemd-socket-activate")
    notify = NotifySocket()
    argv = shlex.split(unit("relay.service")["Service"]["ExecStart"][0])
    conf = tmp_path / "relay.conf"
    conf.write_text((SYSTEMD / "relay.conf").read_text().replace('to = "mx"', 'to = "127.0.0.1:9"'))
    argv = [RELAY_BIN, *[str(conf) if a == "/etc/mailrelay/relay.conf" else a for a in argv[1:]],
            "--spool-dir", str(tmp_path / "spool")]
    names = [unit(n)["Socket"]["FileDescriptorName"][0] for n in ("relay.socket", "relay-submission.socket")]
    ports = [free_port(), free_port()]
    log = tmp_path / "activate.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([tool, *[f"-l127.0.0.1:{p}" for p in ports], f"--fdname={':'.join(names)}",
                                 "-E", f"NOTIFY_SOCKET={notify.address}", *argv],
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        wait_until(lambda: log.read_text().count("Listening on") == 2, what="systemd-socket-activate")
        with socket.create_connection(("127.0.0.1", ports[0]), 10):  # the first client starts it
            assert notify.receive()["READY"] == "1"
        for port in ports:
            assert submit(port, b"Subject: unit\r\n\r\nhi\r\n", recipients=["postmaster@example.com"]) == (250, "")
        proc.send_signal(signal.SIGTERM)
        assert notify.receive()["STOPPING"] == "1"
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        notify.close()


# ---------------------------------------------------------------- Kubernetes
def manifests() -> dict[str, dict]:
    """Every object under deploy/k8s by ``Kind/name``."""
    objects: dict[str, dict] = {}
    for path in sorted(K8S.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            if document and document.get("kind") != "Kustomization":
                objects[f"{document['kind']}/{document['metadata']['name']}"] = document
    return objects


def relay_conf_of(objects: dict[str, dict]) -> str:
    return objects["ConfigMap/mailrelay-config"]["data"]["relay.conf"]


def test_kustomization_lists_every_manifest():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted(p.name for p in K8S.glob("*.yaml")
                                                       if p.name != "kustomization.yaml")


def test_the_statefulset_gives_each_replica_its_own_spool_volume():
    objects = manifests()
    assert set(objects) == {"ConfigMap/mailrelay-config", "StatefulSet/mailrelay", "Service/mailrelay",
                            "Service/mailrelay-headless"}
    sts = objects["StatefulSet/mailrelay"]["spec"]
    assert sts["replicas"] >= 2
    [claim] = sts["volumeClaimTemplates"]
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]  # one volume per replica, not shared
    [container] = sts["template"]["spec"]["containers"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    spool = tomllib.loads(relay_conf_of(objects))["spool"]["dir"]
    assert spool.startswith(mounts[claim["metadata"]["name"]] + "/")  # the spool is on the claim
    assert sts["persistentVolumeClaimRetentionPolicy"] == {"whenDeleted": "Retain", "whenScaled": "Retain"}
    # the governing Service is headless
    assert objects[f"Service/{sts['serviceName']}"]["spec"]["clusterIP"] == "None"


def test_the_config_map_is_mounted_where_the_relay_reads_it():
    objects = manifests()
    pod = objects["StatefulSet/mailrelay"]["spec"]["template"]["spec"]
    [container] = pod["containers"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    [config_mount] = [m for m in container["volumeMounts"] if "configMap" in volumes.get(m["name"], {})]
    assert volumes[config_mount["name"]]["configMap"]["name"] == "mailrelay-config"
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["MAILRELAY_CONFIG"] == f"{config_mount['mountPath']}/relay.conf"
    assert container["args"] == ["relay", "--no-daemon"]


def test_ports_probes_and_services_agree_with_relay_conf():
    objects = manifests()
    conf = tomllib.loads(relay_conf_of(objects))
    [container] = objects["StatefulSet/mailrelay"]["spec"]["template"]["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["smtp"] == conf["smtp"]["port"]
    assert ports["admin"] == int(conf["admin"]["listen"][0].rpartition(":")[2])
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
    assert container["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
    labels = objects["StatefulSet/mailrelay"]["spec"]["template"]["metadata"]["labels"]
    assert objects["StatefulSet/mailrelay"]["spec"]["selector"]["matchLabels"] == labels
    public = objects["Service/mailrelay"]["spec"]
    assert public["selector"] == labels and public["externalTrafficPolicy"] == "Local"
    assert public["ports"] == [{"name": "smtp", "port": 25, "targetPort": "smtp", "protocol": "TCP"}]
    assert conf["server"]["proxy_protocol"] is False  # the Service keeps the client's address itself


def test_the_pod_runs_unprivileged_like_the_image():
    objects = manifests()
    pod = objects["StatefulSet/mailrelay"]["spec"]["template"]["spec"]
    [container] = pod["containers"]
    dockerfile_user = re.search(r"^USER (\d+):(\d+)$", (ROOT / "Dockerfile").read_text(), re.M)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert (pod["securityContext"]["runAsUser"], pod["securityContext"]["runAsGroup"]) == \
        (int(dockerfile_user.group(1)), int(dockerfile_user.group(2)))
    assert container["securityContext"] == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                            "capabilities": {"drop": ["ALL"]}}
    assert pod["terminationGracePeriodSeconds"] > 10  # [smtp] shutdown_grace


def test_the_config_map_relay_conf_is_valid(tmp_path):
    conf = tmp_path / "relay.conf"
    conf.write_text(relay_conf_of(manifests()))
    result = check_config(conf)
    assert result.returncode == 0, result.stderr
    assert "plugins: forward, admin, relay-control; spool /var/lib/mailrelay/spool; SMTP port 2525" in result.stdout


def test_a_relay_with_the_config_map_answers_the_probes(relay_process, tmp_path):
    conf = tmp_path / "relay.conf"
    conf.write_text(relay_conf_of(manifests()))
    admin = free_port()
    # The pod's configuration; on loopback and free ports here.
    relay = relay_process("--config", str(conf), "--interface", "127.0.0.1", "--admin", f"127.0.0.1:{admin}")
    wait_for_port(admin, relay.proc)
    for path, status in (("/healthz", "ok"), ("/readyz", "ready")):
        with urllib.request.urlopen(f"http://127.0.0.1:{admin}{path}", timeout=10) as response:
            assert (response.status, json.load(response)["status"]) == (200, status)
    assert submit(relay.port, b"Subject: k8s\r\n\r\nhi\r\n", recipients=["someone@example.com"]) == (250, "")
