"""``milter:`` against real milters from Debian: OpenDKIM signing and verifying, rspamd's milter proxy.

Nothing here verifies itself: OpenDKIM (``opendkim``) signs with a key made by
``opendkim-genkey`` and published by a real DNS server (dnsmasq); the signature is checked by
dkimpy and by Perl's Mail::DKIM (``libmail-dkim-perl``), and OpenDKIM in verify mode (its DNS
through libunbound, forwarded to the same dnsmasq) labels what it sees in an
``Authentication-Results`` header. rspamd (``rspamd``) runs only its proxy worker in milter mode
with ``self_scan``, a minimal configuration in a temporary directory and no redis: enough to
refuse GTUBE with its own reply.
"""

from __future__ import annotations

import re
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import dkim
import dns.resolver
import pytest

from conftest import dnsmasq_serving, free_port, require, spooled_contents, submit
from sinks import Sink

SELECTOR, DOMAIN = "sel1", "example.test"
GTUBE = b"XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"
HAM = (b"From: Alice <alice@example.test>\r\nTo: bob@far.test\r\nSubject: signed mail\r\n"
       b"Date: Mon, 1 Jan 2024 10:00:00 +0000\r\nMessage-ID: <real1@example.test>\r\n\r\n"
       b"Hello Bob,\r\nthis message should arrive signed.\r\n")
MAIL_DKIM = r"""
use strict; use warnings;
use Mail::DKIM::Verifier; use Net::DNS::Resolver;
Mail::DKIM::DNS::resolver(Net::DNS::Resolver->new(nameservers => ['127.0.0.1'], port => $ARGV[0],
                                                  udp_timeout => 5, tcp_timeout => 5));
my $verifier = Mail::DKIM::Verifier->new();
binmode STDIN; local $/; $verifier->PRINT(scalar <STDIN>); $verifier->CLOSE;
print $verifier->result, "\n";
"""


@dataclass
class Daemon:
    """A real server in the foreground on a loopback port; stopped at the end of the module."""

    proc: subprocess.Popen
    port: int
    log_path: Path

    @property
    def spec(self) -> str:
        return f"milter:127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def run_daemon(args: list[str], port: int, log_path: Path, timeout: float = 60.0) -> Daemon:
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    daemon = Daemon(proc, port, log_path)
    end = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            pytest.fail(f"{args[0]} exited with {proc.returncode}:\n{log_path.read_text(errors='replace')}")
        try:
            with socket.create_connection(("127.0.0.1", port), 0.5):
                return daemon
        except OSError:
            if time.monotonic() > end:
                daemon.stop()
                pytest.fail(f"{args[0]} did not listen on {port} within {timeout}s")
            time.sleep(0.05)


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("milters")


@pytest.fixture(scope="module")
def dkim_key(workdir) -> tuple[Path, str]:
    """A 2048-bit RSA key from opendkim-genkey: the private key file and the TXT record text."""
    subprocess.run([require("opendkim-genkey"), "-b", "2048", "-d", DOMAIN, "-s", SELECTOR, "-D", str(workdir)],
                   check=True, timeout=60)
    record = "".join(re.findall(r'"([^"]*)"', (workdir / f"{SELECTOR}.txt").read_text()))
    return workdir / f"{SELECTOR}.private", record


@pytest.fixture(scope="module")
def dkim_dns(workdir, dkim_key) -> Iterator[int]:
    """dnsmasq publishing the key at sel1._domainkey.example.test (in strings of at most 255 bytes)."""
    _, record = dkim_key
    strings = ",".join(record[i:i + 200] for i in range(0, len(record), 200))
    port = free_port()
    records = [f"--txt-record={SELECTOR}._domainkey.{DOMAIN},{strings}", "--host-record=probe.test,127.0.0.1"]
    with dnsmasq_serving(workdir, port, records, probe="probe.test", log=workdir / "dnsmasq.log"):
        yield port


def _opendkim(workdir: Path, name: str, lines: list[str]) -> Iterator[Daemon]:
    port = free_port()
    conf = workdir / f"{name}.conf"
    conf.write_text("\n".join([
        "Syslog no", "Background no", "RequireSafeKeys false",  # the key lives under /tmp
        f"Socket inet:{port}@127.0.0.1", f"PidFile {workdir}/{name}.pid", *lines]) + "\n")
    daemon = run_daemon([require("opendkim"), "-f", "-x", str(conf)], port, workdir / f"{name}.log")
    yield daemon
    daemon.stop()


@pytest.fixture(scope="module")
def signer(workdir, dkim_key) -> Iterator[Daemon]:
    """OpenDKIM in sign mode for example.test (mail from 127.0.0.1 is its default InternalHosts)."""
    key, _ = dkim_key
    yield from _opendkim(workdir, "signer", ["Mode s", f"Domain {DOMAIN}", f"Selector {SELECTOR}", f"KeyFile {key}",
                                             "Canonicalization relaxed/relaxed"])


@pytest.fixture(scope="module")
def verifier(workdir, dkim_dns) -> Iterator[Daemon]:
    """OpenDKIM in verify mode; libunbound forwards its queries to our dnsmasq (unbound answers
    ``.test`` itself unless told not to)."""
    unbound = workdir / "unbound.conf"
    unbound.write_text(f'server:\n    do-not-query-localhost: no\n    module-config: "iterator"\n'
                       f'    local-zone: "test." nodefault\n'
                       f'forward-zone:\n    name: "."\n    forward-addr: 127.0.0.1@{dkim_dns}\n')
    yield from _opendkim(workdir, "verifier", ["Mode v", f"ResolverConfiguration {unbound}"])


@pytest.fixture(scope="module")
def rspamd(workdir) -> Iterator[Daemon]:
    """rspamd with only its proxy worker, in milter mode, scanning by itself (no redis, no
    controller). A four-line public suffix list and no hyperscan keep its start-up near a second."""
    home = workdir / "rspamd"
    (home / "db").mkdir(parents=True)
    (home / "tld.dat").write_text("com\nnet\norg\ntest\n")
    port = free_port()
    conf = home / "rspamd.conf"
    conf.write_text(f"""
options {{
  pidfile = "{home}/rspamd.pid"; dbdir = "{home}/db"; filters = "";
  url_tld = "{home}/tld.dat"; disable_hyperscan = true; hs_cache_dir = "{home}/db";
  dns {{ nameserver = ["127.0.0.1:9"]; timeout = 1s; retransmits = 0; }}
}}
logging {{ type = "console"; level = "info"; }}
actions {{ reject = 15; add_header = 6; greylist = 4; }}
worker "rspamd_proxy" {{
  bind_socket = "127.0.0.1:{port}"; milter = yes; timeout = 30s; count = 1;
  upstream "local" {{ default = yes; self_scan = yes; }}
}}
""")
    variables = [f"--var={name}={home}/db" for name in ("DBDIR", "RUNDIR", "LOGDIR")]
    daemon = run_daemon([require("rspamd"), "-f", "-u", "root", "-g", "root", *variables, "-c", str(conf)], port,
                        home / "rspamd.log")
    yield daemon
    daemon.stop()


@pytest.fixture
def target():
    sink = Sink(free_port()).start()
    yield sink
    sink.stop()


# ---------------------------------------------------------------- helpers
def published_key(dns_port: int):
    """dkimpy's dnsfunc, asking the same dnsmasq that everyone else asks."""
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers, resolver.port, resolver.lifetime = ["127.0.0.1"], dns_port, 5.0

    def lookup(name: bytes, timeout: int = 5) -> bytes:
        answer = resolver.resolve(name.decode().rstrip("."), "TXT")
        return b"".join(b"".join(r.strings) for r in answer)

    return lookup


def mail_dkim(content: bytes, dns_port: int) -> str:
    result = subprocess.run([require("perl"), "-e", MAIL_DKIM, str(dns_port)], input=content,
                            capture_output=True, timeout=60)
    assert result.returncode == 0, result.stderr.decode()
    return result.stdout.decode().strip()


def header(content: bytes, name: bytes) -> bytes:
    """The first ``name`` header field, unfolded."""
    match = re.search(rb"(?im)^" + re.escape(name) + rb":((?:[^\r\n]*)(?:\r\n[ \t][^\r\n]*)*)",
                      content.partition(b"\r\n\r\n")[0])
    assert match is not None, f"no {name!r} header in {content[:400]!r}"
    return re.sub(rb"\r\n[ \t]", b" ", match.group(1)).strip()


# ---------------------------------------------------------------- OpenDKIM
def test_opendkim_signs_and_independent_verifiers_accept_the_signature(relay_process, signer, dkim_dns):
    relay = relay_process("--filter", signer.spec)
    assert submit(relay.port, HAM, sender="alice@example.test", recipients=["bob@far.test"]) == (250, "")
    [content] = spooled_contents(relay.spool)
    signature = header(content, b"DKIM-Signature")
    assert b"d=example.test" in signature and b"s=sel1" in signature and b"c=relaxed/relaxed" in signature
    assert content.endswith(HAM)
    assert dkim.verify(content, dnsfunc=published_key(dkim_dns))
    assert mail_dkim(content, dkim_dns) == "pass"
    tampered = content.replace(b"should arrive", b"should not arrive")
    assert not dkim.verify(tampered, dnsfunc=published_key(dkim_dns))
    assert mail_dkim(tampered, dkim_dns) == "fail"


def test_opendkim_at_the_client_stage_signs_what_the_next_hop_receives(relay_process, signer, dkim_dns, target):
    relay = relay_process("--client-filter", signer.spec, "--forward-to", f"127.0.0.1:{target.port}")
    assert submit(relay.port, HAM, sender="alice@example.test", recipients=["bob@far.test"]) == (250, "")
    [got] = target.wait_for(1)
    assert got.recipients == ["bob@far.test"]
    assert dkim.verify(got.content, dnsfunc=published_key(dkim_dns))
    assert mail_dkim(got.content, dkim_dns) == "pass"


def test_opendkim_verifier_labels_mail_in_authentication_results(relay_process, verifier, dkim_key, dkim_dns):
    key, _ = dkim_key
    signed = dkim.sign(HAM, SELECTOR.encode(), DOMAIN.encode(), key.read_bytes(),
                       include_headers=[b"From", b"To", b"Subject", b"Date", b"Message-ID"])
    signed = signed.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n") + HAM
    relay = relay_process("--filter", verifier.spec)
    assert submit(relay.port, signed, sender="alice@example.test", recipients=["bob@far.test"]) == (250, "")
    tampered = signed.replace(b"should arrive", b"should not arrive")
    assert submit(relay.port, tampered, sender="alice@example.test", recipients=["bob@far.test"]) == (250, "")
    good, bad = spooled_contents(relay.spool)
    # The authserv-id is the relay's name: OpenDKIM takes it from the j macro.
    assert re.match(rb"relay\.test; dkim=pass .*header\.d=example\.test", header(good, b"Authentication-Results"))
    assert re.match(rb"relay\.test; dkim=fail ", header(bad, b"Authentication-Results"))


def test_a_chain_of_milters_sees_each_others_edits(relay_process, signer, verifier):
    relay = relay_process("--filter", f"{signer.spec},{verifier.spec}")
    assert submit(relay.port, HAM, sender="alice@example.test", recipients=["bob@far.test"]) == (250, "")
    [content] = spooled_contents(relay.spool)
    assert re.match(rb"relay\.test; dkim=pass ", header(content, b"Authentication-Results"))
    assert content.index(b"Authentication-Results:") < content.index(b"DKIM-Signature:")


# ---------------------------------------------------------------- rspamd
def test_rspamd_refuses_gtube_with_its_own_reply_and_passes_clean_mail(relay_process, rspamd):
    relay = relay_process("--filter", rspamd.spec)
    spam = HAM.replace(b"this message should arrive signed.", GTUBE)
    assert submit(relay.port, spam) == (554, "5.7.1 Gtube pattern")
    assert spooled_contents(relay.spool) == []
    assert submit(relay.port, HAM) == (250, "")
    [content] = spooled_contents(relay.spool)
    assert content.endswith(HAM)
