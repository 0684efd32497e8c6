"""The translation owns what it creates and nothing else (in a private namespace).

A firewall loaded before the translation (a DROP policy, a rule in INPUT, a
chain and an nft table of its own) survives: the translated init script run
with status, no argument or its early-exit guard true changes nothing at
all; run with start or stop, and the flat formats loaded (twice), it only
adds its own chains and one hook rule per built-in chain.
"""
import os

import pytest

from xlate_helpers import marked_lines, run_tool

INIT = """#!/bin/sh
# /etc/rc.d/init.d/firewall, shaped like the HOWTO ones
[ "$FIREWALL" = no ] && exit 0
if [ ! -x /bin/sh ]; then exit 0; fi
case "$1" in
start)
  ipchains -F
  ipchains -P input DENY
  ipchains -A input -i lo -j ACCEPT
  ipchains -A input -s 192.0.2.0/24 -j ACCEPT
  ;;
stop)
  ipchains -F
  ipchains -P input ACCEPT
  ;;
status)
  ipchains -L
  ;;
*)
  echo "Usage: firewall {start|stop|status}"
  exit 1
esac
"""
FLAT = "ipchains -P input DENY\nipchains -A input -s 192.0.2.0/24 -j ACCEPT\n"
MASQ_REDIRECT = FLAT + ("ipchains -A forward -s 192.0.2.0/24 -j MASQ\n"
                        "ipchains -A input -p tcp -d 0/0 80 -j REDIRECT 3128\n")
BEFORE = """iptables -P INPUT DROP
iptables -P FORWARD DROP
iptables -A INPUT -s 203.0.113.9 -j ACCEPT
iptables -N admin
iptables -A admin -s 198.51.100.7 -j ACCEPT
iptables -A FORWARD -j admin
nft add table inet other
nft add chain inet other keep
nft add rule inet other keep ip saddr 203.0.113.10 counter
"""
OURS = ("ipchains-INPUT", "ipchains-FORWARD", "ipchains-OUTPUT", "ipchains-PREROUTING",
        "ipchains-POSTROUTING", "in-", "fi-", "fw-", "out-", "fo-", "mr-", "pf-", "om-", "rd-",
        "pre-", "pol-", "stage-", "--comment ipchains-translate")


@pytest.fixture
def host(netns_host):
    """The shared namespace with a firewall of someone else's loaded."""
    netns_host.run("nft", "flush", "ruleset")
    netns_host.sh(BEFORE)
    yield netns_host
    netns_host.run("nft", "flush", "ruleset")


def state(host):
    """Return the namespace's rules, without counters and comment lines."""
    save = host.run("iptables-save").stdout.split("\n")
    rules = [line.split(" [")[0] for line in save if line and not line.startswith("#")]
    return rules, host.run("nft", "list", "table", "inet", "other").stdout


def theirs(rules):
    """Return the lines of RULES that are not ours."""
    return [line for line in rules if not any(word in line for word in OURS)]


def translated(tmp_path, fmt, text):
    src = tmp_path / "firewall"
    src.write_text(text)
    status, out, err = run_tool(["--to=" + fmt, str(src)])
    assert status == 0, err
    path = tmp_path / ("out." + fmt)
    path.write_text(out)
    return str(path)


@pytest.mark.parametrize("args,env", [(["status"], {}), ([], {}),
                                      (["start"], {"FIREWALL": "no"})])
def test_script_paths_without_commands_change_nothing(tmp_path, host, args, env):
    script = translated(tmp_path, "iptables", INIT)
    before = state(host)
    host.run("sh", script, *args, check=False, env=dict(os.environ, **env))
    assert state(host) == before


@pytest.mark.parametrize("arg", ["start", "stop"])
def test_script_start_stop_keep_other_rules(tmp_path, host, arg):
    script = translated(tmp_path, "iptables", INIT)
    before = state(host)
    for _ in range(2):      # a second run replaces our chains, adds nothing
        host.run("sh", "-e", script, arg)
    rules, other = state(host)
    assert theirs(rules) == before[0] and other == before[1]
    assert rules.count("-A INPUT -m comment --comment ipchains-translate -j ipchains-INPUT") == 1
    if arg == "start":
        assert any(r.startswith("-A in-input -s 192.0.2.0/24") and "firewall:10" in r
                   for r in rules), rules
    assert ":INPUT DROP" in rules and ":FORWARD DROP" in rules


def test_nft_keeps_other_tables(tmp_path, host):
    path = translated(tmp_path, "nft", FLAT)
    before = state(host)
    host.run("nft", "-f", path)
    host.run("nft", "-f", path)
    rules, other = state(host)
    assert theirs(rules) == before[0] and other == before[1]
    assert "table ip ipchains" in host.run("nft", "list", "tables").stdout


def after_loading(path):
    """Return the command the restore output names for after each load."""
    lines = marked_lines(open(path).read(), "# after loading: ")
    assert len(lines) == 1, lines
    return lines[0]


def test_iptables_restore_noflush_keeps_other_rules(tmp_path, host):
    path = translated(tmp_path, "iptables-restore", MASQ_REDIRECT)
    tidy = after_loading(path)
    host.sh("iptables -t nat -A POSTROUTING -s 203.0.113.0/24 -j ACCEPT")    # theirs too
    before = state(host)
    host.sh("iptables-restore --noflush < %s" % path)
    host.sh(tidy)                       # after a first load: nothing to delete
    once, _ = state(host)
    for _ in range(2):
        host.sh("iptables-restore --noflush < %s && %s" % (path, tidy))
    rules, other = state(host)
    assert theirs(rules) == before[0] and other == before[1]
    # Reloading replaces our chains and, tidied, leaves one hook per built-in chain.
    assert rules == once
    for table, chain in (("filter", "INPUT"), ("filter", "FORWARD"), ("filter", "OUTPUT"),
                         ("nat", "PREROUTING"), ("nat", "POSTROUTING")):
        hook = "-A %s -m comment --comment ipchains-translate -j ipchains-%s" % (chain, chain)
        assert host.run("iptables", "-t", table, "-S", chain).stdout.split("\n").count(hook) \
            == 1, (table, chain)
