"""The intermediate representation: frozen values, each keeping where it came from.

Two layers live here.  The *ipchains* layer (Rule, Command, PortForward)
says what one ipchains or ipmasqadm command meant; the *netfilter* layer
(NfRule and its matches and statements) says what to emit.  Both are
immutable, so a value can be shared between contexts and compared (a rule
spec given to ``-D`` is found by equality; the SourceRef is left out of it).
"""
import re
from dataclasses import dataclass, field
from typing import Optional, Tuple

# Characters that end or rewrite a line in a ruleset, a shell script or a
# terminal: C0 and C1 controls, DEL, Unicode line and paragraph separators.
UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def printable(text):
    """Return TEXT with control characters written as \\xNN (\\uNNNN) escapes.

    Anything copied from the input (file names bash reports, values in
    messages) passes through here before it goes into a comment, a string
    or a message, so it stays there: a newline in it would start a ruleset
    line or a shell command of its own.
    """
    return UNPRINTABLE.sub(lambda m: "\\x%02x" % ord(m.group()) if ord(m.group()) < 256
                           else "\\u%04x" % ord(m.group()), str(text))


def one_line(text):
    """Return a command's source TEXT on one line (continuations joined, no '\\')."""
    return printable(" ".join(text.replace("\\\n", " ").split()))


@dataclass(frozen=True)
class SourceRef:
    """Where a command came from: file name, first line, original text."""

    file: str
    line: int
    text: str = ""

    def __str__(self):
        return "%s:%d" % (printable(self.file), self.line)


class Raw(str):
    """A shell word kept as written (holds an expansion such as ``$EXTIF``).

    Only the shell-script format carries these: the value is known when the
    script runs, so the word is copied verbatim into the iptables command.
    ``value`` is its value when the script's own assignments tell it (used
    to decide, never written), else None.
    """

    def __new__(cls, text, value=None):
        obj = super().__new__(cls, text)
        obj.value = value
        return obj


@dataclass(frozen=True)
class Diag:
    """One diagnostic: level is 'error', 'warning' or 'note'."""

    level: str
    src: Optional[SourceRef]
    message: str

    def format(self, prog="ipchains-translate"):
        """Return the HAProxy-style line ``FILE:LINE: level: message: 'text'``."""
        if self.src is None:
            return "%s: %s: %s" % (prog, self.level, printable(self.message))
        return "%s: %s: %s: '%s'" % (self.src, self.level, printable(self.message),
                                     one_line(self.src.text))

    @property
    def fails(self):
        """True when the command it names was not translated (exit status 1)."""
        return self.level in ("error", "warning")


# ---------------------------------------------------------------- ipchains side


@dataclass(frozen=True)
class Addr:
    """An address match: ``net`` is 'a.b.c.d/len' (or Raw); ``neg`` for '!'."""

    net: str
    neg: bool = False


@dataclass(frozen=True)
class Ports:
    """A port match: a range lo..hi (equal for one port), or a Raw word."""

    lo: int = 0
    hi: int = 65535
    neg: bool = False
    raw: Optional[str] = None

    @property
    def single(self):
        """True when the range holds one port."""
        return self.raw is None and self.lo == self.hi


@dataclass(frozen=True)
class Rule:
    """One ipchains rule: matches, side effects and target; ``src`` not compared."""

    proto: Optional[str] = None          # 'tcp', 'udp', 'icmp', a number, or Raw
    proto_neg: bool = False
    saddr: Optional[Addr] = None
    daddr: Optional[Addr] = None
    sport: Optional[Ports] = None
    dport: Optional[Ports] = None
    icmp_type: Optional[str] = None      # number as text (or Raw)
    icmp_type_neg: bool = False
    icmp_code: Optional[str] = None
    iface: Optional[str] = None
    iface_neg: bool = False
    syn: Optional[bool] = None           # True: -y, False: ! -y
    frag: Optional[bool] = None          # True: -f, False: ! -f
    log: bool = False                    # -l
    tos: Optional[Tuple[int, int]] = None   # -t AND XOR
    mark: Optional[Tuple[str, int]] = None  # -m: ('=', n), ('+', n), ('-', n)
    copy: Optional[int] = None           # -o [size]; 0 means the whole packet
    target: Optional[str] = None         # ACCEPT DENY REJECT MASQ REDIRECT RETURN chain
    port: int = 0                        # REDIRECT port (0: keep the original)
    src: Optional[SourceRef] = field(default=None, compare=False)


@dataclass(frozen=True)
class Command:
    """One ipchains command: op is the option letter ('A', 'I', 'P', 'M-S', ...)."""

    op: str
    src: SourceRef
    chain: Optional[str] = None
    num: Optional[int] = None
    rules: Tuple[Rule, ...] = ()
    policy: Optional[str] = None
    values: Tuple[int, ...] = ()
    notes: Tuple[str, ...] = ()


@dataclass(frozen=True)
class PortForward:
    """One ``ipmasqadm portfw`` command: op 'a' (add), 'd' (delete), 'f' (flush)."""

    op: str
    src: SourceRef
    proto: str = "tcp"
    laddr: str = ""
    lport: int = 0
    raddr: str = ""
    rport: int = 0


# --------------------------------------------------------------- netfilter side


@dataclass(frozen=True)
class MProto:
    """Match the layer-4 protocol."""

    proto: str
    neg: bool = False


@dataclass(frozen=True)
class MAddr:
    """Match source ('s') or destination ('d'); orig/reply: that conntrack tuple's."""

    dir: str
    net: str
    neg: bool = False
    orig: bool = False
    reply: bool = False


@dataclass(frozen=True)
class MPorts:
    """Match a source ('s') or destination ('d') port range (needs MProto earlier)."""

    dir: str
    ports: Ports
    proto: str = "tcp"
    orig: bool = False
    reply: bool = False


@dataclass(frozen=True)
class MIcmp:
    """Match ICMP type (and code)."""

    type: str
    code: Optional[str] = None
    neg: bool = False


@dataclass(frozen=True)
class MIface:
    """Match the input ('in') or output ('out') interface; '+' wildcard kept."""

    dir: str
    name: str
    neg: bool = False


@dataclass(frozen=True)
class MSyn:
    """Match TCP SYN without ACK and RST (neg: anything else)."""

    neg: bool = False


@dataclass(frozen=True)
class MFrag:
    """Match second and later fragments (neg: first fragments and whole packets)."""

    neg: bool = False


@dataclass(frozen=True)
class MConn:
    """Match conntrack: state is 'SNAT' or 'DNAT'; dir is 'ORIGINAL' or 'REPLY'."""

    state: str
    dir: str


@dataclass(frozen=True)
class MSocket:
    """Match packets for a local transparent socket (the TPROXY recipe's first rule)."""

    transparent: bool = True


@dataclass(frozen=True)
class MLocal:
    """Match packets addressed to one of this host's own addresses."""


@dataclass(frozen=True)
class MMark:
    """Match packets whose mark (ct: whose connection's mark) has all bits of VALUE set."""

    value: int
    ct: bool = False


@dataclass(frozen=True)
class SLog:
    """Log the packet with a prefix."""

    prefix: str


@dataclass(frozen=True)
class SCopy:
    """Copy the packet to userspace (NFLOG group 0); size 0 means all of it."""

    size: int = 0


@dataclass(frozen=True)
class SMark:
    """Set the packet mark (ct: the connection's mark): op '=' sets it, '|' sets the bits."""

    op: str
    value: int
    ct: bool = False


@dataclass(frozen=True)
class STos:
    """TOS = (TOS & and_mask) ^ xor_mask, as ipchains -t did."""

    and_mask: int
    xor_mask: int


@dataclass(frozen=True)
class Verdict:
    """What ends the rule.

    kind: accept drop reject return jump goto redirect tproxy masquerade dnat,
    or None (count only).  arg: the chain, the port, the reject type
    ('port-unreach', 'host-unreach', 'tcp-reset'), the DNAT 'addr:port' or
    the masquerade port range 'lo-hi' (None: any port).
    """

    kind: Optional[str] = None
    arg: object = None
    mark: int = 0


@dataclass(frozen=True)
class NfRule:
    """One netfilter rule: matches, then statements, then a verdict; with origin."""

    matches: tuple = ()
    stmts: tuple = ()
    verdict: Verdict = Verdict()
    origin: str = ""


@dataclass(frozen=True)
class Untranslated:
    """A command kept as a comment: its origin and why."""

    src: SourceRef
    why: str

    def comment(self):
        """Return the comment line that keeps the command's text ('#' in every format)."""
        text = one_line(self.src.text) if self.src else ""
        return "# %s: untranslated (%s): %s" % (self.src, printable(self.why), text)
