"""-e snippets: just the rules of the given commands, one line per rule.

Like iptables-translate, a snippet changes nothing but the rules it names:
no flush, no policy, no chain deleted.  Its rules go into the chains a full
translation creates (in-input, fi-input, out-output, ...), so it needs that
skeleton loaded first; the first line of the output says which chains.
Commands that are not rules (-P, -F, -X, -Z, -R, numbered -D, portfw -f,
portfw -d without -R) are refused here: they only make sense against a
whole firewall.
"""
from . import emit_iptables, emit_nft, semantics
from .chains import ChainError, Chains
from .ir import Command, Diag, PortForward, Untranslated

RULE_OPS = {"A": "-A", "I": "-I", "D": "-D"}


class Snippet:
    """Collects the snippet's lines for one format."""

    def __init__(self, opts, contexts):
        self.opts = opts
        self.contexts = contexts
        self.lines = []           # (table, text)
        self.diags = []
        self.chains_used = []
        self.input_rules = False  # a rule went into an input context

    def ctx_chains(self, chain):
        """Return [(ctx, table, netfilter chain)] of ipchains CHAIN."""
        return [(ctx, semantics.table_of(ctx, self.opts), semantics.chain_name(ctx, chain))
                for ctx in self.contexts.get(chain, ())]

    def use(self, table, chain):
        if (table, chain) not in self.chains_used:
            self.chains_used.append((table, chain))

    def rule(self, table, chain, nf, op):
        """Add the line(s) putting NfRule NF into CHAIN of TABLE (op -A, -I, -D)."""
        self.use(table, chain)
        fmt = self.opts.fmt
        if fmt == "nft":
            verb = {"-A": "add", "-I": "insert"}[op]
            text = "%s rule ip %s %s %s" % (verb, self.opts.table,
                                            emit_nft.chain_name(table, chain),
                                            emit_nft.rule_text(nf))
            self.lines.append((table, "nft '%s'" % text.replace("'", "")))
            return
        pos = ["1"] if op == "-I" else []
        for args in emit_iptables.rule_args(nf):
            if fmt == "iptables":
                self.lines.append((table, str(emit_iptables.command(
                    table, [op, chain] + pos + args))))
            else:
                self.lines.append((table, " ".join([op, chain] + pos + [
                    emit_iptables.restore_word(w) for w in args])))

    def command(self, cmd, chains):
        """Add the lines of one understood command (ChainError when refused here)."""
        if isinstance(cmd, PortForward):
            if cmd.op == "f":
                raise ChainError("portfw -f flushes every port forward: not a rule; "
                                 "translate the whole script for it")
            if cmd.op == "d" and not (cmd.raddr and cmd.rport):
                raise ChainError("portfw -d without -R deletes whatever the forward points "
                                 "to: give -R as well (a rule is deleted by its text)")
            op = "-A" if cmd.op == "a" else "-D"
            return self.nf_rule("nat", "portfw", semantics.portfw_rule(cmd), op)
        if cmd.op == "N":
            for _, table, chain in self.ctx_chains(cmd.chain):
                self.use(table, chain)
                self.lines.append((table, self.new_chain(table, chain)))
            return
        if cmd.op not in RULE_OPS or cmd.num not in (None, 1) or \
                (cmd.op == "D" and cmd.num is not None):
            raise ChainError("-e prints rules only; this command changes a whole chain "
                             "(policy, flush, numbers): translate the whole script for it")
        if not self.ctx_chains(cmd.chain):
            raise ChainError("chain '%s' is not reached from input, forward or output by "
                             "these commands: give the rule jumping to it as well" % cmd.chain)
        effect = chains.apply(cmd, certain=False)
        for ctx, table, chain in self.ctx_chains(cmd.chain):
            self.input_rules = self.input_rules or ctx == "in"
            for rule in effect.rules:
                tr = semantics.translate_rule(rule, cmd.chain, ctx, self.opts)
                self.diags.extend(tr.diags)
                if tr.untranslated is not None:
                    raise ChainError(tr.untranslated.why)
                for nf in tr.rules:
                    self.nf_rule(table, chain, nf, RULE_OPS[cmd.op])
                for table_x, chain_x, nf in tr.extras:
                    self.nf_rule(table_x, emit_iptables.owned(chain_x), nf, RULE_OPS[cmd.op])

    def nf_rule(self, table, chain, nf, op):
        if op == "-D" and self.opts.fmt == "nft":
            raise ChainError("nft deletes rules by handle, not by their text: delete it "
                             "with 'nft -a list table ip %s' and 'nft delete rule'"
                             % self.opts.table)
        self.rule(table, chain, nf, op)

    def new_chain(self, table, chain):
        if self.opts.fmt == "nft":
            return "nft 'add chain ip %s %s'" % (self.opts.table, chain)
        if self.opts.fmt == "iptables":
            return str(emit_iptables.command(table, ["-N", chain]))
        return ":%s - [0:0]" % chain

    def text(self):
        """Return the snippet: a comment naming the chains it needs, then the rules."""
        needs = ", ".join(c if t == "filter" else "%s %s" % (t, c) for t, c in self.chains_used)
        head = ["# ipchains-translate -e: rules only; they go into the chains of a full "
                "translation (load one first): %s" % (needs or "none")]
        if self.opts.fmt != "iptables-restore":
            return "\n".join(head + [text for _, text in self.lines]) + "\n"
        out = head
        for table in emit_iptables.TABLE_ORDER:
            body = [text for t, text in self.lines if t == table]
            if body:
                out += ["*%s" % table] + body + ["COMMIT"]
        return "\n".join(out) + "\n"


def missing_input_stages(features):
    """Return the input stages a full translation may have that snippet FEATURES lack."""
    return [name for name, have in (("mr-input (masqueraded replies)", features.masq),
                                    ("pf-input (port-forwarded packets)", features.portfw))
            if not have]


def translate_snippet(parsed, opts, contexts, features):
    """Return (text, diags) of the -e commands PARSED (pipeline.Parsed values).

    Input rules go into the mr- and pf- stages only when the snippet itself
    masquerades or forwards ports (FEATURES); otherwise a note says so.
    """
    snippet = Snippet(opts, contexts)
    chains = Chains({p.command.chain for p in parsed
                     if isinstance(p.command, Command) and p.command.op == "N"})
    for p in parsed:
        if p.error or p.command is None:
            if p.error:
                snippet.lines.append(("filter", Untranslated(p.item.src, p.error).comment()))
            continue
        try:
            snippet.command(p.command, chains)
        except ChainError as exc:
            snippet.diags.append(Diag("error", p.command.src, str(exc)))
            snippet.lines.append(("filter", Untranslated(p.command.src, str(exc)).comment()))
    missing = missing_input_stages(features)
    if snippet.input_rules and missing:
        # A full translation that masquerades or forwards ports sends those
        # packets through these stages instead of in-input (2.2's input chain).
        snippet.diags.append(Diag("note", None, "input rules here skip %s of a full "
                                  "translation that has them; give its MASQ rule or port "
                                  "forward with -e as well to reach them"
                                  % " and ".join(missing)))
    return snippet.text(), snippet.diags
