"""SMTP AUTH end to end: a real relay with the `auth` plugin, real clients (swaks, smtplib), a real
secrets file made with `relay passwd`, a real local user through PAM, and TLS from trustme."""

from __future__ import annotations

import smtplib
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import require
from mailrelay.spool import Spool
from test_auth_backends import pam_user  # noqa: F401  (fixture: a local user and a PAM service)
from test_tls import certs  # noqa: F401  (fixture: a trustme CA and server certificate)

PASSWORD = "correct horse"


def relay_passwd(password: str) -> str:
    done = subprocess.run([sys.executable, "-m", "mailrelay", "passwd"], input=password + "\n",
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@pytest.fixture
def secrets(tmp_path) -> Path:
    path = tmp_path / "auth.secrets"
    path.write_text("# E-MailRelay secrets file\n"
                    f"server plain alice {PASSWORD.replace(' ', '+20')}\n"
                    f"server md5 carol {relay_passwd(PASSWORD)}\n")
    return path


def swaks(port: int, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([require("swaks"), "--server", f"127.0.0.1:{port}", "--helo", "client.test",
                           "--from", "alice@example.test", "--to", "bob@example.test", "--body", "hi", *args],
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("mechanism, user", [("PLAIN", "alice"), ("LOGIN", "alice"), ("CRAM-MD5", "alice"),
                                             ("CRAM-MD5", "carol")])
def test_swaks_authenticates_from_a_secrets_file(relay_process, secrets, mechanism, user):
    relay = relay_process("--server-auth", str(secrets))
    result = swaks(relay.port, "--auth", mechanism, "--auth-user", user, "--auth-password", PASSWORD)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "235 2.7.0" in result.stdout
    spool = Spool(relay.spool)
    (message_id,) = spool.ids()
    assert spool.read_envelope(message_id).authentication == user


def test_a_wrong_password_and_an_unknown_user_get_the_same_answer(relay_process, secrets):
    relay = relay_process("--server-auth", str(secrets))
    wrong = swaks(relay.port, "--auth", "PLAIN", "--auth-user", "alice", "--auth-password", "nope")
    unknown = swaks(relay.port, "--auth", "PLAIN", "--auth-user", "mallory", "--auth-password", "nope")
    for result in (wrong, unknown):
        assert result.returncode != 0
        assert "535 5.7.8 Authentication credentials invalid" in result.stdout
    assert Spool(relay.spool).ids() == []


def test_mail_without_auth_is_refused(relay_process, secrets):
    relay = relay_process("--server-auth", str(secrets))
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=30) as client:
        with pytest.raises(smtplib.SMTPSenderRefused) as refused:
            client.sendmail("alice@example.test", ["bob@example.test"], b"Subject: x\r\n\r\nhi\r\n")
    assert refused.value.smtp_code == 530


def test_pam_with_a_real_local_user_over_swaks_and_smtplib(relay_process, pam_user):  # noqa: F811
    relay = relay_process("--server-auth", f"pam:{pam_user.service}")
    result = swaks(relay.port, "--auth", "PLAIN", "--auth-user", pam_user.user,
                   "--auth-password", pam_user.password)
    assert result.returncode == 0, result.stdout + result.stderr
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=30) as client:
        client.login(pam_user.user, pam_user.password)
        client.sendmail("alice@example.test", ["bob@example.test"], b"Subject: pam\r\n\r\nhi\r\n")
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=30) as other:
            with pytest.raises(smtplib.SMTPAuthenticationError):
                other.login(pam_user.user, "not the password")
    assert len(Spool(relay.spool).ids()) == 2
    assert "CRAM-MD5" not in smtplib.SMTP("127.0.0.1", relay.port).ehlo()[1].decode()  # PAM: passwords only


def test_auth_is_offered_only_after_starttls_when_loopback_is_not_trusted(relay_process, secrets, certs,  # noqa: F811
                                                                          tmp_path):
    config = tmp_path / "relay.conf"
    config.write_text("[auth]\nloopback_is_secure = false\nserver_auth_config = \"a:plain,login\"\n")
    relay = relay_process("-c", str(config), "--server-auth", str(secrets), "-K",
                          "--server-tls-certificate", str(certs.server()))
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=30) as client:
        client.ehlo("client.test")
        assert not client.has_extn("auth")
        code, _ = client.docmd("AUTH", "PLAIN AGFsaWNlAGNvcnJlY3QgaG9yc2U=")
        assert code == 502  # nothing to offer before TLS
    result = swaks(relay.port, "--tls", "--tls-ca-path", str(certs.ca_file), "--auth", "PLAIN",
                   "--auth-user", "alice", "--auth-password", PASSWORD)
    assert result.returncode == 0, result.stdout + result.stderr


def test_guessing_is_throttled_then_cut_off(relay_process, secrets):
    relay = relay_process("--server-auth", str(secrets))
    codes = []
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=60) as client:
        client.ehlo("client.test")
        for _ in range(12):
            code, _ = client.docmd("AUTH", "PLAIN AGFsaWNlAHdyb25n")  # alice / wrong
            codes.append(code)
            if code == 421:
                break
    assert codes[0] == 535 and codes[-1] == 421
    # The right password does not help the same address for a while.
    result = swaks(relay.port, "--auth", "PLAIN", "--auth-user", "alice", "--auth-password", PASSWORD)
    assert result.returncode != 0 and "421" in result.stdout
