"""Pure emitter for nftables: one small function per match, statement and verdict.

The output is a complete ``nft -f`` file: it declares the table, deletes it
and declares it again with every chain, so loading it twice leaves one copy.
Netfilter's tables become base chains of one ``ip`` table: filter chains
keep their names (INPUT, FORWARD, OUTPUT), the others are prefixed with their
table (nat-PREROUTING, mangle-INPUT, ...).
"""
from .ir import (MAddr, MConn, MFrag, MIcmp, MIface, MLocal, MMark, MPorts, MProto, MSocket,
                 MSyn, SCopy, SLog, SMark, STos, Untranslated, printable)

HOOKS = {
    # (table, chain): (type, hook, priority)
    ("filter", "INPUT"): ("filter", "input", "filter"),
    ("filter", "FORWARD"): ("filter", "forward", "filter"),
    ("filter", "OUTPUT"): ("filter", "output", "filter"),
    ("nat", "PREROUTING"): ("nat", "prerouting", "dstnat"),
    ("nat", "POSTROUTING"): ("nat", "postrouting", "srcnat"),
    ("mangle", "PREROUTING"): ("filter", "prerouting", "mangle"),
    ("mangle", "INPUT"): ("filter", "input", "mangle"),
    ("mangle", "FORWARD"): ("filter", "forward", "mangle"),
    ("mangle", "OUTPUT"): ("route", "output", "mangle"),
}
TABLE_ORDER = ("filter", "nat", "mangle")


def quote(text):
    """Return TEXT as an nft string (nft strings cannot hold double quotes)."""
    return '"%s"' % printable(text).replace('"', "'")


def _op(neg):
    return "!= " if neg else ""


def m_iface(m):
    name = m.name[:-1] + "*" if m.name.endswith("+") else m.name
    return "%s %s%s" % ("iifname" if m.dir == "in" else "oifname", _op(m.neg), quote(name))


def m_proto(m):
    return "meta l4proto %s%s" % (_op(m.neg), m.proto)


def addr_text(net):
    """Return an address; a /32 is written as a plain host address."""
    return net[:-3] if net.endswith("/32") else net


def m_addr(m):
    field = "saddr" if m.dir == "s" else "daddr"
    if m.orig or m.reply:
        return "ct %s ip %s %s%s" % ("reply" if m.reply else "original", field, _op(m.neg),
                                     addr_text(m.net))
    return "ip %s %s%s" % (field, _op(m.neg), addr_text(m.net))


def ports_text(ports):
    """Return a port range as nft writes it ('80' or '1024-65535')."""
    return str(ports.lo) if ports.lo == ports.hi else "%d-%d" % (ports.lo, ports.hi)


def m_ports(m):
    if m.orig or m.reply:
        key = "proto-src" if m.dir == "s" else "proto-dst"
        return "ct %s %s %s%s" % ("reply" if m.reply else "original", key, _op(m.ports.neg),
                                  ports_text(m.ports))
    proto = m.proto if m.proto in ("tcp", "udp") else "th"
    return "%s %s %s%s" % (proto, "sport" if m.dir == "s" else "dport",
                           _op(m.ports.neg), ports_text(m.ports))


def m_icmp(m):
    text = "icmp type %s%s" % (_op(m.neg), str(m.type).replace(":", "-"))
    if m.code is not None:
        text += " icmp code %s" % m.code
    return text


def m_syn(m):
    return "tcp flags & (syn | rst | ack) %s syn" % ("!=" if m.neg else "==")


def m_frag(m):
    return "ip frag-off & 0x1fff %s 0" % ("==" if m.neg else "!=")


def m_conn(m):
    return "ct status %s ct direction %s" % (m.state.lower(), m.dir.lower())


def m_mark(m):
    return "%s mark & 0x%08x == 0x%08x" % ("ct" if m.ct else "meta", m.value, m.value)


def m_local(m):
    return "fib daddr type local"


def m_socket(m):
    return "socket transparent %d" % (1 if m.transparent else 0)


MATCHES = {MIface: m_iface, MProto: m_proto, MAddr: m_addr, MPorts: m_ports,
           MIcmp: m_icmp, MSyn: m_syn, MFrag: m_frag, MConn: m_conn, MMark: m_mark,
           MLocal: m_local, MSocket: m_socket}


def s_log(s):
    return "log prefix %s" % quote(s.prefix)


def s_mark(s):
    what = "ct mark" if s.ct else "meta mark"
    if s.op == "=":
        return "%s set 0x%08x" % (what, s.value)
    return "%s set %s | 0x%08x" % (what, what, s.value)


def s_tos(s):
    return "ip dscp set 0x%02x" % (s.xor_mask >> 2)


def s_copy(s):
    return "log group 0" + (" snaplen %d" % s.size if s.size else "")


STATEMENTS = {SLog: s_log, SMark: s_mark, STos: s_tos, SCopy: s_copy}

REJECT_WITH = {"port-unreach": "reject with icmp type port-unreachable",
               "host-unreach": "reject with icmp type host-unreachable",
               "tcp-reset": "reject with tcp reset"}


def verdict_text(v):
    """Return the verdict of Verdict V ('' for count-only rules)."""
    kind = v.kind
    if kind in ("accept", "drop", "return"):
        return kind
    if kind == "reject":
        return REJECT_WITH[v.arg]
    if kind in ("jump", "goto"):
        return "%s %s" % (kind, v.arg)
    if kind == "redirect":
        return "redirect to :%d" % v.arg if v.arg else "redirect"
    if kind == "tproxy":
        # nft tproxy is not terminal: mark for the policy routing, then accept.
        return "tproxy to :%d meta mark set meta mark | 0x%08x accept" % (v.arg or 0, v.mark)
    if kind == "masquerade":
        return "masquerade to :%s" % v.arg if v.arg else "masquerade"
    if kind == "dnat":
        return "dnat to %s" % v.arg
    return ""


def rule_text(nf, memo=None):
    """Return NfRule NF as one nft rule line.

    MEMO, kept over one render, holds the text of each match tuple (by
    identity: the plan keeps the tuples alive), which a rule repeats in
    several contexts.
    """
    if memo is None:
        parts = [MATCHES[type(m)](m) for m in nf.matches]
    else:
        text = memo.get(id(nf.matches))
        if text is None:
            text = memo[id(nf.matches)] = " ".join(MATCHES[type(m)](m) for m in nf.matches)
        parts = [text] if text else []
    parts += [STATEMENTS[type(s)](s) for s in nf.stmts]
    verdict = verdict_text(nf.verdict)
    if verdict:
        parts.append(verdict)
    elif not nf.stmts:
        parts.append("counter")
    if nf.origin:
        parts.append("comment %s" % quote(nf.origin[:120]))
    return " ".join(parts)


def chain_name(table, name):
    """Return the nft name of netfilter chain NAME of TABLE."""
    if (table, name) in HOOKS and table != "filter":
        return "%s-%s" % (table, name)
    return name


def render(plan, table_name="ipchains", header=()):
    """Return PLAN as an nft -f file (loadable twice: the table is replaced)."""
    lines = (["#!/usr/sbin/nft -f"] + ["# %s" % printable(h) for h in header] +
             plan.header_comments())
    lines += ["table ip %s" % table_name, "delete table ip %s" % table_name,
              "table ip %s {" % table_name]
    first = True
    memo = {}
    for table in TABLE_ORDER:
        for chain in plan.tables.get(table, {}).values():
            if not first:
                lines.append("")
            first = False
            lines.append("\tchain %s {" % chain_name(table, chain.name))
            if chain.base:
                kind, hook, prio = HOOKS[(table, chain.name)]
                policy = chain.base[1].lower()
                lines.append("\t\ttype %s hook %s priority %s; policy %s;"
                             % (kind, hook, prio, policy))
            for entry in chain.entries:
                if isinstance(entry, Untranslated):
                    lines.append("\t\t" + entry.comment())
                else:
                    lines.append("\t\t" + rule_text(entry, memo))
            lines.append("\t}")
    lines.append("}")
    return "\n".join(lines) + "\n"
