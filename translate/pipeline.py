"""Read -> understand -> emit, for whole inputs; pure (no files, no exit codes).

``translate(sources, opts, defines, names)`` takes (name, text) pairs and
returns a Result: the output text and the diagnostics, in input order.
The flat formats run each script in bash in a sandbox (sandbox.py: the one
impure step here), simulate every ipchains command it ran and emit the
final state; the shell format replaces every ipchains command of the script
in place, reading it statically.
"""
import gc
import os
import re
import shlex
from dataclasses import dataclass, field
from typing import List

from . import emit_iptables, emit_nft, semantics
from .chains import ChainError, Chains
from .ipchains import BUILTIN, VERDICTS, HostNotYetSeen, Names, ParseError, parse
from . import sandbox
from .ir import Command, Diag, PortForward, SourceRef, Untranslated, printable
from .shell import (MODERN_MODULES, Cmd, Invocation, Reader, Remark, ShellError, Word,
                    module_remark)
from .shell import parse as parse_shell
from .sniff import not_ipchains
from .snippet import translate_snippet

VERSION = "1.1.0"
TIMEOUT_SYSCTLS = ("net.netfilter.nf_conntrack_tcp_timeout_established",
                   "net.netfilter.nf_conntrack_tcp_timeout_fin_wait",
                   "net.netfilter.nf_conntrack_udp_timeout")
NOOPS = {"L": "-L lists the chains: nothing to translate",
         "C": "-C tests a packet against the chains: nothing to translate",
         "M-L": "-M -L lists masqueraded connections: nothing to translate "
                "(see conntrack -L)",
         "h": "-h prints help: nothing to translate",
         "V": "-V prints the version: nothing to translate"}


class InputError(Exception):
    """An input cannot be read at all (exit status 2)."""


@dataclass
class Result:
    """The translation: output text and diagnostics."""

    text: str
    diags: List[Diag] = field(default_factory=list)
    commands: int = 0           # ipchains/ipmasqadm commands read (for the summary line)

    @property
    def status(self):
        """0 when everything was translated, 1 when something was not."""
        return 1 if any(d.fails for d in self.diags) else 0


# ---------------------------------------------------------------- reading


SAVE_CHAIN = re.compile(r":[^\s:]+\s+\S+")


def save_to_script(text):
    """Return ipchains-save TEXT as a script of ipchains commands (same lines)."""
    out = []
    for line in text.split("\n"):
        stripped = line.strip()
        if stripped.startswith(":"):
            fields = stripped[1:].split()
            if len(fields) >= 2 and fields[0] in BUILTIN:
                out.append("ipchains -P %s %s" % (fields[0], fields[1]))
            elif fields:
                out.append("ipchains -N %s" % fields[0])
            else:
                out.append(line)
        elif stripped.startswith("-"):
            out.append("ipchains " + stripped)
        else:
            out.append(line)
    return "\n".join(out)


def is_save_file(text):
    """True when TEXT looks like ipchains-save output (':chain POLICY' or '-A')."""
    for line in text.split("\n"):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        # ":chain POLICY"; the shell's ":" command has a blank after it.
        return bool(SAVE_CHAIN.match(stripped)) or stripped.startswith("-A ")
    return False


def rule_script(rule):
    """Return an -e RULE as a one-line script ('ipchains' may be left out)."""
    first = rule.split(None, 1)[0] if rule.split() else ""
    if first.rsplit("/", 1)[-1] in ("ipchains", "ipmasqadm") or first.startswith("$"):
        return rule
    return "ipchains " + rule


def read_items(name, text, defines, flat):
    """Return (Reader, tree, items) of one input; InputError if it cannot be read."""
    original = text
    if is_save_file(text):
        text = save_to_script(text)
    try:
        tree = parse_shell(text)
    except ShellError as exc:
        raise InputError("%s: %s" % (name, exc))
    reader = Reader(text, name, defines)
    reader.lines = original.split("\n")
    items = reader.flatten(tree) if flat else reader.in_place(tree)
    return reader, tree, items


# ---------------------------------------------------------------- understanding


@dataclass
class Parsed:
    """One item of the input, understood: a Command/PortForward, a Remark, or an error."""

    item: object
    command: object = None
    error: str = ""


def understand(items, names):
    """Parse every Invocation of ITEMS; return Parsed values and diagnostics."""
    out, diags = [], []
    for item in items:
        if isinstance(item, Remark):
            diags.append(Diag(item.level, item.src, item.message))
            out.append(Parsed(item))
            continue
        if item.error:
            diags.append(Diag("error", item.src, item.error))
            out.append(Parsed(item, error=item.error))
            continue
        try:
            command = parse(item.argv, item.src, names)
        except ParseError as exc:
            message = str(exc) + expanded_hint(item)
            diags.append(Diag("error", item.src, message))
            out.append(Parsed(item, error=message))
            continue
        for note in getattr(command, "notes", ()):
            diags.append(Diag("note", item.src, note))
        out.append(Parsed(item, command))
    return out, diags


class RunReader:
    """Turns the records of a script running in the sandbox into understood items,
    record by record while bash still runs (sandbox.run's sink).

    Host names are resolved only when written in a text bash read (Names);
    a name not in the texts read so far may be in a file cited later, so
    that command is understood again once the run is over.
    """

    def __init__(self, name, text, names):
        shown = [os.getcwd()] + ([os.path.dirname(os.path.abspath(name))]
                                 if os.path.isfile(name) else [])
        self.name = name
        self.origins = sandbox.Origins({name: text}, shown)
        self.names = names
        self.written = names.written or []
        self.known = 0                  # files of origins.read given to names so far
        self.slots = []                 # per item: (Parsed, [Diag]), or the item to redo
        self.redo = []
        self.unseen = None              # the first record run through another program
        self.commands = False           # an ipchains command ran

    def take(self, records):
        """Understand RECORDS (sandbox.run's sink)."""
        items = []
        for rec in records:
            if rec.kind == sandbox.UNSEEN:
                self.unseen = self.unseen or rec
                continue
            items.extend(self.items_of(rec))
        if len(self.origins.read) != self.known:
            self.known = len(self.origins.read)
            self.names.written = self.written + self.origins.texts_read()
        self.names.provisional = True
        try:
            for item in items:
                try:
                    self.slots.append(understand([item], self.names))
                except HostNotYetSeen:
                    self.redo.append(len(self.slots))
                    self.slots.append(item)
        finally:
            self.names.provisional = False

    def items_of(self, rec):
        """Return the items of one record (Invocations, remarks)."""
        line, cited = self.origins.span(rec.file, rec.line)
        if not cited:       # no such line: the record says what ran, and we say where it is not
            cited = "recorded as: %s (%s)" % (shlex.join([rec.kind] + rec.argv),
                                              self.origins.absent(rec.file, rec.line))
        src = SourceRef(rec.file, line, cited)
        if rec.kind in ("ipchains", "ipmasqadm"):
            self.commands = True
            return [Invocation([rec.kind] + rec.argv, src, None)]
        if rec.kind == "restore":
            items = restore_items(rec, src)
            self.commands = self.commands or bool(items)
            return items
        if rec.kind in sandbox.FOREIGN:
            # Its rules would be missing from a ruleset that loads: fail closed.
            return [Remark("error", src, "%s command left out: only ipchains is "
                           "translated, and the rules this loads are not in the "
                           "translation" % rec.kind)]
        words = [Word(w, None, line) for w in [rec.kind] + rec.argv]
        remark = module_remark(Cmd(words, [], line, line), {}, src)
        return [remark] if remark is not None else []

    def result(self):
        """Return (Parsed values, diagnostics) in the order bash ran the commands."""
        self.names.written = self.written + self.origins.texts_read()
        for k in self.redo:
            self.slots[k] = understand([self.slots[k]], self.names)
        parsed, diags = [], []
        for one, more in self.slots:
            parsed.extend(one)
            diags.extend(more)
        return parsed, diags


def run_understood(name, text, defines, names):
    """Return (Parsed values, diagnostics) of script TEXT as bash runs it in the
    sandbox (sandbox.py); NAMES learns the texts of the files it ran.

    InputError when the sandbox cannot run, when the script ran ipchains
    through another program, or when bash ran no ipchains command with
    these values (an empty translation would open the firewall).
    """
    positional, forced = sandbox.split_positional(defines)
    reader = RunReader(name, text, names)
    try:
        ran = sandbox.run(name, text, positional, forced, sink=reader.take)
    except sandbox.SandboxError as exc:
        raise InputError(str(exc))
    if reader.unseen is not None:
        # Leaving it out would drop a rule bash ran: refuse the whole script.
        raise InputError("%s: the script ran %s through another program (env, xargs, nice, "
                         "exec, a script run by sh...), where the stand-ins cannot tell its "
                         "line: '%s'; nothing translated (call it from the script itself)"
                         % (name, reader.unseen.argv[0],
                            printable(shlex.join(reader.unseen.argv))))
    if not reader.commands:
        given = "positional parameters %s" % " ".join(positional) if positional else \
            "no positional parameters (give them as -D 1=start ...)"
        raise InputError("%s: bash ran no ipchains command with %s (the script exited "
                         "%d); nothing to translate" % (name, given, ran.status))
    return reader.result()


def restore_items(rec, src):
    """Return the Invocations of the ipchains-save text an ipchains-restore read."""
    items = []
    original = rec.data.split("\n")
    for number, line in enumerate(save_to_script(rec.data).split("\n"), 1):
        try:
            argv = shlex.split(line, comments=True)
        except ValueError:
            argv = line.split()
        if not argv or argv[0] != "ipchains":
            continue
        at = SourceRef(shown_path(rec.data_file), number, original[number - 1].strip()) \
            if rec.data_file else src
        items.append(Invocation(argv, at, None))
    return items


def shown_path(path):
    """Return PATH relative to the working directory when it lies below it."""
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


def expanded_hint(item):
    """Return how bash expanded a command with expansions that failed to parse
    (an empty or placeholder value is the usual cause), or ''."""
    if item.cmd is not None or not any(c in item.src.text for c in "$`"):
        return ""
    ran = " ".join(shlex.quote(w) if w else "''" for w in item.argv)
    return " (bash ran: %s; give the script's values with -D NAME=VALUE)" % ran


def read_inputs(sources, defines, names, flat):
    """Read and understand every (name, text) of SOURCES; return ([(Reader, [Parsed])], diags).

    Flat formats run scripts in the sandbox; -e rules and ipchains-save
    files hold no shell logic and are read as they are.
    """
    inputs, diags = [], []
    for name, text in sources:
        if flat and name != "-e" and not is_save_file(text):
            parsed, more = run_understood(name, text, defines, names)
            inputs.append((None, parsed))
            diags.extend(more)
            continue
        reader, _, items = read_items(name, text, defines, flat)
        parsed, more = understand(items, names)
        inputs.append((reader, parsed))
        diags.extend(more)
    return inputs, diags


def count_commands(inputs):
    """Return how many commands (not remarks) the INPUTS of read_inputs() hold."""
    return sum(1 for _, parsed in inputs for p in parsed if not isinstance(p.item, Remark))


def static_view(parsed):
    """Return (chains ever created, union jump graph, Features) over all commands."""
    known, graph = set(), {}
    redirect = masq = portfw = udp = False
    for p in parsed:
        cmd = p.command
        if isinstance(cmd, PortForward):
            portfw = True
        if not isinstance(cmd, Command):
            continue
        if cmd.op == "N":
            known.add(cmd.chain)
        if cmd.op == "P" and cmd.policy == "MASQ":
            masq = True
        for rule in cmd.rules:
            redirect = redirect or rule.target == "REDIRECT"
            udp = udp or semantics.redirect_takes_udp(rule)
            masq = masq or rule.target == "MASQ"
            if rule.target and rule.target not in VERDICTS and cmd.op != "D":
                graph.setdefault(cmd.chain, [])
                if rule.target not in graph[cmd.chain]:
                    graph[cmd.chain].append(rule.target)
    return known, graph, semantics.Features(redirect, masq, portfw, udp)


def command_notes(cmd, flat):
    """Return (notes, untranslated?) for commands that only need a note."""
    if cmd.op in NOOPS:
        return [NOOPS[cmd.op]]
    if cmd.op == "P" and cmd.chain in BUILTIN:
        return ["the %s policy is kept in this translation's own chains; "
                "built-in chain policies and rules loaded by others are left alone"
                % cmd.chain]
    if cmd.op in ("F", "X") and cmd.chain is None:
        return ["-%s acts on this translation's own chains only; rules loaded by "
                "others are left alone" % cmd.op]
    if cmd.op == "Z" and flat:
        return ["-Z zeroes counters: a freshly loaded ruleset starts at zero"]
    if cmd.op == "M-S":
        settings = ["%s=%d" % (k, v) for k, v in zip(TIMEOUT_SYSCTLS, cmd.values) if v]
        if not settings:
            return ["-M -S 0 0 0 changes nothing"]
        if flat:
            return ["masquerading timeouts are conntrack sysctls now: sysctl -w %s"
                    % " ".join(settings)]
    return []


# ---------------------------------------------------------------- flat formats


def translate_flat(sources, opts, defines, names):
    """Return the Result for the flat formats (iptables-restore, nft)."""
    inputs, diags = read_inputs(sources, defines, names, flat=True)
    parsed = [p for _, ps in inputs for p in ps]
    known, _, _ = static_view(parsed)
    chains = Chains(known)
    untranslated, header_notes = [], []
    for p in parsed:
        if p.error:
            untranslated.append(Untranslated(p.item.src, p.error))
            continue
        cmd = p.command
        if cmd is None:
            continue
        try:
            if isinstance(cmd, PortForward):
                chains.portforward(cmd)
                continue
            chains.apply(cmd)
        except ChainError as exc:
            diags.append(Diag("error", cmd.src, str(exc)))
            untranslated.append(Untranslated(cmd.src, str(exc)))
            continue
        for note in command_notes(cmd, flat=True):
            diags.append(Diag("note", cmd.src, note))
            if cmd.op == "M-S":
                header_notes.append("%s: %s" % (cmd.src, note))
    plan, plan_diags = semantics.plan_ruleset(chains, opts)
    plan.untranslated = untranslated
    plan.notes = header_notes + plan.notes
    diags.extend(plan_diags)
    plan.accounted = leftover_commands(parsed, plan, diags)
    header = ["Translated from ipchains by ipchains-translate %s: %s"
              % (VERSION, ", ".join(n for n, _ in sources)),
              "ipchains input/forward/output run once per context; see ipchains-translate(8)."]
    if opts.fmt == "nft":
        text = emit_nft.render(plan, opts.table, header)
    else:
        text = emit_iptables.render_restore(plan, header)
    return Result(text, sort_diags(diags), count_commands(inputs))


LEFT_NO_RULE = {"A": "its rules were removed later or are never reached",
                "I": "its rules were removed later or are never reached",
                "R": "its rule was removed later or is never reached",
                "D": "deleted a rule", "N": "created a chain", "X": "deleted chains",
                "F": "flushed chains", "P": "its policy was changed later",
                "Z": "zeroed counters", "M-S": "see the note above"}


def leftover_commands(parsed, plan, diags):
    """Return (src, why) for commands that left no rule and no diagnostic.

    Every ipchains command is accounted for: by an emitted rule's origin, a
    diagnostic, or this list, which goes into the output as comments.
    """
    seen = {str(d.src) for d in diags if d.src is not None}
    for chains in plan.tables.values():
        for chain in chains.values():
            for entry in chain.entries:
                seen.add(getattr(entry, "origin", None) or str(entry.src))
    out = []
    for p in parsed:
        cmd = p.command
        if cmd is None or str(cmd.src) in seen:
            continue
        op = cmd.op if isinstance(cmd, Command) else "portfw"
        out.append((cmd.src, LEFT_NO_RULE.get(op, "port forward removed later or flushed")))
    return out


def sort_diags(diags):
    """Return DIAGS in input order (file order kept, then line), stable."""
    files = []
    for d in diags:
        if d.src is not None and d.src.file not in files:
            files.append(d.src.file)
    def key(d):
        if d.src is None:
            return (len(files), 0)
        return (files.index(d.src.file), d.src.line)
    return sorted(diags, key=key)


# ---------------------------------------------------------------- shell format


class ShellTranslator:
    """Replaces every ipchains command of scripts in place by iptables commands."""

    def __init__(self, opts, known, graph, features):
        self.opts = opts
        self.features = features
        self.chains = Chains(known)
        self.contexts = semantics.chain_contexts(graph, features, opts)
        self.diags = []
        self._seen = set()
        self.uses_tos = False

    def diag(self, level, src, message):
        key = (src, message)
        if key not in self._seen:
            self._seen.add(key)
            self.diags.append(Diag(level, src, message))

    def skeleton(self):
        """Return the shell function that builds the dispatch chains (run once)."""
        plan = semantics.Plan()
        policies = {name: ("ACCEPT", None) for name in BUILTIN}
        semantics.skeleton(plan, self.features, policies, self.opts)
        if self.uses_tos:
            # -t becomes mangle rules (semantics.tos_extras): their chains
            # are ours too, built and hooked with the others.
            for hook in ("INPUT", "FORWARD", "OUTPUT"):
                plan.chain("mangle", hook, (hook.lower(), "ACCEPT"))
        lines = []
        if self.opts.redirect == "tproxy" and self.features.redirect:
            lines += semantics.tproxy_routing(self.opts)
        return emit_iptables.setup_function(plan, lines)

    def ctx_chains(self, chain):
        """Return [(ctx, table, netfilter chain)] of ipchains CHAIN."""
        return [(ctx, semantics.table_of(ctx, self.opts), semantics.chain_name(ctx, chain))
                for ctx in self.contexts.get(chain, ())]

    def rule_lines(self, rule, chain, ctx, table, nf_chain, op="-A", first=None, cache=None):
        """Return the commands adding (or deleting) RULE in one context (CACHE: kept
        for RULE across its contexts, see semantics.translate_rule)."""
        tr = semantics.translate_rule(rule, chain, ctx, self.opts, cache)
        for d in tr.diags:
            self.diag(d.level, d.src, d.message)
        if tr.untranslated is not None:
            return [tr.untranslated.comment()], 0
        lines, count = [], 0
        # The translate_rule cache holds the match tuples shared between contexts.
        words = cache.setdefault("words", {}) if cache is not None else None
        for nf in tr.rules:
            for args in emit_iptables.rule_args(nf, words):
                pos = [str(first + count)] if first is not None else []
                lines.append(emit_iptables.command(table, [op, nf_chain] + pos + args))
                count += 1
        if op == "-A":
            for table_x, chain_x, nf in tr.extras:
                lines.extend(emit_iptables.append_commands(table_x, chain_x, nf))
        return lines, count

    def command_lines(self, cmd, certain):
        """Return the replacement lines of one ipchains Command (ChainError if refused)."""
        if isinstance(cmd, PortForward):
            return self.portfw_lines(cmd)
        effect = self.chains.apply(cmd, certain)
        for note in command_notes(cmd, flat=False):
            self.diag("note", cmd.src, note)
        handler = getattr(self, "do_" + effect.kind.replace("-", "_"))
        return handler(cmd, effect)

    def do_append(self, cmd, effect):
        lines = []
        caches = [{} for _ in effect.rules]
        for ctx, table, nf_chain in self.ctx_chains(cmd.chain):
            for rule, cache in zip(effect.rules, caches):
                lines.extend(self.rule_lines(rule, cmd.chain, ctx, table, nf_chain,
                                             cache=cache)[0])
        return lines

    def do_insert(self, cmd, effect):
        lines = []
        caches = [{} for _ in effect.rules]
        for ctx, table, nf_chain in self.ctx_chains(cmd.chain):
            pos = 1
            for rule, cache in zip(effect.rules, caches):
                more, count = self.rule_lines(rule, cmd.chain, ctx, table, nf_chain, "-I", pos,
                                              cache)
                lines.extend(more)
                pos += count
        return lines

    def do_rewrite(self, cmd, effect):
        chain = self.chains.chains.get(cmd.chain)
        if chain is None or not chain.certain:
            raise ChainError("rule numbers of '%s' are unknown here: the chain was "
                             "changed inside shell logic" % cmd.chain)
        lines = []
        for ctx, table, nf_chain in self.ctx_chains(cmd.chain):
            lines.append(emit_iptables.command(table, ["-F", nf_chain]))
            for rule in chain.rules:
                lines.extend(self.rule_lines(rule, cmd.chain, ctx, table, nf_chain)[0])
        return lines

    def do_delete_spec(self, cmd, effect):
        lines = []
        for ctx, table, nf_chain in self.ctx_chains(cmd.chain):
            for rule in effect.rules:
                lines.extend(self.rule_lines(rule, cmd.chain, ctx, table, nf_chain, "-D")[0])
        return lines

    def do_policy(self, cmd, effect):
        lines = []
        # Every policy chain of the built-in (pol-mr-input, pol-fo-output...).
        ctxs = [ctx for ctx, builtin in semantics.policy_contexts(self.features)
                if builtin == cmd.chain]
        for ctx in ctxs:
            pol = semantics.POLICY_CHAIN[ctx]
            nf = semantics.policy_rule(ctx, cmd.policy, cmd.src, self.opts)
            lines.append(emit_iptables.command("filter", ["-F", pol]))
            lines.extend(emit_iptables.append_commands("filter", pol, nf))
        return lines

    def do_new(self, cmd, effect):
        return [emit_iptables.command(table, ["-N", nf_chain])
                for _, table, nf_chain in self.ctx_chains(cmd.chain)]

    def do_delete(self, cmd, effect):
        return [emit_iptables.command(table, ["-X", nf_chain])
                for name in effect.chains for _, table, nf_chain in self.ctx_chains(name)]

    def do_flush(self, cmd, effect):
        return [emit_iptables.command(table, ["-F", nf_chain])
                for name in effect.chains for _, table, nf_chain in self.ctx_chains(name)]

    def do_zero(self, cmd, effect):
        return [emit_iptables.command(table, ["-Z", nf_chain])
                for name in effect.chains for _, table, nf_chain in self.ctx_chains(name)]

    def do_none(self, cmd, effect):
        if cmd.op == "M-S":
            return ["sysctl -w %s=%d" % (k, v)
                    for k, v in zip(TIMEOUT_SYSCTLS, cmd.values) if v]
        return [": # %s" % (NOOPS.get(cmd.op, "nothing to translate"))]

    def portfw_lines(self, pf):
        effect = self.chains.portforward(pf)
        if effect.kind == "portfw-flush":
            return [emit_iptables.command("nat", ["-F", "portfw"])]
        op = "-A" if effect.kind == "portfw-add" else "-D"
        return [line for changed in effect.rules for line in
                emit_iptables.append_commands("nat", "portfw", semantics.portfw_rule(changed), op)
                ] or [": # the port forward is there already"]


def translate_shell(sources, opts, defines, names):
    """Return the Result for the shell-script format (iptables commands in place)."""
    inputs, diags = read_inputs(sources, defines, names, flat=False)
    known, graph, features = static_view([p for _, ps in inputs for p in ps])
    tr = ShellTranslator(opts, known, graph, features)
    tr.uses_tos = any(rule.tos is not None for _, ps in inputs for p in ps
                      if isinstance(p.command, Command) for rule in p.command.rules)
    outputs = []
    for index, (reader, parsed) in enumerate(inputs):
        replacements, runs = {}, []
        for p in parsed:
            cmd = p.item.cmd
            indent = _indent(reader.lines[cmd.line - 1]) if cmd is not None else ""
            if isinstance(p.item, Remark):
                replacements[cmd.line] = (cmd.end_line, module_lines(p.item, indent),
                                          not cmd.alone)
                continue
            if p.error:
                lines = [Untranslated(p.item.src, p.error).comment()]
                if not cmd.alone:
                    replacements[cmd.line] = (cmd.line - 1, lines, True)
                    continue
                replacements[cmd.line] = (cmd.end_line, [":"] + lines, False)
                continue
            try:
                lines = tr.command_lines(p.command, p.item.certain)
            except ChainError as exc:
                tr.diag("error", p.item.src, str(exc))
                lines = [":", Untranslated(p.item.src, str(exc)).comment()]
            if not lines:
                lines = [": # %s: %s" % (p.item.src, nothing_reason(p.command, tr))]
            elif not all(type(line) is str and line.startswith(": ") for line in lines):
                # Lines that cannot carry a rule comment (-F, -N, -X,
                # sysctl) say where they come from in a shell comment.
                for i, line in enumerate(lines):
                    if type(line) is str:
                        if "--comment" not in line:
                            lines[i] = "%s  # %s" % (line, p.item.src)
                    elif not line.has_comment():
                        line.origin = p.item.src
                runs.append((cmd, indent, lines,
                             all(emit_iptables.batchable(line) for line in lines)))
                continue
            replacements[cmd.line] = (cmd.end_line, [indent + line for line in lines], False)
        for first, commands in batch_runs(runs, reader.lines):
            replacements.update(commands)
        prologue = []
        if index == 0:
            prologue = (["# Translated from ipchains by ipchains-translate %s: %s"
                         % (VERSION, printable(", ".join(n for n, _ in sources))),
                         "# Dispatch chains: see ipchains-translate(8). They are built by "
                         "%s, run once by the" % emit_iptables.SETUP,
                         "# first translated command; other rules and policies are left alone."]
                        + tr.skeleton())
        outputs.append(splice(reader.lines, replacements, prologue))
    diags.extend(tr.diags)
    return Result("".join(outputs), sort_diags(diags), count_commands(inputs))


def batch_runs(runs, source):
    """Yield (first line, {line: replacement}) for the translated commands RUNS
    ((Cmd, indent, lines, all lines batchable) in script order), in runs the
    shell runs one after the other: same indentation, nothing but blank and
    comment lines between.

    Our chains are built (SETUP) when the script's first ipchains command
    runs, not before its own guards.  A run of several commands becomes one
    iptables-restore --noflush call where the first command stood (the
    others' lines are left empty); a lone command stays iptables commands.
    """
    group = []
    for item in runs + [None]:
        if item is not None and group and item[3] and _follows(group[-1], item, source):
            group.append(item)
            continue
        if group:
            yield group[0][0].line, _run_replacements(group)
        group = [item] if item is not None else []


def _follows(prev, item, source):
    """True when command ITEM runs right after PREV (see batch_runs)."""
    (pcmd, pindent, _, psafe), (cmd, indent, _, _) = prev, item
    if indent != pindent or cmd.line <= pcmd.end_line or not psafe:
        return False
    between = source[pcmd.end_line:cmd.line - 1]
    return all(not line.strip() or line.lstrip().startswith("#") for line in between)


def _run_replacements(group):
    """Return {line: (last line, new lines, False)} for one run of commands."""
    indent = group[0][1]
    if len(group) == 1:
        cmd, _, lines, _ = group[0]
        new = [emit_iptables.SETUP] + [line if type(line) is str else line.shell()
                                       for line in lines]
        return {cmd.line: (cmd.end_line, [indent + line for line in new], False)}
    commands = [line for _, _, lines, _ in group for line in lines]
    body = emit_iptables.batch(commands)
    out = {}
    for k, (cmd, _, _, _) in enumerate(group):
        new = [indent + emit_iptables.SETUP, indent + body[0]] + body[1:] if k == 0 else []
        out[cmd.line] = (cmd.end_line, new, False)
    return out


def nothing_reason(cmd, tr):
    """Say why an ipchains command needs no iptables command here."""
    chain = getattr(cmd, "chain", None)
    if chain is not None and chain not in tr.contexts:
        return "chain '%s' is never jumped to: nothing to emit" % printable(chain)
    return "nothing to do"


def module_lines(remark, indent):
    """Return the lines replacing 'modprobe ip_masq_*': the modern module, noted."""
    words = remark.src.text.split()
    modern = [MODERN_MODULES.get(w, w) for w in words]
    if modern and modern[0].rsplit("/", 1)[-1] == "insmod":
        modern[0] = "modprobe"      # insmod wants a file name; modprobe a module
    lines = ["%s# ipchains-translate: %s" % (indent, remark.message),
             "%s# was: %s" % (indent, " ".join(words))]
    if None not in modern:
        lines.append(indent + " ".join(modern))
    return lines


def _indent(line):
    return line[:len(line) - len(line.lstrip())]


def splice(lines, replacements, prologue):
    """Return LINES with line ranges replaced; PROLOGUE goes after a '#!' line.

    REPLACEMENTS maps a first line to (last line, new lines, keep): with keep
    the original lines stay and the new ones are put before them.
    """
    out = []
    start = 0
    if prologue:
        if lines and lines[0].startswith("#!"):
            out.append(lines[0])
            start = 1
        out.extend(prologue)
    i = start
    for _ in range(len(lines) + 1):
        if i >= len(lines):
            break
        lineno = i + 1
        if lineno in replacements:
            last, new, keep = replacements[lineno]
            out.extend(new)
            if keep:
                last = max(last, lineno)
                out.extend(lines[i:last])
            i = max(last, lineno)
            continue
        out.append(lines[i])
        i += 1
    text = "\n".join(out)
    return text if text.endswith("\n") else text + "\n"


# ---------------------------------------------------------------- entry


def refuse_non_ipchains(sources):
    """Raise InputError when no source holds an ipchains command, or one is binary."""
    reasons = [not_ipchains(name, text, is_save_file(text)) for name, text in sources]
    for reason in reasons:
        if reason is not None and "binary data" in reason:
            raise InputError(reason)
    if reasons and all(reasons):
        raise InputError(reasons[0])


REFUSALS = {
    # How each format refuses to load: a first line its loader rejects.
    "nft": "ipchains-translate: incomplete translation, refusing to load: %s",
    "iptables-restore": "ipchains-translate: incomplete translation, refusing to load: %s",
    "iptables": "echo 'ipchains-translate: incomplete translation, refusing to run: %s' >&2; exit 1",
}


def refuse_partial(result, fmt):
    """Return RESULT's text made unloadable when a command was left out (names the first gap).

    nft and iptables-restore fail on a line that is not a comment or a
    command; the shell script exits 1 before its first command.
    """
    gap = next((d for d in result.diags if d.fails), None)
    if gap is None:
        return result.text
    what = " ".join(gap.format().replace("'", "").split())[:300] + \
        " (give --partial to load the rest anyway)"
    line = REFUSALS[fmt] % what
    lines = result.text.split("\n")
    if lines and lines[0].startswith("#!"):
        return "\n".join(lines[:1] + [line] + lines[1:])
    return line + "\n" + result.text


def translate_rules(sources, opts, defines, names):
    """Return the Result for -e snippets: the rules alone (see snippet.py)."""
    inputs, diags = read_inputs(sources, defines, names, flat=True)
    parsed = [p for _, ps in inputs for p in ps]
    _, graph, features = static_view(parsed)
    contexts = semantics.chain_contexts(graph, features, opts)
    text, more = translate_snippet(parsed, opts, contexts, features)
    return Result(text, sort_diags(diags + more), count_commands(inputs))


def translate(sources, opts, defines=None, hosts=None, snippet=False):
    """Translate SOURCES ((name, text) pairs); return a Result (InputError: unreadable).

    SNIPPET: the sources are -e commands, printed as rules alone.
    """
    refuse_non_ipchains(sources)
    names = Names(hosts, keep_hosts=opts.fmt == "iptables")
    # The IR is a large acyclic set of small objects: the cyclic garbage
    # collector would rescan it again and again as it grows, which makes big
    # scripts superlinear.  Nothing here makes cycles worth collecting.
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        if snippet:
            return translate_rules(sources, opts, defines or {}, names)
        if opts.fmt == "iptables":
            return translate_shell(sources, opts, defines or {}, names)
        return translate_flat(sources, opts, defines or {}, names)
    finally:
        if was_enabled:
            gc.enable()
