"""Pure emitters for iptables: argument lists, iptables-restore text, shell commands.

Each match, statement and verdict kind has one small function returning its
words.  iptables has one target per rule, so a rule with statements (log,
mark, TOS, copy) becomes one rule per statement, each with the same
matches, followed by the verdict rule.  Words that are ``Raw`` (shell
expansions) are written as they are in the shell format.
"""
import re
import shlex

from .ir import (MAddr, MConn, MFrag, MIcmp, MIface, MLocal, MMark, MPorts, MProto, MSyn,
                 NfRule, Raw, SCopy, SLog, SMark, STos, Untranslated)

TABLE_ORDER = ("filter", "nat", "mangle")
PLAIN_WORD = re.compile(r"[\w\-./:,!+*=@%]+")


def _neg(neg, words):
    return (["!"] + words) if neg else words


def ports_text(ports):
    """Return a port range as iptables writes it ('80' or '1024:65535')."""
    if ports.raw is not None:
        return ports.raw
    return str(ports.lo) if ports.lo == ports.hi else "%d:%d" % (ports.lo, ports.hi)


def m_iface(m):
    return _neg(m.neg, ["-i" if m.dir == "in" else "-o", m.name])


def m_proto(m):
    return _neg(m.neg, ["-p", m.proto])


def m_addr(m):
    if m.orig or m.reply:
        opt = "--ct%s%s" % ("repl" if m.reply else "orig", "src" if m.dir == "s" else "dst")
        return ["-m", "conntrack"] + _neg(m.neg, [opt, m.net])
    return _neg(m.neg, ["-s" if m.dir == "s" else "-d", m.net])


def m_ports(m):
    if m.orig or m.reply:
        opt = "--ct%s%sport" % ("repl" if m.reply else "orig", "src" if m.dir == "s" else "dst")
        return ["-m", "conntrack"] + _neg(m.ports.neg, [opt, ports_text(m.ports)])
    opt = "--sport" if m.dir == "s" else "--dport"
    return _neg(m.ports.neg, [opt, ports_text(m.ports)])


def m_icmp(m):
    value = m.type if m.code is None else "%s/%s" % (m.type, m.code)
    return _neg(m.neg, ["--icmp-type", value])


def m_syn(m):
    return _neg(m.neg, ["--tcp-flags", "SYN,RST,ACK", "SYN"])


def m_frag(m):
    return _neg(m.neg, ["-f"])


def m_conn(m):
    return ["-m", "conntrack", "--ctstate", m.state, "--ctdir", m.dir]


def m_mark(m):
    return ["-m", "connmark" if m.ct else "mark", "--mark", "0x%x/0x%x" % (m.value, m.value)]


def m_local(m):
    return ["-m", "addrtype", "--dst-type", "LOCAL"]


MATCHES = {MIface: m_iface, MProto: m_proto, MAddr: m_addr, MPorts: m_ports,
           MIcmp: m_icmp, MSyn: m_syn, MFrag: m_frag, MConn: m_conn, MMark: m_mark,
           MLocal: m_local}


def s_log(s):
    return ["-j", "LOG", "--log-prefix", s.prefix]


def s_mark(s):
    if s.ct:
        mask = 0xFFFFFFFF if s.op == "=" else s.value
        return ["-j", "CONNMARK", "--set-xmark", "0x%x/0x%x" % (s.value, mask)]
    return ["-j", "MARK", "--set-mark" if s.op == "=" else "--or-mark", "0x%x" % s.value]


def s_tos(s):
    return ["-j", "TOS", "--set-tos", "0x%02x/0x%02x" % (s.xor_mask, ~s.and_mask & 0xFF)]


def s_copy(s):
    return ["-j", "NFLOG", "--nflog-group", "0"] + (
        ["--nflog-size", str(s.size)] if s.size else [])


STATEMENTS = {SLog: s_log, SMark: s_mark, STos: s_tos, SCopy: s_copy}

REJECT_WITH = {"port-unreach": "icmp-port-unreachable", "host-unreach": "icmp-host-unreachable",
               "tcp-reset": "tcp-reset"}


def verdict_words(v):
    """Return the target words of Verdict V (empty for count-only rules)."""
    kind = v.kind
    if kind is None:
        return []
    if kind in ("accept", "drop", "return"):
        return ["-j", kind.upper()]
    if kind == "reject":
        return ["-j", "REJECT", "--reject-with", REJECT_WITH[v.arg]]
    if kind == "jump":
        return ["-j", v.arg]
    if kind == "goto":
        return ["-g", v.arg]
    if kind == "redirect":
        return ["-j", "REDIRECT"] + (["--to-ports", str(v.arg)] if v.arg else [])
    if kind == "tproxy":
        return ["-j", "TPROXY", "--on-port", str(v.arg or 0),
                "--tproxy-mark", "0x%x/0x%x" % (v.mark, v.mark)]
    if kind == "masquerade":
        return ["-j", "MASQUERADE"] + (["--to-ports", v.arg] if v.arg else [])
    if kind == "dnat":
        return ["-j", "DNAT", "--to-destination", v.arg]
    raise ValueError("unknown verdict %r" % kind)


def match_words(nf):
    """Return the words of all matches of NF, in order."""
    words = []
    for m in nf.matches:
        words.extend(MATCHES[type(m)](m))
    return words


def rule_args(nf):
    """Return one argument list per iptables rule needed for NfRule NF."""
    base = match_words(nf)
    comment = ["-m", "comment", "--comment", nf.origin] if nf.origin else []
    out = [base + comment + STATEMENTS[type(s)](s) for s in nf.stmts]
    target = verdict_words(nf.verdict)
    if target or not nf.stmts:
        out.append(base + comment + target)
    return out


# ---------------------------------------------------------------- iptables-restore


def restore_word(word, _cache={}):
    """Quote WORD for iptables-restore (double quotes when needed)."""
    quoted = _cache.get(word)
    if quoted is None:
        if PLAIN_WORD.fullmatch(word):
            quoted = word
        else:
            quoted = '"%s"' % word.replace("\\", "\\\\").replace('"', "'")
        if len(_cache) < 100000:
            _cache[word] = quoted
    return quoted


def render_restore(plan, header=()):
    """Return PLAN as iptables-restore input (loadable more than once)."""
    lines = ["# %s" % h for h in header] + plan.header_comments()
    for table in TABLE_ORDER:
        chains = plan.tables.get(table)
        if not chains:
            continue
        lines.append("*%s" % table)
        for chain in chains.values():
            policy = chain.base[1] if chain.base else "-"
            lines.append(":%s %s [0:0]" % (chain.name, policy))
        for chain in chains.values():
            for entry in chain.entries:
                if isinstance(entry, Untranslated):
                    lines.append(entry.comment())
                    continue
                for args in rule_args(entry):
                    lines.append(" ".join(["-A", chain.name] + [restore_word(w) for w in args]))
        lines.append("COMMIT")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- shell commands


def shell_word(word):
    """Quote WORD for sh; Raw words (expansions) are kept as written."""
    if isinstance(word, Raw):
        return str(word)
    return shlex.quote(word)


def command(table, args, prog="iptables"):
    """Return one iptables command line for TABLE with ARGS."""
    words = [prog] + (["-t", table] if table != "filter" else []) + list(args)
    return " ".join(shell_word(w) for w in words)


def append_commands(table, chain, nf, op="-A", num=None):
    """Return the commands adding NfRule NF to CHAIN (op -A, -I or -D)."""
    out = []
    for args in rule_args(nf):
        pos = [str(num)] if num is not None else []
        out.append(command(table, [op, chain] + pos + args))
    return out


def skeleton_commands(plan):
    """Return the commands that reset the tables and build PLAN's chains and rules."""
    out = []
    for table in TABLE_ORDER:
        chains = plan.tables.get(table)
        if not chains:
            continue
        out.append(command(table, ["-F"]))
        out.append(command(table, ["-X"]))
        for chain in chains.values():
            if chain.base:
                out.append(command(table, ["-P", chain.name, chain.base[1]]))
            else:
                out.append(command(table, ["-N", chain.name]))
        for chain in chains.values():
            for entry in chain.entries:
                if isinstance(entry, NfRule):
                    out.extend(append_commands(table, chain.name, entry))
    return out
