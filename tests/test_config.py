"""relay.conf as an operator writes it: includes, interpolation, validation messages, [dns],
and E-MailRelay's one-option-per-line files."""

from __future__ import annotations

import os
import tempfile
import textwrap
from pathlib import Path
from typing import Any
from unittest import mock

import dns.nameserver
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailrelay.cli.options import OPTIONS
from mailrelay.config import ConfigError, Settings, load_settings
from mailrelay.config.emailrelay_file import read_options_file
from mailrelay.config.loader import interpolate, load_file
from mailrelay.config.settings import DnsSettings
from mailrelay.dns import make_resolver, parse_nameserver

DATA = Path(__file__).parent / "data" / "config"


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return path


def settings_from(path: Path | None, overrides: dict[str, Any] | None = None) -> tuple[Settings, list[str]]:
    """Load like `relay -c PATH` does, with no plugins installed."""
    return load_settings(str(path) if path else None, overrides or {}, lambda names: {})


def config_error(path: Path, overrides: dict[str, Any] | None = None) -> str:
    with pytest.raises(ConfigError) as excinfo:
        settings_from(path, overrides)
    return str(excinfo.value)


# ---------------------------------------------------------------- sections and includes
def test_a_full_file_becomes_typed_settings():
    settings, warnings = settings_from(DATA / "relay.conf")
    assert settings.smtp.port == 2626
    assert settings.smtp.interface == ["127.0.0.1", "::1"]
    assert settings.smtp.remote_clients is True  # "yes" is accepted for a boolean
    assert settings.smtp.idle_timeout == 60.0
    assert settings.server.domain == "relay.example"
    assert settings.spool.dir == "/var/spool/mailrelay"
    assert settings.plugins.hook_timeout == 5.0
    assert settings.config_file == str(DATA / "relay.conf")
    assert warnings == []


def test_nested_sections_are_nested_tables_and_can_be_referenced(tmp_path):
    conf = write(tmp_path / "relay.conf", """
        [routes.example]
        host = "mx.example.net"
        port = 2525

        [routes."other.example"]
        host = "${routes.example.host}:${routes.example.port}"
        """)
    data, _ = load_file(conf)
    assert data["routes"]["example"] == {"host": "mx.example.net", "port": 2525}
    assert data["routes"]["other.example"]["host"] == "mx.example.net:2525"


def test_an_unclaimed_section_is_a_warning_naming_file_and_line(tmp_path):
    conf = write(tmp_path / "relay.conf", """
        [smtp]
        port = 2600

        [spamfilter]
        threshold = 5
        """)
    settings, warnings = settings_from(conf)
    assert settings.smtp.port == 2600
    assert len(warnings) == 1
    assert f"{conf}:4: [spamfilter]" in warnings[0]
    assert "no enabled plugin" in warnings[0]


def test_includes_are_relative_to_the_including_file_and_merged_after_it_in_sorted_order(
        tmp_path, monkeypatch):
    etc = tmp_path / "etc" / "mailrelay"
    conf = write(etc / "relay.conf", """
        include = ["conf.d/*.toml"]

        [smtp]
        port = 2500
        size = 4096

        [server]
        domain = "main.example"
        """)
    # Written out of order on purpose: sorted by name, 20- is merged last and wins.
    write(etc / "conf.d" / "20-late.toml", """
        [smtp]
        port = 2700
        """)
    write(etc / "conf.d" / "10-early.toml", """
        [smtp]
        port = 2600
        idle_timeout = 42

        [server]
        domain = "early.example"
        """)
    write(etc / "conf.d" / "README", "not toml, not matched by the glob\n")
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)

    settings, _ = settings_from(conf)

    assert settings.smtp.port == 2700           # the last include wins
    assert settings.smtp.idle_timeout == 42.0   # an earlier include's key survives
    assert settings.smtp.size == 4096           # tables merge: the main file's key survives
    assert settings.server.domain == "early.example"  # includes override the including file


def test_an_include_can_include_relative_to_itself(tmp_path):
    conf = write(tmp_path / "relay.conf", 'include = ["conf.d/site.toml"]\n')
    write(tmp_path / "conf.d" / "site.toml", 'include = ["more/*.toml"]\n[smtp]\nport = 2601\n')
    write(tmp_path / "conf.d" / "more" / "x.toml", "[server]\ndomain = \"deep.example\"\n")
    settings, _ = settings_from(conf)
    assert settings.smtp.port == 2601
    assert settings.server.domain == "deep.example"


def test_a_glob_that_matches_nothing_is_fine_but_a_missing_file_is_an_error(tmp_path):
    fine = write(tmp_path / "fine.conf", 'include = ["conf.d/*.toml"]\n[smtp]\nport = 2602\n')
    assert settings_from(fine)[0].smtp.port == 2602

    broken = write(tmp_path / "broken.conf", 'include = ["site.toml"]\n')
    message = config_error(broken)
    assert str(broken) in message
    assert "'site.toml'" in message
    assert "no such file" in message


@pytest.mark.parametrize("includes", [
    {"relay.conf": 'include = ["relay.conf"]\n'},
    {"relay.conf": 'include = ["a.toml"]\n', "a.toml": 'include = ["b.toml"]\n',
     "b.toml": 'include = ["a.toml"]\n'},
], ids=["self", "a-b-a"])
def test_include_loops_are_reported(tmp_path, includes):
    for name, text in includes.items():
        write(tmp_path / name, text)
    message = config_error(tmp_path / "relay.conf")
    assert "include loop" in message
    for name in includes:
        assert name in message


def test_include_must_be_a_list_of_patterns(tmp_path):
    conf = write(tmp_path / "relay.conf", "include = 5\n")
    message = config_error(conf)
    assert f"{conf}:1: include" in message
    assert "list of file patterns" in message


def test_a_problem_in_an_included_file_names_that_file_and_line(tmp_path):
    conf = write(tmp_path / "relay.conf", 'include = ["conf.d/*.toml"]\n[smtp]\nport = 2500\n')
    part = write(tmp_path / "conf.d" / "50-site.toml", "# site overrides\n\n[smtp]\nport = 99999\n")
    message = config_error(conf)
    assert f"{part}:4: [smtp] port" in message
    assert "99999 is out of range 0..65535" in message


# ---------------------------------------------------------------- interpolation
def test_environment_variables_defaults_and_literal_dollars(tmp_path, monkeypatch):
    monkeypatch.setenv("RELAY_DOMAIN", "env.example")
    monkeypatch.setenv("RELAY_EMPTY", "")
    monkeypatch.delenv("RELAY_UNSET", raising=False)
    conf = write(tmp_path / "relay.conf", """
        [server]
        domain = "${RELAY_DOMAIN}"

        [spool]
        dir = "${RELAY_UNSET:-/srv/spool}/$${NOT_A_VARIABLE}/$$HOME"

        [log]
        file = "${RELAY_EMPTY:-/var/log/relay-%d.log}"

        [smtp]
        port = "${RELAY_UNSET:-2603}"
        """)
    settings, _ = settings_from(conf)
    assert settings.server.domain == "env.example"
    assert settings.spool.dir == "/srv/spool/${NOT_A_VARIABLE}/$HOME"
    assert settings.log.file == "/var/log/relay-%d.log"  # as in the shell: empty takes the default
    assert settings.smtp.port == 2603


def test_a_set_variable_wins_over_its_default(tmp_path, monkeypatch):
    monkeypatch.setenv("RELAY_PORT", "2604")
    conf = write(tmp_path / "relay.conf", '[smtp]\nport = "${RELAY_PORT:-25}"\n')
    assert settings_from(conf)[0].smtp.port == 2604


def test_an_unset_variable_is_an_error_naming_file_line_and_key(tmp_path, monkeypatch):
    monkeypatch.delenv("RELAY_NO_SUCH_VAR", raising=False)
    conf = write(tmp_path / "relay.conf", """
        [smtp]
        port = 2525

        [server]
        domain = "mx.${RELAY_NO_SUCH_VAR}"
        """)
    message = config_error(conf)
    assert f"{conf}:5: [server] domain" in message
    assert "environment variable RELAY_NO_SUCH_VAR is not set" in message


def test_references_to_other_keys_follow_chains(tmp_path):
    conf = write(tmp_path / "relay.conf", """
        [paths]
        root = "/srv/relay"
        data = "${paths.root}/data"

        [spool]
        dir = "${paths.data}/spool"

        [server]
        domain = "port-${smtp.port}-remote-${smtp.remote_clients}"

        [smtp]
        port = 2605
        remote_clients = true
        """)
    settings, warnings = settings_from(conf)
    assert settings.spool.dir == "/srv/relay/data/spool"
    assert settings.server.domain == "port-2605-remote-true"
    assert any("[paths]" in w for w in warnings)


@pytest.mark.parametrize("text", [
    '[server]\ndomain = "${server.domain}"\n',
    '[server]\ndomain = "${spool.dir}"\n[spool]\ndir = "${log.file}"\n[log]\nfile = "${server.domain}"\n',
], ids=["self", "three-way"])
def test_reference_loops_are_reported(tmp_path, text):
    conf = write(tmp_path / "relay.conf", text)
    message = config_error(conf)
    assert "interpolation loop" in message
    assert str(conf) in message
    assert "server.domain" in message


@pytest.mark.parametrize("reference, problem", [
    ("${smtp.nothing}", "refers to a key that is not set"),
    ("${smtp}", "environment variable smtp is not set"),  # no dot: the environment
    ("${smtp.interface}", "not a single value"),
    ("${}", "bad reference"),
    ("${1ST}", "bad reference"),
])
def test_bad_references_name_the_key_holding_them(tmp_path, reference, problem):
    conf = write(tmp_path / "relay.conf", f'[smtp]\ninterface = ["127.0.0.1"]\n\n[server]\n'
                                          f'domain = "{reference}"\n')
    message = config_error(conf)
    assert f"{conf}:5: [server] domain" in message
    assert problem in message


_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)
_env_text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"), max_size=40)


@given(_text)
def test_doubling_every_dollar_gives_the_text_back(text):
    data = interpolate({"server": {"domain": text.replace("$", "$$")}})
    assert data["server"]["domain"] == text


@given(st.lists(st.one_of(st.tuples(st.just("text"), _text), st.tuples(st.just("env"), _env_text)),
                max_size=6))
def test_environment_values_are_inserted_verbatim_never_expanded_again(parts):
    environ: dict[str, str] = {}
    source, expected = "", ""
    for i, (kind, value) in enumerate(parts):
        if kind == "text":
            source += value.replace("$", "$$")
        else:
            environ[f"RELAY_TEST_{i}"] = value
            source += f"${{RELAY_TEST_{i}}}"
        expected += value
    with mock.patch.dict(os.environ, environ):
        assert interpolate({"a": {"b": source}})["a"]["b"] == expected


# ---------------------------------------------------------------- validation messages
def test_a_bad_value_names_file_line_and_key(tmp_path):
    conf = write(tmp_path / "relay.conf", '# relay\n[smtp]\nport = "abc"\n')
    message = config_error(conf)
    assert message.startswith(f"{conf}:3: [smtp] port: ")
    assert "expected an integer, got 'abc'" in message


@pytest.mark.parametrize("section, line, problem", [
    ("[smtp]\nport = 65536", "[smtp] port", "out of range 0..65535"),
    ("[smtp]\nport = -1", "[smtp] port", "out of range"),
    ("[smtp]\nport = true", "[smtp] port", "expected an integer"),
    ("[smtp]\nport = 25.5", "[smtp] port", "expected an integer"),
    ("[smtp]\nidle_timeout = 0", "[smtp] idle_timeout", "out of range 1..86400"),
    ("[smtp]\nidle_timeout = nan", "[smtp] idle_timeout", "out of range"),
    ("[smtp]\nmax_recipients = 0", "[smtp] max_recipients", "out of range"),
    ("[smtp]\nsize = 100", "[smtp] size", "too small"),
    ("[smtp]\nremote_clients = \"maybe\"", "[smtp] remote_clients", "expected true or false"),
    ("[smtp]\ninterface = 5", "[smtp] interface", "expected a list"),
    ("[dns]\nattempts = 11", "[dns] attempts", "out of range 1..10"),
    ("[log]\nformat = \"xml\"", "[log] format", "is not one of 'text', 'json'"),
    ("[log]\nverbose = 9", "[log] verbose", "out of range 0..5"),
    ("[spool]\ndurability = \"sometimes\"", "[spool] durability", "is not one of"),
    ("[server]\ndomain = [\"a\"]", "[server] domain", "expected text"),
])
def test_out_of_range_and_mistyped_values_are_refused(tmp_path, section, line, problem):
    conf = write(tmp_path / "relay.conf", f"# comment\n\n{section}\n")
    message = config_error(conf)
    assert f"{conf}:4: {line}: " in message
    assert problem in message


def test_an_unknown_key_in_a_core_section_lists_the_known_keys(tmp_path):
    conf = write(tmp_path / "relay.conf", "[smtp]\nprot = 25\n")
    message = config_error(conf)
    assert f"{conf}:2: [smtp] prot: unknown key" in message
    for known in ("port", "interface", "remote_clients", "size", "idle_timeout"):
        assert known in message


def test_a_setting_outside_any_section_lists_the_sections(tmp_path):
    conf = write(tmp_path / "relay.conf", "port = 25\n")
    message = config_error(conf)
    assert f"{conf}:1: port: unknown top-level key" in message
    assert "smtp" in message and "spool" in message


def test_a_toml_syntax_error_names_the_file_and_line(tmp_path):
    conf = write(tmp_path / "relay.conf", "[smtp]\nport = 25\ndomain = relay.example\n")
    message = config_error(conf)
    assert message.startswith(f"{conf}: TOML syntax error")
    assert "line 3" in message


def test_a_missing_file_is_an_error_naming_it(tmp_path):
    message = config_error(tmp_path / "nope.conf")
    assert str(tmp_path / "nope.conf") in message
    assert "no such configuration file" in message


def test_the_command_line_overrides_the_file_and_is_blamed_for_its_own_mistakes(tmp_path):
    conf = write(tmp_path / "relay.conf", "[smtp]\nport = 2500\nsize = 4096\n")
    settings, _ = settings_from(conf, {"smtp": {"port": "2606"}})
    assert settings.smtp.port == 2606
    assert settings.smtp.size == 4096

    message = config_error(conf, {"smtp": {"port": "70000"}})
    assert message.startswith("command line: [smtp] port: ")
    assert str(conf) not in message


# ---------------------------------------------------------------- [dns]
def test_nameservers_with_ports_reach_the_resolver(tmp_path):
    conf = write(tmp_path / "relay.conf", """
        [dns]
        nameservers = ["127.0.0.1:5353", "[::1]:53", "10.0.0.1", "::2", "[fe80::1]"]
        timeout = 2
        attempts = 3
        """)
    settings, _ = settings_from(conf)
    resolver = make_resolver(settings.dns)
    servers = [(ns.address, ns.port) for ns in resolver.nameservers]
    assert servers == [("127.0.0.1", 5353), ("::1", 53), ("10.0.0.1", 53), ("::2", 53), ("fe80::1", 53)]
    assert all(isinstance(ns, dns.nameserver.Do53Nameserver) for ns in resolver.nameservers)
    assert resolver.timeout == 2.0
    assert resolver.lifetime == 6.0


def test_without_nameservers_the_resolver_still_works():
    resolver = make_resolver(DnsSettings())
    assert resolver.nameservers


@pytest.mark.parametrize("entry", ["dns.example", "127.0.0.1:99999", "127.0.0.1:0", "127.0.0.1:",
                                   "[::1", "[::1]53", "[::1]:x", "1.2.3.4:\uff15\uff13", "300.1.1.1"])
def test_a_bad_nameserver_is_an_error_naming_dns_nameservers(tmp_path, entry):
    conf = write(tmp_path / "relay.conf", f'[dns]\nnameservers = ["127.0.0.1", "{entry}"]\n')
    message = config_error(conf)
    assert f"{conf}:2: [dns] nameservers: " in message
    assert repr(entry) in message


@given(st.ip_addresses(), st.one_of(st.none(), st.integers(1, 65535)))
def test_any_address_and_port_parses_back(address, port):
    host = str(address)
    if port is None:
        text, expected = host, 53
    elif address.version == 6:
        text, expected = f"[{host}]:{port}", port
    else:
        text, expected = f"{host}:{port}", port
    assert parse_nameserver(text) == (host, expected)


# ---------------------------------------------------------------- E-MailRelay options files
FLAGS = {o.long for o in OPTIONS if o.kind in ("flag", "count")}
KNOWN = {o.long for o in OPTIONS} | {"config"}
VALUE_OPTIONS = sorted(o.long for o in OPTIONS if o.kind in ("value", "multi"))


def options(path: Path) -> list[str]:
    return read_options_file(path, FLAGS, KNOWN)


def test_an_options_file_becomes_command_line_arguments(tmp_path):
    file = write(tmp_path / "emailrelay.conf", """
        # E-MailRelay configuration
        port 2599
          spool-dir "/var/spool/my relay"

        domain relay.example
        remote-clients
        log yes
        verbose no
        no-syslog on\r
        server-smtp-config -pipelining
        prompt-timeout=5
        """)
    assert options(file) == ["--port", "2599", "--spool-dir", "/var/spool/my relay",
                             "--domain", "relay.example", "--remote-clients", "--log", "--no-syslog",
                             "--server-smtp-config", "-pipelining", "--prompt-timeout", "5"]


@pytest.mark.parametrize("line, problem", [
    ("prot 25", "unknown option 'prot'"),
    ("port", "option 'port' needs a value"),
    ('port ""', "option 'port' needs a value"),
    ("log maybe", "option 'log' takes no value (or yes/no)"),
    ("--port 25", "not an option line: '--port 25'"),
])
def test_a_bad_line_is_reported_with_file_and_line(tmp_path, line, problem):
    file = write(tmp_path / "emailrelay.conf", f"# first\nlog\n{line}\n")
    with pytest.raises(ConfigError) as excinfo:
        options(file)
    assert str(excinfo.value) == f"{file}:3: {problem}"


def test_an_options_file_with_a_nul_is_refused(tmp_path):
    file = tmp_path / "emailrelay.conf"
    file.write_bytes(b"port 25\0\n")
    with pytest.raises(ConfigError, match="NUL"):
        options(file)


# A lone CR ends a line too (Python's universal newlines), so it cannot sit inside a value.
_line_text = st.characters(blacklist_categories=("Cs",), blacklist_characters="\n\r\0")
_quoted_value = st.text(_line_text, min_size=1, max_size=30)
_bare_value = st.text(_line_text, min_size=1, max_size=30).filter(
    lambda v: v[0] not in " \t=" and v[-1] not in " \t" and not (len(v) >= 2 and v[0] == v[-1] == '"'))
_line = st.one_of(
    st.tuples(st.just("comment"), st.text(_line_text, max_size=20)),
    st.tuples(st.just("flag"), st.sampled_from(sorted(FLAGS)), st.sampled_from(["", " yes", " no", " on"])),
    st.tuples(st.just("quoted"), st.sampled_from(VALUE_OPTIONS), _quoted_value),
    st.tuples(st.just("bare"), st.sampled_from(VALUE_OPTIONS), _bare_value),
)


@given(st.lists(_line, max_size=8))
def test_options_files_read_back_in_order(lines):
    text, expected = "", []
    for kind, *rest in lines:
        if kind == "comment":
            text += f"  #{rest[0]}\n\n"
        elif kind == "flag":
            name, value = rest
            text += f"{name}{value}\n"
            if value != " no":
                expected.append(f"--{name}")
        else:
            name, value = rest
            text += f'{name} "{value}"\n' if kind == "quoted" else f"{name} {value}\n"
            expected += [f"--{name}", value]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "emailrelay.conf"
        path.write_text(text, encoding="utf-8")
        assert options(path) == expected
