"""The ipchains (and ipmasqadm portfw) grammar: one argv -> one IR command.

``parse(argv, src, names)`` returns a Command (or PortForward) or raises
ParseError with a message; it never looks at other commands (the chain
simulation in chains.py does).  Words may be ``Raw`` (shell expansions kept
for the shell-script format); they pass through as opaque values.
"""
import re
import socket
from dataclasses import replace

from .ir import Addr, Command, PortForward, Ports, Raw, Rule

# A chain name is written bare into nft (where ';', '{', '}' and '#' are
# syntax) and into iptables-restore lines: only these characters carry over.
BAD_CHAIN_CHARS = re.compile(r"[^A-Za-z0-9_.-]")

BUILTIN = ("input", "output", "forward")
HOST_NAME = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_.-]{0,252})")
VERDICTS = ("ACCEPT", "DENY", "REJECT", "MASQ", "REDIRECT", "RETURN")
POLICIES = ("ACCEPT", "DENY", "REJECT", "MASQ")

# Protocol names ipchains knew; numbers are kept as numbers (0 means all).
PROTOCOLS = {"all": None, "tcp": "tcp", "udp": "udp", "icmp": "icmp"}
PROTO_NUMBERS = {"0": None, "6": "tcp", "17": "udp", "1": "icmp"}

# A fixed table first, so that a translation does not depend on /etc/services.
SERVICES = {
    "ftp-data": 20, "ftp": 21, "ssh": 22, "telnet": 23, "smtp": 25,
    "domain": 53, "bootps": 67, "bootpc": 68, "tftp": 69, "finger": 79,
    "www": 80, "http": 80, "pop3": 110, "pop-3": 110, "auth": 113,
    "ident": 113, "nntp": 119, "ntp": 123, "netbios-ns": 137,
    "netbios-dgm": 138, "netbios-ssn": 139, "imap": 143, "imap2": 143,
    "snmp": 161, "https": 443, "syslog": 514, "printer": 515,
    "talk": 517, "ntalk": 518, "route": 520, "uucp": 540, "socks": 1080,
    "squid": 3128, "webcache": 8080, "x11": 6000,
}

# ICMP types by name, with the code a name implies (ipchains -h icmp).
ICMP_TYPES = {
    "echo-reply": (0, None), "pong": (0, None),
    "destination-unreachable": (3, None),
    "network-unreachable": (3, 0), "host-unreachable": (3, 1),
    "protocol-unreachable": (3, 2), "port-unreachable": (3, 3),
    "fragmentation-needed": (3, 4), "source-route-failed": (3, 5),
    "network-unknown": (3, 6), "host-unknown": (3, 7),
    "network-prohibited": (3, 9), "host-prohibited": (3, 10),
    "TOS-network-unreachable": (3, 11), "TOS-host-unreachable": (3, 12),
    "communication-prohibited": (3, 13), "host-precedence-violation": (3, 14),
    "precedence-cutoff": (3, 15), "source-quench": (4, None),
    "redirect": (5, None), "network-redirect": (5, 0), "host-redirect": (5, 1),
    "TOS-network-redirect": (5, 2), "TOS-host-redirect": (5, 3),
    "echo-request": (8, None), "ping": (8, None),
    "router-advertisement": (9, None), "router-solicitation": (10, None),
    "time-exceeded": (11, None), "ttl-exceeded": (11, None),
    "ttl-zero-during-transit": (11, 0), "ttl-zero-during-reassembly": (11, 1),
    "parameter-problem": (12, None), "ip-header-bad": (12, 0),
    "required-option-missing": (12, 1), "timestamp-request": (13, None),
    "timestamp-reply": (14, None), "address-mask-request": (17, None),
    "address-mask-reply": (18, None),
}

COMMANDS = {
    "-A": "A", "--append": "A", "-I": "I", "--insert": "I",
    "-R": "R", "--replace": "R", "-D": "D", "--delete": "D",
    "-P": "P", "--policy": "P", "-N": "N", "--new-chain": "N",
    "-X": "X", "--delete-chain": "X", "-F": "F", "--flush": "F",
    "-Z": "Z", "--zero": "Z", "-L": "L", "--list": "L",
    "-C": "C", "--check": "C", "-M": "M", "--masquerading": "M",
    "-h": "h", "--help": "h", "-V": "V", "--version": "V",
}
NEEDS_CHAIN = ("A", "I", "R", "D", "P", "N", "C")
TAKES_RULE = ("A", "I", "R", "D", "C")
LISTING_FLAGS = ("-v", "--verbose", "-n", "--numeric", "-x", "--exact",
                 "--line-numbers")


class ParseError(Exception):
    """The command is not valid ipchains; the message says why."""


class HostNotYetSeen(Exception):
    """A host name not in the texts the script read so far (Names.provisional)."""


class Names:
    """Resolves host and service names; ``keep_hosts`` keeps names as written."""

    def __init__(self, hosts=None, keep_hosts=False):
        self.hosts = dict(hosts or {})
        self.keep_hosts = keep_hosts
        self._cache = {}
        # The texts bash read, when the names come from a script run in the
        # sandbox: only names written there are given to the resolver.
        self.written = None
        # While the script still runs, a name not (yet) in those texts may
        # be in a file it reads later: HostNotYetSeen, asked again after.
        self.provisional = False

    def host(self, name):
        """Return the IPv4 addresses of NAME (mapping first, then the resolver)."""
        if name in self.hosts:
            return self.hosts[name]
        if name not in self._cache and self.written is not None and \
                not any(name in text for text in self.written):
            if self.provisional:
                raise HostNotYetSeen(name)
            # Looked up outside the sandbox, a name the script built from
            # what it read would carry that out in a DNS query.
            self._cache[name] = None
        if name in self._cache and self._cache[name] is None:
            raise ParseError("host name '%s' was computed by the script; it is not looked up "
                             "(give --host %s=ADDRESS)" % (name, name))
        if name not in self._cache:
            try:
                infos = socket.getaddrinfo(name, None, socket.AF_INET)
                addrs = sorted({info[4][0] for info in infos}, key=_ip_key)
            except (OSError, UnicodeError):
                addrs = []
            self._cache[name] = addrs
        if not self._cache[name]:
            raise ParseError("cannot resolve host name '%s' (give --host %s=ADDRESS)"
                             % (name, name))
        return self._cache[name]

    @staticmethod
    def service(name, proto):
        """Return the port number of service NAME for PROTO."""
        if name in SERVICES:
            return SERVICES[name]
        try:
            return socket.getservbyname(name, proto if proto in ("tcp", "udp") else "tcp")
        except OSError:
            raise ParseError("unknown service name '%s'" % name)


def _ip_key(text):
    return tuple(int(p) for p in text.split("."))


def parse_ipv4(text):
    """Return dotted quad TEXT as an int, or None when it is not one."""
    parts = text.split(".")
    if len(parts) != 4 or not all(p.isdigit() and len(p) <= 3 for p in parts):
        return None
    nums = [int(p) for p in parts]
    if any(n > 255 for n in nums):
        return None
    return (nums[0] << 24) | (nums[1] << 16) | (nums[2] << 8) | nums[3]


def format_ipv4(value):
    """Return int VALUE as a dotted quad."""
    return socket.inet_ntoa(value.to_bytes(4, "big"))


def parse_mask(text):
    """Return the prefix length of '/N' or '/a.b.c.d'; ParseError if invalid."""
    if text.isdigit():
        bits = int(text)
        if bits > 32:
            raise ParseError("mask /%s is longer than 32 bits" % text)
        return bits
    value = parse_ipv4(text)
    if value is None:
        raise ParseError("bad mask '/%s'" % text)
    bits = bin(value).count("1")
    if value != ((0xFFFFFFFF << (32 - bits)) & 0xFFFFFFFF):
        raise ParseError("mask %s is not contiguous; netfilter cannot express it" % text)
    return bits


def parse_addresses(text, names, _numeric={}):
    """Return the 'a.b.c.d/len' networks of an ipchains address (many for a name)."""
    if isinstance(text, Raw):
        return [text]
    # Scripts repeat their addresses; numeric ones mean the same whatever NAMES says.
    known = _numeric.get(text)
    if known is not None:
        return list(known)
    nets = _parse_addresses(text, names)
    host = text.partition("/")[0]
    if len(_numeric) < 100000 and (parse_ipv4(host) is not None or host in ("any", "0")):
        _numeric[text] = tuple(nets)
    return nets


def _parse_addresses(text, names):
    """parse_addresses() of a word that is not Raw."""
    host, _, mask = text.partition("/")
    if not host:
        raise ParseError("empty address in '%s'" % text)
    if ":" in host:
        raise ParseError("'%s' is IPv6; ipchains is IPv4 only" % text)
    bits = parse_mask(mask) if mask else None
    if host in ("any", "0"):
        return ["0.0.0.0/0"] if bits in (None, 0) else ["0.0.0.0/%d" % bits]
    value = parse_ipv4(host)
    if value is None:
        if all(c.isdigit() or c == "." for c in host) or not HOST_NAME.fullmatch(host):
            raise ParseError("bad address '%s'" % host)
        if names.keep_hosts:
            return [Raw(text)]
        values = [parse_ipv4(a) for a in names.host(host)]
    else:
        values = [value]
    bits = 32 if bits is None else bits
    mask_value = (0xFFFFFFFF << (32 - bits)) & 0xFFFFFFFF
    return ["%s/%d" % (format_ipv4(v & mask_value), bits) for v in values]


def parse_port(text, proto, names):
    """Return one port number from a number or a service name."""
    if text.isdigit():
        port = int(text)
        if port > 65535:
            raise ParseError("port %s is out of range (0-65535)" % text)
        return port
    return names.service(text, proto)


def parse_ports(text, proto, names, neg=False):
    """Return Ports for 'a', 'a:b', ':b' or 'a:' (numbers or service names)."""
    if isinstance(text, Raw):
        return Ports(neg=neg, raw=text)
    if ":" not in text:
        port = parse_port(text, proto, names)
        return Ports(port, port, neg)
    lo_text, _, hi_text = text.partition(":")
    lo = parse_port(lo_text, proto, names) if lo_text else 0
    hi = parse_port(hi_text, proto, names) if hi_text else 65535
    if lo > hi:
        raise ParseError("port range %s is reversed" % text)
    return Ports(lo, hi, neg)


def parse_icmp(text, what):
    """Return (type, code) for an ICMP type name or number; code may be None."""
    if isinstance(text, Raw):
        return text, None
    if text in ICMP_TYPES:
        return ICMP_TYPES[text]
    lo, colon, hi = text.partition(":")
    if colon and lo.isdigit() and lo == hi:
        text = lo              # ipchains-save writes one type as '8:8'
    elif colon and what == "type":
        lo, hi = lo or "0", hi or "255"
        if lo.isdigit() and hi.isdigit() and int(lo) < int(hi) <= 255:
            return "%s:%s" % (lo, hi), None     # a range: nft only
        raise ParseError("bad ICMP type range '%s'" % text)
    elif colon:
        raise ParseError("ICMP %s ranges cannot be translated: '%s'" % (what, text))
    if text.isdigit() and int(text) <= 255:
        return int(text), None
    raise ParseError("unknown ICMP %s '%s'" % (what, text))


def parse_protocol(text):
    """Return the protocol as 'tcp', 'udp', 'icmp', a number text, None (all) or Raw."""
    if isinstance(text, Raw):
        return text
    low = text.lower()
    if low in PROTOCOLS:
        return PROTOCOLS[low]
    if low in PROTO_NUMBERS:
        return PROTO_NUMBERS[low]
    if text.isdigit() and int(text) <= 255:
        return text
    try:
        return str(socket.getprotobyname(low))
    except OSError:
        raise ParseError("unknown protocol '%s'" % text)


def glued_option(before):
    """Return a message when a word of BEFORE runs into an option ('1024:-j'), else ''."""
    for word in reversed(before):
        if isinstance(word, Raw) or word.startswith("-"):
            continue
        head, dash, option = word.partition(":-")
        if dash and option and option[0].isalpha():
            return ("'%s' runs into the option '-%s': a space is missing before it"
                    % (word, option))
        return ""
    return ""


class _Words:
    """A cursor over argv words."""

    def __init__(self, words):
        self.words = list(words)
        self.i = 0
        self.n = len(self.words)

    def more(self):
        return self.i < self.n

    def peek(self, ahead=0):
        j = self.i + ahead
        return self.words[j] if j < self.n else None

    def take(self, what):
        if not self.more():
            raise ParseError("%s needs an argument" % what)
        word = self.words[self.i]
        self.i += 1
        return word

    def take_neg(self, what):
        """Take an argument that may be preceded by '!'; return (word, negated)."""
        neg = False
        if self.peek() == "!":
            self.i += 1
            neg = True
        return self.take(what), neg

    def optional_value(self):
        """Take the next word if it is a value (not an option, not '! -x')."""
        word = self.peek()
        if word is None or (word.startswith("-") and not isinstance(word, Raw)):
            return None
        if word == "!":
            return None
        self.i += 1
        return word


def _literal(word, what):
    if isinstance(word, Raw):
        raise ParseError("%s must be written literally, not '%s' "
                         "(give -D or expand it)" % (what, word))
    return word


def _number(word, what):
    word = _literal(word, what)
    if not word.isdigit():
        raise ParseError("%s must be a number, not '%s'" % (what, word))
    return int(word)


def is_number(word):
    """True when WORD is a literal non-negative integer."""
    return word is not None and not isinstance(word, Raw) and word.isdigit()


def parse(argv, src, names):
    """Parse one invocation (argv[0] is the program); return an IR command."""
    prog = argv[0].rsplit("/", 1)[-1] if argv else ""
    if prog == "ipmasqadm" or (isinstance(argv[0], Raw) and "MASQADM" in argv[0].upper()):
        return parse_ipmasqadm(argv[1:], src, names)
    return _Parser(argv[1:], src, names).run()


class _Parser:
    """Parses one ipchains argv; one small method per option."""

    def __init__(self, words, src, names):
        self.w = _Words(words)
        self.src = src
        self.names = names
        self.op = None
        self.chain = None
        self.num = None
        self.policy = None
        self.values = ()
        self.notes = []
        self.f = {}          # rule fields as parsed (words, not yet interpreted)
        self.rule_given = False

    def run(self):
        w = self.w
        if not w.more():
            raise ParseError("no command given")
        words, option = w.words, self.option
        while w.i < w.n:
            w.i += 1
            option(words[w.i - 1])
        if self.op is None:
            raise ParseError("no command given (one of -A -I -R -D -P -N -X -F -Z -L -C -M)")
        if self.rule_given and self.op not in TAKES_RULE:
            raise ParseError("-%s does not take rule options" % self.op)
        rules = ()
        if self.op in TAKES_RULE and not (self.op == "D" and self.num is not None):
            rules = self.rules()
            if self.op == "R" and len(rules) > 1:
                raise ParseError("-R needs a rule that names one address each way")
        elif self.op == "D" and self.rule_given:
            raise ParseError("-D takes a rule number or a rule, not both")
        return Command(self.op, self.src, self.chain, self.num, rules, self.policy,
                       self.values, tuple(self.notes))

    # --- commands -------------------------------------------------------------

    def option(self, word):
        if isinstance(word, Raw):
            raise ParseError("option '%s' must be written literally" % word)
        if word in COMMANDS:
            return self.command(COMMANDS[word], word)
        if word == "!":
            nxt = self.w.peek()
            if nxt in ("-y", "--syn", "-f", "--fragment"):
                self.w.take("!")
                return self.rule_option(nxt, neg=True)
            raise ParseError("'!' must come before -y, -f or an option's value")
        if word in LISTING_FLAGS:
            if self.op not in (None, "L", "Z"):
                raise ParseError("%s is only for -L" % word)
            return None
        return self.rule_option(word)

    def command(self, op, word):
        if self.op is not None:
            raise ParseError("two commands in one line (%s after -%s)" % (word, self.op))
        self.op = op
        if op == "M":
            return self.masquerading()
        if op in ("h", "V"):
            return None
        if op in NEEDS_CHAIN:
            self.chain = _literal(self.w.take(word), "the chain name")
        elif self.w.optional_value() is not None:
            self.chain = _literal(self.w.words[self.w.i - 1], "the chain name")
        if self.chain is not None and len(self.chain) > 8:
            raise ParseError("chain name '%s' is longer than 8 characters" % self.chain)
        if self.chain is not None and BAD_CHAIN_CHARS.search(self.chain):
            raise ParseError("bad chain name '%s': only letters, digits, '_', '.' and '-' "
                             "carry over to iptables and nft" % self.chain)
        if op == "I" and is_number(self.w.peek()):
            self.num = self.positive(self.w.take(word))
        elif op == "R":
            self.num = self.positive(self.w.take("-R"))
        elif op == "D" and is_number(self.w.peek()):
            self.num = self.positive(self.w.take(word))
        elif op == "P":
            # ipchains compared policies with strcmp (parse_policy): case matters.
            policy = _literal(self.w.take("-P"), "the policy")
            if policy not in POLICIES:
                raise ParseError("bad policy '%s' (ACCEPT, DENY, REJECT or MASQ, in "
                                 "capitals as ipchains wanted them)" % policy)
            self.policy = policy
        return None

    @staticmethod
    def positive(word):
        num = _number(word, "the rule number")
        if num < 1:
            raise ParseError("rule numbers start at 1")
        return num

    def masquerading(self):
        sub = self.w.take("-M")
        if sub in ("-L", "--list"):
            self.op = "M-L"
            while self.w.peek() in LISTING_FLAGS:
                self.w.take("-M -L")
            return None
        if sub in ("-S", "--set"):
            self.op = "M-S"
            self.values = tuple(_number(self.w.take("-M -S (tcp tcpfin udp)"), "a timeout")
                                for _ in range(3))
            return None
        raise ParseError("-M needs -L or -S")

    # --- rule options ----------------------------------------------------------

    def rule_option(self, word, neg=False):
        handler = RULE_OPTIONS.get(word)
        if handler is None:
            glued = glued_option(self.w.words[:self.w.i - 1])
            if glued:
                raise ParseError(glued)
            raise ParseError("unknown option '%s'" % word)
        self.rule_given = True
        handler(self, word, neg)

    def once(self, key, value):
        if key in self.f:
            raise ParseError("%s given twice" % key)
        self.f[key] = value

    def opt_proto(self, word, _neg):
        text, neg = self.w.take_neg(word)
        self.once("-p", (parse_protocol(text), neg, text))

    def opt_addr(self, word, _neg):
        key = "-s" if word in ("-s", "--source", "--src") else "-d"
        text, neg = self.w.take_neg(word)
        port, port_neg = None, False
        if self.w.peek() == "!" and self.w.peek(1) is not None and \
                (not self.w.peek(1).startswith("-") or isinstance(self.w.peek(1), Raw)):
            self.w.take("!")
            port_neg = True
        port = self.w.optional_value()
        if port_neg and port is None:
            raise ParseError("'!' after %s needs a port" % word)
        self.once(key, (text, neg))
        if port is not None:
            self.once(key + "port", (port, port_neg))

    def opt_port(self, word, _neg):
        key = "-sport" if word in ("--sport", "--source-port") else "-dport"
        text, neg = self.w.take_neg(word)
        self.once(key, (text, neg))

    def opt_icmp(self, word, _neg):
        text, neg = self.w.take_neg(word)
        self.once("-sport", (text, neg))
        self.f["icmp-option"] = True

    def opt_iface(self, word, _neg):
        text, neg = self.w.take_neg(word)
        if not isinstance(text, Raw) and (len(text) > 15 or not text):
            raise ParseError("bad interface name '%s'" % text)
        self.once("-i", (text, neg))

    def opt_syn(self, word, neg):
        self.once("-y", not neg)

    def opt_frag(self, word, neg):
        self.once("-f", not neg)

    def opt_bidir(self, word, _neg):
        self.once("-b", True)

    def opt_log(self, word, _neg):
        self.once("-l", True)

    def opt_jump(self, word, _neg):
        target = _literal(self.w.take(word), "the target")
        # ipchains passed the target to the kernel as written, and the kernel
        # compared it with strcmp: 'deny' names a user chain, not DENY.
        if target == "REDIR":
            self.notes.append("REDIR is a spelling of REDIRECT; read as REDIRECT")
            target = "REDIRECT"
        elif target != target.upper() and target.upper() in VERDICTS + ("REDIR",):
            self.notes.append("ipchains targets are case-sensitive: '%s' names a user "
                              "chain, not %s" % (target, target.upper()))
        port = None
        if target == "REDIRECT":
            port = self.w.optional_value()
        self.once("-j", (target, port))

    def opt_tos(self, word, _neg):
        and_mask = self.hex_byte(self.w.take(word + " (and-mask)"))
        xor_mask = self.hex_byte(self.w.take(word + " (xor-mask)"))
        if not and_mask & 1:
            raise ParseError("TOS and-mask must keep bit 0 (an odd value)")
        if xor_mask & 1:
            raise ParseError("TOS xor-mask must not change bit 0 (an even value)")
        self.once("-t", (and_mask, xor_mask))

    @staticmethod
    def hex_byte(word):
        word = _literal(word, "a TOS mask")
        try:
            value = int(word, 16)
        except ValueError:
            raise ParseError("bad TOS mask '%s' (two hex digits)" % word)
        if not 0 <= value <= 255:
            raise ParseError("TOS mask '%s' is more than one byte" % word)
        return value

    def opt_mark(self, word, _neg):
        text = _literal(self.w.take(word), "the mark")
        op = "="
        if text[:1] in "+-" and len(text) > 1:
            op, text = text[0], text[1:]
        try:
            value = int(text, 0)
        except ValueError:
            raise ParseError("bad mark '%s'" % text)
        if not 0 <= value <= 0xFFFFFFFF:
            raise ParseError("mark %s does not fit in 32 bits" % text)
        self.once("-m", (op, value))

    def opt_output(self, word, _neg):
        size = self.w.optional_value()
        self.once("-o", 0 if size is None else _number(size, "the -o size"))

    # --- build the rule -------------------------------------------------------

    def rules(self):
        """Interpret the gathered words; return one Rule per address pair (and -b)."""
        f = self.f
        proto, proto_neg, proto_text = f.get("-p", (None, False, None))
        kw = {"proto": proto, "proto_neg": proto_neg, "src": self.src}
        raw_proto = isinstance(proto, Raw)
        is_icmp = proto == "icmp" and not proto_neg
        for key in ("-sport", "-dport"):
            if key in f:
                if not (raw_proto or (proto in ("tcp", "udp", "icmp") and not proto_neg)):
                    raise ParseError("ports need -p tcp, -p udp or -p icmp (ICMP type/code)")
        if f.get("icmp-option") and not (is_icmp or raw_proto):
            raise ParseError("--icmp-type needs -p icmp")
        if is_icmp:
            self.icmp_fields(kw)
        else:
            for key, field in (("-sport", "sport"), ("-dport", "dport")):
                if key in f:
                    text, neg = f[key]
                    kw[field] = parse_ports(text, proto, self.names, neg)
        if "-i" in f:
            kw["iface"], kw["iface_neg"] = f["-i"]
        if "-y" in f:
            if proto != "tcp" and not raw_proto or proto_neg:
                raise ParseError("-y needs -p tcp")
            kw["syn"] = f["-y"]
        if "-f" in f:
            if f["-f"] and any(k in f for k in ("-sport", "-dport", "-y")):
                raise ParseError("-f (later fragments) cannot match ports, ICMP types or -y")
            kw["frag"] = f["-f"]
        kw["log"] = "-l" in f
        kw["tos"] = f.get("-t")
        kw["mark"] = f.get("-m")
        kw["copy"] = f.get("-o")
        if "-j" in f:
            self.target_fields(kw, proto, proto_neg)
        return self.expand(kw)

    def icmp_fields(self, kw):
        f = self.f
        if "-sport" in f:
            text, neg = f["-sport"]
            itype, code = parse_icmp(text, "type")
            kw["icmp_type"], kw["icmp_type_neg"] = str(itype), neg
            if code is not None:
                kw["icmp_code"] = str(code)
        if "-dport" in f:
            text, neg = f["-dport"]
            if neg:
                raise ParseError("an ICMP code cannot be negated")
            if "icmp_type" not in kw:
                raise ParseError("an ICMP code (after -d) needs an ICMP type (after -s)")
            if isinstance(text, Raw):
                kw["icmp_code"] = text
            elif text.partition(":")[0].isdigit() and int(text.partition(":")[0]) <= 255:
                kw["icmp_code"] = text.partition(":")[0]
            else:
                raise ParseError("bad ICMP code '%s'" % text)

    def target_fields(self, kw, proto, proto_neg):
        target, port = self.f["-j"]
        kw["target"] = target
        if target == "REDIRECT":
            if isinstance(proto, Raw):
                pass
            elif proto not in ("tcp", "udp") or proto_neg:
                raise ParseError("REDIRECT needs -p tcp or -p udp")
            if port is not None:
                if isinstance(port, Raw):
                    raise ParseError("the REDIRECT port must be written literally")
                kw["port"] = parse_port(port, proto, self.names)
        if self.chain in ("output", "forward") and target == "REDIRECT":
            raise ParseError("REDIRECT is only valid in input (and chains it calls)")
        if self.chain in ("input", "output") and target == "MASQ":
            raise ParseError("MASQ is only valid in forward (and chains it calls)")

    def expand(self, kw):
        """Return the rules for every resolved address pair, both ways for -b."""
        f = self.f
        srcs = self.addresses("-s")
        dsts = self.addresses("-d")
        if len(srcs) * len(dsts) > 1:
            self.notes.append("a host name gave %d address pairs: one rule each"
                              % (len(srcs) * len(dsts)))
        rules = []
        for s in srcs:
            for d in dsts:
                rule = Rule(saddr=s, daddr=d, **kw)
                rules.append(rule)
                if f.get("-b"):
                    rules.append(swap(rule))
        return tuple(rules)

    def addresses(self, key):
        if key not in self.f:
            return [None]
        text, neg = self.f[key]
        nets = parse_addresses(text, self.names)
        return [None if (n == "0.0.0.0/0" and not neg) else Addr(n, neg) for n in nets]


def swap(rule):
    """Return RULE with source and destination (addresses and ports) exchanged."""
    if rule.proto == "icmp":
        return replace(rule, saddr=rule.daddr, daddr=rule.saddr)
    return replace(rule, saddr=rule.daddr, daddr=rule.saddr,
                   sport=rule.dport, dport=rule.sport)


RULE_OPTIONS = {}
for _names, _method in (
        (("-p", "--protocol"), _Parser.opt_proto),
        (("-s", "--source", "--src", "-d", "--destination", "--dst"), _Parser.opt_addr),
        (("--sport", "--source-port", "--dport", "--destination-port"), _Parser.opt_port),
        (("--icmp-type",), _Parser.opt_icmp),
        (("-i", "--interface"), _Parser.opt_iface),
        (("-y", "--syn"), _Parser.opt_syn),
        (("-f", "--fragment"), _Parser.opt_frag),
        (("-b", "--bidirectional"), _Parser.opt_bidir),
        (("-l", "--log"), _Parser.opt_log),
        (("-j", "--jump"), _Parser.opt_jump),
        (("-t", "--TOS"), _Parser.opt_tos),
        (("-m", "--mark"), _Parser.opt_mark),
        (("-o", "--output"), _Parser.opt_output)):
    for _name in _names:
        RULE_OPTIONS[_name] = _method


def parse_ipmasqadm(words, src, names):
    """Parse ``ipmasqadm portfw -a|-d -P proto -L addr port -R addr port`` or ``-f``."""
    w = _Words(words)
    if w.take("ipmasqadm") != "portfw":
        raise ParseError("only 'ipmasqadm portfw' can be translated")
    op, fields = None, {}
    while w.more():
        word = _literal(w.take("portfw option"), "a portfw option")
        if word in ("-a", "-d", "-f", "--add", "--delete", "--flush"):
            if op is not None:
                raise ParseError("two portfw commands in one line")
            op = word.lstrip("-")[0]
        elif word in ("-P", "--proto"):
            fields["proto"] = _literal(w.take(word), "the protocol").lower()
        elif word in ("-L", "--laddr", "-R", "--raddr"):
            addr = _literal(w.take(word), "the address")
            port = _literal(w.take(word + " port"), "the port")
            fields[word.lstrip("-")[0].upper()] = (addr, port)
        elif word in ("-p", "--pref"):
            _number(w.take(word), "the preference")
        else:
            raise ParseError("unknown portfw option '%s'" % word)
    if op is None:
        raise ParseError("portfw needs -a, -d or -f")
    if op == "f":
        return PortForward("f", src)
    proto = fields.get("proto", "tcp")
    if proto not in ("tcp", "udp"):
        raise ParseError("portfw -P must be tcp or udp")
    # -d may leave out -R: the kernel then deletes whatever the local end
    # forwards to (ip_masq_portfw.c, ip_portfw_del).
    for key in ("L", "R") if op == "a" else ("L",):
        if key not in fields:
            raise ParseError("portfw -%s needs -%s addr port" % (op, key))
    (laddr, lport), (raddr, rport) = fields["L"], fields.get("R", (None, None))
    return PortForward(op, src, proto, _single_host(laddr, names),
                       parse_port(lport, proto, names),
                       "" if raddr is None else _single_host(raddr, names),
                       0 if rport is None else parse_port(rport, proto, names))


def _single_host(text, names):
    nets = parse_addresses(text, names)
    if len(nets) != 1 or not str(nets[0]).endswith("/32"):
        raise ParseError("portfw needs one host address, not '%s'" % text)
    return nets[0][:-3]
