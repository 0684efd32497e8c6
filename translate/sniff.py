"""Says what an input is when it is not an ipchains firewall (fail closed on it).

``not_ipchains(name, text)`` returns None for an input holding at least one
ipchains, ipchains-restore or ipmasqadm command (or an ipchains-save dump),
else a located one-line reason naming what the input looks like instead:
empty, binary, iptables-save or nft ruleset, iptables script, or just
something without an ipchains command.
"""
import re

from .shell import ShellError, Word, _walk_cmds, assignment, parse, program_of

PROGRAMS = ("ipchains", "ipchains-restore", "ipmasqadm")
LOOKS = (
    (re.compile(r"\s*\*(filter|nat|mangle|raw|security)\s*$"), "iptables-save output"),
    (re.compile(r"\s*:[A-Z][A-Z_-]* (ACCEPT|DROP|-) \[\d+:\d+\]"), "iptables-save output"),
    (re.compile(r"\s*(table|flush ruleset|add table)\b"), "an nftables ruleset"),
    (re.compile(r"\s*(\S*/)?(iptables|ip6tables|iptables-restore)(\s|$)"),
     "an iptables script"),
    (re.compile(r"\s*(\S*/)?nft(\s|$)"), "an nft script"),
    (re.compile(r"\s*\$\{?IPTABLES\b"), "an iptables script"),
)


def is_binary(text):
    """True for text holding NUL, or mostly control characters and bytes that are
    not UTF-8 (a Latin-1 comment in an old script is not binary)."""
    head = text[:4096]
    odd = sum(1 for c in head if (c < " " and c not in "\t\n\r\f") or "\udc80" <= c <= "\udcff")
    return "\0" in text[:65536] or odd * 10 > len(head)


CANDIDATE = re.compile(r"ipchains|ipmasqadm|IPCHAINS|MASQADM", re.I)


def has_ipchains(text):
    """True when shell TEXT runs ipchains, ipchains-restore or ipmasqadm somewhere.

    Only lines naming one are read as shell (one at a time, so a big
    firewall costs no more than its first command).
    """
    for line in text.split("\n"):
        if CANDIDATE.search(line) and line_has_ipchains(line):
            return True
    return False


def line_has_ipchains(line):
    """True when the shell LINE holds an ipchains command (an unreadable line counts)."""
    try:
        tree = parse(line.rstrip("\\"))
    except ShellError:
        return True
    for cmd in _walk_cmds(tree):
        words = list(cmd.words)
        while words and assignment(words[0]):
            words = words[1:]
        for word in words[:2]:     # 'exec ipchains', '$SUDO ipchains' as well
            if isinstance(word, Word) and program_of(word, {}) in PROGRAMS:
                return True
    return False


def not_ipchains(name, text, save_file=False):
    """Return None for ipchains input, else 'NAME:LINE: ...' saying what it looks like."""
    if is_binary(text):
        return "%s:1: binary data, not an ipchains script: nothing translated" % name
    lines = text.split("\n")
    code = [(n, line) for n, line in enumerate(lines, 1)
            if line.strip() and not line.lstrip().startswith("#")]
    if not code:
        return "%s:1: empty input (no commands): no ipchains command to translate" % name
    if save_file or has_ipchains(text):
        return None
    for number, line in code:
        for pattern, what in LOOKS:
            if pattern.match(line):
                return ("%s:%d: this looks like %s, not ipchains: no ipchains command "
                        "in it: '%s'" % (name, number, what, " ".join(line.split())[:80]))
    number, line = code[0]
    return ("%s:%d: no ipchains command in it (first command: '%s')"
            % (name, number, " ".join(line.split())[:80]))
