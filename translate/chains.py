"""Simulates what ipchains did to its chain lists, command by command.

``Chains.apply(command, certain)`` changes the state as ipchains would and
returns an Effect (what the shell-script format must do in place) or raises
ChainError.  Appends are O(1) and lookups go through dicts, so a script of
many ``-A`` lines is simulated in linear time.  The state after the last
command is what the flat formats emit.
"""
from dataclasses import dataclass, field
from typing import List, Optional

from .ipchains import BUILTIN, VERDICTS


class ChainError(Exception):
    """The command is well formed but ipchains would have refused it here."""


@dataclass
class Chain:
    """One chain: its rules, and for built-ins the policy and its origin."""

    name: str
    rules: List = field(default_factory=list)
    policy: Optional[str] = None
    policy_src: object = None
    certain: bool = True        # False once changed by shell logic we cannot follow


@dataclass(frozen=True)
class Effect:
    """What a command did: kind and the chains (and rules) it touched."""

    kind: str                   # append insert rewrite delete-spec policy new delete flush zero none
    chains: tuple = ()
    rules: tuple = ()
    num: Optional[int] = None


class Chains:
    """The chains of one ipchains firewall, as the kernel would hold them."""

    def __init__(self, known_chains=()):
        self.chains = {}
        for name in BUILTIN:
            self.chains[name] = Chain(name, policy="ACCEPT")
        self.known = set(known_chains)     # every chain the script ever creates
        self.edges = {}                    # (from, to) -> number of jump rules
        self.portfw = {}                   # portfw_key -> PortForward, in order added

    # --- queries ---------------------------------------------------------------

    def user_chains(self):
        """Return the names of the user chains in creation order."""
        return [n for n in self.chains if n not in BUILTIN]

    def jumps_from(self, name):
        """Return the chains that rules of NAME jump to."""
        return [b for (a, b), n in self.edges.items() if a == name and n > 0]

    def _reaches(self, start, goal):
        seen, todo = set(), [start]
        for _ in range(len(self.chains) + len(self.known) + 1):
            if not todo:
                return False
            name = todo.pop()
            if name == goal:
                return True
            if name not in seen:
                seen.add(name)
                todo.extend(self.jumps_from(name))
        return goal in todo

    # --- checks ------------------------------------------------------------------

    def _chain(self, name, certain):
        if name in self.chains:
            return self.chains[name]
        if not certain and name in self.known:
            return None
        raise ChainError("no chain '%s' (create it with -N first)" % name)

    def _check_targets(self, chain, rules, certain):
        for rule in rules:
            target = rule.target
            if target is None or target in VERDICTS:
                continue
            if target in BUILTIN:
                raise ChainError("cannot jump to the built-in chain '%s'" % target)
            if target not in self.chains and not (not certain and target in self.known):
                hint = {"DROP": " (ipchains spells it DENY)",
                        "MASQUERADE": " (ipchains spells it MASQ)"}.get(target.upper(), "")
                raise ChainError("unknown target '%s': no such chain%s" % (target, hint))
            if target == chain or self._reaches(target, chain):
                raise ChainError("jumping to '%s' would make a loop" % target)

    def _count_edges(self, chain, rules, delta):
        for rule in rules:
            if rule.target is not None and rule.target not in VERDICTS:
                key = (chain, rule.target)
                self.edges[key] = self.edges.get(key, 0) + delta

    # --- commands ----------------------------------------------------------------

    def apply(self, cmd, certain=True):
        """Apply one Command; return its Effect or raise ChainError."""
        handler = getattr(self, "_op_" + cmd.op.replace("-", "_"), None)
        if handler is None:
            return Effect("none")
        return handler(cmd, certain)

    def _op_A(self, cmd, certain):
        chain = self._chain(cmd.chain, certain)
        self._check_targets(cmd.chain, cmd.rules, certain)
        if chain is not None:
            chain.rules.extend(cmd.rules)
            chain.certain = chain.certain and certain
        self._count_edges(cmd.chain, cmd.rules, +1)
        return Effect("append", (cmd.chain,), cmd.rules)

    def _op_I(self, cmd, certain):
        chain = self._chain(cmd.chain, certain)
        self._check_targets(cmd.chain, cmd.rules, certain)
        num = cmd.num or 1
        if chain is not None:
            if num > len(chain.rules) + 1 and chain.certain:
                raise ChainError("rule number %d is past the end of '%s' (%d rules)"
                                 % (num, cmd.chain, len(chain.rules)))
            chain.rules[num - 1:num - 1] = list(cmd.rules)
            chain.certain = chain.certain and certain
        self._count_edges(cmd.chain, cmd.rules, +1)
        kind = "insert" if num == 1 else "rewrite"
        return Effect(kind, (cmd.chain,), cmd.rules, num)

    def _numbered(self, cmd, certain):
        chain = self._chain(cmd.chain, certain)
        if chain is None or not chain.certain or not certain:
            raise ChainError("rule number %d of '%s' is unknown here: the chain was "
                             "changed inside shell logic" % (cmd.num, cmd.chain))
        if cmd.num > len(chain.rules):
            raise ChainError("no rule %d in '%s' (%d rules)"
                             % (cmd.num, cmd.chain, len(chain.rules)))
        return chain

    def _op_R(self, cmd, certain):
        chain = self._numbered(cmd, certain)
        self._check_targets(cmd.chain, cmd.rules, certain)
        old = chain.rules[cmd.num - 1]
        self._count_edges(cmd.chain, (old,), -1)
        chain.rules[cmd.num - 1] = cmd.rules[0]
        self._count_edges(cmd.chain, cmd.rules, +1)
        return Effect("rewrite", (cmd.chain,), cmd.rules, cmd.num)

    def _op_D(self, cmd, certain):
        if cmd.num is not None:
            chain = self._numbered(cmd, certain)
            old = chain.rules.pop(cmd.num - 1)
            self._count_edges(cmd.chain, (old,), -1)
            return Effect("rewrite", (cmd.chain,), (), cmd.num)
        chain = self._chain(cmd.chain, certain)
        removed = []
        for rule in cmd.rules:
            try:
                index = chain.rules.index(rule) if chain is not None else -1
            except ValueError:
                index = -1
            if index < 0:
                raise ChainError("no such rule in '%s'" % cmd.chain)
            # The stored rule keeps its own origin, which the emitted rules carry.
            removed.append(chain.rules.pop(index))
        self._count_edges(cmd.chain, cmd.rules, -1)
        return Effect("delete-spec", (cmd.chain,), tuple(removed))

    def _op_P(self, cmd, certain):
        if cmd.chain not in BUILTIN:
            raise ChainError("only built-in chains have a policy, not '%s'" % cmd.chain)
        if cmd.policy == "MASQ" and cmd.chain != "forward":
            raise ChainError("MASQ is only a policy for forward")
        chain = self.chains[cmd.chain]
        chain.policy, chain.policy_src = cmd.policy, cmd.src
        return Effect("policy", (cmd.chain,))

    def _op_N(self, cmd, certain):
        if cmd.chain in BUILTIN or cmd.chain.upper() in VERDICTS or cmd.chain == "REDIR":
            raise ChainError("'%s' is reserved and cannot be a chain name" % cmd.chain)
        if cmd.chain in self.chains:
            if certain:
                raise ChainError("chain '%s' already exists" % cmd.chain)
            return Effect("new", (cmd.chain,))
        self.chains[cmd.chain] = Chain(cmd.chain, certain=certain)
        return Effect("new", (cmd.chain,))

    def _op_X(self, cmd, certain):
        if cmd.chain is None:
            names = self.user_chains()
            for name in names:
                if self.chains[name].rules and certain:
                    raise ChainError("chain '%s' is not empty (flush it with -F first)" % name)
        elif cmd.chain in BUILTIN:
            raise ChainError("cannot delete the built-in chain '%s'" % cmd.chain)
        else:
            chain = self._chain(cmd.chain, certain)
            if chain is not None and chain.rules and certain:
                raise ChainError("chain '%s' is not empty (flush it with -F first)" % cmd.chain)
            users = [a for (a, b), n in self.edges.items()
                     if b == cmd.chain and n > 0 and a != cmd.chain]
            if users and certain:
                raise ChainError("chain '%s' is still used by '%s'" % (cmd.chain, users[0]))
            names = [cmd.chain]
        for name in names:
            chain = self.chains.pop(name, None)
            if chain is not None:
                self._count_edges(name, chain.rules, -1)
        return Effect("delete", tuple(names))

    def _op_F(self, cmd, certain):
        names = list(self.chains) if cmd.chain is None else [cmd.chain]
        for name in names:
            chain = self._chain(name, certain)
            if chain is not None:
                self._count_edges(name, chain.rules, -1)
                chain.rules = []
                chain.certain = certain
        return Effect("flush", tuple(names))

    def _op_Z(self, cmd, certain):
        names = list(self.chains) if cmd.chain is None else [cmd.chain]
        for name in names:
            self._chain(name, certain)
        return Effect("zero", tuple(names))

    def _op_C(self, cmd, certain):
        self._chain(cmd.chain, certain)
        return Effect("none")

    def portforward(self, pf):
        """Apply one PortForward; return its Effect or raise ChainError.

        As ip_masq_portfw.c did: an add of a forward already there (same
        protocol, local and remote address and port) changes nothing
        (ip_portfw_add -> ip_portfw_edit); a delete removes every forward of
        its protocol and local port whose local address, remote address and
        remote port equal those given, each left out (0) matching any
        (ip_portfw_del), and fails with ESRCH when none is removed.
        """
        if pf.op == "f":
            self.portfw.clear()
            return Effect("portfw-flush")
        key = portfw_key(pf)
        if pf.op == "a":
            if key in self.portfw:
                return Effect("portfw-add")         # no second copy to delete later
            self.portfw[key] = pf
            return Effect("portfw-add", rules=(pf,))
        gone = [k for k in self.portfw if portfw_deletes(pf, self.portfw[k])]
        if not gone:
            raise ChainError("no such port forward")
        return Effect("portfw-delete", rules=tuple(self.portfw.pop(k) for k in gone))


def portfw_key(pf):
    """Return what identifies a port forward: protocol, local and remote address and port."""
    return (pf.proto, pf.laddr, pf.lport, pf.raddr, pf.rport)


def portfw_deletes(delete, entry):
    """True when ipmasqadm portfw -d DELETE removes forward ENTRY (ip_portfw_del's test)."""
    return (delete.proto == entry.proto and delete.lport == entry.lport
            and (not delete.laddr or delete.laddr == entry.laddr)
            and (not delete.raddr or delete.raddr == entry.raddr)
            and (not delete.rport or delete.rport == entry.rport))
