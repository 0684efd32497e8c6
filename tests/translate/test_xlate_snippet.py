"""-e without FILEs prints a snippet: the rules alone (no flush, no policy,
one line per rule, like iptables-translate), for the chains of a full
translation; loaded on top of one, it adds its rules and removes nothing.
"""
import re

import pytest

from xlate_helpers import FORMATS, run_tool

FULL = "ipchains -P input DENY\nipchains -A input -p tcp -d 0/0 22 -j ACCEPT\n"
RULES = ["-A input -p tcp -d 0/0 80 -j ACCEPT", "-I output -p udp -d 192.0.2.53 53 -j DENY"]


def snippet(fmt, rules=RULES):
    argv = ["--to=" + fmt]
    for rule in rules:
        argv.append("--rule=" + rule)
    return run_tool(argv)


@pytest.mark.parametrize("fmt", FORMATS)
def test_snippet_is_rules_alone(fmt):
    status, out, err = snippet(fmt)
    assert status == 0, err
    lines = out.rstrip("\n").split("\n")
    assert lines[0].startswith("# ipchains-translate -e: rules only")
    assert "in-input" in lines[0] and "out-output" in lines[0] and "fo-output" in lines[0]
    rules = [line for line in lines[1:] if line not in ("*filter", "COMMIT")]
    # input reaches in-input and fi-input; output reaches out-output and
    # fo-output (the output stage of forwarded packets).
    assert len(rules) == 4
    for word in (" -F", " -X", " -P", "flush", "delete", "policy", "table ip ipchains {"):
        assert word not in out


@pytest.mark.parametrize("fmt", FORMATS)
def test_snippet_refuses_whole_chain_commands(fmt):
    status, out, err = snippet(fmt, ["-P input DENY", "-A input -j ACCEPT"])
    assert status == 1
    assert "-e:1: error: -e prints rules only" in err
    assert "refusing" in out.split("\n")[0]


@pytest.mark.parametrize("fmt", FORMATS)
def test_snippet_loads_on_a_full_translation(tmp_path, netns_host, fmt):
    host = netns_host
    host.run("nft", "flush", "ruleset")
    src = tmp_path / "fw"
    src.write_text(FULL)
    status, full, err = run_tool(["--to=" + fmt, str(src)])
    assert status == 0, err
    full_path, snip_path = tmp_path / "full", tmp_path / "snip"
    full_path.write_text(full)
    snip_path.write_text(snippet(fmt)[1])
    loader = {"iptables": "sh -e %s", "iptables-restore": "iptables-restore --noflush < %s",
              "nft": "nft -f %s"}[fmt]
    host.sh(loader % full_path)
    if fmt == "iptables-restore":
        host.sh(loader % snip_path)
    else:
        host.sh("sh -e %s" % snip_path)
    listing = host.run("nft", "list", "ruleset").stdout if fmt == "nft" else \
        host.run("iptables-save").stdout
    count = lambda origin: len(re.findall(re.escape(origin) + r"\b", listing))    # noqa: E731
    assert count("fw:1") >= 2 and count("fw:2") == 2
    assert count("-e:1") == 2 and count("-e:2") == 2
    host.run("nft", "flush", "ruleset")


@pytest.mark.parametrize("fmt", FORMATS)
def test_snippet_input_rules_reach_the_masquerading_stages_it_knows(fmt):
    """With the MASQ rule given too, an input rule goes to mr-input (masqueraded
    replies) as well; without it, a note says which stages it skips."""
    rule = "-A input -p tcp -d 0/0 80 -j ACCEPT"
    status, out, err = snippet(fmt, [rule, "-A forward -s 192.0.2.0/24 -j MASQ"])
    assert status == 0, err
    assert "mr-input" in out.split("\n")[0] and "om-output" not in out.split("\n")[0]
    assert "skip" not in err or "mr-input" not in err
    status, out, err = snippet(fmt, [rule])
    assert status == 0 and "mr-input" not in out
    assert "note: input rules here skip mr-input (masqueraded replies) and pf-input" in err


@pytest.mark.parametrize("fmt", FORMATS)
def test_snippet_refuses_a_port_forward_delete_without_its_target(fmt):
    """portfw -d without -R deletes whatever the forward points to (2.2's
    ip_portfw_del); a rule is deleted by its text, so the snippet needs -R."""
    status, out, err = snippet(fmt, ["ipmasqadm portfw -d -P tcp -L 198.51.100.1 2222"])
    assert status == 1
    assert "-e:1: error: portfw -d without -R" in err
    assert "refusing" in out.split("\n")[0]
