"""Peers for the mail authentication tests that we did not write: Perl's Mail::DKIM (sign, verify,
ARC verify; Net::DNS pointed at our dnsmasq) and OpenDKIM's verifier; DNS records for dnsmasq,
keys, and an SMTP client that arrives through a PROXY header from any address."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from conftest import require
from smtpwire import Wire

from mailrelay_plugins.mailauth import keys

PERL_VERIFY = r"""
use strict; use warnings;
use Mail::DKIM::Verifier; use Mail::DKIM::ARC::Verifier; use Mail::DKIM::DNS; use Net::DNS::Resolver;
my ($mode, $port) = @ARGV;
Mail::DKIM::DNS::resolver(Net::DNS::Resolver->new(nameservers => ['127.0.0.1'], port => $port, recurse => 1,
                                                  udp_timeout => 5, tcp_timeout => 5, retry => 1));
my $v = $mode eq 'arc' ? Mail::DKIM::ARC::Verifier->new() : Mail::DKIM::Verifier->new();
binmode STDIN;
while (my $line = <STDIN>) { $line =~ s/\r?\n\z/\015\012/; $v->PRINT($line); }
$v->CLOSE;
print "result=", $v->result, "\n", "detail=", ($v->result_detail // ''), "\n";
if ($mode ne 'arc') {
    for my $s ($v->signatures) {
        print "signature d=", $s->domain, " s=", $s->selector, " a=", $s->algorithm, " result=", $s->result, "\n";
    }
}
"""

PERL_SIGN = r"""
use strict; use warnings;
use Mail::DKIM::Signer; use Mail::DKIM::TextWrap;
my ($domain, $selector, $keyfile, $headers) = @ARGV;
my $signer = Mail::DKIM::Signer->new(Algorithm => 'rsa-sha256', Method => 'relaxed', Domain => $domain,
                                     Selector => $selector, KeyFile => $keyfile, Headers => $headers);
binmode STDIN; binmode STDOUT;
my @lines;
while (my $line = <STDIN>) { $line =~ s/\r?\n\z/\015\012/; push @lines, $line; $signer->PRINT($line); }
$signer->CLOSE;
my $signature = $signer->signature->as_string;
$signature =~ s/\r?\n/\015\012/g;
print $signature, "\015\012", @lines;
"""


def _perl(script: str, args: list[str], data: bytes) -> str:
    perl = require("perl")
    result = subprocess.run([perl, "-e", script, *args], input=data, capture_output=True, timeout=60)
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    return result.stdout.decode(errors="replace")


def mail_dkim_verify(content: bytes, dns_port: int) -> tuple[str, list[str]]:
    """Mail::DKIM's overall result and one line per signature (``d=.. s=.. a=.. result=..``)."""
    out = _perl(PERL_VERIFY, ["dkim", str(dns_port)], content)
    result = re.search(r"^result=(.*)$", out, re.M)
    assert result is not None, out
    return result.group(1), re.findall(r"^signature (.*)$", out, re.M)


def mail_dkim_arc_verify(content: bytes, dns_port: int) -> tuple[str, str]:
    """Mail::DKIM::ARC::Verifier's chain result (pass, fail, none) and its detail."""
    out = _perl(PERL_VERIFY, ["arc", str(dns_port)], content)
    result = re.search(r"^result=(.*)$", out, re.M)
    detail = re.search(r"^detail=(.*)$", out, re.M)
    assert result is not None and detail is not None, out
    return result.group(1), detail.group(1)


def mail_dkim_sign(content: bytes, domain: str, selector: str, key_file: Path,
                   headers: str = "from:to:subject:date:message-id") -> bytes:
    """``content`` with a DKIM-Signature by Mail::DKIM::Signer (rsa-sha256, relaxed) on top."""
    perl = require("perl")
    result = subprocess.run([perl, "-e", PERL_SIGN, domain, selector, str(key_file), headers], input=content,
                            capture_output=True, timeout=60)
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    return result.stdout


def opendkim_verify(content: bytes, records: dict[str, str], workdir: Path) -> list[str]:
    """OpenDKIM's test mode (``opendkim -t``) on ``content``: one ``dkim=...`` result per signature.

    Its keys come from ``TestPublicKeys`` (a file of ``name record`` lines): OpenDKIM's resolver
    (libunbound) cannot be pointed at a nameserver on a high port; Mail::DKIM checks the DNS side.
    """
    binary = require("opendkim")
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "keys.txt").write_text("".join(f"{name} {record}\n" for name, record in records.items()))
    (workdir / "opendkim.conf").write_text(f"Mode v\nSyslog no\nTestPublicKeys {workdir / 'keys.txt'}\n")
    message = workdir / "message.eml"
    message.write_bytes(content)
    result = subprocess.run([binary, "-x", str(workdir / "opendkim.conf"), "-vv", "-t", str(message)],
                            capture_output=True, timeout=60)
    output = result.stdout.decode(errors="replace") + result.stderr.decode(errors="replace")
    assert result.returncode == 0, output
    return re.findall(r"^\s*(dkim=\S+ .*?);?$", output, re.M)


def txt_option(name: str, value: str) -> str:
    """A dnsmasq ``--txt-record`` for ``value``, split into strings of at most 255 octets (commas
    separate the strings; no shell is involved, so no quotes)."""
    assert "," not in value, "dnsmasq would split the record at the comma"
    chunks = [value[i:i + 255] for i in range(0, len(value), 255)] or [""]
    return f"--txt-record={name}," + ",".join(chunks)


def new_key(directory: Path, domain: str, selector: str, kind: str = "rsa") -> tuple[Path, str]:
    """A private key file (mode 0600) and its public TXT record."""
    private = keys.generate(kind)  # type: ignore[arg-type]
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{selector}.{domain}.pem"
    keys.write_private(path, keys.pem(private))
    return path, keys.txt_record(private)


def send_as(port: int, client_ip: str, sender: str, recipients: list[str], content: bytes,
            helo: str = "client.test") -> tuple[int, str]:
    """One message from ``client_ip`` (announced in a PROXY v1 header): the first refusal's reply,
    or the reply to the final dot."""
    with Wire(port) as wire:
        wire.send(f"PROXY TCP4 {client_ip} 127.0.0.1 40000 25\r\n".encode())
        code, text = wire.reply()
        if code != 220:
            return code, text
        for command in (f"EHLO {helo}", f"MAIL FROM:<{sender}>", *(f"RCPT TO:<{r}>" for r in recipients), "DATA"):
            code, text = wire.cmd(command)
            if code >= 400:
                return code, text
        data = content.replace(b"\r\n.", b"\r\n..")
        return wire.cmd(data + (b"" if data.endswith(b"\r\n") else b"\r\n") + b".")
