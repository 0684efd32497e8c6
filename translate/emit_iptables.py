"""Pure emitters for iptables: argument lists, iptables-restore text, shell commands.

Each match, statement and verdict kind has one small function returning its
words.  iptables has one target per rule, so a rule with statements (log,
mark, TOS, copy) becomes one rule per statement, each with the same
matches, followed by the verdict rule.  Words that are ``Raw`` (shell
expansions) are written as they are in the shell format.
"""
import re
import shlex

from .ir import (MAddr, MConn, MFrag, MIcmp, MIface, MLocal, MMark, MPorts, MProto, MSocket,
                 MSyn, NfRule, Raw, SCopy, SLog, SMark, STos, Untranslated, printable)

TABLE_ORDER = ("filter", "nat", "mangle")
BUILTIN_CHAINS = ("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING")
OWN_PREFIX = "ipchains-"
SETUP = "ipchains_translate_setup"
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


def m_socket(m):
    return ["-m", "socket"] + (["--transparent"] if m.transparent else [])


MATCHES = {MIface: m_iface, MProto: m_proto, MAddr: m_addr, MPorts: m_ports,
           MIcmp: m_icmp, MSyn: m_syn, MFrag: m_frag, MConn: m_conn, MMark: m_mark,
           MLocal: m_local, MSocket: m_socket}


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


def rule_args(nf, memo=None):
    """Return one argument list per iptables rule needed for NfRule NF.

    MEMO, a dict kept while one rule is emitted in several contexts, keeps
    the words of the match tuples it shares between them (by identity: the
    dict's owner keeps those tuples alive as long as MEMO).
    """
    if memo is None:
        base = match_words(nf)
    else:
        base = memo.get(id(nf.matches))
        if base is None:
            base = memo[id(nf.matches)] = match_words(nf)
    head = base + comment_words(nf)
    return [head + tail for tail in rule_tails(nf)]


def comment_words(nf):
    """Return the words citing NfRule NF's FILE:LINE (none when it has no origin)."""
    return ["-m", "comment", "--comment", nf.origin] if nf.origin else []


def rule_tails(nf):
    """Return what follows the matches and comment, one word list per iptables
    rule NfRule NF needs: each statement's, then the target's (if any)."""
    tails = [STATEMENTS[type(s)](s) for s in nf.stmts]
    target = verdict_words(nf.verdict)
    if target or not nf.stmts:
        tails.append(target)
    return tails


# ---------------------------------------------------------------- iptables-restore


def restore_word(word, _cache={}):
    """Quote WORD for iptables-restore (double quotes when needed)."""
    quoted = _cache.get(word)
    if quoted is None:
        if PLAIN_WORD.fullmatch(word):
            quoted = word
        else:
            quoted = '"%s"' % printable(word).replace("\\", "\\\\").replace('"', "'")
        if len(_cache) < 100000:
            _cache[word] = quoted
    return quoted


class Quoted(dict):
    """Memo of QUOTE(word), bounded: looked up from C (by quoted(), for plain-str words)."""

    def __init__(self, quote):
        super().__init__()
        self.quote = quote

    def __missing__(self, word):
        text = self.quote(word)
        if len(self) >= 100000:
            # Bounded, but a big script (more distinct words: ports, origins)
            # keeps hitting: the words it uses now are memoized again.
            self.clear()
        self[word] = text
        return text


def quoted(words, memo):
    """Return WORDS quoted by MEMO.quote, joined by spaces.

    Hundreds of thousands of words go through here: when all are plain str
    (not Raw, which hashes like its text but is quoted differently) they
    are looked up in MEMO without a Python call per word.
    """
    kinds = {*map(type, words)}
    if kinds == _PLAIN:
        return " ".join(map(memo.__getitem__, words))
    if not kinds <= _PLAIN_OR_RAW:
        return " ".join([memo[w] if type(w) is str else memo.quote(w) for w in words])
    # A few Raw words ($LAN) among plain ones: those are quoted one by one,
    # never looked up in MEMO (a Raw word finds its text's entry there).
    types, plain, raws = [*map(type, words)], list(words), []
    at = types.index(Raw)
    while True:
        raws.append(at)
        plain[at] = ""
        try:
            at = types.index(Raw, at + 1)
        except ValueError:
            break
    out = [*map(memo.__getitem__, plain)]
    for at in raws:
        out[at] = memo.quote(words[at])
    return " ".join(out)


_PLAIN = {str}
_PLAIN_OR_RAW = {str, Raw}
RESTORE_QUOTED = Quoted(restore_word)


def restore_rule_texts(nf, heads):
    """Return the quoted arguments of each iptables-restore rule for NfRule NF
    (what rule_args gives, quoted); HEADS memoizes the quoted matches and
    comment, which a rule repeats in several contexts (keyed by the match
    tuple's identity: the caller keeps the tuples alive as long as HEADS)."""
    key = (id(nf.matches), nf.origin)
    head = heads.get(key)
    if head is None:
        head = heads[key] = quoted(match_words(nf) + comment_words(nf), RESTORE_QUOTED)
    return [head + " " + quoted(tail, RESTORE_QUOTED) if head and tail else
            head or quoted(tail, RESTORE_QUOTED) for tail in rule_tails(nf)]


def owned(chain):
    """Return the chain of ours standing for netfilter CHAIN: built-ins get a
    chain of their own (hooked from the built-in), so nothing else is touched."""
    return OWN_PREFIX + chain if chain in BUILTIN_CHAINS else chain


def hook_args(chain):
    """Return the arguments of the one rule hooking our chain into built-in CHAIN."""
    return [chain, "-m", "comment", "--comment", "ipchains-translate", "-j", owned(chain)]


def restore_tables(plan, hooks=True):
    """Return the iptables-restore lines of PLAN: our chains declared (so created,
    or flushed when they exist, under --noflush), their rules, and with HOOKS
    one rule per built-in chain jumping to ours."""
    lines = []
    heads = {}          # quoted matches and comment (PLAN keeps every tuple alive)
    for table in TABLE_ORDER:
        chains = plan.tables.get(table)
        if not chains:
            continue
        lines.append("*%s" % table)
        for chain in chains.values():
            lines.append(":%s - [0:0]" % owned(chain.name))
        for chain in chains.values():
            own = owned(chain.name)
            prefix = "-A %s " % own
            for entry in chain.entries:
                if isinstance(entry, Untranslated):
                    lines.append(entry.comment())
                    continue
                for text in restore_rule_texts(entry, heads):
                    lines.append(prefix + text if text else prefix[:-1])
        for chain in chains.values():
            if hooks and chain.name in BUILTIN_CHAINS:
                lines.append(" ".join(["-A"] + hook_args(chain.name)))
        lines.append("COMMIT")
    return lines


def hooked_chains(plan):
    """Return the (table, built-in chain) pairs PLAN hooks its own chains into."""
    return [(table, chain.name) for table in TABLE_ORDER
            for chain in plan.tables.get(table, {}).values() if chain.name in BUILTIN_CHAINS]


def tidy_hooks_command(plan):
    """Return the shell command that leaves one hook rule per built-in chain of PLAN.

    iptables-restore cannot test before it adds a rule, and no sequence of
    its commands adds a rule when missing and none when present; so a load
    over an earlier one leaves two identical hooks.  Run after each load,
    this deletes the older ones (a first load has one: nothing is deleted).
    """
    pairs = " ".join("'%s %s'" % pair for pair in hooked_chains(plan))
    return ("printf '%%s\\n' %s | while read t c; do h=\"%s -j %s$c\"; "
            "while [ \"$(iptables -t $t -S $c | grep -cxF -- \"-A $c $h\")\" -gt 1 ]; do "
            "iptables -t $t -D $c $h || break; done; done"
            % (pairs, " ".join(hook_args("")[1:-2]), OWN_PREFIX))


def render_restore(plan, header=()):
    """Return PLAN as input for 'iptables-restore --noflush': it declares (so
    replaces) only its own chains and adds one hook rule per built-in chain."""
    lines = ["# %s" % printable(h) for h in header] + [
        "# Load with: iptables-restore --noflush < FILE (without --noflush",
        "# iptables-restore would flush every rule of these tables, not only ours).",
        "# Each load adds a hook rule per built-in chain (iptables-restore cannot",
        "# test first); after each load, this leaves one (the newest):",
        "# after loading: %s" % tidy_hooks_command(plan),
    ] + plan.header_comments()
    return "\n".join(lines + restore_tables(plan)) + "\n"


# ---------------------------------------------------------------- shell commands


def shell_word(word, _cache={}):
    """Quote WORD for sh; Raw words (expansions) are kept as written."""
    if isinstance(word, Raw):
        return str(word)
    quoted = _cache.get(word)
    if quoted is None:
        quoted = shlex.quote(word)
        if len(_cache) < 100000:
            _cache[word] = quoted
    return quoted


class CommandLine:
    """One iptables command: its table and arguments, so that runs of them can
    be batched into one iptables-restore call.  Its shell text (str()) is
    made only when asked for: most commands of a script go into a batch,
    where they are quoted for the here-document instead."""

    __slots__ = ("table", "args", "prog", "origin", "batch_safe")

    def __init__(self, table, args, prog="iptables"):
        self.table = table
        self.args = args
        self.prog = prog
        self.origin = None        # FILE:LINE for commands that carry no rule comment
        self.batch_safe = None    # see batchable()

    def __str__(self, _heads={}):
        head = _heads.get((self.prog, self.table))
        if head is None:
            head = _heads[self.prog, self.table] = quoted(
                [self.prog] + (["-t", self.table] if self.table != "filter" else []),
                SHELL_QUOTED)
        return head + " " + quoted(self.args, SHELL_QUOTED) if self.args else head

    def __repr__(self):
        return "CommandLine(%r)" % str(self)

    def has_comment(self):
        """True when the command carries a rule comment (its origin is in it)."""
        return "--comment" in self.args

    def shell(self):
        """Return the command as a shell line (origin as a trailing comment)."""
        return "%s  # %s" % (self, self.origin) if self.origin else str(self)


def command(table, args, prog="iptables"):
    """Return one iptables command for TABLE with ARGS (a CommandLine)."""
    return CommandLine(table, list(args), prog)


SHELL_QUOTED = Quoted(shell_word)
HEREDOC = "IPCHAINS_TRANSLATE"


def heredoc_word(word, _cache={}):
    """Quote WORD for an iptables-restore line in an unquoted here-document:
    Raw words (expansions) stay as written so the shell expands them."""
    if isinstance(word, Raw):
        return str(word)
    text = _cache.get(word)
    if text is None:
        text = restore_word(word)
        if "\\" in text or "$" in text or "`" in text:
            text = text.replace("\\", "\\\\").replace("$", "\\$").replace("`", "\\`")
        if len(_cache) < 100000:
            _cache[word] = text
    return text


# What a here-document reads otherwise than a command line does: single quotes
# (no quoting there: '$(cmd)' runs), backslashes, and line ends.
HEREDOC_UNSAFE = re.compile("['\\\\\x00-\x1f\x7f-\x9f\u2028\u2029]")


def batchable(line):
    """True for a CommandLine an iptables-restore here-document can carry.

    A word kept as written (Raw) goes into the here-document as it stands;
    one holding single quotes, backslashes or line ends would mean other
    text there (a quoted '$(cmd)' would run, a line would end the rule or
    the document early and the rest run as shell commands).  Such a command
    stays an iptables command of its own, where the shell reads the word as
    the script's own command did.
    """
    if not isinstance(line, CommandLine):
        return False
    safe = line.batch_safe
    if safe is None:
        # Most commands hold no Raw word at all: tell that at C speed first;
        # the same few Raw words ($LAN...) recur in thousands of commands.
        safe = line.batch_safe = Raw not in map(type, line.args) or not any(
            map(UNSAFE_RAW.__getitem__, filter(_is_raw, line.args)))
    return safe


# Raw word -> True when a here-document would read it otherwise (keys are Raw words only,
# hashed like their text).
UNSAFE_RAW = Quoted(lambda word: HEREDOC_UNSAFE.search(word) is not None)
_is_raw = Raw.__instancecheck__


HEREDOC_QUOTED = Quoted(heredoc_word)


def batch(commands):
    """Return shell lines loading CommandLines COMMANDS with one iptables-restore
    --noflush (iptables-nft reads the whole ruleset for every command, so one
    call per rule grows with the square of the rules)."""
    out, table = ["iptables-restore --noflush <<%s" % HEREDOC], None
    # Tables never refer to each other, so each table's commands go in one
    # section, in their order: one commit per table, not one per switch.
    order = {t: i for i, t in enumerate(TABLE_ORDER)}
    for cmd in sorted(commands, key=lambda c: order.get(c.table, len(order))):
        if cmd.table != table:
            if table is not None:
                out.append("COMMIT")
            out.append("*%s" % cmd.table)
            table = cmd.table
        if cmd.origin:
            out.append("# %s" % cmd.origin)
        if cmd.args[0] == "-N":
            # Declared, it is created or (left from an earlier run) flushed:
            # one existing chain must not fail the whole batch.
            out.append(":%s - [0:0]" % heredoc_word(cmd.args[1]))
            continue
        out.append(quoted(cmd.args, HEREDOC_QUOTED))
    out += ["COMMIT", HEREDOC]
    return out


def append_commands(table, chain, nf, op="-A", num=None):
    """Return the commands adding NfRule NF to CHAIN (op -A, -I or -D)."""
    out = []
    for args in rule_args(nf):
        pos = [str(num)] if num is not None else []
        out.append(command(table, [op, owned(chain)] + pos + args))
    return out


def setup_function(plan, extra=()):
    """Return the shell function that (re)builds PLAN's own chains once, when
    first called, hooks them into the built-ins, then runs EXTRA commands.

    Our chains are declared to iptables-restore --noflush (created, or
    flushed when they exist: a second run replaces them); each built-in
    chain gets one hook rule, added only if missing.  Nothing we did not
    create is flushed, deleted or given a policy.
    """
    hooks = []
    for table in TABLE_ORDER:
        for chain in plan.tables.get(table, {}).values():
            if chain.name in BUILTIN_CHAINS:
                hooks.append("%s 2>/dev/null || %s" % (
                    command(table, ["-C"] + hook_args(chain.name)),
                    command(table, ["-A"] + hook_args(chain.name))))
    return (["%s() {" % SETUP,
             "\t[ -z \"$ipchains_translate_ready\" ] || return 0",
             "\tipchains_translate_ready=1",
             "\tiptables-restore --noflush <<'%s'" % HEREDOC] +
            restore_tables(plan, hooks=False) + [HEREDOC] +
            ["\t" + line for line in hooks + list(extra)] + ["}"])
