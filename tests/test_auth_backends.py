"""The ``auth`` plugin behind the ``on_auth`` hook: secrets files, password hashes, CRAM-MD5, PAM,
trusted addresses, throttling, and ``relay passwd``.

The hooks are called through the relay's own hook caller (what the SMTP front end does), on a
real ``Relay`` with only the ``auth`` plugin enabled from its entry point. The SMTP exchange itself
(EHLO AUTH, the 334 prompts) belongs to the core's AUTH wiring, whose swaks and smtplib tests come
with it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import ipaddress
import logging
import os
import random
import select
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, AsyncIterator

import argon2
import bcrypt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import require
from mailrelay.cli import load
from mailrelay.config.loader import ConfigError, Sources
from mailrelay.config.settings import build_settings
from mailrelay.plugin_host import PluginHost
from mailrelay.relay import Relay
from mailrelay.types import Action, Session, Verdict
from mailrelay_plugins.auth.settings import MechanismPolicy, parse_server_auth_config
from mailrelay_plugins.auth.throttle import Throttle, ThrottlePolicy, client_key
from mailrelay_plugins.auth.trust import TrustTable, parse_address_range

RELAY = Path(sys.executable).with_name("relay")
CLIENT = "192.0.2.10"

# emailrelay-passwd output printed in E-MailRelay's reference (doc/reference.md: the md5 example
# lines hash the passwords of its plain example lines) and test/emailrelay_chain_test.sh.
EMAILRELAY_PASSWD = {
    "password123": "9N2IRYVXqu7SkOW1Xat+wpR9NbA2R6fb61XlmqW+46E=",
    "e=mc2": "v1HOpuLIbbvgoJjhueeoqwfvtIp2C+gMA285ke+xxow=",
    "my password": "x6UJKQF9f7HfhS1M+PW4s8rXIoT+L+WoqLz+rBwSKbw=",
    "carols_password": "3QiB7qqFvxf/O0TC95BhyFj1uZLjonjXsqFjmBHc860=",
}
CAROL_DOTTED = "4001433821.398427562.3259251711.3361837303.2461660504.3615007459.2556666290.2918439953"
# passlib's documented example: scrypt.using(rounds=8).hash("password").
PASSLIB_SCRYPT = "$scrypt$ln=8,r=8,p=1$WKs1xljLudd6z9kbY0wpJQ$yCR4iDZYDKv+iEJj6yHY0lv/epnfB6f/w1EbXrsJOuQ"

# Account name -> the password a client types.
PASSWORDS = {"alice": "e=mc2", "carol": "my password", "désirée": "pâté 42", "dave": "dave's pw",
             "erin": "erin pw", "frank": "frank pw", "grace": "password"}


def relay_passwd(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    """Run the real ``relay passwd`` executable."""
    return subprocess.run([str(RELAY), "passwd", *args], input=stdin, capture_output=True, text=True,
                          timeout=60)


@pytest.fixture(scope="module")
def dave_md5() -> str:
    result = relay_passwd(stdin=PASSWORDS["dave"] + "\n")
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


@pytest.fixture
def secrets_file(tmp_path: Path, dave_md5: str) -> Path:
    # Hashes made with the libraries themselves (cheap costs), as an operator's other tools would.
    erin = bcrypt.hashpw(PASSWORDS["erin"].encode(), bcrypt.gensalt(4)).decode()
    frank = argon2.PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1).hash(PASSWORDS["frank"])
    path = tmp_path / "server.auth"
    path.write_text(f"""# emailrelay secrets file
client plain bob client+20secret
server plain alice e+3Dmc2
server plain:b Y2Fyb2w= bXkgcGFzc3dvcmQ= # carol
server plain d+C3+A9sir+C3+A9e p+C3+A2t+C3+A9+2042
server md5 dave {dave_md5}
server bcrypt erin {erin}
server argon2 frank {frank}
server scrypt grace {PASSLIB_SCRYPT}

server none 192.168.0.* localipv4
server none fe80::/64 localipv6
server none 10.1.2.3 onehost
server none 10.0.0.0/8 tennet
""")
    return path


class Harness:
    """A relay with the auth plugin started; calls hooks the way the SMTP front end does."""

    def __init__(self, relay: Relay, plugin: Any) -> None:
        self.relay, self.plugin = relay, plugin

    async def auth(self, mechanism: str, username: str, password: str | None = None, *, ip: str = CLIENT,
                   tls: bool = True, challenge: str | None = None, response: str | None = None) -> Verdict:
        return await self.relay.hooks.decide("on_auth", session=Session(ip, 40000, tls=tls), mechanism=mechanism,
                                             username=username, password=password, challenge=challenge,
                                             response=response)

    async def cram(self, username: str, password: str, *, ip: str = CLIENT, whole_line: bool = False) -> Verdict:
        """CRAM-MD5 as a client computes it: HMAC-MD5 of the server's challenge, keyed by the password."""
        challenge = f"<{random.randrange(10**9)}.{int(time.time())}@relay.test>"
        digest = hmac.new(password.encode(), challenge.encode(), "md5").hexdigest()
        return await self.auth("CRAM-MD5", username, ip=ip, challenge=challenge,
                               response=f"{username} {digest}" if whole_line else digest)

    async def timed(self, *args: Any, **kwargs: Any) -> tuple[Verdict, float]:
        started = time.perf_counter()
        verdict = await self.auth(*args, **kwargs)
        return verdict, time.perf_counter() - started


@contextlib.asynccontextmanager
async def auth_relay(tmp_path: Path, hook_timeout: float = 30.0, **auth: Any) -> AsyncIterator[Harness]:
    host = PluginHost()
    host.enable(["auth"])
    schemas: dict[str, type] = {}
    for result in host.pm.hook.relay_config_schema():
        schemas.update(result or {})
    raw = {"spool": {"dir": str(tmp_path / "spool")}, "server": {"domain": "relay.test"},
           "plugins": {"hook_timeout": hook_timeout}, "auth": {"failure_delay": 0, **auth}}
    relay = Relay(build_settings(raw, Sources(), schemas), host)
    await relay.hooks.each("relay_startup", relay=relay)
    try:
        yield Harness(relay, host.pm.get_plugin("auth"))
    finally:
        await relay.hooks.each("relay_shutdown", relay=relay)


def run(coroutine: Any) -> Any:
    return asyncio.run(coroutine)


OK_REPLY = "235 2.7.0 Authentication successful"
FAILED_REPLY = "535 5.7.8 Authentication credentials invalid"


# ---------------------------------------------------------------- relay passwd
@pytest.mark.parametrize("password", ["password123", "e=mc2", "my password"])
def test_relay_passwd_prints_what_emailrelay_passwd_prints(password):
    result = relay_passwd(stdin=password + "\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout == EMAILRELAY_PASSWD[password] + "\n"


def test_relay_passwd_has_emailrelay_passwds_options():
    assert relay_passwd("--dotted", stdin="carols_password\n").stdout == CAROL_DOTTED + "\n"
    # Surrounding blanks are trimmed, as emailrelay-passwd does; --base64 keeps them.
    assert relay_passwd(stdin="  carols_password \t\r\n").stdout.strip() == EMAILRELAY_PASSWD["carols_password"]
    encoded = base64.b64encode(b"my password").decode()
    assert relay_passwd("--base64", stdin=encoded + "\n").stdout.strip() == EMAILRELAY_PASSWD["my password"]
    assert relay_passwd("-H", "NONE", stdin="my pass+word=\n").stdout == "my+20pass+2Bword+3D\n"
    empty = relay_passwd(stdin="\n")
    assert empty.returncode == 1 and "invalid password" in empty.stderr and not empty.stdout
    dotted_bcrypt = relay_passwd("--type", "bcrypt", "--dotted", stdin="x\n")
    assert dotted_bcrypt.returncode == 1 and "--dotted only works for md5" in dotted_bcrypt.stderr


def test_relay_passwd_on_a_terminal_prompts_twice_without_echo():
    terminal, child_side = os.openpty()
    proc = subprocess.Popen([str(RELAY), "passwd"], stdin=child_side, stdout=subprocess.PIPE, stderr=child_side,
                            start_new_session=True)
    os.close(child_side)
    shown = b""

    def wait_for(text: bytes) -> None:
        nonlocal shown
        end = time.monotonic() + 30
        while text not in shown and time.monotonic() < end:
            if select.select([terminal], [], [], 0.1)[0]:
                shown += os.read(terminal, 1024)
        assert text in shown, shown

    try:
        wait_for(b"Password: ")
        os.write(terminal, b"e=mc2\n")
        wait_for(b"Password (again): ")
        os.write(terminal, b"e=mc2\n")
        out, _ = proc.communicate(timeout=30)
    finally:
        os.close(terminal)
    assert (proc.returncode, out) == (0, (EMAILRELAY_PASSWD["e=mc2"] + "\n").encode())
    assert b"e=mc2" not in shown  # not echoed


@pytest.mark.parametrize("kind", ["bcrypt", "argon2", "scrypt"])
def test_relay_passwd_hashes_log_in_with_plain_and_login(tmp_path, kind):
    result = relay_passwd("--type", kind, stdin="zoe's long passphrase\n")
    assert result.returncode == 0, result.stderr
    hashed = result.stdout.strip()
    assert hashed.startswith({"bcrypt": "$2b$12$", "argon2": "$argon2id$", "scrypt": "$scrypt$ln=16,"}[kind])
    (tmp_path / "auth").write_text(f"server {kind} zoe {hashed}\n")

    async def scenario():
        async with auth_relay(tmp_path, server_auth=str(tmp_path / "auth")) as relay:
            assert (await relay.auth("PLAIN", "zoe", "zoe's long passphrase")).reply() == OK_REPLY
            assert (await relay.auth("LOGIN", "zoe", "zoe's long passphrase")).reply() == OK_REPLY
            assert (await relay.auth("PLAIN", "zoe", "zoe's long passphrasf")).reply() == FAILED_REPLY
            assert relay.plugin.mechanisms(secure=True) == ["PLAIN", "LOGIN"]  # no CRAM-MD5 from a hash
    run(scenario())


# ---------------------------------------------------------------- secrets files
@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_every_secret_type_checks_plain_and_login_passwords(tmp_path, secrets_file, mechanism):
    async def scenario():
        async with auth_relay(tmp_path, server_auth=str(secrets_file)) as relay:
            for user, password in PASSWORDS.items():
                ok = await relay.auth(mechanism, user, password)
                assert (ok.action, ok.reply()) == (Action.OK, OK_REPLY), user
                wrong = await relay.auth(mechanism, user, password + "x", ip=f"198.51.100.{len(user)}")
                assert (wrong.action, wrong.reply()) == (Action.DENY, FAILED_REPLY), user
            # 'client' lines are not server accounts; names are case-sensitive.
            assert (await relay.auth(mechanism, "bob", "client secret")).reply() == FAILED_REPLY
            assert (await relay.auth(mechanism, "Alice", "e=mc2")).reply() == FAILED_REPLY
            assert (await relay.auth(mechanism, "alice", "")).reply() == FAILED_REPLY
    run(scenario())


def test_cram_md5_against_plain_and_md5_secrets(tmp_path, secrets_file):
    async def scenario():
        async with auth_relay(tmp_path, server_auth=str(secrets_file)) as relay:
            for user in ("alice", "carol", "désirée", "dave"):
                assert (await relay.cram(user, PASSWORDS[user])).reply() == OK_REPLY, user
                assert (await relay.cram(user, PASSWORDS[user], whole_line=True)).reply() == OK_REPLY, user
                assert (await relay.cram(user, PASSWORDS[user] + "x")).reply() == FAILED_REPLY, user
            # A digest for another challenge (a replayed answer) fails.
            challenge = "<1.2@relay.test>"
            stale = hmac.new(b"e=mc2", b"<0.1@relay.test>", "md5").hexdigest()
            assert (await relay.auth("CRAM-MD5", "alice", challenge=challenge, response=stale)).reply() == FAILED_REPLY
            # Password hashes cannot answer a challenge; unknown users fail alike.
            assert (await relay.cram("erin", PASSWORDS["erin"])).reply() == FAILED_REPLY
            assert (await relay.cram("nobody", "whatever")).reply() == FAILED_REPLY
    run(scenario())


def test_an_md5_secret_from_emailrelays_docs_answers_cram_md5(tmp_path):
    (tmp_path / "auth").write_text(f"server md5 carol {EMAILRELAY_PASSWD['carols_password']}\n"
                                   f"server md5 alice {CAROL_DOTTED}\n")

    async def scenario():
        async with auth_relay(tmp_path, server_auth=str(tmp_path / "auth")) as relay:
            assert (await relay.cram("carol", "carols_password")).reply() == OK_REPLY
            assert (await relay.cram("alice", "carols_password")).reply() == OK_REPLY  # dotted form
            # md5 secrets answer CRAM-MD5 (and, under TLS, PLAIN too); nothing is offered in clear
            # unless --server-auth-config's m: says so.
            assert relay.plugin.mechanisms(secure=False) == []
            assert relay.plugin.mechanisms(secure=True) == ["CRAM-MD5", "PLAIN", "LOGIN"]
            assert (await relay.auth("PLAIN", "carol", "carols_password", tls=False)).reply().startswith("504 5.5.4")
            assert (await relay.auth("PLAIN", "carol", "carols_password", tls=True)).reply() == OK_REPLY
            assert (await relay.auth("PLAIN", "carol", "carols_password", ip="::1", tls=False)).reply() == OK_REPLY
        async with auth_relay(tmp_path, server_auth=str(tmp_path / "auth"), loopback_is_secure=False) as relay:
            assert (await relay.auth("PLAIN", "carol", "carols_password", ip="::1", tls=False)).reply().startswith("504")
    run(scenario())


def test_unknown_user_and_wrong_password_look_identical(tmp_path):
    # Only bcrypt accounts: an unknown user must cost a bcrypt check too (the decoy).
    hashed = bcrypt.hashpw(b"right", bcrypt.gensalt(10)).decode()
    (tmp_path / "auth").write_text(f"server bcrypt alice {hashed}\nserver bcrypt bob {hashed}\n")

    async def scenario():
        async with auth_relay(tmp_path, server_auth=str(tmp_path / "auth")) as relay:
            await relay.auth("PLAIN", "alice", "right")  # warm up
            wrong = [await relay.timed("PLAIN", "alice", "wrong", ip=f"198.51.100.{i}") for i in range(3)]
            unknown = [await relay.timed("PLAIN", "mallory", "wrong", ip=f"203.0.113.{i}") for i in range(3)]
            assert {v.reply() for v, _ in wrong} == {v.reply() for v, _ in unknown} == {FAILED_REPLY}
            median_wrong = sorted(t for _, t in wrong)[1]
            median_unknown = sorted(t for _, t in unknown)[1]
            assert median_unknown > 0.5 * median_wrong, (median_wrong, median_unknown)
        # With failure_delay, every failure takes at least that long, whatever failed.
        async with auth_relay(tmp_path, server_auth=str(tmp_path / "auth"), failure_delay=0.3) as relay:
            for verdict, seconds in [await relay.timed("PLAIN", "alice", "wrong"),
                                     await relay.timed("PLAIN", "nobody", "wrong", ip="203.0.113.9"),
                                     await relay.timed("PLAIN", "bad\x01name", "wrong", ip="203.0.113.8")]:
                assert verdict.reply() == FAILED_REPLY and 0.3 <= seconds < 1.0
    run(scenario())


@pytest.mark.parametrize("line, problem", [
    ("server none 192.168.0.1/24 lan", "has host bits set (did you mean 192.168.0.0/24?)"),
    ("server none 192.*.0.* lan", "only trailing parts"),
    ("server none example.com lan", "is not an address"),
    ("server bcrypt erin not-a-hash", "bad bcrypt secret"),
    ("server argon2 erin $argon2id$broken", "bad argon2 secret"),
    ("server scrypt erin $scrypt$ln=28,r=8,p=1$c2FsdA$aGFzaGhhc2hoYXNoaGFzaA", "MiB per check"),
    ("server md5 erin c2hvcnQ=", "bad md5 secret"),
    ("server plain alice again", "duplicate server secret (plain) for 'alice'"),
    ("server none 192.168.0.0/24 twice", "duplicate trusted address"),
    ("server sha1 erin abc", "unknown secret type"),
])
def test_bad_secrets_files_are_refused_with_file_and_line(tmp_path, line, problem):
    path = tmp_path / "auth"
    path.write_text(f"server plain alice pw\nserver none 192.168.0.* lan\n{line}\n")

    async def scenario():
        async with auth_relay(tmp_path, server_auth=str(path)):
            pass
    with pytest.raises(Exception) as caught:
        run(scenario())
    assert f"{path}:3" in str(caught.value) and problem in str(caught.value)


def test_the_secrets_file_is_read_again_when_it_changes(tmp_path, caplog):
    path = tmp_path / "auth"
    path.write_text("server plain alice one\n")

    async def scenario():
        async with auth_relay(tmp_path, server_auth=str(path)) as relay:
            relay.plugin.recheck = 0  # look at the file on every attempt
            assert (await relay.auth("PLAIN", "bob", "two")).reply() == FAILED_REPLY
            path.write_text("server plain alice one\nserver plain bob two\n")
            assert (await relay.auth("PLAIN", "bob", "two")).reply() == OK_REPLY
            path.write_text("server plain alice one\nserver bogus line here\n")  # an editor mid-save
            assert (await relay.auth("PLAIN", "bob", "two")).reply() == OK_REPLY  # previous accounts kept
    with caplog.at_level(logging.INFO, logger="mailrelay.auth"):
        run(scenario())
    assert "secrets file not reloaded" in caplog.text and f"{path}:2" in caplog.text


# ---------------------------------------------------------------- trusted addresses and MAIL
def test_trusted_addresses_need_no_auth(tmp_path, secrets_file):
    async def scenario():
        async with auth_relay(tmp_path, server_auth=str(secrets_file)) as relay:
            expected = {"192.168.0.77": "localipv4", "::ffff:192.168.0.5": "localipv4", "fe80::1": "localipv6",
                        "fe80::1%eth0": "localipv6", "10.1.2.3": "onehost", "10.9.9.9": "tennet",
                        "203.0.113.5": None, "fe80:0:0:1::1": None, "": None}
            for ip, keyword in expected.items():
                session = Session(ip, 40000)
                assert (await relay.relay.hooks.decide("on_connect", session=session)).action is Action.CONT
                assert session.notes.get("trusted") == keyword, ip
                mail = await relay.relay.hooks.decide("on_mail_from", session=session, transaction=None,
                                                      address="a@example.test")
                if keyword:
                    assert mail.action is Action.CONT
                else:
                    assert mail.reply() == "530 5.7.0 Authentication required", ip
            authenticated = Session(CLIENT, 40000, auth_user="alice")
            assert (await relay.relay.hooks.decide("on_mail_from", session=authenticated, transaction=None,
                                                   address="a@example.test")).action is Action.CONT
        async with auth_relay(tmp_path, server_auth=str(secrets_file), require=False) as relay:
            assert (await relay.relay.hooks.decide("on_mail_from", session=Session(CLIENT, 1), transaction=None,
                                                   address="")).action is Action.CONT
    run(scenario())


@settings(max_examples=200, deadline=None)
@given(networks=st.lists(st.tuples(st.ip_addresses(v=4), st.integers(0, 32)), max_size=6),
       client=st.ip_addresses(v=4))
def test_the_most_specific_trusted_network_gives_the_keyword(networks, client):
    table = TrustTable.build([(ipaddress.ip_network(f"{a}/{n}", strict=False), f"k{i}")
                              for i, (a, n) in enumerate(networks)])
    containing = [(network.prefixlen, keyword) for network, keyword in table.entries if client in network]
    longest = max((length for length, _ in containing), default=None)
    best = {keyword for length, keyword in containing if length == longest}  # equal networks may tie
    found = table.keyword_for(str(client))
    assert found in best if containing else found is None


@given(address=st.ip_addresses(v=4), stars=st.integers(1, 4))
def test_ipv4_wildcards_are_the_matching_networks(address, stars):
    parts = str(address).split(".")
    wildcard = ".".join(parts[:4 - stars] + ["*"] * stars)
    assert parse_address_range(wildcard) == ipaddress.ip_network(f"{address}/{32 - 8 * stars}", strict=False)


# ---------------------------------------------------------------- throttling
THROTTLE = {"throttle_delay_after": 2, "throttle_delay": 0.1, "throttle_max_delay": 0.4,
            "throttle_disconnect_after": 5, "throttle_window": 60}


def test_failures_from_one_address_are_delayed_more_and_more_then_disconnected(tmp_path, secrets_file):
    async def scenario():
        async with auth_relay(tmp_path, server_auth=str(secrets_file), **THROTTLE) as relay:
            times = []
            for i in range(5):  # a different user each time: the client address is what counts
                verdict, seconds = await relay.timed("PLAIN", f"guess{i}", "pw")
                assert verdict.reply() == FAILED_REPLY
                times.append(seconds)
            assert times[0] < 0.1 and times[1] < 0.1  # below the first delay
            assert 0.1 <= times[2] < 0.25 and 0.2 <= times[3] < 0.35 and 0.4 <= times[4] < 0.55
            locked, seconds = await relay.timed("PLAIN", "alice", "e=mc2")  # even the right password
            assert locked.action is Action.DISCONNECT and seconds < 0.1
            assert locked.reply() == "421 4.7.0 Too many failed authentication attempts, try again later"
            # Other clients and users are not affected; IPv6 clients count per /64.
            assert (await relay.auth("PLAIN", "alice", "e=mc2", ip="192.0.2.11")).reply() == OK_REPLY
            for i in range(5):
                await relay.auth("PLAIN", f"v6guess{i}", "pw", ip=f"2001:db8:1:2::{i + 1}")
            assert (await relay.auth("PLAIN", "alice", "e=mc2", ip="2001:db8:1:2::99")).action is Action.DISCONNECT
            assert (await relay.auth("PLAIN", "alice", "e=mc2", ip="2001:db8:1:3::1")).reply() == OK_REPLY
    run(scenario())


def test_failures_for_one_user_are_throttled_across_addresses(tmp_path, secrets_file):
    async def scenario():
        async with auth_relay(tmp_path, server_auth=str(secrets_file), **THROTTLE) as relay:
            for i in range(5):
                assert (await relay.auth("LOGIN", "alice", f"guess{i}", ip=f"198.51.100.{i}")).reply() == FAILED_REPLY
            assert (await relay.auth("LOGIN", "alice", "e=mc2", ip="198.51.100.99")).action is Action.DISCONNECT
            assert (await relay.cram("alice", "e=mc2", ip="198.51.100.99")).action is Action.DISCONNECT
            assert (await relay.auth("LOGIN", "carol", "my password", ip="198.51.100.99")).reply() == OK_REPLY
    run(scenario())


def test_a_success_resets_the_count(tmp_path, secrets_file):
    async def scenario():
        async with auth_relay(tmp_path, server_auth=str(secrets_file), **THROTTLE) as relay:
            for _ in range(2):
                await relay.auth("PLAIN", "alice", "typo")
            assert relay.plugin.throttle.failures(CLIENT, "alice") == 2
            assert (await relay.auth("PLAIN", "alice", "e=mc2")).reply() == OK_REPLY
            assert relay.plugin.throttle.failures(CLIENT, "alice") == 0
            _, seconds = await relay.timed("PLAIN", "alice", "typo")
            assert seconds < 0.1  # no delay: the earlier failures are forgotten
    run(scenario())


def test_parallel_guesses_are_counted_as_they_start(tmp_path, secrets_file):
    async def scenario():
        async with auth_relay(tmp_path, server_auth=str(secrets_file), **THROTTLE) as relay:
            verdicts = await asyncio.gather(*[relay.auth("PLAIN", "alice", f"guess{i}") for i in range(12)])
            actions = [v.action for v in verdicts]
            assert actions.count(Action.DENY) == 5 and actions.count(Action.DISCONNECT) == 7
    run(scenario())


def test_failures_are_logged_with_address_and_user_but_never_the_password(tmp_path, secrets_file, caplog):
    async def scenario():
        async with auth_relay(tmp_path, server_auth=str(secrets_file), **THROTTLE) as relay:
            await relay.auth("PLAIN", "alice", "Hunter2-secret")
            await relay.auth("PLAIN", "mallory", "Hunter2-secret", ip="203.0.113.7")
            await relay.auth("PLAIN", "alice", "e=mc2", ip="203.0.113.8")
    with caplog.at_level(logging.INFO, logger="mailrelay.auth"):
        run(scenario())
    failures = [r.getMessage() for r in caplog.records if "auth failed" in r.getMessage()]
    assert len(failures) == 2
    assert f"client={CLIENT}" in failures[0] and 'user="alice"' in failures[0] and "wrong password" in failures[0]
    assert "client=203.0.113.7" in failures[1] and 'user="mallory"' in failures[1] and "unknown user" in failures[1]
    assert 'authenticated user="alice"' in caplog.text
    assert "Hunter2" not in caplog.text and "e=mc2" not in caplog.text


def test_throttle_state_expires_and_stays_bounded():
    now = [1000.0]
    throttle = Throttle(ThrottlePolicy(window=60, delay_after=1, delay=1, max_delay=4, disconnect_after=3,
                                       max_tracked=6), clock=lambda: now[0])
    assert [throttle.attempt("192.0.2.1", "u").delay for _ in range(3)] == [0, 1, 2]
    assert throttle.attempt("192.0.2.1", "u").refuse
    now[0] += 61
    assert throttle.attempt("192.0.2.1", "u").delay == 0  # the window has passed
    for i in range(20):
        throttle.attempt(f"198.51.100.{i}", f"user{i}")
    assert len(throttle) <= 6
    assert client_key("2001:db8::1") == client_key("2001:db8::ffff") == "ip:2001:db8::/64"
    assert client_key("::ffff:192.0.2.1") == "ip:192.0.2.1"


# ---------------------------------------------------------------- mechanisms and options
@pytest.mark.parametrize("config, insecure, secure", [
    ("", [], ["CRAM-MD5", "PLAIN", "LOGIN"]),   # nothing in clear unless m: names it
    ("m:plain,cram-md5", ["CRAM-MD5", "PLAIN"], ["CRAM-MD5", "PLAIN"]),
    ("m:;a:plain,login", [], ["PLAIN", "LOGIN"]),
    ("m:cram-md5", ["CRAM-MD5"], ["CRAM-MD5"]),
    ("x:login", [], ["CRAM-MD5", "PLAIN"]),
    ("M:CRAM-MD5;A:PLAIN;D:", ["CRAM-MD5"], ["PLAIN"]),
    ("m:cram-md5,plain;x:plain;d:cram-md5", ["CRAM-MD5"], ["PLAIN", "LOGIN"]),
])
def test_server_auth_config_chooses_mechanisms_without_and_with_tls(tmp_path, secrets_file, config, insecure, secure):
    async def scenario():
        async with auth_relay(tmp_path, server_auth=str(secrets_file), server_auth_config=config) as relay:
            assert relay.plugin.mechanisms(secure=False) == insecure
            assert relay.plugin.mechanisms(secure=True) == secure
            assert relay.plugin.auth_mechanisms(Session(CLIENT, 1, tls=True)) == secure
            assert relay.plugin.auth_mechanisms(Session("127.0.0.1", 1)) == secure  # no password on a wire
            refused = await relay.auth("LOGIN", "alice", "e=mc2", tls=False)
            assert refused.reply() == (OK_REPLY if "LOGIN" in insecure else "504 5.5.4 Unrecognized authentication type")
    run(scenario())


def test_server_auth_config_syntax():
    assert parse_server_auth_config("m:;a:plain") == MechanismPolicy((), (), ("PLAIN",), ())
    assert parse_server_auth_config(" ; ") == MechanismPolicy()
    for bad in ("q:plain", "plain", "m:palin"):
        with pytest.raises(ConfigError, match="--server-auth-config"):
            parse_server_auth_config(bad)


def test_command_line_options_enable_the_plugin(tmp_path, secrets_file):
    settings, host, _ = load(None, {"server_auth": str(secrets_file), "server_auth_config": "m:;a:plain"})
    assert "auth" in host.order
    assert settings.extra["auth"].server_auth == str(secrets_file)
    assert settings.extra["auth"].mechanism_policy == MechanismPolicy((), (), ("PLAIN",), ())


def test_start_up_refuses_a_configuration_that_cannot_work(tmp_path, secrets_file):
    async def start(**auth):
        async with auth_relay(tmp_path, **auth):
            pass
    with pytest.raises(Exception, match="server_auth: give a secrets file or pam:"):
        run(start())
    with pytest.raises(Exception, match="hook_timeout"):
        run(start(server_auth=str(secrets_file), throttle_max_delay=28))
    with pytest.raises(Exception, match="cannot read secrets file|No such file"):
        run(start(server_auth=str(tmp_path / "missing")))


# ---------------------------------------------------------------- PAM with a real local user
@pytest.fixture(scope="module")
def pam_user(tmp_path_factory):
    """A throw-away local user and PAM services using pam_unix (removed afterwards)."""
    require("useradd")
    suffix = random.randrange(10000, 100000)
    user, password, service = f"mrtest{suffix}", "S3cret pw!", f"mrtest-relay-{suffix}"
    sleeper = tmp_path_factory.mktemp("pam") / "sleep.sh"
    sleeper.write_text("#!/bin/sh\nsleep 0.5\n")
    sleeper.chmod(0o755)
    services = {  # nodelay: pam_unix would otherwise sleep ~2 s after each failure
        service: "auth required pam_unix.so nodelay\naccount required pam_unix.so\n",
        f"{service}-slow": f"auth required pam_exec.so quiet {sleeper}\n"
                           "auth required pam_unix.so nodelay\naccount required pam_unix.so\n",
        f"{service}-broken": "auth required pam_no_such_module.so\n",
    }
    subprocess.run(["useradd", "-M", "-s", "/usr/sbin/nologin", user], check=True)
    try:
        subprocess.run(["chpasswd"], input=f"{user}:{password}\n", text=True, check=True)
        for name, text in services.items():
            Path(f"/etc/pam.d/{name}").write_text(text)
        yield type("PamUser", (), {"user": user, "password": password, "service": service})
    finally:
        subprocess.run(["userdel", user], check=False)
        for name in services:
            with contextlib.suppress(FileNotFoundError):
                os.remove(f"/etc/pam.d/{name}")


def test_pam_checks_a_real_local_user(tmp_path, pam_user):
    async def scenario():
        async with auth_relay(tmp_path, server_auth="pam:", pam_service=pam_user.service) as relay:
            assert relay.plugin.mechanisms(secure=True) == ["PLAIN", "LOGIN"]
            assert relay.plugin.mechanisms(secure=False) == []
            assert (await relay.auth("PLAIN", pam_user.user, pam_user.password)).reply() == OK_REPLY
            assert (await relay.auth("LOGIN", pam_user.user, pam_user.password)).reply() == OK_REPLY
            wrong = await relay.auth("PLAIN", pam_user.user, "wrong", ip="198.51.100.1")
            unknown = await relay.auth("PLAIN", "nosuchuser42", "wrong", ip="198.51.100.2")
            assert wrong.reply() == unknown.reply() == FAILED_REPLY
            cram = await relay.auth("CRAM-MD5", pam_user.user, challenge="<1.2@x>", response="00" * 16)
            assert cram.reply() == "504 5.5.4 Unrecognized authentication type"  # PAM needs the password
        async with auth_relay(tmp_path, server_auth=f"pam:{pam_user.service}-broken") as relay:
            # A broken PAM stack says nothing about the password: a temporary failure.
            assert (await relay.auth("PLAIN", pam_user.user, pam_user.password)).reply() == \
                "454 4.7.0 Temporary authentication failure"
    run(scenario())


def test_pam_runs_off_the_event_loop(tmp_path, pam_user):
    async def scenario():
        async with auth_relay(tmp_path, server_auth=f"pam:{pam_user.service}-slow") as relay:
            ticks = 0

            async def ticker():
                nonlocal ticks
                while True:
                    await asyncio.sleep(0.02)
                    ticks += 1
            task = asyncio.ensure_future(ticker())
            verdict, seconds = await relay.timed("PLAIN", pam_user.user, pam_user.password)
            task.cancel()
            assert verdict.reply() == OK_REPLY and seconds >= 0.5
            assert ticks >= 15  # the loop kept running while PAM slept for 0.5 s
    run(scenario())


def test_pam_refuses_an_expired_account(tmp_path, pam_user):
    subprocess.run(["chage", "-E", "0", pam_user.user], check=True)
    try:
        async def scenario():
            async with auth_relay(tmp_path, server_auth="pam:" + pam_user.service) as relay:
                assert (await relay.auth("PLAIN", pam_user.user, pam_user.password)).reply() == FAILED_REPLY
        run(scenario())
    finally:
        subprocess.run(["chage", "-E", "-1", pam_user.user], check=True)
