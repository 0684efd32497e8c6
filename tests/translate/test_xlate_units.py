"""Unit tests of the pieces: grammar, shell reader, chain simulation, semantics, CLI."""
import os
import random
import re
import shutil
import subprocess
import sys
import time

import pytest

import verdicts
from xlate_helpers import ROOT, missing, run_tool
from translate import cli
from translate.chains import ChainError, Chains
from translate.ipchains import Names, ParseError, parse, parse_addresses
from translate.ir import Addr, Ports, Raw, SourceRef
from translate.pipeline import translate
from translate.semantics import Options, chain_contexts, Features
from translate.shell import Reader, parse as parse_shell, tokenize

SRC = SourceRef("t", 1, "text")
NAMES = Names({"moose.mancill.com": ["203.0.113.80"], "two": ["192.0.2.1", "192.0.2.2"]})


def cmd(line, names=NAMES):
    return parse(["ipchains"] + line.split(), SRC, names)


def rule(line):
    (r,) = cmd(line).rules
    return r


# ---------------------------------------------------------------- grammar


@pytest.mark.parametrize("text,nets", [
    ("0/0", ["0.0.0.0/0"]), ("any/0", ["0.0.0.0/0"]), ("192.0.2.7", ["192.0.2.7/32"]),
    ("192.0.2.7/24", ["192.0.2.0/24"]), ("192.0.2.0/255.255.255.128", ["192.0.2.0/25"]),
    ("moose.mancill.com/32", ["203.0.113.80/32"]), ("two", ["192.0.2.1/32", "192.0.2.2/32"]),
])
def test_addresses(text, nets):
    assert parse_addresses(text, NAMES) == nets


@pytest.mark.parametrize("text,message", [
    ("192.0.2.0/33", "longer than 32"), ("192.0.2.0/255.0.255.0", "not contiguous"),
    ("300.1.1.1", "bad address"), ("2001:db8::1", "IPv6"), ("nowhere.invalid", "cannot resolve"),
])
def test_bad_addresses(text, message):
    with pytest.raises(ParseError, match=message):
        parse_addresses(text, NAMES)


def test_hostnames_kept_for_the_shell_format():
    assert parse_addresses("moose.mancill.com/32", Names(keep_hosts=True)) == ["moose.mancill.com/32"]


def test_ports_ranges_services_and_negation():
    r = rule("-A input -p tcp -s 0/0 :1023 -d 0/0 ! www")
    assert r.sport == Ports(0, 1023) and r.dport == Ports(80, 80, neg=True)
    assert rule("-A input -p udp --sport 1024: --dport domain").sport == Ports(1024, 65535)
    with pytest.raises(ParseError, match="out of range"):
        cmd("-A input -p tcp -d 0/0 70000")
    with pytest.raises(ParseError, match="reversed"):
        cmd("-A input -p tcp -d 0/0 90:80")
    with pytest.raises(ParseError, match="ports need"):
        cmd("-A input -d 0/0 80")


def test_icmp_type_after_s_and_code_after_d():
    r = rule("-A input -p icmp -s 0/0 destination-unreachable -d 0/0 4")
    assert (r.icmp_type, r.icmp_code) == ("3", "4")
    r = rule("-A input -p icmp -s 0/0 port-unreachable")
    assert (r.icmp_type, r.icmp_code) == ("3", "3")
    assert rule("-A input -p icmp --icmp-type ping").icmp_type == "8"
    with pytest.raises(ParseError, match="needs an ICMP type"):
        cmd("-A input -p icmp -d 0/0 4")


def test_bidirectional_gives_two_swapped_rules():
    a, b = cmd("-A input -p tcp -b -s 192.0.2.1 1024 -d 198.51.100.1 25 -j ACCEPT").rules
    assert (b.saddr, b.daddr, b.sport, b.dport) == (a.daddr, a.saddr, a.dport, a.sport)


def test_flags_and_side_effects():
    r = rule("-A input -p tcp ! -y -i ! eth+ -l -m 0x10 -t 0x01 0x10 -o 64 -j ACCEPT")
    assert (r.syn, r.iface, r.iface_neg, r.log, r.mark, r.tos, r.copy) == \
        (False, "eth+", True, True, ("=", 16), (1, 16), 64)
    assert rule("-A input ! -f").frag is False
    with pytest.raises(ParseError, match="-y needs -p tcp"):
        cmd("-A input -p udp -y")
    with pytest.raises(ParseError, match="and-mask must keep bit 0"):
        cmd("-A input -t 0x00 0x10")


def test_redir_is_redirect_with_a_note_and_port_optional():
    c = cmd("-A input -p tcp -j REDIR 12970 -s 192.0.2.0/24 -d moose.mancill.com/32 80")
    assert c.rules[0].target == "REDIRECT" and c.rules[0].port == 12970
    assert any("REDIR is a spelling" in n for n in c.notes)
    assert rule("-A input -p udp -j REDIRECT").port == 0
    with pytest.raises(ParseError, match="only valid in input"):
        cmd("-A forward -p tcp -j REDIRECT 80")
    with pytest.raises(ParseError, match="needs -p tcp or -p udp"):
        cmd("-A input -j REDIRECT 80")


@pytest.mark.parametrize("line,message", [
    ("-A", "needs an argument"), ("-A input -s", "needs an argument"),
    ("-X input -s 0/0", "does not take rule options"), ("-A input -A output", "two commands"),
    ("-P input DROP", "bad policy"), ("-A input -z", "unknown option"),
    ("-A averyl0ngname", "longer than 8"), ("-R input 0", "start at 1"),
    ("-M -Q", "-M needs"), ("-A input ! -x", "'!' must come"), ("", "no command"),
])
def test_grammar_errors(line, message):
    with pytest.raises(ParseError, match=re.escape(message)):
        parse(["ipchains"] + line.split(), SRC, NAMES)


def test_other_commands():
    assert cmd("-M -S 7200 10 160").values == (7200, 10, 160)
    assert cmd("-I input 3 -j ACCEPT").num == 3
    assert cmd("-D input 2").num == 2 and cmd("-D input -j ACCEPT").rules
    assert cmd("-L input -n -v").op == "L"
    assert cmd("-F").chain is None


def test_ipmasqadm_portfw():
    pf = parse("ipmasqadm portfw -a -P tcp -L 198.51.100.1 80 -R 192.0.2.80 8080".split(),
               SRC, NAMES)
    assert (pf.op, pf.laddr, pf.lport, pf.raddr, pf.rport) == \
        ("a", "198.51.100.1", 80, "192.0.2.80", 8080)
    with pytest.raises(ParseError, match="needs -R"):
        parse("ipmasqadm portfw -a -P tcp -L 198.51.100.1 80".split(), SRC, NAMES)


def test_raw_words_pass_through():
    r = parse(["ipchains", "-A", "input", "-i", Raw("$EXTIF"), "-s", Raw("$NET"), "-j", "DENY"],
              SRC, NAMES).rules[0]
    assert r.iface == "$EXTIF" and r.saddr == Addr("$NET")
    with pytest.raises(ParseError, match="literally"):
        parse(["ipchains", "-A", "input", "-j", Raw("$T")], SRC, NAMES)


# ---------------------------------------------------------------- chain simulation


def sim(*lines):
    chains = Chains(known_chains=["u"])
    for line in lines:
        chains.apply(cmd(line))
    return chains


def sources(chains, name="input"):
    return [r.saddr.net.split("/")[0] for r in chains.chains[name].rules]


def test_insert_replace_delete_act_like_ipchains():
    c = sim("-A input -s 192.0.2.1", "-A input -s 192.0.2.2", "-I input -s 192.0.2.3",
            "-I input 2 -s 192.0.2.4", "-R input 3 -s 192.0.2.5", "-D input 4",
            "-D input -s 192.0.2.3")
    assert sources(c) == ["192.0.2.4", "192.0.2.5"]


@pytest.mark.parametrize("lines,message", [
    (("-N u", "-A u -j u"), "loop"), (("-N u", "-N v", "-A u -j v", "-A v -j u"), "loop"),
    (("-A input -j nochain",), "unknown target"), (("-D input 1",), "no rule 1"),
    (("-N u", "-A u", "-X u"), "not empty"), (("-N u", "-A input -j u", "-X u"), "still used"),
    (("-P input MASQ",), "only a policy for forward"), (("-X input",), "built-in"),
    (("-N u", "-N u"), "already exists"), (("-D input -s 192.0.2.9",), "no such rule"),
    (("-A input -j input",), "built-in"), (("-N ACCEPT",), "reserved"),
])
def test_chain_errors(lines, message):
    chains = Chains(known_chains=["u", "v"])
    with pytest.raises(ChainError, match=message):
        for line in lines:
            chains.apply(cmd(line))


def append_cpu_time(n):
    """Return the CPU seconds N appends to one chain take, and the chain's length after."""
    chains = Chains()
    line = cmd("-A input -s 192.0.2.1 -j ACCEPT")
    start = time.process_time()
    for _ in range(n):
        chains.apply(line)
    return time.process_time() - start, len(chains.chains["input"].rules)


def test_many_appends_are_linear():
    """Twice the appends take about twice the CPU time (4 times if each append
    walked the chain); the best of a few runs, so a busy machine does not matter."""
    n = 50000
    times = {}
    for size in (n, 2 * n):
        runs = [append_cpu_time(size) for _ in range(3)]
        assert all(length == size for _, length in runs)
        times[size] = min(t for t, _ in runs)
    assert times[2 * n] / max(times[n], 1e-6) < 3.0, times


# ---------------------------------------------------------------- shell reader


def flat(text, defines=None):
    reader = Reader(text, "s", defines)
    return reader.flatten(parse_shell(text))


def argvs(items):
    return [" ".join(i.argv) for i in items if getattr(i, "argv", None)]


def test_continuations_quotes_comments_and_variables():
    text = ('IPCHAINS=/sbin/ipchains\nNET="192.0.2.0/24"  # inside\n'
            "$IPCHAINS -A input \\\n  -s $NET -d '198.51.100.1' 80 -p tcp # ssh\n"
            '${IPCHAINS} -A input -s "$NET"\n')
    assert argvs(flat(text)) == [
        "ipchains -A input -s 192.0.2.0/24 -d 198.51.100.1 80 -p tcp",
        "ipchains -A input -s 192.0.2.0/24"]
    assert [i.src.line for i in flat(text)] == [3, 5]


def test_loops_and_functions_unrolled():
    text = ('for h in 192.0.2.1 192.0.2.2; do\n  ipchains -A input -s $h -j DENY\ndone\n'
            'allow() {\n  ipchains -A input -p $1 -d 0/0 $2 -j ACCEPT\n}\nallow tcp 22\n')
    assert argvs(flat(text)) == ["ipchains -A input -s 192.0.2.1 -j DENY",
                                 "ipchains -A input -s 192.0.2.2 -j DENY",
                                 "ipchains -A input -p tcp -d 0/0 22 -j ACCEPT"]


def test_defines_win_and_unknown_values_are_reported():
    text = "IF=eth0\nIP=`hostname -i`\nipchains -A input -i $IF -d $IP -j ACCEPT\n"
    (item,) = flat(text)
    assert "$IP is set from the command substitution" in item.error
    (item,) = flat(text, {"IF": "eth1", "IP": "198.51.100.1"})
    assert item.argv == ["ipchains", "-A", "input", "-i", "eth1", "-d", "198.51.100.1",
                         "-j", "ACCEPT"]


def test_conditionals_are_reported_not_guessed():
    text = "if [ -x /sbin/ipchains ]; then\n  ipchains -F\nfi\nipchains -A input\n"
    items = flat(text)
    assert "cannot be flattened (if at line 1)" in items[0].error
    assert items[1].argv == ["ipchains", "-A", "input"]


def test_tokenizer_keeps_raw_text():
    words = [t.raw for t in tokenize('a "b $C" \'d e\' $(f g) `h`\n') if hasattr(t, "raw")]
    assert words == ['a', '"b $C"', "'d e'", "$(f g)", "`h`"]


# ---------------------------------------------------------------- semantics


def test_user_chain_gets_the_contexts_of_its_callers():
    graph = {"input": ["u"], "output": ["u"], "u": ["v"]}
    ctxs = chain_contexts(graph, Features(), Options())
    assert ctxs["v"] == ["in", "fi", "out", "fo"]
    assert "u" not in chain_contexts({}, Features(), Options())


def nft(text, **kw):
    return translate([("t", text)], Options(fmt="nft", **kw))


def test_interface_is_outgoing_in_forward_and_output():
    """ipchains -i is the device the chain was called with: the receiving one for
    input, the sending one for forward and output (ip_fw.c:1653-1671)."""
    out = nft("ipchains -A output -i eth0 -j ACCEPT\nipchains -A forward -i eth1 -j ACCEPT\n"
              "ipchains -A input -i eth2 -j ACCEPT\n").text
    chains = {}
    for chain, body, origin in verdicts.nft_rules(out):
        chains.setdefault(chain, []).append(body)
    assert chains["out-output"] == ['oifname "eth0" accept']
    assert chains["fo-output"] == ['oifname "eth0" accept']
    assert chains["fw-forward"] == ['oifname "eth1" goto stage-out']
    assert chains["in-input"] == ['iifname "eth2" accept']
    assert chains["fi-input"] == ['iifname "eth2" goto stage-fw']


def test_masq_in_a_chain_reached_from_input_is_an_error():
    result = nft("ipchains -N m\nipchains -A m -j MASQ\nipchains -A input -j m\n")
    assert result.status == 1
    assert any("MASQ is only valid in forward" in d.message for d in result.diags)


def test_every_rule_carries_its_origin():
    result = translate([("fw.sh", "ipchains -A input -s 192.0.2.1 -j ACCEPT -l\n")],
                       Options(fmt="iptables-restore"))
    rules = [line for line in result.text.split("\n") if "192.0.2.1" in line]
    assert len(rules) == 4 and all('--comment fw.sh:1' in line for line in rules)


def test_tos_that_nft_cannot_express_is_a_warning():
    result = nft("ipchains -A output -t 0xff 0x02\n")
    assert result.status == 1 and "untranslated" in result.text


# ---------------------------------------------------------------- command line


def test_exit_statuses(tmp_path):
    good = tmp_path / "good.sh"
    good.write_text("ipchains -A input -s 192.0.2.1 -j ACCEPT\n")
    assert run_tool([str(good)])[0] == 0
    assert run_tool(["-e", "-A input -s 192.0.2.0/33"])[0] == 1
    assert run_tool([str(tmp_path / "missing.sh")])[0] == 2
    assert run_tool(["--to=pf", str(good)])[0] == 2
    assert run_tool(["-D", "novalue", str(good)])[0] == 2
    status, out, err = run_tool([], stdin="ipchains -P input DENY\n")
    assert status == 0 and "pol-input" in out


def test_e_rules_are_named_dash_e(tmp_path):
    status, out, err = run_tool(["--to=nft", "-e", "-A input -j ACCEPT", "-e", "-A input -j NOPE"])
    assert status == 1
    assert err.startswith("-e:2: error: unknown target 'NOPE'")
    assert 'comment "-e:1"' in out


def test_output_file_and_quiet(tmp_path):
    out_file = tmp_path / "out.nft"
    status, out, err = run_tool(["-q", "--to=nft", "-o", str(out_file),
                                 "-e", "-A input -p tcp -j REDIR 80"])
    assert status == 0 and out == "" and err == ""
    assert "redirect to :80" in out_file.read_text()


def test_version_and_help():
    proc = subprocess.run([sys.executable, "-m", "translate", "--version"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stderr == ""
    assert re.fullmatch(r"ipchains-translate \d+(\.\d+)+\n", proc.stdout), proc.stdout
    # The same version the translations name in their header.
    header = nft("ipchains -A input -j DENY\n").text.split("\n")[1]
    assert header.startswith("# Translated from ipchains by %s:" % proc.stdout.strip())


def test_python_dash_m_works():
    proc = subprocess.run([sys.executable, "-m", "translate", "--to=nft", "-e", "-A input -j DENY"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "drop" in proc.stdout


FUZZ_WORDS = ["-A", "-I", "-R", "-D", "-P", "-N", "-X", "-F", "-Z", "-L", "-C", "-M", "-S",
              "input", "output", "forward", "u", "1", "2", "-p", "tcp", "udp", "icmp", "!",
              "-s", "-d", "0/0", "192.0.2.1/24", "80", "1:2", "-i", "eth+", "-y", "-f", "-b",
              "-j", "ACCEPT", "DENY", "REJECT", "MASQ", "REDIRECT", "RETURN", "-l", "-t",
              "0x01", "0x10", "-m", "+1", "-o", "'", '"', "$X", "$(x)", "\\", ";", "if",
              "then", "fi", "for", "do", "done", "{", "}", "(", ")", "portfw", "-a"]


@pytest.mark.parametrize("text", [
    "f()",                                  # a function header at the end of input
    "ipchains -A input -p tcp -j REDIR 80",  # a number as the very last word
    "ipchains -A input -s '192.0.2.1",       # an unterminated quote: unreadable
])
def test_inputs_that_once_broke(text):
    for fmt in ("iptables", "nft"):
        status, out, err = run_tool(["--to=" + fmt], stdin=text)
        assert "internal error" not in err and status in (0, 1, 2)


@pytest.mark.parametrize("fmt", ["iptables", "iptables-restore", "nft"])
def test_no_traceback_on_random_input(fmt):
    rng = random.Random(4)
    for _ in range(300):
        lines = []
        for _ in range(rng.randint(1, 4)):
            prog = rng.choice(["ipchains", "$IPCHAINS", "ipmasqadm", "echo"])
            lines.append(" ".join([prog] + [rng.choice(FUZZ_WORDS)
                                            for _ in range(rng.randint(0, 9))]))
        status, out, err = run_tool(["--to=" + fmt], stdin="\n".join(lines) + "\n")
        assert "internal error" not in err, (lines, err)
        assert status in (0, 1, 2)


# ---------------------------------------------------------------- manual page


MAN = os.path.join(ROOT, "man", "ipchains-translate.8")


def test_man_page_is_quiet_under_groff():
    if shutil.which("groff") is None:
        missing("groff is not installed")
    proc = subprocess.run(["groff", "-man", "-ww", "-z", MAN], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stderr == ""


def test_man_page_documents_every_option_in_order():
    text = open(MAN).read()
    options = text.split(".SH OPTIONS")[1].split(".SH FORMATS")[0]
    documented = re.findall(r"^\.(?:TP\n)?\.(?:B|BR|BI) \\?(-[-\\\w]+)", options, re.M)
    documented = [d.replace("\\", "") for d in documented]
    parser = cli.build_parser()
    for action in parser._actions:
        longs = [o for o in action.option_strings if o.startswith("--")]
        name = (longs or action.option_strings or [None])[0]
        if name is None:
            continue
        shorts = [o for o in action.option_strings if not o.startswith("--")]
        assert any(o in documented for o in action.option_strings), name
        del shorts
    keys = [d.lstrip("-").lower() for d in documented]
    assert keys == sorted(keys), "options are not alphabetical: %s" % keys
    for section in ("FORMATS", "SEMANTICS", "WHAT CANNOT BE TRANSLATED", "EXAMPLES",
                    "EXIT STATUS", "SEE ALSO"):
        assert ".SH " + section in text
    for ref in ("tproxy (8)", "iptables (8)", "nft (8)", "iptables\\-restore (8)"):
        assert ".BR " + ref in text
    assert "REDIR 12970" in text


def need_check_tools():
    if os.geteuid() != 0:
        pytest.skip("--check needs root")
    if shutil.which("unshare") is None:
        missing("--check needs unshare(1)")


@pytest.mark.parametrize("fmt", ["iptables", "iptables-restore", "nft"])
def test_check_loads_in_a_private_namespace(fmt):
    need_check_tools()
    status, out, err = run_tool(["--to=" + fmt, "--check", "-e",
                                 "-A input -p tcp -s 192.0.2.0/24 -d 0/0 80 -j REDIRECT 3128"])
    assert status == 0, err
    assert "check: the kernel accepts the ruleset" in err


def test_check_reports_a_refusal():
    need_check_tools()
    ok, message = cli.check("*filter\n-A NOCHAIN -j ACCEPT\nCOMMIT\n", "iptables-restore")
    assert not ok and "refuses" in message
    ok, message = cli.check("table ip t {\n\tchain c {\n\t\tjump nowhere\n\t}\n}\n", "nft")
    assert not ok and "refuses" in message


MASQ_SCRIPT = ("ipchains -A forward -s 192.0.2.0/24 -j MASQ\n"
               "ipchains -A output -s 192.0.2.0/24 -j DENY\n"
               "ipchains -A output -s 198.51.100.1 -j ACCEPT\n"
               "ipchains -A output -s ! 198.51.100.1 -j REJECT\n")


def om_chain(text):
    return text.split("chain om-output {")[1].split("}")[0]


def test_output_source_tests_of_masqueraded_packets_use_masq_source():
    result = nft(MASQ_SCRIPT, masq_source="198.51.100.1")
    om = om_chain(result.text)
    # 2.2 saw 198.51.100.1 as the source: not the inside net, yes the router.
    assert "192.0.2.0/24" not in om
    assert om.count("comment") == 1 and "accept" in om
    assert "ip saddr 192.0.2.0/24 drop" in result.text.split("chain out-output {")[1]


def test_output_source_tests_of_masqueraded_packets_warned_without_masq_source():
    # Fail closed (issue 11): without --masq-source the translation differs
    # from 2.2 for masqueraded packets, so it is a warning and exit 1.
    result = nft(MASQ_SCRIPT)
    assert "ip saddr 192.0.2.0/24 drop" in om_chain(result.text)
    warnings = [d for d in result.diags if "--masq-source" in d.message]
    assert len(warnings) == 3 and result.status == 1
    assert all(d.level == "warning" for d in warnings)


def test_bytes_that_are_not_utf8_pass_through(tmp_path):
    script = tmp_path / "latin1.sh"
    script.write_bytes(b"# caf\xe9\nipchains -A input -s \xff -j DENY\nipchains -A input -j DENY\n")
    proc = subprocess.run([sys.executable, "-m", "translate", "--to=iptables", str(script)],
                          cwd=ROOT, capture_output=True, timeout=60,
                          env=dict(os.environ, PYTHONIOENCODING="ascii", LC_ALL="C"))
    assert proc.returncode == 1 and b"internal error" not in proc.stderr
    assert b"# caf\xe9\n" in proc.stdout and b"bad address" in proc.stderr
