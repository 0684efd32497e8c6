"""The translator and every golden file, checked against the hand-written Linux 2.2 table.

expectations.py says what 2.2 did with each target in each place a packet
met it, citing the 2.2 source; these tests translate small scripts and read
the golden files, and compare.  The golden files are our own output, so they
are checked here rather than trusted.
"""
import os
import re

import pytest

import expectations as ex
import verdicts
from xlate_helpers import CASES, case_names, run_tool

# Where each context is reached: the built-in chain a rule is added to, and
# commands that make the translator emit that context.
REACH = {
    "in": ("input", []), "fi": ("input", []), "fw": ("forward", []),
    "out": ("output", []), "fo": ("output", []),
    "mr": ("input", ["-P forward MASQ"]), "om": ("output", ["-P forward MASQ"]),
    "rd": ("input", ["-A input -p tcp -d 203.0.113.80 80 -j REDIRECT 3128"]),
    "pf": ("input", ["ipmasqadm portfw -a -P tcp -L 198.51.100.1 80 -R 192.0.2.80 8080"]),
}
BUILTIN_TARGETS = ("ACCEPT", "DENY", "REJECT", "MASQ", "REDIRECT", "RETURN")
POLICY_CONTEXTS = {chain: [c for c, p in ex.POLICY_CHAINS.items() if p == chain]
                   for chain in set(ex.POLICY_CHAINS.values())}


def translate_lines(tmp_path, lines, fmt):
    """Translate LINES as file expect.sh: ipchains arguments, or whole ipmasqadm commands."""
    script = tmp_path / "expect.sh"
    script.write_text("".join("%s\n" % line if line.startswith("ipmasqadm ")
                              else "ipchains %s\n" % line for line in lines))
    return run_in(tmp_path, ["--to=" + fmt, "expect.sh"])


def run_in(directory, argv):
    """Run the tool with ARGV from DIRECTORY, so origins name the file as given."""
    cwd = os.getcwd()
    os.chdir(str(directory))
    try:
        return run_tool(argv)
    finally:
        os.chdir(cwd)


def portfw_script(tmp_path, commands):
    """Translate ipmasqadm portfw COMMANDS to nft; return (status, text)."""
    script = tmp_path / "pf.sh"
    script.write_text("".join("ipmasqadm portfw %s\n" % c for c in commands))
    status, out, err = run_in(tmp_path, ["--to=nft", "pf.sh"])
    return status, out


def rules_of(text, chain, origin=None):
    """Return the nft rule bodies of CHAIN (those from ORIGIN when given)."""
    return [body for name, body, where in verdicts.nft_rules(text)
            if name == chain and (origin is None or where == origin)]


def iptables_targets(text, chain, origin):
    """Return the target words of the iptables-restore rules of CHAIN from ORIGIN."""
    return [words for table, name, where, words in verdicts.iptables_rules(text)
            if name == chain and where == origin]


def rule_for(target, context=None):
    """Return an ipchains rule spec with TARGET that the target accepts in CONTEXT."""
    if target == "REDIRECT":
        return "-p tcp -d 203.0.113.9 8080 -j REDIRECT 3128"
    if context == "om":
        # A source test in output saw the masquerading address on 2.2: without
        # --masq-source it is refused (a warning), so test the destination.
        return "-d 198.51.100.99 -j %s" % target
    return "-s 198.51.100.99 -j %s" % target


# ---------------------------------------------------------------- (a) the translator


@pytest.mark.parametrize("row", [r for r in ex.TARGETS if r.nft is not None],
                         ids=lambda r: "%s-%s" % (r.target, r.context))
def test_target_in_context_gives_the_2_2_verdict(tmp_path, row):
    builtin, setup = REACH[row.context]
    lines = setup + ["-A %s %s" % (builtin, rule_for(row.target, row.context))]
    origin = "expect.sh:%d" % len(lines)
    chain = "%s-%s" % (row.context, builtin)
    status, nft, err = translate_lines(tmp_path, lines, "nft")
    assert status == 0, err
    bodies = rules_of(nft, chain, origin)
    assert bodies and all(b == row.nft or b.endswith(" " + row.nft) for b in bodies), (
        "%s in %s: 2.2 gave '%s' (%s); translated: %r" % (row.target, chain, row.verdict,
                                                          row.cite, bodies))
    status, restore, err = translate_lines(tmp_path, lines, "iptables-restore")
    targets = iptables_targets(restore, chain, origin)
    assert targets and targets[-1] == row.iptables, (row.cite, targets)


@pytest.mark.parametrize("row", [r for r in ex.TARGETS if r.nft is None],
                         ids=lambda r: "%s-%s" % (r.target, r.context))
def test_target_refused_where_2_2_did_not_allow_it(tmp_path, row):
    builtin, setup = REACH[row.context]
    # A user chain reached only from the refused place: the chain itself is fine.
    lines = setup + ["-N u", "-A u %s" % rule_for(row.target), "-A %s -j u" % builtin]
    status, nft, err = translate_lines(tmp_path, lines, "nft")
    assert status == 1 and "is only valid in" in err, (row.cite, err)
    assert "expect.sh:%d: error:" % (len(setup) + 2) in err


@pytest.mark.parametrize("policy", ["DENY", "REJECT"])
def test_script_format_policy_reaches_every_policy_chain(tmp_path, policy):
    """In the script format, -P input/output sets the policy chain of every
    context of that chain (masqueraded replies, port-forwarded packets, the
    output stage of forwarded packets too) with the table's verdict, as the
    flat formats do."""
    lines = ["-P forward MASQ", REACH["pf"][1][0], "-P input %s" % policy,
             "-P output %s" % policy]
    status, script, err = translate_lines(tmp_path, lines, "iptables")
    assert status == 0, err
    for ctx, chain in ex.POLICY_CHAINS.items():
        builtin = REACH[ctx][0]
        if builtin == "forward":
            continue
        origin = "expect.sh:%d" % (3 if builtin == "input" else 4)
        targets = iptables_targets(script, chain, origin)
        row = ex.expect(policy, ctx)
        assert targets == [row.iptables], (chain, ctx, row.cite, targets)


@pytest.mark.parametrize("example", ex.EXAMPLES, ids=lambda e: e.name)
def test_example_rule(tmp_path, example):
    status, nft, err = translate_lines(tmp_path, example.commands, "nft")
    assert status == 0, err
    bodies = rules_of(nft, example.chain)
    assert example.nft in bodies, "%s: 2.2 gave '%s' (%s); %s has %r" % (
        example.name, example.verdict, example.cite, example.chain, bodies)


@pytest.mark.parametrize("case", ex.OM_PORTS, ids=lambda c: c.ports)
def test_masqueraded_source_port_is_one_of_2_2s(tmp_path, case):
    """A source port test in output is decided for masqueraded packets by
    the ports 2.2 masqueraded from; forwarded packets keep the test."""
    lines = ["-P forward MASQ", "-A output -p tcp -s 0/0 %s -j DENY" % case.ports]
    status, nft, err = translate_lines(tmp_path, lines, "nft")
    assert rules_of(nft, "fo-output", "expect.sh:2") == [
        "meta l4proto tcp tcp sport %s drop" % case.ports.replace(":", "-").replace("! ", "!= ")]
    om = rules_of(nft, "om-output", "expect.sh:2")
    if case.om_rule == "untranslated":
        assert om == [] and "expect.sh:2: warning:" in err and status != 0, (case.cite, err)
    else:
        assert status == 0, err
        assert om == ([case.om_rule] if case.om_rule else []), (case.cite, om)


def portfw_tuples(text):
    """Return the port forwards of a translation as (proto, laddr, lport, raddr, rport)."""
    out = []
    for body in rules_of(text, "portfw"):
        m = re.match(r"meta l4proto (\w+) ip daddr (\S+) \w+ dport (\d+) "
                     r"fib daddr type local ct mark set ct mark \| 0x20000000 dnat to (\S+):(\d+)$", body)
        assert m, body
        out.append((m.group(1), m.group(2), int(m.group(3)), m.group(4), int(m.group(5))))
    return out


@pytest.mark.parametrize("example", ex.PORTFW, ids=lambda e: e.name)
def test_portfw(tmp_path, example):
    status, nft = portfw_script(tmp_path, example.commands)
    assert status == example.status, example.cite
    assert sorted(portfw_tuples(nft)) == sorted(example.remaining), example.cite


def test_portfw_delete_in_place_removes_what_was_added(tmp_path):
    """In the script format, a delete becomes one iptables -D per forward it
    removes, each the very rule its -a added (so iptables finds it)."""
    script = tmp_path / "pf.sh"
    script.write_text("ipmasqadm portfw -a -P udp -L 198.51.100.1 53 -R 192.0.2.53 53\n"
                      "ipmasqadm portfw -a -P udp -L 198.51.100.1 53 -R 192.0.2.53 53\n"
                      "ipmasqadm portfw -a -P udp -L 198.51.100.1 53 -R 192.0.2.54 53\n"
                      "ipmasqadm portfw -d -P udp -L 198.51.100.1 53\n")
    status, out, err = run_in(tmp_path, ["--to=iptables", "pf.sh"])
    assert status == 0, err
    # iptables commands, or lines of an iptables-restore batch (a here-document).
    added = re.findall(r"(?:^| )-A portfw (.*)$", out, re.M)
    deleted = re.findall(r"(?:^| )-D portfw (.*)$", out, re.M)
    assert len([a for a in added if "-j DNAT" in a]) == 2 and sorted(deleted) == sorted(added)


def test_forwards_sharing_a_local_end_are_noted(tmp_path):
    script = tmp_path / "pf.sh"
    script.write_text("ipmasqadm portfw -a -P tcp -L 198.51.100.1 80 -R 192.0.2.80 8080\n"
                      "ipmasqadm portfw -a -P tcp -L 198.51.100.1 80 -R 192.0.2.81 8080\n")
    status, out, err = run_in(tmp_path, ["--to=nft", "pf.sh"])
    assert status == 0
    assert err.startswith("pf.sh:2: note: 2.2 shared the connections to tcp 198.51.100.1:80 "
                          "among its forwards; netfilter sends them all to the first (pf.sh:1)")


def test_table_covers_every_target_and_context():
    """Every target and every context the translator emits has a row."""
    targets = {r.target for r in ex.TARGETS}
    assert targets >= {"ACCEPT", "DENY", "REJECT", "MASQ", "REDIRECT", "RETURN"}
    contexts = {r.context for r in ex.TARGETS}
    assert contexts >= set(REACH)
    for target in ("ACCEPT", "DENY", "REJECT"):
        assert {r.context for r in ex.TARGETS if r.target == target} >= set(REACH), target
    names = " ".join(e.name for e in ex.EXAMPLES)
    for needed in ("user chain", "RETURN", "policy", "MASQ", "REDIRECT", "masqueraded replies"):
        assert needed in names, needed
    assert {e.name.split()[0] for e in ex.PORTFW} >= {"add", "delete", "flush"}


# ---------------------------------------------------------------- (b) the golden files


def case_targets(name):
    """Return {line: target} of the rules and policies of golden case NAME, read from its text."""
    with open(os.path.join(CASES, name + ".ipchains")) as f:
        lines = f.read().split("\n")
    out = {}
    for number, line in enumerate(lines, 1):
        text = line.split("#", 1)[0]
        policy = re.search(r"(?:\s-P\s+\S+|^:\S+)\s+(ACCEPT|DENY|REJECT|MASQ)\b", text)
        jump = re.search(r"\s-j\s+(\S+)", text)
        if policy:
            out[number] = ("policy", policy.group(1))
        elif jump:
            target = jump.group(1)
            out[number] = ("rule", "REDIRECT" if target == "REDIR" else target)
    return out


def golden_mismatches(name):
    """Yield a line for each rule of golden NAME.nft whose verdict the table contradicts."""
    with open(os.path.join(CASES, name + ".nft")) as f:
        text = f.read()
    targets = case_targets(name)
    prefix = name + ".ipchains:"
    for chain, body, origin in verdicts.nft_rules(text):
        if not origin.startswith(prefix):
            continue
        kind_target = targets.get(int(origin[len(prefix):]))
        if kind_target is None:
            continue
        kind, target = kind_target
        if kind == "policy":
            contexts = POLICY_CONTEXTS.get(chain, [])
        else:
            ctx = chain.split("-", 1)[0]
            contexts = [ctx] if ctx in REACH else []
        for ctx in contexts:
            row = ex.expect(target, ctx)
            if kind == "rule" and target not in BUILTIN_TARGETS:
                want = "jump %s-%s" % (ctx, target)       # a user chain
            elif row is not None and row.nft is not None:
                want = row.nft
            else:
                continue
            if not (body == want or body.endswith(" " + want)):
                yield "%s %s (%s in %s): has '%s', 2.2: '%s' [%s]" % (
                    chain, origin, target, ctx, body, want, row.cite if row else "ip_fw.c branch")


@pytest.mark.parametrize("name", case_names())
def test_golden_verdicts_agree_with_the_table(name):
    bad = list(golden_mismatches(name))
    assert not bad, "\n".join(bad)


def golden_portfw(name):
    """Return the port forwards golden case NAME leaves, simulated from its text by the table's rules."""
    with open(os.path.join(CASES, name + ".ipchains")) as f:
        lines = f.read().split("\n")
    left = []
    for line in lines:
        words = line.split("#", 1)[0].split()
        if words[:2] != ["ipmasqadm", "portfw"]:
            continue
        op = words[2]
        if op == "-f":
            left = []
            continue
        proto = words[words.index("-P") + 1]
        i = words.index("-L")
        laddr, lport = words[i + 1], int(words[i + 2])
        raddr, rport = "", 0
        if "-R" in words:
            j = words.index("-R")
            raddr, rport = words[j + 1], int(words[j + 2])
        entry = (proto, laddr, lport, raddr, rport)
        if op == "-a":
            if entry not in left:
                left.append(entry)
        else:
            left = [e for e in left if not ex.portfw_deletes(entry, e)]
    return left


@pytest.mark.parametrize("name", [n for n in case_names() if "ipmasqadm portfw" in
                                  open(os.path.join(CASES, n + ".ipchains")).read()])
def test_golden_port_forwards_agree_with_the_table(name):
    with open(os.path.join(CASES, name + ".nft")) as f:
        assert sorted(portfw_tuples(f.read())) == sorted(golden_portfw(name))
