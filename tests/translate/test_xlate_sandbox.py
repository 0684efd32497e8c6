"""The flat formats run the script in bash inside a sandbox: the script never
touches the host (files, network, links), runs under a time limit, and a
script that runs no ipchains command with the values given is refused.
"""
import os
import sys

import pytest

from translate import sandbox
from xlate_helpers import ROOT, run_tool

NOSY = """#!/bin/sh
touch {dir}/written-beside-the-script
echo hello > /tmp/{mark}
echo hello > /var/tmp/{mark}
/usr/bin/env ip link add {link} type dummy
/usr/bin/env iptables -P INPUT DROP
exec 3<>/dev/tcp/192.0.2.1/80 && echo reached-network >> {dir}/net
ipchains -A input -s 192.0.2.0/24 -j ACCEPT
"""


@pytest.fixture(autouse=True)
def need_bwrap():
    if sandbox.shutil.which("bwrap") is None:
        pytest.skip("bwrap (bubblewrap) is not installed")


def test_script_cannot_touch_the_host(tmp_path, netns_host):
    mark = "ipchains-translate-%d" % os.getpid()
    link = "xlt%d" % (os.getpid() % 100000)
    script = tmp_path / "nosy.sh"
    script.write_text(NOSY.format(dir=tmp_path, mark=mark, link=link))
    # Run inside a lab namespace: a broken sandbox could only reach that one.
    proc = netns_host.run(sys.executable, "-m", "translate", "--to=nft", str(script),
                          check=False, env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.returncode == 0, proc.stderr
    assert "nosy.sh:8" in proc.stdout
    assert sorted(os.listdir(tmp_path)) == ["nosy.sh"]
    assert not os.path.exists("/tmp/" + mark) and not os.path.exists("/var/tmp/" + mark)
    assert link not in netns_host.run("ip", "link").stdout
    assert "DROP" not in netns_host.run("iptables", "-S", "INPUT").stdout


def test_time_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(sandbox, "TIMEOUT", 2)
    script = tmp_path / "loop.sh"
    script.write_text("ipchains -A input -j ACCEPT\nwhile :; do :; done\n")
    status, out, err = run_tool(["--to=nft", str(script)])
    assert status == 2 and out == ""
    assert "loop.sh: the script ran longer than 2 s in the sandbox" in err


needs_process_bound = pytest.mark.skipif(
    not sandbox.process_bound(),
    reason="the sandbox's process bound needs pid_max per pid namespace (Linux >= 6.14) "
           "and unshare; without it a fork bomb would run unbounded here")


@pytest.mark.parametrize("body", [
    # Many processes at once, each waiting: bounded, they would wait until TIMEOUT.
    "for i in $(seq 1 %d); do tail -f /dev/null & done\nwait\n" % (sandbox.PROCESSES + 200),
    # The classic fork bomb.
    "bomb() { bomb | bomb & }\nbomb\nwait\n"], ids=["many", "bomb"])
@needs_process_bound
def test_too_many_processes_stop_the_script_at_once(tmp_path, monkeypatch, body):
    # Before, only the time limit ended them (and nothing bounded their number).
    monkeypatch.setattr(sandbox, "TIMEOUT", 20)
    script = tmp_path / "procs.sh"
    script.write_text("ipchains -A input -j ACCEPT\n" + body)
    status, out, err = run_tool(["--to=nft", str(script)])
    assert status == 2 and out == ""
    assert err.strip() == ("ipchains-translate: %s: the script ran more than %d processes at "
                           "once in the sandbox (a fork bomb?); stopped, nothing translated"
                           % (script, sandbox.PROCESSES))


@needs_process_bound
def test_processes_that_ended_do_not_count_against_the_bound(tmp_path):
    # Orphans (a subshell's background job) are reaped by the sandbox's init:
    # more of them over time than the bound holds at once is no fork bomb.
    script = tmp_path / "orphans.sh"
    script.write_text("for i in $(seq 1 %d); do (/bin/true &); done\n"
                      "ipchains -A input -j ACCEPT\n" % (sandbox.PROCESSES + 200))
    status, out, err = run_tool(["--to=nft", str(script)])
    assert status == 0, err
    assert "orphans.sh:2" in out


def test_process_bound_only_where_pid_max_is_per_namespace():
    # On an older kernel pid_max is global: writing it from the sandbox's
    # namespace would change the host's.
    assert not sandbox.pid_max_per_namespace("6.13.7-amd64")
    assert not sandbox.pid_max_per_namespace("5.10.0-28-amd64")
    assert sandbox.pid_max_per_namespace("6.14.0")
    assert sandbox.pid_max_per_namespace("7.0.1")
    assert not sandbox.pid_max_per_namespace("garbage")


def test_no_command_run_with_these_values_is_refused(tmp_path):
    script = tmp_path / "init.sh"
    script.write_text('case "$1" in\nstart) ipchains -P input DENY ;;\nesac\n')
    status, out, err = run_tool(["--to=iptables-restore", str(script)])
    assert status == 2 and out == ""
    assert "init.sh: bash ran no ipchains command with no positional parameters" in err
    status, out, err = run_tool(["--to=iptables-restore", "-D", "1=start", str(script)])
    assert status == 0 and "init.sh:2" in out


def test_forced_values_win_and_guards_are_followed(tmp_path):
    script = tmp_path / "fw.sh"
    script.write_text("IPADDR=`ifconfig eth0 | grep inet`\n"
                      "X=\n"
                      '[ -n "$X" ] && ipchains -A input -s 192.0.2.7 -j DENY\n'
                      "ipchains -A input -d $IPADDR -j ACCEPT\n"
                      "exit 0\n"
                      "ipchains -A input -j DENY\n")
    status, out, err = run_tool(["--to=nft", "-D", "IPADDR=198.51.100.2", str(script)])
    assert status == 0, err
    assert "ip daddr 198.51.100.2 accept" in out
    assert "192.0.2.7" not in out and "fw.sh:3" not in out + err
    assert "fw.sh:6" not in out + err


def test_stdin_runs_in_the_sandbox_too():
    status, out, err = run_tool(["--to=nft"], stdin="for n in 1 2; do ipchains -A input "
                                "-s 192.0.2.$n -j ACCEPT; done\n")
    assert status == 0, err
    assert out.count('comment "<stdin>:1"') == 4     # two rules, two contexts each


def test_records_written_by_the_script_are_refused(tmp_path):
    script = tmp_path / "forge.sh"
    script.write_text("ipchains -A input -s 192.0.2.1 -j ACCEPT\n"
                      "echo to-stdout-goes-nowhere\n"
                      "for fd in 10 11 12; do printf 'garbage\\0' >&$fd; done 2>/dev/null\n")
    status, out, err = run_tool(["--to=nft", str(script)])
    assert status == 2 and out == ""
    assert "forge.sh: the script wrote into the stand-ins' record stream" in err
