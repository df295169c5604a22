"""Server-side TLS as clients see it: STARTTLS (-K), implicit TLS (--server-tls-connection),
--server-tls-required, client certificates (--server-tls-verify), --tls-config versions, and a
certificate reloaded on SIGHUP.

Tests marked with both loops run against an in-process relay (asyncio's loop) and against a real
`python -m mailrelay` process, which runs on uvloop (asserted in test_the_relay_process_runs_on_uvloop).
"""

from __future__ import annotations

import signal
import smtplib
import socket
import ssl
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import trustme

from conftest import require, wait_until
from mailrelay.spool import Envelope
from smtpwire import Wire

MESSAGE = b"From: a@example.test\r\nTo: b@example.test\r\nSubject: tls\r\n\r\nover TLS\r\n"
LOOPS = ["asyncio", "uvloop"]


# ---------------------------------------------------------------- certificates
@dataclass
class Certificates:
    ca: trustme.CA
    dir: Path

    def server(self, name: str = "server", common_name: str = "relay.test") -> Path:
        """A PEM file holding a new server key and certificate chain (E-MailRelay's one-file form)."""
        leaf = self.ca.issue_cert("localhost", "127.0.0.1", common_name=common_name)
        path = self.dir / f"{name}.pem"
        leaf.private_key_and_cert_chain_pem.write_to_path(str(path))
        return path

    def client_context(self, client: trustme.LeafCert | None = None, **versions: ssl.TLSVersion
                       ) -> ssl.SSLContext:
        context = ssl.create_default_context()
        self.ca.configure_trust(context)
        if client is not None:
            client.configure_cert(context)
        for key, value in versions.items():
            setattr(context, key, value)
        return context

    @property
    def ca_file(self) -> Path:
        return self.dir / "ca.pem"


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Certificates:
    directory = tmp_path_factory.mktemp("certs")
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(directory / "ca.pem"))
    found = Certificates(ca, directory)
    found.server()
    return found


# ---------------------------------------------------------------- relays
@dataclass
class Served:
    port: int
    spool: Path
    log: Callable[[], str]
    pid: int = 0

    def envelopes(self) -> list[Envelope]:
        return [Envelope.from_bytes(p.read_bytes()) for p in sorted(self.spool.glob("*.envelope"))]

    def contents(self) -> list[bytes]:
        return [p.read_bytes() for p in sorted(self.spool.glob("*.content"))]


def _arguments(tls: dict[str, Any]) -> list[str]:
    """The E-MailRelay options that say what ``[tls]`` says."""
    args: list[str] = []
    for key, flag in (("starttls", "--server-tls"), ("connection", "--server-tls-connection"),
                      ("required", "--server-tls-required")):
        if tls.get(key):
            args.append(flag)
    if tls.get("key"):
        args += ["--server-tls-certificate", tls["key"]]
    args += ["--server-tls-certificate", tls["certificate"]]
    if tls.get("verify"):
        args += ["--server-tls-verify", tls["verify"]]
    if tls.get("config"):
        args += ["--tls-config", ",".join(tls["config"])]
    return args


@pytest.fixture
def tls_relay(inprocess_relay, relay_process, certs) -> Callable[..., Served]:
    """Factory: a relay with the given ``[tls]`` settings, in-process ("asyncio") or as a process
    started with the equivalent options ("uvloop")."""
    def start(loop: str, **tls: Any) -> Served:
        tls = {"certificate": str(certs.dir / "server.pem"), **tls}
        if loop == "asyncio":
            running = inprocess_relay(config={"tls": tls})
            return Served(running.port, running.spool.directory, lambda: "")
        process = relay_process(*_arguments(tls))
        return Served(process.port, process.spool, lambda: process.log, process.proc.pid)
    return start


def starttls_session(port: int, context: ssl.SSLContext) -> smtplib.SMTP:
    smtp = smtplib.SMTP("127.0.0.1", port, timeout=10)
    smtp.ehlo("client.test")
    code, _ = smtp.starttls(context=context)
    assert code == 220
    return smtp


# ---------------------------------------------------------------- STARTTLS
@pytest.mark.parametrize("loop", LOOPS)
def test_starttls_is_offered_then_mail_arrives_encrypted(tls_relay, certs, loop):
    relay = tls_relay(loop, starttls=True)
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as smtp:
        smtp.ehlo("client.test")
        assert smtp.has_extn("starttls")
        smtp.starttls(context=certs.client_context())
        smtp.ehlo("client.test")
        assert not smtp.has_extn("starttls")  # RFC 3207 4.2: not offered again
        assert smtp.docmd("STARTTLS") == (503, b"5.5.1 TLS is already active")
        assert smtp.sendmail("a@example.test", ["b@example.test"], MESSAGE) == {}
    [content] = relay.contents()
    received = content.split(b"\r\n\r\n")[0]
    assert b"with ESMTPS" in received and b"tls TLS_" in received
    [envelope] = relay.envelopes()
    assert envelope.client_certificate == ""  # no --server-tls-verify: no certificate asked for


def swaks_over_tls(swaks: str, relay, certs: Certificates, mode: str) -> None:
    """swaks sends one message with ``--tls`` (STARTTLS) or ``--tls-on-connect``, verifying our certificate."""
    result = subprocess.run([swaks, "--server", f"127.0.0.1:{relay.port}", mode, "--tls-verify",
                             "--tls-ca-path", str(certs.ca_file), "--helo", "client.test",
                             "--from", "a@example.test", "--to", "b@example.test", "--body", "hello"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "TLS started" in result.stdout
    assert len(list(relay.spool.glob("*.envelope"))) == 1


def test_swaks_sends_over_starttls_with_key_and_certificate_in_two_files(relay_process, certs, tmp_path):
    swaks = require("swaks")
    leaf = certs.ca.issue_cert("localhost", "127.0.0.1")
    leaf.private_key_pem.write_to_path(str(tmp_path / "relay.key"))
    leaf.cert_chain_pems[0].write_to_path(str(tmp_path / "relay.crt"))
    relay = relay_process("-K", "--server-tls-certificate", str(tmp_path / "relay.key"),
                          "--server-tls-certificate", str(tmp_path / "relay.crt"))
    swaks_over_tls(swaks, relay, certs, "--tls")


def test_starttls_is_not_offered_without_tls(inprocess_relay):
    relay = inprocess_relay()
    with Wire(relay.port) as wire:
        code, ehlo = wire.greet()
        assert "STARTTLS" not in ehlo
        assert wire.cmd("STARTTLS") == (454, "4.7.0 TLS not available")


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("injected", [b"RSET\r\n", b"EHLO evil.test\r\nMAIL FROM:<evil@example.test>\r\n"],
                         ids=["rset", "ehlo-mail"])
def test_commands_pipelined_after_starttls_are_discarded(tls_relay, certs, loop, injected):
    relay = tls_relay(loop, starttls=True)
    with Wire(relay.port) as wire:
        wire.greet()
        wire.send(b"STARTTLS\r\n" + injected)  # one packet: the injection attempt
        assert wire.reply() == (220, "2.0.0 Ready to start TLS")
        assert wire.buf == b""
        wire.sock = certs.client_context().wrap_socket(wire.sock, server_hostname="127.0.0.1")
        # Had the clear-text commands run after the handshake, their replies would come first.
        assert wire.cmd("RCPT TO:<b@example.test>") == (503, "5.5.1 Send HELO or EHLO first")
        code, _ = wire.cmd("EHLO client.test")
        assert code == 250
        assert wire.cmd("RCPT TO:<b@example.test>") == (503, "5.5.1 Need MAIL before RCPT")
        assert wire.cmd("QUIT")[0] == 221


@pytest.mark.parametrize("loop", LOOPS)
def test_starttls_starts_the_session_over(tls_relay, certs, loop):
    relay = tls_relay(loop, starttls=True)
    with Wire(relay.port) as wire:
        wire.greet()
        assert wire.cmd("MAIL FROM:<a@example.test>")[0] == 250  # a transaction before TLS...
        assert wire.cmd("STARTTLS")[0] == 220
        wire.sock = certs.client_context().wrap_socket(wire.sock, server_hostname="127.0.0.1")
        assert wire.cmd("MAIL FROM:<a@example.test>") == (503, "5.5.1 Send HELO or EHLO first")
        code, ehlo = wire.cmd("EHLO client.test")
        assert code == 250 and "STARTTLS" not in ehlo
        # ...is gone: RFC 3207 4.2 has the server forget everything it learnt before TLS.
        assert wire.cmd("RCPT TO:<b@example.test>") == (503, "5.5.1 Need MAIL before RCPT")
        assert wire.cmd("MAIL FROM:<c@example.test>")[0] == 250
        assert wire.cmd("RCPT TO:<d@example.test>")[0] == 250
        assert wire.cmd("DATA")[0] == 354
        code, text = wire.cmd(b"Subject: after TLS\r\n\r\nbody\r\n.")
        assert code == 250, text
        wire.cmd("QUIT")
    [envelope] = relay.envelopes()
    assert envelope.sender == "c@example.test"


# ---------------------------------------------------------------- --server-tls-required
def test_tls_required_refuses_mail_before_starttls_even_from_loopback(tls_relay, certs):
    relay = tls_relay("asyncio", starttls=True, required=True)
    refusal = (530, "5.7.0 Must issue a STARTTLS command first")
    with Wire(relay.port) as wire:
        assert wire.reply()[0] == 220
        assert wire.cmd("HELO client.test") == refusal
        code, ehlo = wire.cmd("EHLO client.test")
        assert code == 250 and "STARTTLS" in ehlo
        for command in ("MAIL FROM:<a@example.test>", "RCPT TO:<b@example.test>", "DATA", "RSET",
                        "VRFY postmaster", "AUTH PLAIN AGFsaWNlAHB3", "HELP"):
            assert wire.cmd(command) == refusal, command
        assert wire.cmd("NOOP")[0] == 250
        assert wire.cmd("STARTTLS")[0] == 220
        wire.sock = certs.client_context().wrap_socket(wire.sock, server_hostname="127.0.0.1")
        assert wire.cmd("EHLO client.test")[0] == 250
        assert wire.cmd("MAIL FROM:<a@example.test>")[0] == 250
    with starttls_session(relay.port, certs.client_context()) as smtp:
        assert smtp.sendmail("a@example.test", ["b@example.test"], MESSAGE) == {}
    assert len(relay.envelopes()) == 1


# ---------------------------------------------------------------- implicit TLS
@pytest.mark.parametrize("loop", LOOPS)
def test_implicit_tls_port_speaks_tls_from_the_first_byte(tls_relay, certs, loop):
    relay = tls_relay(loop, connection=True)
    with smtplib.SMTP_SSL("127.0.0.1", relay.port, timeout=10, context=certs.client_context()) as smtp:
        smtp.ehlo("client.test")
        assert not smtp.has_extn("starttls")
        assert smtp.docmd("STARTTLS")[0] == 503
        assert smtp.sendmail("a@example.test", ["b@example.test"], MESSAGE) == {}
    assert b"with ESMTPS" in relay.contents()[0]
    with socket.create_connection(("127.0.0.1", relay.port), 10) as plain:  # a clear-text client
        plain.sendall(b"EHLO client.test\r\n")
        assert b"220" not in read_to_end(plain)  # no greeting, only a closed connection


def test_swaks_sends_on_connect_to_an_implicit_tls_port(relay_process, certs):
    swaks = require("swaks")
    relay = relay_process("--server-tls-connection", "--server-tls-certificate", str(certs.dir / "server.pem"))
    swaks_over_tls(swaks, relay, certs, "--tls-on-connect")


def read_to_end(sock: socket.socket) -> bytes:
    data = b""
    try:
        while chunk := sock.recv(4096):
            data += chunk
    except ConnectionResetError:
        pass
    return data


# ---------------------------------------------------------------- versions
def tls11_client(certs: Certificates) -> ssl.SSLContext:
    context = certs.client_context(minimum_version=ssl.TLSVersion.TLSv1,
                                   maximum_version=ssl.TLSVersion.TLSv1_1)
    context.set_ciphers("DEFAULT:@SECLEVEL=0")  # so that this client is willing to speak TLS 1.1
    return context


def handshake(port: int, context: ssl.SSLContext) -> str:
    """Connect, STARTTLS, return the negotiated version (or raise the handshake's error)."""
    with starttls_session(port, context) as smtp:
        version = smtp.sock.version()
        smtp.ehlo("client.test")
        return version


# The relay refuses: an alert, or (asyncio's loop does not flush it) the connection closed.
REFUSED = "ALERT_PROTOCOL_VERSION|UNEXPECTED_EOF|EOF occurred"


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")
def test_tls_1_2_is_the_minimum_by_default(tls_relay, certs):
    relay = tls_relay("asyncio", starttls=True)
    with pytest.raises(ssl.SSLError, match=REFUSED):
        handshake(relay.port, tls11_client(certs))
    tls12 = certs.client_context(maximum_version=ssl.TLSVersion.TLSv1_2)
    assert handshake(relay.port, tls12) == "TLSv1.2"
    assert handshake(relay.port, certs.client_context()) == "TLSv1.3"
    # The same TLS 1.1 client gets in where the operator allows it: the refusal was the relay's.
    old = tls_relay("asyncio", starttls=True, config=["tlsv1.1"])
    assert handshake(old.port, tls11_client(certs)) == "TLSv1.1"


def test_tls_config_sets_the_minimum_and_maximum_version(tls_relay, certs):
    only13 = tls_relay("asyncio", starttls=True, config=["tlsv1.3"])
    with pytest.raises(ssl.SSLError, match=REFUSED):
        handshake(only13.port, certs.client_context(maximum_version=ssl.TLSVersion.TLSv1_2))
    assert handshake(only13.port, certs.client_context()) == "TLSv1.3"
    only12 = tls_relay("uvloop", starttls=True, config=["-tlsv1.2"])
    with pytest.raises(ssl.SSLError, match=REFUSED):
        handshake(only12.port, certs.client_context(minimum_version=ssl.TLSVersion.TLSv1_3))
    assert handshake(only12.port, certs.client_context()) == "TLSv1.2"


# ---------------------------------------------------------------- client certificates
@pytest.mark.parametrize("loop", LOOPS)
def test_a_verified_client_certificate_lands_in_the_envelope(tls_relay, certs, loop):
    relay = tls_relay(loop, starttls=True, verify=str(certs.ca_file))
    client = certs.ca.issue_cert("client.example.test", common_name="client.example.test")
    with starttls_session(relay.port, certs.client_context(client)) as smtp:
        smtp.ehlo("client.test")
        assert smtp.sendmail("a@example.test", ["b@example.test"], MESSAGE) == {}
    [envelope] = relay.envelopes()
    # E-MailRelay keeps the client's certificate itself (PEM) in X-MailRelay-ClientCertificate.
    expected = ssl.PEM_cert_to_DER_cert(client.cert_chain_pems[0].bytes().decode())
    assert ssl.PEM_cert_to_DER_cert(envelope.client_certificate + "\n") == expected
    raw = next(relay.spool.glob("*.envelope")).read_bytes()
    assert b"X-MailRelay-ClientCertificate: -----BEGIN CERTIFICATE-----\r\n " in raw
    if loop == "uvloop":
        assert "/CN=client.example.test'" in relay.log()  # the subject, OpenSSL's one-line form


@pytest.mark.parametrize("loop", LOOPS)
def test_verify_refuses_clients_without_a_certificate_from_the_ca(tls_relay, certs, loop):
    relay = tls_relay(loop, starttls=True, verify=str(certs.ca_file))
    stranger = trustme.CA().issue_cert("client.example.test")
    for context in (certs.client_context(), certs.client_context(stranger)):
        # TLS 1.3: the client may finish its side first and see the alert on its next read.
        with pytest.raises((ssl.SSLError, smtplib.SMTPServerDisconnected, ConnectionError)):
            with starttls_session(relay.port, context) as smtp:
                smtp.ehlo("client.test")
                smtp.sendmail("a@example.test", ["b@example.test"], MESSAGE)
    assert relay.envelopes() == []
    if loop == "uvloop":
        wait_until(lambda: relay.log().count("TLS handshake failed") == 2, what="two failures logged")
    client = certs.ca.issue_cert("client.example.test")
    with starttls_session(relay.port, certs.client_context(client)) as smtp:  # still serving
        assert smtp.ehlo("client.test")[0] == 250


# ---------------------------------------------------------------- SIGHUP, start-up errors
def served_certificate(port: int, context: ssl.SSLContext, implicit: bool) -> bytes:
    if implicit:
        with socket.create_connection(("127.0.0.1", port), 10) as raw:
            with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                return tls.getpeercert(binary_form=True) or b""
    with starttls_session(port, context) as smtp:
        return smtp.sock.getpeercert(binary_form=True) or b""


def der_of(pem_file: Path) -> bytes:
    text = pem_file.read_text()
    start = text.index("-----BEGIN CERTIFICATE-----")
    end = text.index("-----END CERTIFICATE-----") + len("-----END CERTIFICATE-----")
    return ssl.PEM_cert_to_DER_cert(text[start:end])


@pytest.mark.parametrize("mode", ["--server-tls", "--server-tls-connection"])
def test_sighup_reloads_the_certificate_without_a_restart(relay_process, certs, tmp_path, mode):
    pem = tmp_path / "relay.pem"
    certs.server("first").replace(pem)
    relay = relay_process(mode, "--server-tls-certificate", str(pem))
    implicit = mode == "--server-tls-connection"
    context = certs.client_context()
    first = der_of(pem)
    assert served_certificate(relay.port, context, implicit) == first
    with starttls_session(relay.port, context) if not implicit else smtplib.SMTP_SSL(
            "127.0.0.1", relay.port, timeout=10, context=context) as open_before:
        certs.server("second", common_name="renewed.relay.test").replace(pem)  # as certbot would
        second = der_of(pem)
        relay.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: served_certificate(relay.port, context, implicit) == second, what="new certificate")
        assert open_before.noop()[0] == 250  # a session from before carries on
    assert "reloaded" in relay.log

    pem.write_text("-----BEGIN CERTIFICATE-----\nnot one\n-----END CERTIFICATE-----\n")
    relay.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: "not reloaded" in relay.log, what="the failed reload in the log")
    assert served_certificate(relay.port, context, implicit) == second  # the last good one stays
    assert relay.proc.poll() is None


def start_failure(relay_process, *args: str) -> str:
    relay = relay_process(*args, wait=False)
    assert relay.proc.wait(30) == 1
    return relay.log


def test_an_unusable_certificate_is_a_clear_start_up_error(relay_process, certs, tmp_path):
    missing = tmp_path / "missing.pem"
    assert f"cannot read TLS certificate {missing}: No such file or directory" in start_failure(
        relay_process, "-K", "--server-tls-certificate", str(missing))
    assert f"cannot read TLS certificate {tmp_path}: Is a directory" in start_failure(
        relay_process, "-K", "--server-tls-certificate", str(tmp_path))
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("hello\n")
    assert "garbage.pem: not a PEM private key and certificate chain" in start_failure(
        relay_process, "--server-tls-connection", "--server-tls-certificate", str(garbage))
    other_key = tmp_path / "other.key"
    certs.ca.issue_cert("localhost").private_key_pem.write_to_path(str(other_key))
    log = start_failure(relay_process, "-K", "--server-tls-certificate", str(other_key),
                        "--server-tls-certificate", str(certs.dir / "server.pem"))
    assert "not a PEM private key and certificate chain that belong together" in log
    assert "Traceback" not in log


@pytest.mark.parametrize("args, problem", [
    (["-K"], "TLS needs a certificate (--server-tls-certificate)"),
    (["-K", "--server-tls-connection", "--server-tls-certificate", "x.pem"], "cannot be used together"),
    (["--server-tls-required"], "needs [tls] starttls or connection"),
    (["-K", "--server-tls-certificate", "x.pem", "-9", "tlsv9"], "unknown keyword 'tlsv9'"),
    (["-K"] + ["--server-tls-certificate", "x.pem"] * 3, "[tls] certificate: expected text"),
])
def test_inconsistent_tls_options_are_refused(relay_process, args, problem):
    assert problem in start_failure(relay_process, *args)


def test_the_relay_process_runs_on_uvloop(relay_process, certs):
    relay = relay_process("-K", "--server-tls-certificate", str(certs.dir / "server.pem"))
    with starttls_session(relay.port, certs.client_context()) as smtp:
        assert smtp.ehlo("client.test")[0] == 250
    maps = Path(f"/proc/{relay.proc.pid}/maps").read_text()
    assert "uvloop/loop" in maps  # the STARTTLS above went through uvloop's start_tls


@pytest.fixture(autouse=True)
def _no_config_from_the_environment(monkeypatch) -> Iterator[None]:
    monkeypatch.delenv("MAILRELAY_CONFIG", raising=False)
    yield

