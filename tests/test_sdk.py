"""The plugin SDK: the public surface, hook spec versions, `relay new-plugin`, and the pytest plugin
as a plugin author's test suite uses it."""

from __future__ import annotations

import subprocess
import sys
import tomllib

import pytest

import mailrelay_sdk
from mailrelay.plugin_host import PluginError, PluginHost
from mailrelay_sdk import HOOKSPEC_VERSION, Verdict, hookimpl

from conftest import ROOT


def test_the_public_surface_is_importable_from_one_place():
    for name in ("hookimpl", "Verdict", "Message", "Envelope", "Session", "Route", "DeliveryResult",
                 "FilterResult", "Recipient", "Transaction", "Event", "inject", "InjectionRefused", "events"):
        assert name in mailrelay_sdk.__all__ and getattr(mailrelay_sdk, name) is not None
    assert mailrelay_sdk.events.MESSAGE_BOUNCED == "message.bounced"
    assert {"received", "rejected", "message.delivered", "pickup.refused"} <= mailrelay_sdk.events.ALL
    assert (ROOT / "sdk" / "py.typed").is_file()


# ---------------------------------------------------------------- hook spec versions
class Counted:
    """A plugin class that counts instantiations (a refused plugin must never be created)."""

    made = 0

    def __init__(self):
        type(self).made += 1

    @hookimpl
    def on_mail_from(self, address):
        return Verdict.deny("no") if address.startswith("x") else None


@pytest.mark.parametrize("attributes, message", [
    ({"requires_core": ">=99"}, "plugin 'future' needs mailrelay >=99; this is mailrelay 0.1.0"),
    ({"requires_core": "<0.1"}, "plugin 'future' needs mailrelay <0.1; this is mailrelay 0.1.0"),
    ({"hookspec_version": HOOKSPEC_VERSION + 1},
     f"plugin 'future' was written for hook spec version {HOOKSPEC_VERSION + 1}; mailrelay 0.1.0 implements "
     f"hook spec version {HOOKSPEC_VERSION}"),
    ({"requires_core": "about 0.1"}, "plugin 'future' declares requires_core = 'about 0.1', which is not"),
])
def test_an_incompatible_plugin_is_refused_whole(attributes, message):
    plugin = type("Future", (Counted,), {**attributes, "made": 0})
    host = PluginHost()
    with pytest.raises(PluginError) as refused:
        host.register(plugin, "future")
    assert message in str(refused.value)
    assert plugin.made == 0                                  # never instantiated
    assert host.pm.get_plugin("future") is None and host.order == []
    assert host.pm.hook.on_mail_from.get_hookimpls() == []   # no hook half-registered


def test_a_compatible_declaration_is_accepted():
    plugin = type("Current", (Counted,), {"requires_core": ">=0.1,<1", "hookspec_version": HOOKSPEC_VERSION,
                                          "made": 0})
    host = PluginHost()
    host.register(plugin, "current")
    assert host.order == ["current"] and plugin.made == 1


def test_a_hook_this_core_lacks_is_reported(caplog):
    class FromTheFuture:
        @hookimpl
        def on_quantum_entanglement(self, session):
            return None

    PluginHost().register(FromTheFuture(), "future")
    assert "plugin 'future' implements hooks this mailrelay 0.1.0 does not have: on_quantum_entanglement" \
        in caplog.text


# ---------------------------------------------------------------- relay new-plugin
def test_new_plugin_writes_a_complete_package(tmp_path):
    result = subprocess.run([sys.executable, "-m", "mailrelay", "new-plugin", "spam-trap", "-d", str(tmp_path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    package = tmp_path / "mailrelay-spam-trap"
    assert f"created {package}" in result.stdout
    project = tomllib.loads((package / "pyproject.toml").read_text())
    assert project["project"]["name"] == "mailrelay-spam-trap"
    assert project["project"]["entry-points"]["mailrelay"] == {"spam-trap": "mailrelay_spam_trap:Plugin"}
    assert project["project"]["dependencies"] == ["mailrelay>=0.1"]
    source = (package / "src" / "mailrelay_spam_trap" / "__init__.py").read_text()
    compile(source, "__init__.py", "exec")
    assert 'requires_core = ">=0.1"' in source and f"hookspec_version = {HOOKSPEC_VERSION}" in source
    assert '"spam_trap"' in source and "__plugin" not in source
    assert "relay_plugins" in (package / "tests" / "test_plugin.py").read_text()
    assert "pypa/gh-action-pypi-publish" in (package / ".github" / "workflows" / "ci.yml").read_text()
    assert "relay --plugins spam-trap" in (package / "README.md").read_text()
    # Never over an existing directory, never with a name that is not one.
    again = subprocess.run([sys.executable, "-m", "mailrelay", "new-plugin", "spam-trap", "-d", str(tmp_path)],
                           capture_output=True, text=True, timeout=60)
    assert again.returncode == 1 and "already exists" in again.stderr
    bad = subprocess.run([sys.executable, "-m", "mailrelay", "new-plugin", "../evil", "-d", str(tmp_path)],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "is not a plugin name" in bad.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mailrelay-spam-trap"]


# ---------------------------------------------------------------- the pytest plugin
PLUGIN_AUTHORS_TESTS = '''
import pytest
from mailrelay_sdk import Verdict, hookimpl
from mailrelay_sdk.testing import (RunningRelay, Sink, assert_accepted, assert_bounced, assert_delivered,
                                   assert_rejected)


class NoInterns:
    @hookimpl
    async def on_rcpt_to(self, recipient):
        if recipient.address.startswith("intern@"):
            return Verdict.deny("Interns get no mail", code=550, enhanced="5.7.1")
        return None


@pytest.fixture
def relay_plugins():
    return {"no-interns": NoInterns()}


def test_relay_is_in_process_on_a_free_port_with_only_the_plugins_under_test(relay, tmp_path):
    assert isinstance(relay, RunningRelay) and relay.port > 1024
    assert relay.host.order == ["no-interns"]
    assert str(relay.spool.directory).startswith(str(tmp_path))


def test_rejected_with_code(relay):
    result = relay.send(recipients=["intern@example.test"])
    assert_rejected(result, 550, enhanced="5.7.1", text="Interns get no mail", stage="rcpt")
    with pytest.raises(AssertionError, match="the code is 550, not 451"):
        assert_rejected(result, 451)


def test_accepted_and_spooled(relay):
    spool_id = assert_accepted(relay.send(subject="Quarterly report"))
    assert relay.spool.ids() == [spool_id]
    assert b"Subject: Quarterly report" in relay.spool.read_content(spool_id)


def test_delivered_and_bounced_through_the_sink(relay, sink):
    assert isinstance(sink, Sink)
    sink.refuse("gone@", "550 5.1.1 No such user")
    assert_accepted(relay.send(sender="boss@example.test", recipients=["staff@example.test"]))
    delivered = assert_delivered(sink, to="staff@example.test", sender="boss@example.test")
    assert delivered.message["Subject"] == "Test message"
    assert_accepted(relay.send(sender="boss@example.test", recipients=["gone@example.test"]))
    bounce = assert_bounced(sink, to="boss@example.test", recipient="gone@example.test")
    assert bounce.sender == "" and b"550 5.1.1 No such user" in bounce.content


def test_relay_factory_takes_config(relay_factory):
    small = relay_factory(config={"smtp": {"size": 2000}})
    assert_rejected(small.send(body="x" * 5000), 552)


def test_a_failing_expectation_says_what_happened(relay, sink):
    with pytest.raises(AssertionError, match="the sink got no a message to nobody@example.test"):
        assert_delivered(sink, to="nobody@example.test", timeout=0.5)
'''


def test_the_pytest_plugin_serves_a_plugin_authors_tests(tmp_path):
    """Run a plugin author's test file with pytest, in its own directory: the fixtures come from the
    `pytest11` entry point, not from this suite's conftest."""
    (tmp_path / "test_no_interns.py").write_text(PLUGIN_AUTHORS_TESTS)
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_no_interns.py"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "6 passed" in result.stdout
    fixtures = subprocess.run([sys.executable, "-m", "pytest", "--fixtures", "-p", "no:cacheprovider"],
                              cwd=tmp_path, capture_output=True, text=True, timeout=120).stdout
    assert "from mailrelay_sdk.testing" in fixtures or "mailrelay_sdk/testing.py" in fixtures
    for name in ("relay ", "sink ", "relay_plugins ", "relay_config ", "relay_factory "):
        assert name in fixtures.replace("\n", " ")
