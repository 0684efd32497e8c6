"""ipchains chain semantics -> netfilter placement.

ipchains and netfilter see packets at different places.  ipchains ``input``
saw every arriving packet, ``output`` every leaving one, and a forwarded
packet crossed input, then forward, then output.  netfilter's INPUT and
OUTPUT see only local traffic.  So every ipchains chain is emitted once per
*context* it is reached in, each context a netfilter chain named
``CTX-CHAIN``:

  in-   input, for packets to this host             (filter INPUT)
  rd-   input, for packets REDIRECTed to this host, judged by their
        original destination from conntrack        (filter INPUT, nat mode)
  mr-   input, for replies of masqueraded connections, judged by their
        addresses before de-masquerading (conntrack's reply tuple)
                                                    (filter FORWARD)
  pf-   input, for port-forwarded packets (ipmasqadm portfw), judged by the
        address they arrived for (conntrack's original tuple) (filter FORWARD)
  fi-   input, as the first stage of a forwarded packet    (filter FORWARD)
  fw-   forward, the second stage                           (filter FORWARD)
  out-  output, for local packets                           (filter OUTPUT)
  fo-   output, as the third stage of forwarded packets     (filter FORWARD)
  om-   output, as the third stage of masqueraded packets: 2.2 masqueraded
        before its output chain, so a source address test there is decided
        for the masquerading address (--masq-source), not the inside one
  pre-  input, deciding REDIRECT before routing   (nat or mangle PREROUTING)

In the forward stages ACCEPT means "go on to the next stage" (a goto into
``stage-fw`` / ``stage-out``, which run the next ipchains chain and then its
policy), so verdicts and order are kept.  Every stage ends in its chain's
policy (``pol-*`` chains), so nothing falls through.  MASQ marks the packet
and goes on to the output stage; nat POSTROUTING masquerades marked packets
to 2.2's ports; replies of masqueraded connections meet the input chain by
the addresses and ports they arrived with, skip forward and meet output, as
on 2.2 (ip_rcv ran input, ip_local_deliver de-masqueraded, ip_forward skipped
forward for IPSKB_MASQUERADED packets); port-forwarded packets likewise.
REDIRECT is decided in PREROUTING by a copy of the input chain whose side
effects are dropped, then accepted in INPUT at the rule's own position.  REJECT answers as 2.2 did in each place:
port unreachable from input, host unreachable from forward and from output
for forwarded packets, and no ICMP for local packets (2.2's output chain
made the send fail: a drop).
"""
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from .ipchains import BUILTIN, VERDICTS, Names, ParseError, parse_addresses, parse_ipv4
from .ir import (Diag, MAddr, MConn, MFrag, MIcmp, MIface, MLocal, MMark, MPorts, MProto,
                 MSocket, MSyn, NfRule, Ports, Raw, SCopy, SLog, SMark, STos, Untranslated,
                 Verdict, one_line, printable)

CONTEXT_INFO = {
    # ctx: (built-in chain, interface direction, description)
    "in": ("input", "in", "input, packets to this host"),
    "rd": ("input", "in", "input, redirected packets (original destination)"),
    "mr": ("input", "in", "input, replies of masqueraded connections"),
    "pf": ("input", "in", "input, port-forwarded packets"),
    "fi": ("input", "in", "input, as the first stage of forwarded packets"),
    "fw": ("forward", "out", "forward, the second stage of forwarded packets"),
    "out": ("output", "out", "output, local packets"),
    "fo": ("output", "out", "output, the third stage of forwarded packets"),
    "om": ("output", "out", "output, the third stage of masqueraded packets"),
    "pre": ("input", "in", "input, deciding REDIRECT before routing"),
}
CONTEXT_ORDER = ("in", "rd", "mr", "pf", "fi", "fw", "out", "fo", "om", "pre")
POLICY_CHAIN = {"in": "pol-input", "rd": "pol-input", "mr": "pol-mr-input",
                "pf": "pol-pf-input",
                "fi": "pol-fi-input", "fw": "pol-forward", "out": "pol-output",
                "fo": "pol-fo-output", "om": "pol-fo-output"}
MANGLE_HOOKS = {"in": ("INPUT",), "fi": ("FORWARD",), "fw": ("FORWARD",),
                "out": ("OUTPUT",), "fo": ("FORWARD",)}
# What REJECT sent in each context on 2.2: ip_input.c ip_rcv sent port
# unreachable for the input chain (every arriving packet, forwarded or not);
# ip_forward.c sent host unreachable for the forward chain and for the output
# chain of forwarded packets; ip_output.c only dropped a local packet (or
# failed the send with EPERM), so locally REJECT is a drop.
REJECT_WITH = {"in": "port-unreach", "rd": "port-unreach", "mr": "port-unreach",
               "pf": "port-unreach",
               "fi": "port-unreach", "fw": "host-unreach", "fo": "host-unreach",
               "om": "host-unreach", "out": None}
# 2.2 gave masqueraded connections ports PORT_MASQ_BEGIN..PORT_MASQ_END-1
# (include/net/ip_masq.h, ip_masq.c get_next_mport); input rules meant for
# the replies test them.
MASQ_PORTS = (61000, 65095)
# The connection mark bit of connections a port forward of the script made:
# only they skip the forward chain (a DNAT by another table is forwarded
# traffic like any other).  Masqueraded connections carry the --masq-mark
# bit in their connection mark likewise.
PORTFW_CT_MARK = 0x20000000


@dataclass
class Options:
    """How to translate: output format, REDIRECT mode and the marks used."""

    fmt: str = "iptables-restore"
    redirect: str = "nat"
    masq_mark: int = 0x40000000
    masq_source: Optional[str] = None
    tproxy_mark: int = 0x1
    table: str = "ipchains"
    route_table: int = 100


@dataclass
class PlanChain:
    """One netfilter chain: base (hook, policy) for built-ins; entries in order."""

    name: str
    base: Optional[tuple] = None
    entries: List = field(default_factory=list)


@dataclass
class Plan:
    """The whole netfilter ruleset: tables of chains, plus notes for the header."""

    tables: Dict[str, Dict[str, PlanChain]] = field(default_factory=dict)
    notes: List[str] = field(default_factory=list)
    untranslated: List[Untranslated] = field(default_factory=list)
    accounted: List = field(default_factory=list)    # (SourceRef, why): no rule left

    def header_comments(self):
        """Return the '#' lines a flat format starts with: what is untranslated,
        what else is needed, and which commands left no rule of their own."""
        lines = [u.comment() for u in self.untranslated]
        lines += ["# needed as well: %s" % printable(note) for note in self.notes]
        lines += ["# %s: no rule of its own (%s): %s" % (src, printable(why), one_line(src.text))
                  for src, why in self.accounted]
        return lines

    def chain(self, table, name, base=None):
        """Return chain NAME of TABLE, creating it (and the table) if needed."""
        chains = self.tables.setdefault(table, {})
        if name not in chains:
            chains[name] = PlanChain(name, base)
        return chains[name]

    def add(self, table, name, entry):
        """Append ENTRY (NfRule or Untranslated) to chain NAME of TABLE."""
        self.chain(table, name).entries.append(entry)


@dataclass(frozen=True)
class Features:
    """What the firewall uses, which decides the skeleton."""

    redirect: bool = False
    masq: bool = False
    portfw: bool = False
    redirect_udp: bool = False      # a REDIRECT may take UDP (-p udp, or $PROTO)


class Untranslatable(Exception):
    """This rule cannot be expressed in the target; the message says why."""


class Invalid(Exception):
    """This rule is invalid where it is reached (like REDIRECT from output)."""


def chain_name(ctx, chain):
    """Return the netfilter name of ipchains CHAIN in context CTX."""
    return "%s-%s" % (ctx, chain)


def table_of(ctx, opts):
    """Return the table that holds chains of context CTX."""
    if ctx == "pre":
        return "nat" if opts.redirect == "nat" else "mangle"
    return "filter"


def builtin_contexts(features, opts):
    """Return {built-in chain: [contexts]} for a firewall with FEATURES."""
    inputs = ["in", "fi"]
    if features.redirect:
        inputs = (["in", "rd", "fi", "pre"] if opts.redirect == "nat"
                  else ["in", "fi", "pre"])
    if features.masq:
        inputs.insert(inputs.index("fi"), "mr")
    if features.portfw:
        inputs.insert(inputs.index("fi"), "pf")
    outputs = ["out", "fo", "om"] if features.masq else ["out", "fo"]
    return {"input": inputs, "forward": ["fw"], "output": outputs}


def chain_contexts(graph, features, opts):
    """Return {chain: [contexts]}: a user chain gets those of every caller."""
    result = {}
    for builtin, ctxs in builtin_contexts(features, opts).items():
        todo, seen = [builtin], set()
        for _ in range(len(graph) + 2 * len(BUILTIN) + 1000000):
            if not todo:
                break
            name = todo.pop()
            if name in seen:
                continue
            seen.add(name)
            have = result.setdefault(name, [])
            for ctx in ctxs:
                if ctx not in have:
                    have.append(ctx)
            todo.extend(graph.get(name, ()))
    for name in result:
        result[name].sort(key=CONTEXT_ORDER.index)
    return result


# ---------------------------------------------------------------- matches


class NeverMatches(Exception):
    """The rule cannot match in this context (decided at translation time)."""


def masq_source_test(addr, opts):
    """Return True/False when -s ADDR is decided by the masquerading address, else None."""
    if opts.masq_source is None:
        return None
    text = addr.net
    if isinstance(text, Raw):
        # A shell word: decided only when the script's assignments give its value.
        try:
            nets = parse_addresses(str(text.value), Names(keep_hosts=True)) if text.value else []
        except ParseError:
            nets = []
        if len(nets) != 1 or isinstance(nets[0], Raw):
            return None
        text = nets[0]
    net, _, bits = text.partition("/")
    mask = (0xFFFFFFFF << (32 - int(bits))) & 0xFFFFFFFF
    inside = parse_ipv4(opts.masq_source) & mask == parse_ipv4(net)
    return inside != addr.neg


def masq_port_test(ports):
    """Return True/False when source PORTS of a masqueraded TCP/UDP packet are
    decided by 2.2's masquerading ports (MASQ_PORTS), None when the range cuts them."""
    lo, hi = MASQ_PORTS
    if ports.lo <= lo and ports.hi >= hi:
        return not ports.neg
    if ports.hi < lo or ports.lo > hi:
        return ports.neg
    return None


_SHARED = {}


def shared(cls, *args):
    """Return the frozen match CLS(*ARGS), one object for equal arguments: rules
    repeat the same few protocols, interfaces and addresses, and making a
    frozen dataclass costs more than looking it up (bounded memo).  A Raw
    word equals and hashes like its text but means another thing: never memoized."""
    if Raw in map(type, args):
        return cls(*args)
    key = (cls,) + args
    match = _SHARED.get(key)
    if match is None:
        if len(_SHARED) >= 100000:
            _SHARED.clear()
        match = _SHARED[key] = cls(*args)
    return match


def rule_matches(rule, ctx, opts=None):
    """Return the netfilter matches of RULE in context CTX, in emission order.

    In the 'om' context the source address was the masquerading address on
    2.2: with --masq-source the test is decided here (NeverMatches if false);
    a TCP/UDP source port was one of MASQ_PORTS, so a port test is decided
    here too, or raises Untranslatable when its range cuts them.
    """
    iface_dir = CONTEXT_INFO[ctx][1]
    orig = ctx in ("rd", "pf")
    reply = ctx == "mr"
    saddr = rule.saddr
    if ctx == "om" and saddr is not None and opts is not None:
        decided = masq_source_test(saddr, opts)
        if decided is False:
            raise NeverMatches()
        if decided:
            saddr = None
    sport = rule.sport
    if ctx == "om" and sport is not None and sport.raw is None and rule.proto in ("tcp", "udp"):
        decided = masq_port_test(sport)
        if decided is None:
            raise Untranslatable("source port %s%d:%d of a masqueraded packet: 2.2 tested "
                                 "the port it masqueraded from (%d-%d), which netfilter "
                                 "picks only after the filter rules"
                                 % ("! " if sport.neg else "", sport.lo, sport.hi, *MASQ_PORTS))
        if decided is False:
            raise NeverMatches()
        sport = None
    out = []
    if rule.iface is not None:
        out.append(shared(MIface, iface_dir, rule.iface, rule.iface_neg))
    if rule.proto is not None:
        out.append(shared(MProto, rule.proto, rule.proto_neg))
    if saddr is not None:
        out.append(shared(MAddr, "s", saddr.net, saddr.neg))
    if rule.daddr is not None:
        out.append(shared(MAddr, "d", rule.daddr.net, rule.daddr.neg, orig, reply))
    proto = rule.proto
    if sport is not None:
        out.append(MPorts("s", sport, proto))
    if rule.dport is not None:
        out.append(MPorts("d", rule.dport, proto, orig, reply))
    if rule.icmp_type is not None:
        out.append(MIcmp(rule.icmp_type, rule.icmp_code, rule.icmp_type_neg))
    if rule.syn is not None:
        out.append(MSyn(neg=not rule.syn))
    if rule.frag is not None:
        out.append(MFrag(neg=not rule.frag))
    return tuple(out)


# ---------------------------------------------------------------- statements


def log_prefix(chain, rule):
    """Return the log prefix, like ipchains' 'Packet log: CHAIN TARGET'."""
    target = rule.target or "-"
    if target == "REDIRECT":
        target = "REDIRECT %d" % rule.port
    return ("%s %s " % (chain, target))[:28]


def tos_stmt(rule, opts):
    """Return the STos of RULE; nft can only set the DSCP bits of the byte."""
    and_mask, xor_mask = rule.tos
    if opts.fmt == "nft" and (and_mask & 0xFC or xor_mask & 0x03):
        raise Untranslatable(
            "-t %02x %02x changes more than the DSCP bits; nft can only set "
            "'ip dscp'" % (and_mask, xor_mask))
    return STos(and_mask, xor_mask)


def rule_stmts(rule, chain, opts):
    """Return the side-effect statements of RULE (log first, as ipchains did)."""
    out = []
    if rule.log:
        out.append(SLog(log_prefix(chain, rule)))
    if rule.mark is not None:
        op, value = rule.mark
        if op != "=":
            raise Untranslatable("-m %s%d adds to the mark; netfilter can only set "
                                 "mark bits" % (op, value))
        out.append(SMark("=", value))
    if rule.tos is not None and opts.fmt == "nft":
        out.append(tos_stmt(rule, opts))
    if rule.copy is not None:
        out.append(SCopy(rule.copy))
    return tuple(out)


# ---------------------------------------------------------------- verdicts


def stage_goto(ctx):
    """Return the verdict that continues a forwarded packet after CTX accepts."""
    return Verdict("goto", "stage-fw" if ctx == "fi" else "stage-out")


def verdict_of(rule, chain, ctx, opts):
    """Return (Verdict, extra statements) for RULE's target in context CTX."""
    target = rule.target
    if target is None:
        return Verdict(None), ()
    if target not in VERDICTS:
        return Verdict("jump", chain_name(ctx, target)), ()
    handler = VERDICT_HANDLERS[target]
    return handler(rule, chain, ctx, opts)


def _accept(rule, chain, ctx, opts):
    if ctx in ("fi", "fw", "mr", "pf"):
        return stage_goto(ctx), ()
    return Verdict("accept"), ()


def _deny(rule, chain, ctx, opts):
    if ctx == "pre":
        return Verdict("accept"), ()
    return Verdict("drop"), ()


def reject_verdict(ctx):
    """Return the Verdict of REJECT in context CTX, answering as 2.2 did there."""
    code = REJECT_WITH[ctx]
    return Verdict("reject", code) if code else Verdict("drop")


def _reject(rule, chain, ctx, opts):
    if ctx == "pre":
        return Verdict("accept"), ()
    return reject_verdict(ctx), ()


def _return(rule, chain, ctx, opts):
    return Verdict("return"), ()


def _masq(rule, chain, ctx, opts):
    if ctx == "pre":
        return Verdict("accept"), ()
    if ctx != "fw":
        raise Invalid("MASQ is only valid in forward, but chain '%s' is reached "
                      "from %s" % (chain, CONTEXT_INFO[ctx][0]))
    return Verdict("goto", "stage-om"), (SMark("|", opts.masq_mark),)


def _redirect(rule, chain, ctx, opts):
    if ctx in ("fw", "out", "fo", "om"):
        raise Invalid("REDIRECT is only valid in input, but chain '%s' is reached "
                      "from %s" % (chain, CONTEXT_INFO[ctx][0]))
    if ctx == "pre":
        if opts.redirect == "tproxy":
            return Verdict("tproxy", rule.port, opts.tproxy_mark), ()
        return Verdict("redirect", rule.port), ()
    if ctx == "fi":
        # Only reached when the redirect did not happen (no listener in tproxy
        # mode); 2.2 would have answered from the local stack: refuse.
        return Verdict("reject", "tcp-reset" if rule.proto == "tcp" else "port-unreach"), ()
    if ctx in ("mr", "pf"):
        # 2.2 delivered the packet locally, where ip_local_deliver de-masqueraded
        # it first and forwarded it: the redirect changed nothing.
        return stage_goto(ctx), ()
    return Verdict("accept"), ()


VERDICT_HANDLERS = {"ACCEPT": _accept, "DENY": _deny, "REJECT": _reject,
                    "RETURN": _return, "MASQ": _masq, "REDIRECT": _redirect}


# ---------------------------------------------------------------- one rule


class Translation:
    """RULE in one context: the rules for its chain, extras elsewhere, diagnostics.

    rules and extras ((table, chain, NfRule)) and diags are sequences; a plain
    class with empty tuples, as hundreds of thousands are made and most stay
    empty.
    """

    __slots__ = ("rules", "extras", "diags", "untranslated")

    def __init__(self):
        self.rules = ()
        self.extras = ()
        self.diags = ()
        self.untranslated = None        # an Untranslated when the rule is left out


def translate_rule(rule, chain, ctx, opts, cache=None):
    """Return the Translation of ipchains RULE of CHAIN in context CTX.

    CACHE, a dict kept while one rule is translated in several contexts,
    saves recomputing what does not depend on the context.
    """
    result = Translation()
    cache = {} if cache is None else cache
    origin = cache.get("origin")
    if origin is None:
        origin = cache["origin"] = str(rule.src) if rule.src else ""
    try:
        if rule.icmp_type is not None and ":" in rule.icmp_type and opts.fmt != "nft":
            raise Untranslatable("iptables' icmp match takes one type, not the range "
                                 "'%s' (nft takes it: --to=nft)" % rule.icmp_type)
        verdict, extra = verdict_of(rule, chain, ctx, opts)
        if ctx == "pre":
            stmts = ()
        else:
            if "stmts" not in cache:
                cache["stmts"] = rule_stmts(rule, chain, opts)
            stmts = cache["stmts"] + extra
        if rule.tos is not None and opts.fmt != "nft" and ctx in MANGLE_HOOKS:
            result.extras = tos_extras(rule, ctx, opts, origin)
    except (Untranslatable, Invalid) as exc:
        level = "warning" if isinstance(exc, Untranslatable) else "error"
        result.diags = [Diag(level, rule.src, str(exc))]
        result.untranslated = Untranslated(rule.src, str(exc))
        return result
    if ctx == "pre" and verdict.kind is None:
        return result           # counting only: nothing to decide before routing
    key = (CONTEXT_INFO[ctx][1], ctx if ctx in ("rd", "mr", "pf", "om") else "")
    if key not in cache:
        try:
            cache[key] = rule_matches(rule, ctx, opts)
        except NeverMatches:
            cache[key] = None
        except Untranslatable as exc:
            result.diags = [Diag("warning", rule.src, str(exc))]
            result.untranslated = Untranslated(rule.src, str(exc))
            return result
    matches = cache[key]
    if matches is None:
        return result           # decided while translating: it never matches here
    result.rules = [NfRule(matches, stmts, verdict, origin)]
    return result


def tos_extras(rule, ctx, opts, origin):
    """Return mangle-table rules applying RULE's -t (iptables' TOS is mangle-only)."""
    stmt = tos_stmt(rule, opts)
    out = []
    for hook in MANGLE_HOOKS[ctx]:
        iface_ctx = "in" if ctx in ("in", "fi") else "out"
        out.append(("mangle", hook, NfRule(rule_matches(rule, iface_ctx), (stmt,),
                                           Verdict(None), origin)))
    return out


# ---------------------------------------------------------------- skeleton


def policy_rule(ctx, policy, src, opts):
    """Return the NfRule ending context CTX with ipchains POLICY."""
    origin = str(src) if src is not None else "ipchains-translate: default policy"
    if policy in ("ACCEPT", "MASQ"):
        if policy == "MASQ":
            return NfRule((), (SMark("|", opts.masq_mark),), Verdict("goto", "stage-om"), origin)
        if ctx in ("fi", "fw", "mr", "pf"):
            return NfRule((), (), stage_goto(ctx), origin)
        return NfRule((), (), Verdict("accept"), origin)
    if policy == "REJECT":
        return NfRule((), (), reject_verdict(ctx), origin)
    return NfRule((), (), Verdict("drop"), origin)


def base_policy(policy):
    """Return the built-in chain policy for an ipchains policy (never reached)."""
    return "ACCEPT" if policy in ("ACCEPT", "MASQ") else "DROP"


def note(text):
    """Return an NfRule-free origin text for skeleton rules."""
    return "ipchains-translate: " + text


def policy_contexts(features):
    """Return (context, built-in chain) of every policy chain of a firewall with FEATURES."""
    return (("in", "input"),) + ((("mr", "input"),) if features.masq else ()) + (
        (("pf", "input"),) if features.portfw else ()) + (
        ("fi", "input"), ("fw", "forward"), ("out", "output"), ("fo", "output"))


def skeleton(plan, features, policies, opts):
    """Add the dispatch chains, stages and policy chains to PLAN.

    POLICIES maps each built-in ipchains chain to (policy, SourceRef or None).
    """
    ctxs = builtin_contexts(features, opts)
    in_pol, fw_pol, out_pol = (base_policy(policies[c][0])
                               for c in ("input", "forward", "output"))
    inp = plan.chain("filter", "INPUT", ("input", in_pol))
    fwd = plan.chain("filter", "FORWARD", ("forward", fw_pol))
    outp = plan.chain("filter", "OUTPUT", ("output", out_pol))
    if "rd" in ctxs["input"]:
        dnat = (MConn("DNAT", "ORIGINAL"),)
        inp.entries.append(NfRule(dnat, (), Verdict("jump", "rd-input"),
                                  note("redirected packets, by original destination")))
        inp.entries.append(NfRule(dnat, (), Verdict("jump", "pol-input"),
                                  note("input policy")))
    inp.entries.append(NfRule((), (), Verdict("jump", "in-input"), note("input")))
    inp.entries.append(NfRule((), (), Verdict("jump", "pol-input"), note("input policy")))
    if features.masq:
        replies = (MConn("SNAT", "REPLY"), MMark(opts.masq_mark, ct=True))
        fwd.entries.append(NfRule(replies, (), Verdict("jump", "mr-input"),
                                  note("replies of masqueraded connections: input stage, "
                                       "by their addresses before de-masquerading")))
        fwd.entries.append(NfRule(replies, (), Verdict("jump", "pol-mr-input"),
                                  note("replies of masqueraded connections: input policy")))
    if features.portfw:
        forwarded = (MConn("DNAT", "ORIGINAL"), MMark(PORTFW_CT_MARK, ct=True))
        fwd.entries.append(NfRule(forwarded, (), Verdict("jump", "pf-input"),
                                  note("port-forwarded: input stage, by the address they "
                                       "arrived for")))
        fwd.entries.append(NfRule(forwarded, (), Verdict("jump", "pol-pf-input"),
                                  note("port-forwarded: input policy")))
    fwd.entries.append(NfRule((), (), Verdict("jump", "fi-input"),
                              note("forwarded: input stage")))
    fwd.entries.append(NfRule((), (), Verdict("jump", "pol-fi-input"),
                              note("forwarded: input policy")))
    outp.entries.append(NfRule((), (), Verdict("jump", "out-output"), note("output")))
    outp.entries.append(NfRule((), (), Verdict("jump", "pol-output"), note("output policy")))
    stage_fw = plan.chain("filter", "stage-fw")
    stage_fw.entries.append(NfRule((), (), Verdict("jump", "fw-forward"),
                                   note("forwarded: forward stage")))
    stage_fw.entries.append(NfRule((), (), Verdict("jump", "pol-forward"),
                                   note("forwarded: forward policy")))
    stage_out = plan.chain("filter", "stage-out")
    stage_out.entries.append(NfRule((), (), Verdict("jump", "fo-output"),
                                    note("forwarded: output stage")))
    stage_out.entries.append(NfRule((), (), Verdict("jump", "pol-fo-output"),
                                    note("forwarded: output policy")))
    if features.masq:
        stage_om = plan.chain("filter", "stage-om")
        stage_om.entries.append(NfRule((), (), Verdict("jump", "om-output"),
                                       note("masqueraded: output stage")))
        stage_om.entries.append(NfRule((), (), Verdict("jump", "pol-fo-output"),
                                       note("masqueraded: output policy")))
    for ctx, builtin in policy_contexts(features):
        policy, src = policies[builtin]
        plan.add("filter", POLICY_CHAIN[ctx], policy_rule(ctx, policy, src, opts))
    for builtin, names in ctxs.items():
        for ctx in names:
            plan.chain(table_of(ctx, opts), chain_name(ctx, builtin))
    nat_hooks(plan, features, opts)


def nat_hooks(plan, features, opts):
    """Add the PREROUTING/POSTROUTING dispatch for portfw, REDIRECT and MASQ."""
    if features.portfw:
        pre = plan.chain("nat", "PREROUTING", ("prerouting", "ACCEPT"))
        plan.chain("nat", "portfw")
        pre.entries.append(NfRule((), (), Verdict("jump", "portfw"),
                                  note("ipmasqadm port forwards")))
    if features.redirect:
        table = table_of("pre", opts)
        pre = plan.chain(table, "PREROUTING", ("prerouting", "ACCEPT"))
        if opts.redirect == "tproxy":
            # The kernel's TPROXY recipe (Documentation/networking/tproxy):
            # packets of connections a transparent socket already holds
            # (the servers' replies to a proxy connecting from the client's
            # address) are marked for the local route and kept from TPROXY.
            socket = (MProto("tcp"), MSocket())
            divert = NfRule((), (SMark("|", opts.tproxy_mark),), Verdict("accept"),
                            note("TPROXY: packets for transparent sockets"))
            if opts.fmt == "nft":
                pre.entries.append(NfRule(socket, divert.stmts, divert.verdict, divert.origin))
            else:
                # iptables has one target per rule: the recipe's DIVERT chain.
                plan.add(table, "tproxy-divert", divert)
                pre.entries.append(NfRule(socket, (), Verdict("jump", "tproxy-divert"),
                                          divert.origin))
            if features.redirect_udp:
                # UDP too (a proxy's flow from the client's address gets the
                # server's answers this way, else they are dropped), but
                # marked without accept: a transparent UDP socket bound and
                # not yet connected also matches other clients' first
                # datagrams, which must still reach the TPROXY rule.
                pre.entries.append(NfRule((MProto("udp"), MSocket()), divert.stmts,
                                          Verdict(None),
                                          note("TPROXY: UDP packets for transparent "
                                               "sockets (marked, not accepted)")))
        pre.entries.append(NfRule((), (), Verdict("jump", "pre-input"),
                                  note("input rules deciding REDIRECT")))
        if opts.redirect == "tproxy":
            plan.notes.extend(tproxy_routing(opts))
    if features.masq:
        post = plan.chain("nat", "POSTROUTING", ("postrouting", "ACCEPT"))
        marked = MMark(opts.masq_mark)
        ours = SMark("|", opts.masq_mark, ct=True)     # its replies: mr- (skeleton)
        ports = "%d-%d" % MASQ_PORTS
        for proto in ("tcp", "udp"):
            post.entries.append(NfRule((MProto(proto), marked), (ours,),
                                       Verdict("masquerade", ports),
                                       note("MASQ, from the ports 2.2 used")))
        post.entries.append(NfRule((marked,), (ours,), Verdict("masquerade"), note("MASQ")))


def tproxy_routing(opts):
    """Return the policy routing TPROXY needs, as shell commands that can run
    again: the rule is deleted before it is added (ip rule add would add a
    second one) and the route replaced (ip route add fails when it exists)."""
    rule = "fwmark 0x%x/0x%x lookup %d" % (opts.tproxy_mark, opts.tproxy_mark, opts.route_table)
    return ["ip rule del %s 2>/dev/null || true" % rule,
            "ip rule add %s" % rule,
            "ip route replace local 0.0.0.0/0 dev lo table %d" % opts.route_table]


# ---------------------------------------------------------------- whole firewall


def features_of(chains):
    """Return the Features a simulated firewall uses (final state)."""
    redirect = masq = udp = False
    for chain in chains.chains.values():
        for rule in chain.rules:
            redirect = redirect or rule.target == "REDIRECT"
            udp = udp or redirect_takes_udp(rule)
            masq = masq or rule.target == "MASQ"
    masq = masq or chains.chains["forward"].policy == "MASQ"
    return Features(redirect, masq, bool(chains.portfw), udp)


def redirect_takes_udp(rule):
    """True when RULE redirects UDP (-p udp, or a protocol only the script's run tells)."""
    return rule.target == "REDIRECT" and (rule.proto == "udp" or isinstance(rule.proto, Raw))


def graph_of(chains):
    """Return {chain: [chains its rules jump to]} of the final state."""
    graph = {}
    for (a, b), n in chains.edges.items():
        if n > 0:
            graph.setdefault(a, []).append(b)
    return graph


def plan_ruleset(chains, opts):
    """Return (Plan, diagnostics) for the final state of simulated CHAINS."""
    plan = Plan()
    diags = []
    features = features_of(chains)
    policies = {name: (chains.chains[name].policy, chains.chains[name].policy_src)
                for name in BUILTIN}
    skeleton(plan, features, policies, opts)
    contexts = chain_contexts(graph_of(chains), features, opts)
    seen = set()
    for name, chain in chains.chains.items():
        ctxs = contexts.get(name)
        if not ctxs:
            if chain.rules:
                diags.append(Diag("note", chain.rules[0].src,
                                  "chain '%s' is never jumped to; its %d rule(s) are "
                                  "not emitted" % (name, len(chain.rules))))
            continue
        targets = [plan.chain(table_of(ctx, opts), chain_name(ctx, name)) for ctx in ctxs]
        for rule in chain.rules:
            cache = {}
            for ctx, target in zip(ctxs, targets):
                tr = translate_rule(rule, name, ctx, opts, cache)
                target.entries.extend(tr.rules)
                if tr.untranslated is not None:
                    target.entries.append(tr.untranslated)
                for table_x, chain_x, nf in tr.extras:
                    plan.chain(table_x, chain_x, (chain_x.lower(), "ACCEPT")).entries.append(nf)
                for diag in [*tr.diags, *rule_notes(rule, ctx, opts)]:
                    key = (diag.src, diag.message)
                    if key not in seen:
                        seen.add(key)
                        diags.append(diag)
    for pf in chains.portfw.values():
        plan.add("nat", "portfw", portfw_rule(pf))
    diags.extend(portfw_notes(chains.portfw.values()))
    return plan, diags


def portfw_notes(forwards):
    """Yield a note for each port forward that 2.2 would have shared connections with.

    ip_masq_portfw.c (portfw_in_create) rotated the forwards of one local
    address and port by their -p preference; a DNAT rule list takes the first.
    """
    first = {}
    for pf in forwards:
        key = (pf.proto, pf.laddr, pf.lport)
        if key in first:
            yield Diag("note", pf.src, "2.2 shared the connections to %s %s:%d among its "
                       "forwards; netfilter sends them all to the first (%s)"
                       % (pf.proto, pf.laddr, pf.lport, first[key].src))
        else:
            first[key] = pf


def rule_notes(rule, ctx, opts):
    """Yield notes about changes of meaning RULE undergoes (once per rule)."""
    if rule.frag is not None and ctx in ("in", "fi"):
        yield Diag("note", rule.src, "conntrack reassembles fragments before filtering, "
                   "so -f rarely matches")
    if rule.tos is not None and opts.fmt != "nft" and ctx in MANGLE_HOOKS:
        yield Diag("note", rule.src, "-t is applied in the mangle table, regardless of "
                   "the verdicts of earlier rules")
    if rule.tos is not None and opts.fmt == "nft" and rule.tos[0] & 0x02 == 0 \
            and ctx in ("in", "fi", "fw", "out"):
        yield Diag("note", rule.src, "-t: bit 1 of the TOS byte is ECN now and is "
                   "left alone")
    if ctx == "om" and rule.saddr is not None and masq_source_test(rule.saddr, opts) is None:
        # Fail closed: without the address, masqueraded packets meet a test
        # 2.2 never gave them (and a DENY/REJECT would now stop them all).
        yield Diag("warning", rule.src, "2.2 masqueraded before the output chain, so this source "
                   "test saw the masquerading address; give --masq-source ADDRESS to decide "
                   "it for masqueraded packets (now it sees the inside address)")
    if rule.copy is not None and ctx in ("in", "fi", "fw", "out"):
        yield Diag("note", rule.src, "-o copies to NFLOG group 0 (ulogd), not netlink "
                   "device /dev/fwmonitor")


def portfw_rule(pf):
    """Return the DNAT rule of one ipmasqadm port forward.

    Only for packets to this host's own addresses: 2.2 looked for port
    forwards when it delivered a packet locally (ip_input.c ip_local_deliver,
    ip_fw_demasquerade), so a forward of some other address never matched.
    """
    matches = (MProto(pf.proto), MAddr("d", pf.laddr + "/32"),
               MPorts("d", Ports(pf.lport, pf.lport), pf.proto), MLocal())
    return NfRule(matches, (SMark("|", PORTFW_CT_MARK, ct=True),),
                  Verdict("dnat", "%s:%d" % (pf.raddr, pf.rport)), str(pf.src))
