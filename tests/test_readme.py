"""README.md stays true: its example relay.conf validates and its first commands are the real ones."""

from __future__ import annotations

import re
import subprocess
import sys

from conftest import ROOT


def test_readme_example_config_is_valid(tmp_path):
    readme = (ROOT / "README.md").read_text()
    [example] = re.findall(r"```toml\n(include = .*?)```", readme, re.S)
    (tmp_path / "conf.d").mkdir()
    (tmp_path / "conf.d" / "local.toml").write_text("[smtp]\nport = 2526\n")
    conf = tmp_path / "relay.conf"
    conf.write_text(example)
    result = subprocess.run([sys.executable, "-m", "mailrelay", "check-config", str(conf)],
                            capture_output=True, text=True, timeout=60,
                            env={"PATH": "/usr/bin:/bin", "MAILRELAY_SPOOL": str(tmp_path / "spool")})
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout and "SMTP port 2526" in result.stdout  # the include won


def test_readme_test_command_is_what_ci_runs():
    readme = (ROOT / "README.md").read_text()
    first_block = re.search(r"```sh\n(.*?)```", readme, re.S).group(1)
    test_command = [line.strip() for line in first_block.splitlines()
                    if "pytest" in line and not line.lstrip().startswith("#")][0]
    assert test_command in (ROOT / ".ci" / "run").read_text()
