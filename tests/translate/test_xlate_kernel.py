"""Every golden case, in every format, is loaded by the kernel in a private namespace.

iptables-restore: ``--test`` and a real load; nft: ``nft -c -f``, then
``nft -f`` twice, leaving one copy; the shell script format is run with
``sh -e`` for the cases whose commands need nothing outside the namespace.
"""
import os
import tempfile

import pytest

import verdicts
from xlate_helpers import case_names, translate_case

# Shell scripts that are not run: they resolve host names at load time (no
# DNS here), load modules (not namespaced) or hold deliberate errors.
NOT_RUN = {"book", "book-tproxy", "shell", "errors", "unflat"}
# Variables the shell cases leave to the environment (their -D values).
SHELL_ENV = {"INTIF": "eth1", "EXTIF": "eth0"}


def _file(text):
    fd, path = tempfile.mkstemp(prefix="xlate", suffix=".rules")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return path


@pytest.fixture
def host(netns_host):
    """The shared namespace, emptied before each test."""
    netns_host.run("nft", "flush", "ruleset")
    return netns_host


def saved_rules(host):
    """Return the kernel's ruleset as iptables-save lists it, without its dated comments."""
    return [line for line in host.run("iptables-save").stdout.split("\n")
            if line and not line.startswith("#")]


def rule_origins(lines):
    """Return the sorted (table, chain, origin) of each rule in iptables-restore LINES."""
    return sorted((table, chain, origin) for table, chain, origin, _
                  in verdicts.iptables_rules("\n".join(lines)))


@pytest.mark.parametrize("name", case_names())
def test_iptables_restore_loads(host, name):
    """The kernel takes every rule, and loading again leaves the same ruleset."""
    status, out, err = translate_case(name, "iptables-restore", ["--partial"])
    path = _file(out)
    try:
        host.sh("iptables-restore --test < %s" % path)
        host.sh("iptables-restore < %s" % path)
        first = saved_rules(host)
        # Every rule of the translation is in the kernel, in its chain and table.
        assert rule_origins(first) == rule_origins(out.split("\n"))
        host.sh("iptables-restore < %s" % path)
        assert saved_rules(host) == first
    finally:
        os.unlink(path)


@pytest.mark.parametrize("name", case_names())
def test_nft_loads_twice_one_copy(host, name):
    status, out, err = translate_case(name, "nft", ["--partial"])
    path = _file(out)
    try:
        host.run("nft", "-c", "-f", path)
        host.run("nft", "-f", path)
        first = host.run("nft", "list", "table", "ip", "ipchains").stdout
        host.run("nft", "-f", path)
        second = host.run("nft", "list", "table", "ip", "ipchains").stdout
        tables = host.run("nft", "list", "tables").stdout.split("\n")
        assert tables.count("table ip ipchains") == 1
        assert first == second
        assert first.count("comment") >= out.count("comment \"")
    finally:
        os.unlink(path)


@pytest.mark.parametrize("name", sorted(set(case_names()) - NOT_RUN))
def test_shell_script_runs(host, name):
    status, out, err = translate_case(name, "iptables", ["--partial"])
    path = _file(out)
    try:
        host.run("sh", "-n", path)
        env = dict(os.environ, **SHELL_ENV)
        host.run("sh", "-e", path, env=env)
        rules = host.run("iptables-save").stdout
        assert "-A INPUT" in rules and "-j in-input" in rules
    finally:
        os.unlink(path)


@pytest.mark.parametrize("name", sorted(NOT_RUN))
def test_shell_script_syntax(name):
    status, out, err = translate_case(name, "iptables", ["--partial"])
    path = _file(out)
    try:
        import subprocess
        assert subprocess.run(["sh", "-n", path]).returncode == 0
    finally:
        os.unlink(path)
