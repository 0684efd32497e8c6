"""Meaning details (issue 11 items 7 and 8), each checked against what ipchains
1.3.9 did (parse_policy and parse_target in ipchains.c: strcmp, no case
folding) or what the loaders accept.
"""
import re

import pytest

from xlate_helpers import run_tool


def translate(tmp_path, text, fmt="nft", *extra):
    path = tmp_path / "fw.sh"
    path.write_text(text)
    return run_tool(["--to=" + fmt, "--partial", *extra, str(path)])


@pytest.mark.parametrize("fmt", ["nft", "iptables"])
def test_lowercase_target_is_a_chain_name(tmp_path, fmt):
    status, out, err = translate(tmp_path, "ipchains -A input -s 192.0.2.1 -j deny\n", fmt)
    assert status == 1
    assert "fw.sh:1: note: ipchains targets are case-sensitive: 'deny' names a user chain" in err
    assert "fw.sh:1: error: unknown target 'deny': no such chain" in err
    assert not re.search(r"^\s*(-A .*|.*ip saddr )192\.0\.2\.1.*(drop|DROP)", out, re.M)


def test_lowercase_policy_is_refused(tmp_path):
    status, out, err = translate(tmp_path, "ipchains -P input deny\n")
    assert status == 1 and "fw.sh:1: error: bad policy 'deny'" in err


def test_policy_on_a_user_chain(tmp_path):
    status, out, err = translate(tmp_path, "ipchains -N mine\nipchains -P mine DENY\n")
    assert status == 1 and "fw.sh:2: error: only built-in chains have a policy, not 'mine'" in err


def test_port_range_glued_to_an_option(tmp_path):
    status, out, err = translate(tmp_path, "ipchains -A input -p tcp -d 0/0 1024:-j ACCEPT\n")
    assert status == 1
    assert "error: '1024:-j' runs into the option '-j': a space is missing before it" in err


def test_icmp_type_range_for_nft(tmp_path, netns_host):
    text = "ipchains -A input -p icmp --icmp-type 13:255 -j DENY\n"
    status, out, err = translate(tmp_path, text, "nft")
    assert status == 0, err
    assert "icmp type 13-255 drop" in out
    path = tmp_path / "out.nft"
    path.write_text(out)
    netns_host.run("nft", "-c", "-f", str(path))
    status, out, err = translate(tmp_path, text, "iptables-restore")
    assert status == 1 and "warning: iptables' icmp match takes one type" in err


def test_insmod_becomes_modprobe(tmp_path):
    status, out, err = translate(tmp_path, "/sbin/insmod ip_masq_ftp\n"
                                 "ipchains -A input -j ACCEPT\n", "iptables")
    assert "\nmodprobe nf_nat_ftp\n" in out and "insmod nf_nat_ftp" not in out


def test_masq_output_source_test_without_masq_source_fails(tmp_path):
    text = ("ipchains -P forward MASQ\n"
            "ipchains -A output -i eth0 -s ! 198.51.100.1 -j REJECT\n")
    status, out, err = translate(tmp_path, text, "nft")
    assert status == 1 and "fw.sh:2: warning: 2.2 masqueraded before the output chain" in err
    status, out, err = translate(tmp_path, text, "nft", "--masq-source", "198.51.100.1")
    assert status == 0, err


def test_chain_commands_carry_their_origin_in_the_script_format(tmp_path):
    text = ("ipchains -N foo\nipchains -A input -j foo\nipchains -F foo\n"
            "ipchains -M -S 7200 10 60\nipchains -A input -j ACCEPT\n"
            "ipchains -D input 1\nipchains -X foo\n")
    status, out, err = translate(tmp_path, text, "iptables")
    assert status == 0, err
    body = out.split("\n}\n", 1)[1]       # after the setup function
    for line in body.split("\n"):
        if re.match(r"\s*(iptables|sysctl) ", line):
            assert re.search(r"fw\.sh:\d", line), line
    for number in (1, 3, 4, 6, 7):
        assert "# %s:%d" % (tmp_path / "fw.sh", number) in out, number


def test_continued_command_quoted_on_one_line(tmp_path):
    status, out, err = translate(tmp_path, "ipchains -A input \\\n  -s 192.0.2.0/33 -j ACCEPT\n")
    assert "'ipchains -A input -s 192.0.2.0/33 -j ACCEPT'" in err
    assert "\\" not in err and "\\ " not in out
