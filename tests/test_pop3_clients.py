"""Mail sent over SMTP, delivered by ``deliver:`` into maildirs, collected over POP3 by real clients
(fetchmail, getmail6, poplib) from a real ``relay`` process: plain, STLS and POP3S, keeping and
deleting, ``--pop-by-name``, two processes on one mailbox, PAM accounts, ``--interface pop=``."""

from __future__ import annotations

import contextlib
import os
import poplib
import random
import signal
import socket
import ssl
import subprocess
import sys
from pathlib import Path

import pytest
import trustme

from mailrelay import net

from conftest import free_port, require, submit, wait_for_port, wait_until
from test_pop3_protocol import PLAINTEXT, Pop

SECRETS = "server plain alice alice-pw\nserver plain bob bob-pw\n"


def body(n: int, user: str = "alice") -> bytes:
    return (f"From: sender@example.test\r\nTo: {user}@local.test\r\nSubject: note {n} for {user}\r\n\r\n"
            f"hello {user}, number {n}\r\n.a line with a dot\r\n").encode()


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> tuple[Path, Path, trustme.CA]:
    """A CA and a server certificate for CN=localhost (fetchmail checks the common name)."""
    directory = tmp_path_factory.mktemp("certs")
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(directory / "ca.pem"))
    leaf = ca.issue_cert("localhost", "127.0.0.1", common_name="localhost")
    leaf.private_key_and_cert_chain_pem.write_to_path(str(directory / "server.pem"))
    return directory / "server.pem", directory / "ca.pem", ca


@pytest.fixture
def tools(tmp_path) -> dict[str, str]:
    """An address verifier that makes <user>@local.test the mailbox <user>, and an MDA for the
    clients that stores each message as a numbered file."""
    verifier = tmp_path / "verify.py"
    verifier.write_text(f"""#!{sys.executable}
import sys
local, _, domain = sys.argv[1].partition("@")
if domain == "local.test":
    print(local.capitalize()); print(local); sys.exit(0)
print(sys.argv[1]); print(sys.argv[1]); sys.exit(1)
""")
    mda = tmp_path / "mda.py"
    mda.write_text(f"""#!{sys.executable}
import os, sys
out = sys.argv[1]
os.makedirs(out, exist_ok=True)
n = len(os.listdir(out))
open(os.path.join(out, f"{{n:04d}}.eml"), "wb").write(sys.stdin.buffer.read())
""")
    for path in (verifier, mda):
        path.chmod(0o755)
    secrets = tmp_path / "pop.secrets"
    secrets.write_text(SECRETS)
    return {"verifier": str(verifier), "mda": str(mda), "secrets": str(secrets)}


def start_relay(relay_process, tools, *extra: str, spool: Path | None = None, pop_host: str = "127.0.0.1",
                pop_auth: str = ""):
    """A relay process that delivers <user>@local.test into maildirs and serves them over POP3;
    ready once the POP3 port answers (the SMTP socket is bound, and answers, earlier)."""
    pop_port = free_port()
    relay = relay_process("--address-verifier", tools["verifier"], "--filter", "deliver:", "--pop",
                          "--pop-port", str(pop_port), "--pop-auth", pop_auth or tools["secrets"], "--pop-by-name",
                          *extra, spool=spool)
    wait_for_port(pop_port, relay.proc, host=pop_host)
    relay.pop_port = pop_port
    return relay


def send(relay, n: int, user: str = "alice") -> None:
    assert submit(relay.port, body(n, user), sender="sender@example.test", recipients=[f"{user}@local.test"])[0] == 250


def in_mailbox(relay, user: str = "alice") -> list[str]:
    box = relay.spool / user
    return sorted(p.name for sub in ("new", "cur") for p in (box / sub).iterdir())


def ends_with(message: bytes, expected: bytes) -> bool:
    """Whether a collected message ends with ``expected``, line ends aside (clients hand mail
    to their MDA with LF)."""
    return message.replace(b"\r\n", b"\n").endswith(expected.replace(b"\r\n", b"\n"))


def collected(directory: Path) -> list[bytes]:
    return [p.read_bytes() for p in sorted(directory.glob("*.eml"))] if directory.exists() else []


# ---------------------------------------------------------------- fetchmail
def fetchmail(tmp_path: Path, port: int, tools, *, keep: bool, tls: str = "", user: str = "alice",
              name: str = "fm") -> tuple[int, Path, str]:
    home = tmp_path / name
    home.mkdir(exist_ok=True)
    out = home / "out"
    rc = home / "fetchmailrc"
    rc.write_text(f"""set no syslog
poll 127.0.0.1 proto POP3 port {port} timeout 10
  user "{user}" there with password "{user}-pw" is "root" here
  {tls or "sslproto '' no sslcertck"}
  fetchall {"keep" if keep else ""}
  mda "{tools['mda']} {out}"
""")
    rc.chmod(0o600)
    result = subprocess.run([require("fetchmail"), "-f", str(rc), "--nodetach", "-N", "-v"], capture_output=True,
                            text=True, timeout=60, env={**os.environ, "FETCHMAILHOME": str(home)})
    return result.returncode, out, result.stdout + result.stderr


def test_fetchmail_collects_mail_sent_over_smtp_and_deletes_it(relay_process, tools, tmp_path):
    relay = start_relay(relay_process, tools)
    for n in (1, 2):
        send(relay, n)
    assert len(in_mailbox(relay)) == 2
    code, out, log = fetchmail(tmp_path, relay.pop_port, tools, keep=False)
    assert code == 0, log
    messages = collected(out)
    assert len(messages) == 2
    for n, message in enumerate(messages, 1):
        assert ends_with(message, body(n))
        assert b"Received: " in message
    assert in_mailbox(relay) == []
    code, _, log = fetchmail(tmp_path, relay.pop_port, tools, keep=False, name="again")
    assert code == 1, log  # fetchmail: no mail


def test_fetchmail_keep_leaves_the_mail_on_the_server(relay_process, tools, tmp_path):
    relay = start_relay(relay_process, tools)
    send(relay, 1)
    code, out, log = fetchmail(tmp_path, relay.pop_port, tools, keep=True)
    assert code == 0, log
    assert len(collected(out)) == 1
    [name] = in_mailbox(relay)
    assert name.endswith(":2,S")  # read, and kept
    code, out, log = fetchmail(tmp_path, relay.pop_port, tools, keep=True, name="again")
    assert code == 0 and len(collected(out)) == 1, log


def test_fetchmail_over_stls_verifies_the_certificate(relay_process, tools, tmp_path, certs):
    pem, ca_file, _ = certs
    relay = start_relay(relay_process, tools, "--server-tls", "--server-tls-certificate", str(pem))
    send(relay, 1)
    verified = f"sslproto 'TLS1.2+' sslcertck sslcertfile \"{ca_file}\" sslcommonname \"localhost\""
    stranger = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(stranger))
    code, _, log = fetchmail(tmp_path, relay.pop_port, tools, keep=False, name="stranger",
                             tls=verified.replace(str(ca_file), str(stranger)))
    assert code == 2, log  # a certificate from an unknown CA: the client gives up before logging in
    assert len(in_mailbox(relay)) == 1
    code, out, log = fetchmail(tmp_path, relay.pop_port, tools, keep=False, tls=verified)
    assert code == 0, log
    assert "STLS" in log and len(collected(out)) == 1
    assert in_mailbox(relay) == []
    tls_line = next(line for line in relay.log.splitlines() if " TLS TLSv1." in line)
    login_line = next(line for line in relay.log.splitlines() if "logged in user='alice'" in line)
    assert relay.log.index(tls_line) < relay.log.index(login_line)  # the password went over TLS


# ---------------------------------------------------------------- getmail6
def getmail(tmp_path: Path, port: int, tools, *, delete: bool, name: str = "gm", retriever: str = "SimplePOP3Retriever",
            extra: str = "") -> tuple[int, Path, str]:
    home = tmp_path / name
    home.mkdir(exist_ok=True)
    out = home / "out"
    rc = home / "getmailrc"
    rc.write_text(f"""[retriever]
type = {retriever}
server = 127.0.0.1
port = {port}
username = alice
password = alice-pw
{extra}
[destination]
type = MDA_external
path = {sys.executable}
arguments = ("{tools['mda']}", "{out}")
allow_root_commands = true

[options]
read_all = true
delete = {str(delete).lower()}
""")
    result = subprocess.run([require("getmail"), f"--rcfile={rc}", f"--getmaildir={home}"], capture_output=True,
                            text=True, timeout=60)
    return result.returncode, out, result.stdout + result.stderr


def test_getmail_collects_keeping_then_deleting(relay_process, tools, tmp_path):
    relay = start_relay(relay_process, tools)
    for n in (1, 2, 3):
        send(relay, n)
    code, out, log = getmail(tmp_path, relay.pop_port, tools, delete=False)
    assert code == 0, log
    assert [ends_with(m, body(n)) for n, m in enumerate(collected(out), 1)] == [True] * 3
    assert len(in_mailbox(relay)) == 3
    code, out, log = getmail(tmp_path, relay.pop_port, tools, delete=True, name="gm2", extra="use_apop = true")
    assert code == 0, log
    assert len(collected(out)) == 3
    assert in_mailbox(relay) == []
    assert "logged in user='alice' mechanism=APOP" in relay.log


def test_getmail_over_pop3s(relay_process, tools, tmp_path, certs):
    pem, ca_file, _ = certs
    tls_port = free_port()
    relay = start_relay(relay_process, tools, "--server-tls", "--server-tls-certificate", str(pem),
                        "--pop-tls-port", str(tls_port))
    send(relay, 7)
    code, out, log = getmail(tmp_path, tls_port, tools, delete=True, retriever="SimplePOP3SSLRetriever",
                             extra=f"ca_certs = {ca_file}\nssl_cert_hostname = localhost")
    assert code == 0, log
    assert ends_with(collected(out)[0], body(7))
    assert in_mailbox(relay) == []


# ---------------------------------------------------------------- poplib, users, processes
def login(port: int, user: str, host: str = "127.0.0.1") -> poplib.POP3:
    client = poplib.POP3(host, port, timeout=10)
    client.user(user)
    client.pass_(f"{user}-pw")
    return client


def test_pop_by_name_separates_two_users(relay_process, tools):
    relay = start_relay(relay_process, tools)
    send(relay, 1, "alice")
    send(relay, 2, "bob")
    send(relay, 3, "bob")
    for user, numbers in (("alice", [1]), ("bob", [2, 3])):
        client = login(relay.pop_port, user)
        count, _ = client.stat()
        got = [b"\r\n".join(client.retr(i)[1]) + b"\r\n" for i in range(1, count + 1)]
        assert [m.endswith(body(n, user)) for m, n in zip(got, numbers)] == [True] * len(numbers)
        assert len(got) == len(numbers)
        client.quit()


def test_two_relay_processes_share_the_mailbox_lock(relay_process, tools, tmp_path):
    spool = tmp_path / "shared-spool"
    first = start_relay(relay_process, tools, spool=spool)
    second = start_relay(relay_process, tools, spool=spool)
    send(first, 1)
    holder = login(first.pop_port, "alice")
    with pytest.raises(poplib.error_proto, match=r"\[IN-USE\]"):
        login(second.pop_port, "alice")
    holder.dele(1)
    holder.quit()
    other = login(second.pop_port, "alice")
    assert other.stat() == (0, 0)
    other.quit()


def test_a_delivery_during_a_session_waits_for_the_next_one(relay_process, tools):
    relay = start_relay(relay_process, tools)
    send(relay, 1)
    client = login(relay.pop_port, "alice")
    uids = client.uidl()[1]
    send(relay, 2)  # lands in new/ while the session holds the mailbox
    assert client.stat()[0] == 1
    client.quit()
    client = login(relay.pop_port, "alice")
    again = client.uidl()[1]
    assert again[0] == uids[0] and len(again) == 2  # the same UID for the same message
    client.quit()


def served_certificate(port: int, ca: trustme.CA) -> bytes:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    client = poplib.POP3("127.0.0.1", port, timeout=10)
    client.stls(context=context)
    der = client.sock.getpeercert(binary_form=True)
    client.quit()
    return der


def test_sighup_renews_the_pop3_certificate_too(relay_process, tools, tmp_path, certs):
    _, _, ca = certs
    pem = tmp_path / "server.pem"
    ca.issue_cert("localhost", "127.0.0.1", common_name="localhost").private_key_and_cert_chain_pem.write_to_path(str(pem))
    relay = start_relay(relay_process, tools, "--server-tls", "--server-tls-certificate", str(pem))
    before = served_certificate(relay.pop_port, ca)
    ca.issue_cert("localhost", "127.0.0.1", common_name="localhost").private_key_and_cert_chain_pem.write_to_path(str(pem))
    relay.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: served_certificate(relay.pop_port, ca) != before, what="the new certificate")


# ---------------------------------------------------------------- addresses and accounts
def network_address() -> str:
    """A non-loopback IPv4 address of this host (POP3 from "the network" without leaving it)."""
    output = subprocess.run([require("ip"), "-4", "-o", "addr", "show", "scope", "global"], capture_output=True,
                            text=True, check=True).stdout
    for line in output.splitlines():
        return line.split()[3].split("/")[0]
    pytest.fail("this host has no non-loopback IPv4 address to test remote POP3 clients with")


def test_interface_items_for_one_listener_leave_the_other_on_its_default():
    assert net.addresses_for("smtp", ["pop=192.0.2.9"], any_default=False) == ["127.0.0.1"]
    assert net.addresses_for("pop", ["smtp=127.0.0.2"], any_default=True) == ["0.0.0.0", "::"]
    assert net.addresses_for("pop", ["pop=127.0.0.3", "smtp=127.0.0.2"], any_default=False) == ["127.0.0.3"]


def test_interface_pop_and_remote_clients(relay_process, tools, certs):
    pem, _, ca = certs
    address = network_address()
    relay = start_relay(relay_process, tools, "--interface", f"smtp=127.0.0.1,pop={address}", pop_host=address)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", relay.pop_port), 2).close()  # POP listens on pop= only
    client = Pop(relay.pop_port, host=address)
    assert client.greeting == "-ERR [SYS/PERM] This server does not serve remote clients"
    relay.stop()
    relay = start_relay(relay_process, tools, "--remote-clients", "--interface", f"smtp=127.0.0.1,pop={address}",
                        "--server-tls", "--server-tls-certificate", str(pem), pop_host=address)
    client = Pop(relay.pop_port, host=address)
    assert client.greeting.startswith("+OK")
    assert client.cmd("USER alice") == PLAINTEXT  # a network client: no password in clear
    assert client.cmd("STLS") == "+OK Begin TLS negotiation"
    context = ssl.create_default_context()
    ca.configure_trust(context)
    client.sock = context.wrap_socket(client.sock, server_hostname="localhost")
    assert client.login().startswith("+OK 0 messages")


@pytest.fixture(scope="module")
def pam_account():
    """A throw-away local user and a PAM service using pam_unix (removed afterwards)."""
    require("useradd")
    suffix = random.randrange(10000, 100000)
    user, password, service = f"mrpop{suffix}", "P0p pass!", f"mrtest-pop-{suffix}"
    subprocess.run(["useradd", "-M", "-s", "/usr/sbin/nologin", user], check=True)
    try:
        subprocess.run(["chpasswd"], input=f"{user}:{password}\n", text=True, check=True)
        Path(f"/etc/pam.d/{service}").write_text("auth required pam_unix.so nodelay\naccount required pam_unix.so\n")
        yield user, password, service
    finally:
        subprocess.run(["userdel", user], check=False)
        with contextlib.suppress(FileNotFoundError):
            os.remove(f"/etc/pam.d/{service}")


def test_pam_accounts_log_in_to_their_own_mailbox(relay_process, tools, pam_account):
    user, password, service = pam_account
    relay = start_relay(relay_process, tools, pop_auth=f"pam:{service}")
    send(relay, 1, user)
    client = poplib.POP3("127.0.0.1", relay.pop_port, timeout=10)
    client.user(user)
    with pytest.raises(poplib.error_proto, match=r"-ERR \[AUTH\] Authentication failed"):
        client.pass_("wrong")
    client.user(user)
    assert client.pass_(password).startswith(b"+OK 1 messages")
    assert b"\r\n".join(client.retr(1)[1]).endswith(b"number 1\r\n.a line with a dot")
    client.quit()


def test_a_socket_named_pop_from_the_service_manager_is_served(tools, tmp_path):
    activate = require("systemd-socket-activate")
    port = free_port()
    log = open(tmp_path / "relay.log", "wb")
    proc = subprocess.Popen([activate, "-l", f"127.0.0.1:{port}", "--fdname=pop", sys.executable, "-m", "mailrelay",
                             "--no-daemon", "--no-smtp", "--log", "--no-syslog", "--spool-dir", str(tmp_path / "spool"),
                             "--pop", "--pop-auth", tools["secrets"], "--pop-by-name"],
                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        wait_for_port(port, proc)  # this first connection starts the relay
        client = Pop(port, timeout=30)
        assert client.greeting.startswith("+OK"), (tmp_path / "relay.log").read_text()
        assert client.login().startswith("+OK 0 messages")
        assert client.cmd("QUIT").startswith("+OK")
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()
    assert f"pop3 listening on 127.0.0.1:{port}" in (tmp_path / "relay.log").read_text()


def test_emailrelay_short_options_run_the_pop_server(relay_process, tools):
    pop_port = free_port()
    relay = relay_process("--address-verifier", tools["verifier"], "--filter", "deliver:",
                          "-B", "-E", str(pop_port), "-F", tools["secrets"], "-J", "-G")
    wait_for_port(pop_port, relay.proc)
    send(relay, 1)
    client = login(pop_port, "alice")
    client.dele(1)
    client.quit()
    assert len(in_mailbox(relay)) == 1  # -G: DELE did nothing
