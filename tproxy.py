#!/usr/bin/env python3
"""tproxy - transparent proxy redirector, compatible with transproxy 1.x.

Usage:
  tproxy [options] [-a ACL]... [PROXYHOST PROXYPORT]
  tproxy (-h | --help)
  tproxy (-V | --version)

Without -s, tproxy serves the one connection on standard input (inetd, nowait)
and exits. With -s PORT it listens, forks one child per connection, and runs
in the background as USER (-r) unless -d is given. Started by systemd with a
listening socket (LISTEN_FDS), it uses that socket and stays in the foreground.

Modes:
  HTTP translate (the default): rewrite each request line to absolute form and
      send the requests to the cache at PROXYHOST PROXYPORT; if the cache cannot
      be reached, go straight to the original destination (unless -p).
  Raw relay (with -t): relay bytes to PROXYHOST PROXYPORT, or to the
      connection's original destination when PROXYHOST PROXYPORT are omitted.
  CONNECT (with --connect): relay bytes to the original destination through the
      HTTP proxy at PROXYHOST PROXYPORT, which is asked with CONNECT.

Options:
  -a ACL                  Serve only clients matching ACL: a host, a classful
                          network (192.168.1.0) or a CIDR network, IPv4 or IPv6;
                          repeatable. Other clients are closed and logged.
  -b ADDR                 Listen on ADDR only (default: all addresses, IPv4 and
                          IPv6). Needs -s.
  -d                      Stay in the foreground and log to standard error.
                          Needs -s.
  -f URL                  Send every HTTP request to URL instead, except
                          requests whose Referer begins with URL.
  -h --help               Show this help and exit.
  -l FILE                 Append one line per connection to FILE; reopened on
                          SIGHUP.
  -p                      Never fall back to the original destination when the
                          cache cannot be reached.
  -P PIDFILE              Write the server's pid to PIDFILE; needs -s (default:
                          /var/run/tproxy.pid in the background, none with -d).
  -r USER                 After binding, run as USER (a name or #uid) with its
                          primary group and no supplementary groups. Needs -s.
  -s PORT                 Standalone: listen on PORT (a number or a service
                          name).
  -t                      Raw relay: no HTTP translation.
  -v                      Log more: every HTTP request and every failure in
                          detail.
  -V --version            Show the version and exit.
  --connect               Reach the original destination through the HTTP
                          proxy PROXYHOST PROXYPORT with CONNECT.
  --connect-timeout=SECS  Give up connecting to a target after SECS seconds
                          [default: 10].
  --grace=SECS            On SIGTERM, let live connections run up to SECS
                          seconds (0 or more), then reset them [default: 10].
  --idle-timeout=SECS     Close a connection when neither side has sent
                          anything for SECS seconds (default: 120; with --udp,
                          a flow ends after 30).
  --max-conns=N           Serve at most N connections at once; further clients
                          wait in the listen queue (default: 512, or MAX
                          given to --prefork).
  --max-per-client=N      Serve at most N connections at once from one client
                          address; further ones are reset and logged
                          [default: 64].
  --prefork=N[:MAX]       The same as --workers=N, and MAX as --max-conns
                          unless that is given (kept from 1.0). Needs -s.
  --proxy-auth-file=FILE  With --connect, read "user:password" for the proxy's
                          Proxy-Authorization from FILE.
  --request-timeout=SECS  HTTP translate mode: answer 408 and close when a
                          request head is not complete SECS seconds after it
                          began (for the first, after the connection was
                          accepted) [default: 10].
  --send-proxy=VERSION    Send a PROXY protocol header (v1 or v2) to the target
                          before the client's bytes.
  --source=SPEC           Connect to the target from SPEC: "client" (the
                          client's address), "client-port" (its address and
                          port) or an address of this host.
  --source-ports=LOW-HIGH
                          Take the local port of every connection to a target
                          from LOW-HIGH (for example 40000-40999), so that
                          servers can route replies to this node by port; not
                          with --source=client-port.
  --udp                   Relay UDP datagrams, flow by flow, instead of TCP
                          connections (see UDP in tproxy(8)). Needs -s.
  --workers=N             Serve with N worker processes ("auto": one per CPU),
                          each relaying many connections at once, instead of
                          one fork per connection. Needs -s.
"""

__version__ = "1.1.0"

import errno
import heapq
import marshal
import math
import os
import select
import signal
import _signal     # signal's C module: see set_handler
import _socket     # socket's C module: its sockets without socket.py's wrapping, where made often
import socket
import struct
import sys
import time

# Exit statuses (sysexits.h), documented in tproxy(8).
EX_OK = 0
EX_USAGE = 64        # the command line is wrong
EX_NOUSER = 67       # -r names no such user
EX_NOHOST = 68       # a host name cannot be resolved
EX_UNAVAILABLE = 69  # inetd mode: the connection could not be served
EX_SOFTWARE = 70     # internal error
EX_OSERR = 71        # the system refused: bind, fork, capabilities
EX_CANTCREAT = 73    # the pid file or log file cannot be written
EX_NOPERM = 77       # permission denied (privileged port, switching user)

# Kernel constants that the socket module does not carry.
SOL_IP = 0
SOL_IPV6 = 41
IP_TRANSPARENT = 19
IPV6_TRANSPARENT = 75
IP_BIND_ADDRESS_NO_PORT = 24
IP_LOCAL_PORT_RANGE = 51    # Linux >= 6.3; IPv6 sockets too; clamped to the namespace's range
SO_ORIGINAL_DST = 80
IP6T_SO_ORIGINAL_DST = 80
F_SETPIPE_SZ = 1031
CAP_NET_RAW = 13
CAP_NET_BIND_SERVICE = 10

DEFAULT_PIDFILE = "/var/run/tproxy.pid"
MAX_HEAD = 16384        # bytes of one HTTP request head, as most servers allow
CHUNK = 65536           # bytes per read; a read this full switches a raw pump to splice
PIPE_SIZE = 1 << 20     # splice pipe capacity; larger pipes mean fewer wakeups
# Non-blocking zero-copy moves; 0 where os.splice is missing (Python < 3.10): pumps copy.
SPLICE_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK if hasattr(os, "splice") else 0
LISTEN_BACKLOG = 1024
TCP_IDLE_TIMEOUT = 120      # --idle-timeout for connections
COUNT_MOST = 1 << 22         # PID_MAX_LIMIT (include/linux/threads.h): no more workers or forked connections can exist
UDP_IDLE_TIMEOUT = 30       # --idle-timeout for --udp flows: conntrack's nf_conntrack_udp_timeout


class Fatal(Exception):
    """A start-up error: one line for stderr and an exit status."""

    def __init__(self, message, status):
        super().__init__(message)
        self.status = status


class ConnectionFailed(Exception):
    """A connection could not be served; the message is its logged outcome."""


# ---------------------------------------------------------------------------
# Command line -> Config
# ---------------------------------------------------------------------------

class Config:
    """Everything the command line decided, checked and resolved."""

    mode = "http"           # "http", "raw" or "connect"
    target = None           # (host, port) given as PROXYHOST PROXYPORT, or None
    target_addrs = ()       # resolved addresses of target, tried in turn
    force_url = None        # -f, bytes
    no_fallback = False     # -p
    port = None             # -s, int; None means inetd mode
    bind = None             # -b
    foreground = False      # -d, or started by systemd: no daemonizing
    log_to_stderr = False   # -d
    user = None             # (name, uid, gid) for -r
    acl = ()                # ip_network objects
    logfile = None          # -l
    pidfile = None          # -P
    pidfile_given = False   # -P named it (else it is the default)
    verbose = False
    idle_timeout = 120.0
    connect_timeout = 10.0
    grace = 10.0            # --grace: seconds live connections get after SIGTERM
    max_conns = 512
    max_per_client = 64
    request_timeout = 10.0
    prefork = None          # --prefork as given (it runs --workers): said once at start-up
    workers = None          # --workers: how many event-loop worker processes
    proxy_auth = None       # bytes "user:password"
    send_proxy = None       # "v1" or "v2"
    source = None           # "client", "client-port", or an address string
    source_ports = None     # (low, high) local ports for upstream connections
    activated = False       # started by systemd with a listening socket (LISTEN_FDS)
    udp = False             # --udp: relay datagrams (mode "udp")


def parse_args(argv):
    """Parse ARGV (without the program name) into a Config; raise Fatal."""
    args = quick_parse(argv)
    if args is None:
        args = docopt_parse(argv)
    return build_config(args)


def docopt_parse(argv):
    """Return docopt's dictionary for ARGV, or raise Fatal with a one-line reason."""
    from docopt import docopt, DocoptExit
    known = option_table(__doc__)
    for word in argv:
        if word == "--":
            break
        if word.startswith("-") and word != "-":
            name = word.split("=", 1)[0]
            if name.startswith("--"):
                if not any(o.startswith(name) for o in known):
                    raise Fatal("unknown option %s (see tproxy --help)" % name, EX_USAGE)
            elif name[1:2] and "-" + name[1] not in known:
                raise Fatal("unknown option -%s (see tproxy --help)" % name[1], EX_USAGE)
    try:
        return docopt(__doc__, argv=argv, version="tproxy " + __version__)
    except DocoptExit as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        if not first or first.startswith("Usage:") or "unmatched" in first:
            first = "bad arguments: %s" % " ".join(argv)
        raise Fatal("%s (see tproxy --help)" % first, EX_USAGE) from None


def option_table(doc):
    """Return {option: (takes a value, default, key)} from DOC's Options section.

    KEY is the name docopt files the option under: the long one of synonyms.
    """
    entries = []                # [spec, description] per option, continuation lines joined
    for line in doc.split("Options:", 1)[1].splitlines():
        line = line.strip()
        if line.startswith("-"):
            spec, _, description = line.partition("  ")
            entries.append([spec, description])
        elif entries:
            entries[-1][1] += " " + line
    table = {}
    for spec, description in entries:
        words = spec.replace("=", " ").split()
        takes = any(not w.startswith("-") for w in words)
        default = None
        if "[default: " in description:
            default = description.split("[default: ", 1)[1].split("]", 1)[0]
        names = [w for w in words if w.startswith("-")]
        for name in names:
            table[name] = (takes, default, names[-1])
    return table


def quick_parse(argv):
    """Return docopt's dictionary for a plain, well-formed ARGV without importing docopt.

    inetd starts one tproxy per connection, and docopt costs more to import
    and run than the rest of the start-up. Anything unusual (help, version,
    abbreviations, bundled flags, repeats, errors) returns None, so that
    docopt decides and words the error; tests/test_cli.py checks that both
    agree.
    """
    table = option_table(__doc__)
    args = {key: (default if takes else False) for takes, default, key in table.values()}
    args["-a"] = []
    positional = []
    seen = set()
    words = iter(argv)
    for word in words:
        if not word.startswith("-") or word == "-":
            positional.append(word)
            continue
        if word.startswith("--"):
            name, eq, value = word.partition("=")
        else:                   # -sPORT: a short option's value may be attached
            name, value = word[:2], word[2:]
            eq = value
        if name not in table or name in ("-h", "--help", "-V", "--version") or \
                (name in seen and name != "-a"):
            return None
        seen.add(name)
        takes, _, key = table[name]
        if not takes:
            if eq:
                return None
            args[key] = True
            continue
        if not eq:
            value = next(words, None)
            if value is None:
                return None
        if name == "-a":
            args["-a"].append(value)
        else:
            args[key] = value
    if len(positional) not in (0, 2):
        return None
    args["PROXYHOST"], args["PROXYPORT"] = positional if positional else (None, None)
    return args


def build_config(args):
    """Turn docopt's ARGS into a Config, checking every value; raise Fatal."""
    cfg = Config()
    standalone_only = [o for o in ("-b", "-r", "-P", "--prefork", "--workers") if args[o]]
    if args["-d"]:
        standalone_only.append("-d")
    cfg.activated = socket_activated()
    if args["-s"] is None and standalone_only and not cfg.activated:
        raise Fatal("%s needs -s PORT (standalone mode)" % standalone_only[0], EX_USAGE)
    if args["--udp"]:
        check_udp_options(args, cfg.activated)
        cfg.udp = True
    modes = [m for m, on in (("-t", args["-t"]), ("--connect", args["--connect"])) if on]
    if len(modes) > 1:
        raise Fatal("-t and --connect exclude each other", EX_USAGE)
    if args["-p"] and (args["-t"] or args["--connect"]):
        raise Fatal("-p applies to HTTP translate mode only", EX_USAGE)
    cfg.mode = "raw" if args["-t"] else "connect" if args["--connect"] else "http"
    if cfg.udp:
        cfg.mode = "udp"
    if args["PROXYHOST"] is not None and args["PROXYPORT"] is None:
        raise Fatal("PROXYHOST %s needs a PROXYPORT after it" % args["PROXYHOST"], EX_USAGE)
    if args["PROXYHOST"] is not None:
        cfg.target = (args["PROXYHOST"], parse_port(args["PROXYPORT"], "PROXYPORT"))
    elif cfg.mode not in ("raw", "udp"):
        raise Fatal("PROXYHOST PROXYPORT are needed unless -t is given", EX_USAGE)
    if args["-f"]:
        if cfg.mode != "http":
            raise Fatal("-f applies to HTTP translate mode only", EX_USAGE)
        cfg.force_url = args["-f"].encode("latin-1", "replace")
    cfg.no_fallback = bool(args["-p"])
    if args["-s"] is not None:
        cfg.port = parse_port(args["-s"], "-s")
    elif cfg.activated:
        cfg.port = 0            # the port of the socket systemd passes
    cfg.bind = args["-b"]
    cfg.foreground = bool(args["-d"])
    cfg.acl = tuple(parse_acl(a) for a in args["-a"])
    cfg.logfile = args["-l"]
    cfg.log_to_stderr = cfg.foreground
    if cfg.activated:
        cfg.foreground = True   # systemd supervises; never fork away from it
    cfg.pidfile = args["-P"] or (DEFAULT_PIDFILE if cfg.port and not cfg.foreground else None)
    cfg.pidfile_given = bool(args["-P"])
    cfg.verbose = bool(args["-v"])
    idle = args["--idle-timeout"]
    if idle is None:            # no docopt default: the TCP and UDP defaults differ
        idle = str(UDP_IDLE_TIMEOUT if cfg.udp else TCP_IDLE_TIMEOUT)
    cfg.idle_timeout = parse_seconds(idle, "--idle-timeout")
    cfg.connect_timeout = parse_seconds(args["--connect-timeout"], "--connect-timeout")
    cfg.grace = parse_seconds(args["--grace"], "--grace", allow_zero=True)
    if args["--max-conns"] is not None:     # no docopt default: --prefork's MAX may set it
        cfg.max_conns = parse_count(args["--max-conns"], "--max-conns")
    cfg.max_per_client = parse_count(args["--max-per-client"], "--max-per-client")
    cfg.request_timeout = parse_seconds(args["--request-timeout"], "--request-timeout")
    if args["--prefork"] is not None:       # "--prefork=" too: an empty N is an error, not absent
        if args["--workers"] is not None:
            raise Fatal("--prefork and --workers exclude each other", EX_USAGE)
        cfg.prefork = args["--prefork"]
        cfg.workers, most = parse_prefork(args["--prefork"])
        if most is not None and args["--max-conns"] is None:
            cfg.max_conns = most
    if args["--workers"] is not None:
        cfg.workers = parse_workers(args["--workers"])
    if args["--send-proxy"]:
        if args["--send-proxy"] not in ("v1", "v2"):
            raise Fatal("--send-proxy takes v1 or v2, not %r" % args["--send-proxy"], EX_USAGE)
        if cfg.mode == "http":
            raise Fatal("--send-proxy needs -t or --connect", EX_USAGE)
        cfg.send_proxy = args["--send-proxy"]
    if args["--source"]:
        cfg.source = parse_source(args["--source"])
    if args["--source-ports"]:
        if cfg.source == "client-port":
            raise Fatal("--source-ports and --source=client-port exclude each other: "
                        "client-port keeps the client's own port", EX_USAGE)
        cfg.source_ports = parse_port_range(args["--source-ports"], "--source-ports")
    if args["--proxy-auth-file"] and cfg.mode != "connect":
        raise Fatal("--proxy-auth-file applies to --connect only", EX_USAGE)
    if cfg.mode == "connect" and (args["--proxy-auth-file"] or os.environ.get("TPROXY_PROXY_AUTH")):
        cfg.proxy_auth = read_proxy_auth(args["--proxy-auth-file"])
    forget_environment_variable(b"TPROXY_PROXY_AUTH")
    if args["-r"]:
        cfg.user = lookup_user(args["-r"])
    if cfg.target:
        cfg.target_addrs = resolve(cfg.target[0], cfg.target[1])
    return cfg


def check_udp_options(args, activated):
    """Refuse --udp without -s, or with an option that has no meaning for datagrams; raise Fatal."""
    if args["-s"] is None and not activated:
        raise Fatal("--udp needs -s PORT (standalone mode)", EX_USAGE)
    if activated and args["--workers"]:
        raise Fatal("--udp and --workers exclude each other with sockets from systemd: "
                    "each passed UDP socket gets one worker", EX_USAGE)
    for option in ("-f", "-p", "--connect", "--send-proxy", "--prefork", "--proxy-auth-file"):
        if args[option]:
            raise Fatal("--udp and %s exclude each other" % option, EX_USAGE)


def parse_port(text, what):
    """Return TEXT as a TCP port number (digits or a service name); raise Fatal."""
    if is_digits(text):
        port = bounded_number(text, 65535)
        if port:
            return port
        raise Fatal("%s: port %s is out of range (1-65535)" % (what, clipped(text)), EX_USAGE)
    try:
        return socket.getservbyname(text, "tcp")
    except (OSError, UnicodeError):
        raise Fatal("%s: unknown port or service %r" % (what, text), EX_USAGE) from None


def parse_seconds(text, what, allow_zero=False):
    """Return TEXT as seconds above 0 (with ALLOW_ZERO, 0 or more); raise Fatal."""
    try:
        value = float(text) if text.isascii() else -1.0
    except ValueError:
        value = -1.0
    if not (0 <= value if allow_zero else 0 < value) or not value <= 86400 * 365:
        raise Fatal("%s: %r is not a number of seconds" % (what, text), EX_USAGE)
    return value


def parse_count(text, what):
    """Return TEXT as a whole number from 1 to COUNT_MOST; raise Fatal."""
    if not is_digits(text) or not text.strip("0"):
        raise Fatal("%s: %r is not a positive whole number" % (what, text), EX_USAGE)
    count = bounded_number(text, COUNT_MOST)
    if count is None:
        raise Fatal("%s: %s is more than %d" % (what, clipped(text), COUNT_MOST), EX_USAGE)
    return count


def is_digits(text):
    """Return True when TEXT is ASCII digits only (str.isdigit also takes "²" and "①")."""
    return text.isascii() and text.isdigit()


def bounded_number(digits, most):
    """Return DIGITS (ASCII digits, see is_digits) as an int when it is at most MOST, else None.

    The length is looked at first: int() refuses a number of more than
    4,300 digits with a ValueError.
    """
    significant = digits.lstrip("0") or "0"
    if len(significant) > len(str(most)):
        return None
    number = int(significant)
    return number if number <= most else None


def clipped(text, width=20):
    """Return TEXT cut to WIDTH characters for a message ("..." says it was longer)."""
    return text[:width] + "..." * (len(text) > width)


def parse_prefork(text):
    """Return (workers, max connections or None) from --prefork "N" or "N:MAX"; raise Fatal.

    The prefork pool served one connection per process, at most MAX (N
    without it) at once; --workers serve many each, so N counts processes
    and MAX becomes --max-conns, the same cap on connections at once.
    """
    low, colon, high = text.partition(":")
    low = parse_count(low, "--prefork")
    if not colon:
        return low, None
    high = parse_count(high, "--prefork")
    if high < low:
        raise Fatal("--prefork: MAX %d is below N %d" % (high, low), EX_USAGE)
    return low, high


def parse_workers(text):
    """Parse --workers N ("auto": the CPUs this process may run on); raise Fatal."""
    if text == "auto":
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except (AttributeError, OSError):
            return os.cpu_count() or 1
    return parse_count(text, "--workers")


def parse_source(text):
    """Return a --source SPEC: "client", "client-port" or an IP address."""
    if text in ("client", "client-port"):
        return text
    import ipaddress
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise Fatal("--source: %r is not client, client-port or an IP address" % text,
                    EX_USAGE) from None


def parse_port_range(text, what):
    """Return (low, high) from "LOW-HIGH", numbers 1-65535 with LOW <= HIGH; raise Fatal."""
    low, dash, high = text.partition("-")
    if not (dash and low.isdigit() and high.isdigit()):
        raise Fatal("%s: %r is not LOW-HIGH (two port numbers)" % (what, text), EX_USAGE)
    low, high = int(low), int(high)
    if not 1 <= low <= high <= 65535:
        raise Fatal("%s: %r is not a range of ports (1-65535, LOW <= HIGH)" % (what, text),
                    EX_USAGE)
    return low, high


def parse_acl(text):
    """Return an ip_network for an -a entry: host, classful network or CIDR."""
    import ipaddress
    if "/" in text:
        try:
            return ipaddress.ip_network(text, strict=False)
        except ValueError as exc:
            raise Fatal("-a: %s" % exc, EX_USAGE) from None
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        addrs = resolve(text, 0)
        if len(addrs) != 1:
            raise Fatal("-a: host %s has %d addresses; list them one by one"
                        % (text, len(addrs)), EX_USAGE) from None
        addr = ipaddress.ip_address(plain_ip(addrs[0][4][0]).split("%", 1)[0])
    if addr.version == 4:
        # A classful network is written with its host part zero (transproxy's form).
        first = int(addr) >> 24
        prefix = 8 if first < 128 else 16 if first < 192 else 24 if first < 224 else 32
        net = ipaddress.ip_network("%s/%d" % (addr, prefix), strict=False)
        if net.network_address == addr and prefix < 32:
            return net
    return ipaddress.ip_network(addr)


def read_proxy_auth(path):
    """Return b"user:password" from PATH or $TPROXY_PROXY_AUTH; raise Fatal."""
    if path:
        try:
            with open(path, "rb") as f:
                text = f.read(4096).strip()
        except OSError as exc:
            raise Fatal("--proxy-auth-file: %s: %s" % (path, exc.strerror), EX_USAGE) from None
        where = path
    else:
        text = os.environb[b"TPROXY_PROXY_AUTH"].strip()
        where = "TPROXY_PROXY_AUTH"
    if b":" not in text or b"\n" in text:
        raise Fatal("%s: expected one line user:password" % where, EX_USAGE)
    return text


def forget_environment_variable(name):
    """Remove NAME (bytes) from the environment, including the copy /proc/PID/environ shows.

    Deleting it from os.environ and libc's environ is not enough: the kernel
    shows the block the process started with, and children inherit that
    memory. So its value there is overwritten with zero bytes as well.
    """
    if os.environb.pop(name, None) is None:
        return
    os.environ.pop(name.decode("ascii"), None)
    import ctypes
    try:
        with open("/proc/self/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        start, end = int(fields[47]), int(fields[48])   # env_start, env_end (fields 50, 51)
    except (OSError, IndexError, ValueError):
        return
    block = ctypes.string_at(start, end - start)
    prefix = name + b"="
    at = 0 if block.startswith(prefix) else block.find(b"\0" + prefix) + 1
    if at > 0 or block.startswith(prefix):
        value_at = at + len(prefix)
        length = block.find(b"\0", value_at)
        length = (len(block) if length < 0 else length) - value_at
        ctypes.memset(start + value_at, 0, length)


def lookup_user(text):
    """Return (name, uid, gid) for -r USER (a name or #uid); raise Fatal."""
    import pwd
    try:
        if text.startswith("#") and is_digits(text[1:]):
            uid = int(text[1:])
            if uid >= 0xFFFFFFFF:       # (uid_t) -1 and beyond name nobody
                raise KeyError(text)
            try:
                entry = pwd.getpwuid(uid)
                return entry.pw_name, uid, entry.pw_gid
            except KeyError:
                return text, uid, uid   # a bare uid runs with the same-numbered group
        entry = pwd.getpwnam(text)
        return entry.pw_name, entry.pw_uid, entry.pw_gid
    except (KeyError, ValueError, OverflowError, UnicodeError):
        raise Fatal("-r: unknown user %r" % text, EX_NOUSER) from None


def resolve(host, port):
    """Return getaddrinfo results for a TCP HOST PORT; raise Fatal if none."""
    try:
        return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise Fatal("cannot resolve host %s: %s" % (host, getattr(exc, "strerror", exc)),
                    EX_NOHOST) from None


# ---------------------------------------------------------------------------
# Files tproxy writes (-P, -l): never through a link another user planted
# ---------------------------------------------------------------------------

def open_own_file(path, name, flags, user, mode, pid_file=False):
    """Open PATH (the -l file, or the PID_FILE) so that no other user can steer the open; return the fd.

    NAME is how messages call it ("-l FILE", "-P FILE", "the default pid file FILE").

    The rule (tproxy(8), FILES): the last component is never followed; an
    existing file must be a regular file with one link, owned by the user
    tproxy runs as or by USER; a directory anyone may write without the
    sticky bit is refused. In a directory USER may write, the open is done
    with USER's rights (so nothing planted there gains more than USER has),
    and -P is refused there outright, since USER could replace the pid
    file root later trusts. A file tproxy creates is USER's only when
    opened as USER. Raise Fatal (status 73) naming PATH and the reason.
    """
    import stat
    directory = os.path.dirname(os.path.abspath(path))
    try:
        dir_st = os.stat(directory)
    except OSError as exc:
        raise Fatal("%s: directory %s: %s" % (name, directory, exc.strerror),
                    EX_CANTCREAT) from None
    if dir_st.st_mode & stat.S_IWOTH and not dir_st.st_mode & stat.S_ISVTX:
        raise Fatal("%s: directory %s is writable by every user; refusing it"
                    % (name, directory), EX_CANTCREAT)
    as_user = user if user and os.geteuid() == 0 and user[1] != 0 and \
        writable_by(dir_st, user) else None
    if as_user and pid_file:
        raise Fatal("%s: directory %s is writable by %s, who could replace the pid file; "
                    "use a directory only root may write (see tproxy(8), FILES)"
                    % (name, directory, user[0]), EX_CANTCREAT)
    owners = {os.geteuid()} | ({user[1]} if user else set())
    if as_user:
        owners = {user[1]}
    safe = flags | os.O_NOFOLLOW | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = with_identity(as_user, lambda: create_or_open(path, safe, mode))
    except OSError as exc:
        reason = "is a symbolic link; refusing to follow it" if exc.errno == errno.ELOOP \
            else exc.strerror
        raise Fatal("%s: %s" % (name, reason), EX_CANTCREAT) from None
    st = os.fstat(fd)
    problem = None
    if not stat.S_ISREG(st.st_mode):
        problem = "is not a regular file"
    elif st.st_nlink != 1:
        problem = "has %d hard links; refusing it" % st.st_nlink
    elif st.st_uid not in owners:
        problem = "is owned by uid %d, not by %s" % (
            st.st_uid, " or ".join(str(u) for u in sorted(owners)))
    if problem:
        os.close(fd)
        raise Fatal("%s: %s" % (name, problem), EX_CANTCREAT)
    if pid_file and st.st_uid != os.geteuid():
        os.fchown(fd, os.geteuid(), os.getegid())   # left to USER by an older tproxy: take it back
    os.set_blocking(fd, True)
    return fd


def create_or_open(path, flags, mode):
    """Create PATH exclusively, or open the file already there (FLAGS hold O_NOFOLLOW)."""
    try:
        return os.open(path, flags | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        return os.open(path, flags)


def writable_by(st, user):
    """Return True when USER (name, uid, gid; no supplementary groups) may write directory ST."""
    import stat
    return bool(st.st_uid == user[1] and st.st_mode & stat.S_IWUSR or
                st.st_gid == user[2] and st.st_mode & stat.S_IWGRP or
                st.st_mode & stat.S_IWOTH)


def with_identity(user, action):
    """Return ACTION() run with USER's effective uid and gid (and no groups); as is when None."""
    if user is None:
        return action()
    groups, egid = os.getgroups(), os.getegid()
    os.setgroups([])
    os.setegid(user[2])
    os.seteuid(user[1])
    try:
        return action()
    finally:
        os.seteuid(0)
        os.setegid(egid)
        os.setgroups(groups)


# ---------------------------------------------------------------------------
# Logging: syslog (daemon facility) or stderr, plus the -l connection log
# ---------------------------------------------------------------------------

def syslog_unreachable(path="/dev/log"):
    """Return why no syslog daemon listens at PATH ("/dev/log: No such file..."), or None.

    Tries a datagram then a stream connection, as the C library's syslog() does.
    """
    for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
        try:
            probe = socket.socket(socket.AF_UNIX, kind)
        except OSError:         # no descriptor to ask with: syslog() will fail quietly itself
            return None
        with probe:
            try:
                probe.connect(path)
                return None
            except OSError as exc:
                reason = "%s: %s" % (path, exc.strerror)
    return reason


def stderr_outlives_start():
    """Return True if a daemon may keep fd 2: a terminal, a file, a device or systemd's journal.

    Not a pipe or another socket: whoever reads it (a shell's $(...), ssh)
    would wait for the daemon to exit.
    """
    import stat
    try:
        st = os.fstat(2)
    except OSError:
        return False
    if stat.S_ISREG(st.st_mode) or stat.S_ISCHR(st.st_mode):
        return True
    return os.environ.get("JOURNAL_STREAM") == "%d:%d" % (st.st_dev, st.st_ino)


class Log:
    """Where messages go: stderr until `use_syslog()`, then syslog (daemon facility)."""

    def __init__(self, logfile=None, user=None):
        self.to_stderr = True
        self._syslog = None
        self.logfile = logfile
        self.user = user        # -r USER: the -l file's rightful second owner
        self.log_fd = None
        self.gathered = None    # {fd: [lines]} while gathering (see gather)
        self.pid = None         # this process's pid while gathering (a long-lived loop's)
        self.reopen()

    def gather(self):
        """Keep the lines for standard error and the -l file until `flush()`: one write each.

        An event loop's round ends many connections; it flushes before it waits
        again, so no line is lost, reordered or held past its round. The process's
        pid is taken once: getpid(2) is a system call per line otherwise.
        """
        self.gathered = {}
        self.pid = os.getpid()

    def flush(self):
        """Write the lines gathered so far."""
        gathered = self.gathered
        if gathered:
            self.gathered = {}
            for fd, lines in gathered.items():
                self.write_out(fd, b"".join(lines))

    def write(self, fd, data):
        """Write DATA to FD, or gather it for the next `flush()`."""
        if self.gathered is not None:
            self.gathered.setdefault(fd, []).append(data)
        else:
            self.write_out(fd, data)

    @staticmethod
    def write_out(fd, data):
        """Write DATA to FD whole; a failing write loses it, as a log must not stop the proxy."""
        try:
            while data:
                data = data[os.write(fd, data):]
        except OSError:
            pass

    def use_syslog(self, stderr_usable=True):
        """Send messages to syslog from now on (ident tproxy, with the pid); return True if so.

        Without a syslog daemon (no /dev/log: containers, minimal hosts) say so once
        on stderr and keep logging there, or, where stderr is not STDERR_USABLE
        (inetd: it is the client), write messages to the -l file only.
        """
        missing = syslog_unreachable()
        if missing and not stderr_usable:
            self.to_stderr = False
            return False
        if missing:
            self.message("no syslog (%s); logging to standard error" % missing)
            return False
        import syslog
        syslog.openlog("tproxy", syslog.LOG_PID, syslog.LOG_DAEMON)
        self._syslog = syslog
        self.to_stderr = False
        return True

    def reopen(self):
        """(Re)open the -l file for appending (see open_own_file); raise Fatal if it cannot be."""
        if self.logfile is None:
            return
        fd = open_own_file(self.logfile, "-l %s" % self.logfile, os.O_WRONLY | os.O_APPEND, self.user, 0o640)
        self.flush()            # what was gathered for the old file goes there
        if self.log_fd is not None:
            os.close(self.log_fd)
        self.log_fd = fd

    def message(self, text, error=False):
        """Log one operational message."""
        if self.to_stderr:
            self.write(2, ("tproxy[%d]: %s\n" % (self.pid or os.getpid(), text)).encode("utf-8", "replace"))
        elif self._syslog:
            prio = self._syslog.LOG_ERR if error else self._syslog.LOG_INFO
            self._syslog.syslog(prio, printable(text))
        else:
            self.to_file(text)          # inetd without syslog: the -l file is all there is

    def connection(self, line):
        """Log one connection summary, to the message log and the -l file."""
        self.message(line)
        if self.to_stderr or self._syslog:
            self.to_file(line)

    def to_file(self, line):
        """Append LINE, stamped, to the -l file if there is one."""
        if self.log_fd is not None:
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            self.write(self.log_fd, ("%s tproxy[%d]: %s\n" % (stamp, self.pid or os.getpid(), line)).encode())


def printable(text):
    """Return TEXT with undecodable bytes from argv or the environment (lone surrogates) escaped."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


ESCAPE_FREE = bytes(b for b in range(0x20, 0x7F) if b not in (0x22, 0x5C))


def escape(data, limit=200):
    """Return bytes from the network as printable ASCII, cut at LIMIT."""
    if type(data) is bytes and len(data) <= limit and not data.translate(None, ESCAPE_FREE):
        return data.decode("ascii")     # nothing to escape (a host name): at C speed
    out = []
    for byte in data[:limit]:
        if 0x20 <= byte < 0x7F and byte not in (0x22, 0x5C):
            out.append(chr(byte))
        else:
            out.append("\\x%02x" % byte)
    return "".join(out) + ("..." if len(data) > limit else "")


ADDR_FORMS = {}         # host -> its "host:%d" format (show_addr); a few hosts come back often
ADDR_FORMS_KEPT = 1024


def show_addr(addr):
    """Return a sockaddr as host:port, IPv6 in brackets, v4-mapped unwrapped."""
    form = ADDR_FORMS.get(addr[0])
    if form is None:
        host = addr[0]
        if host.startswith("::ffff:") and "." in host:
            host = host[7:]
        form = ("[%s]:%%d" if ":" in host else "%s:%%d") % host.replace("%", "%%")
        if len(ADDR_FORMS) >= ADDR_FORMS_KEPT:
            ADDR_FORMS.clear()
        ADDR_FORMS[addr[0]] = form
    return form % addr[1]


class Record:
    """What happened to one connection, logged once when it ends."""

    def __init__(self, client, mode):
        self.started = time.monotonic()
        self.client = client
        self.mode = mode
        self.orig = None
        self.target = None
        self.host = None
        self.up = 0
        self.down = 0
        self.outcome = "ok"

    def line(self):
        """Return the one-line summary of this connection."""
        return "client=%s%s target=%s mode=%s%s up=%d down=%d time=%.3f outcome=%s" % (
            show_addr(self.client), " orig=" + show_addr(self.orig) if self.orig else "",
            show_addr(self.target) if self.target else "-", self.mode,
            ' host="%s"' % escape(self.host) if self.host is not None else "",
            self.up, self.down, time.monotonic() - self.started, self.outcome)


# ---------------------------------------------------------------------------
# Addresses: access list, original destination, loop guard
# ---------------------------------------------------------------------------

def plain_ip(host):
    """Return HOST with an IPv4-mapped IPv6 prefix removed."""
    return host[7:] if host.startswith("::ffff:") and "." in host else host


def acl_allows(acl, client):
    """Return True when ACL is empty or the client address is in one of its networks."""
    if not acl:
        return True
    import ipaddress
    addr = ipaddress.ip_address(plain_ip(client[0]).split("%", 1)[0])
    return any(addr.version == net.version and addr in net for net in acl)


def original_destination(conn):
    """Return the (host, port) the client meant to reach.

    After REDIRECT or DNAT that is SO_ORIGINAL_DST (conntrack's original
    tuple); after TPROXY, or with no NAT at all, it is the accepted socket's
    own address.
    """
    if SOCKET_FAMILY.__get__(conn) == socket.AF_INET:
        # conntrack's answer first: where it tracks the connection (any NAT) the local
        # address is not needed, one system call less.
        try:
            return conntrack_destination(conn)
        except OSError:
            return conn.getsockname()
    local = conn.getsockname()
    if not local[0].startswith("::ffff:"):
        try:
            raw = conn.getsockopt(SOL_IPV6, IP6T_SO_ORIGINAL_DST, 28)
            port, = struct.unpack_from("!H", raw, 2)
            return socket.inet_ntop(socket.AF_INET6, raw[8:24]), port
        except OSError:
            return local[0], local[1]
    try:
        return conntrack_destination(conn)
    except OSError:
        return plain_ip(local[0]), local[1]


def conntrack_destination(conn):
    """Return conntrack's original (host, port) of an IPv4 (or v4-mapped) CONN; raise OSError if it has none."""
    raw = conn.getsockopt(SOL_IP, SO_ORIGINAL_DST, 16)
    port, = struct.unpack_from("!H", raw, 2)
    return socket.inet_ntoa(raw[4:8]), port


# The C member of a socket's family: an int, where socket.socket's property builds an enum
# (in a fork child that copies about 130 KiB of the parent's pages).
SOCKET_FAMILY = _socket.socket.family


def is_local_address(host):
    """Return True when HOST is an address of this host (it can be bound)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, 0))
            return True
        except OSError:
            return False


def is_self(dest, listen_port):
    """Return True when DEST is this listener itself (a forwarding loop)."""
    return dest[1] == listen_port and is_local_address(plain_ip(dest[0]))


def shared_memory(size):
    """Return SIZE bytes of anonymous memory shared with the processes forked later; raise Fatal."""
    import mmap
    try:
        return mmap.mmap(-1, size)
    except OSError as exc:      # --max-conns or --workers too large for this machine
        raise Fatal("cannot map %d bytes of shared memory for --max-conns/--workers: %s"
                    % (size, exc.strerror), EX_OSERR) from None


class OwnUpstreams:
    """The upstream sockets of every process of this server, by inode, in shared memory.

    An OUTPUT-chain REDIRECT can catch tproxy's own connection to a target
    and bring it back as a new client, one more per hop. Each connection
    (a fork child, a session of a --workers worker) has a
    slot in a shared board, where its upstream socket's inode is written
    before connecting; a new client from a local address is looked up in
    /proc/net/tcp (its source and original destination name the upstream
    socket that made it), and refused when that socket's inode is on the
    board. Reading /proc/net/tcp costs time in proportion to every socket of
    the namespace (TIME_WAIT included: milliseconds under load), so more
    boards say which clients can be ours at all: each slot's local port once
    connect() has chosen it, with the port it connects to, and until then the
    port it connects to alone. Only a client whose port and original
    destination port are a slot's local and destination ports, or whose
    original destination port is a port being connected to, is looked up (a
    local client sharing only its port number with an upstream, common when
    both come from the same ephemeral range, is not). Without a board (inetd
    mode) nothing is recognised.
    """

    def __init__(self):
        self.board = None       # memoryview of unsigned 64-bit inodes, one per slot
        self.ports = None       # mmap of 16-bit local ports, one per slot (0: not known)
        self.pending = None     # mmap of 16-bit destination ports while the local one is not known
        self.dests = None       # mmap of 16-bit destination ports, one per slot (0: none)
        self.slot = None        # this process's slot, or None in the parent

    def create(self, slots):
        """Make the shared boards for SLOTS connections (in the parent, before forking)."""
        self.board = memoryview(shared_memory(8 * max(slots, 1))).cast("Q")
        self.ports = shared_memory(2 * max(slots, 1))
        self.pending = shared_memory(2 * max(slots, 1))
        self.dests = shared_memory(2 * max(slots, 1))
        # The same boards as words, written per connection (searched as bytes, with find).
        self.port_words, self.pending_words, self.dest_words = (
            memoryview(board).cast("H") for board in (self.ports, self.pending, self.dests))

    def take(self, slot):
        """Use SLOT from now on (in a child or worker)."""
        self.slot = slot
        self.release(slot)

    def add(self, sock, dest_port, slot=None):
        """Record SOCK, about to connect to DEST_PORT, as the upstream of SLOT (default: ours)."""
        slot = self.slot if slot is None else slot
        if self.board is not None and slot is not None:
            self.port_words[slot] = 0
            self.dest_words[slot] = self.pending_words[slot] = dest_port
            self.board[slot] = os.fstat(sock.fileno()).st_ino

    def connecting(self, sock, slot=None):
        """SOCK of SLOT has called connect(): its local port is known now."""
        slot = self.slot if slot is None else slot
        if self.board is not None and slot is not None:
            try:
                port = sock.getsockname()[1]
            except OSError:
                return
            self.port_words[slot] = port
            self.pending_words[slot] = 0

    def release(self, slot=None):
        """Forget the upstream of SLOT (default: this process's own)."""
        slot = self.slot if slot is None else slot
        if self.board is not None and slot is not None:
            self.board[slot] = self.port_words[slot] = self.pending_words[slot] = \
                self.dest_words[slot] = 0

    @staticmethod
    def offsets(ports, port):
        """Yield the byte offset of each slot of the 16-bit board PORTS that holds PORT (at C speed).

        A board is mostly zeros, where a search for two bytes crawls (about 1 ns
        a byte); one for a single byte is memchr's. So the port's nonzero byte
        is searched for, and the pair checked where it is found.
        """
        needle = struct.pack("=H", port)
        k = 0 if needle[0] else 1
        probe = needle[k:k + 1]
        at = ports.find(probe)
        while at >= 0:
            start = at - k
            if start % 2 == 0 and ports[start:start + 2] == needle:    # not straddling two slots
                yield start
            at = ports.find(probe, at + 1)

    @staticmethod
    def may_hold(ports, port):
        """Return False when no slot of the 16-bit board PORTS can hold PORT (a memchr)."""
        byte = port & 0xFF or port >> 8     # either byte would do; a zero one is everywhere
        return ports.find(BYTE_VALUES[byte]) >= 0

    def holds(self, ports, port):
        """Return True when some slot of the 16-bit board PORTS holds PORT."""
        return next(self.offsets(ports, port), None) is not None

    def holds_pair(self, port, dest_port):
        """Return True when some slot's local port is PORT and its destination port DEST_PORT."""
        dest = struct.pack("=H", dest_port)
        return any(self.dests[at:at + 2] == dest for at in self.offsets(self.ports, port))

    def is_own(self, client, orig, proto="tcp"):
        """Return True when the connection (PROTO "udp": the flow) CLIENT -> ORIG is one of this server's upstreams."""
        if self.board is None:
            return False
        # Most clients are no upstream's: a byte of each port missing from its board says so.
        # An upstream's destination port is on dests from before it is pending until after
        # it is released, so a client whose destination port is on no slot's is no upstream
        # (the local ports of many live upstreams hold most byte values; their few
        # destination ports seldom hold the listener's).
        # Pending is read before ports, each time: connecting() writes the port before it
        # clears pending, so an upstream connecting meanwhile is seen by one of the reads.
        if not self.may_hold(self.dests, orig[1]):
            return False
        if not (self.may_hold(self.pending, orig[1]) or self.may_hold(self.ports, client[1])):
            return False
        if not (self.holds(self.pending, orig[1]) or self.holds_pair(client[1], orig[1])):
            return False
        host = plain_ip(client[0]).split("%", 1)[0]      # a link-local scope is not in /proc
        if not is_local_address(host):
            return False
        inode = socket_inode((host, client[1]), (plain_ip(orig[0]).split("%", 1)[0], orig[1]),
                             proto)
        return inode is not None and inode in self.board


own_upstreams = OwnUpstreams()
BYTE_VALUES = [bytes([value]) for value in range(256)]


def socket_inode(local, remote, proto="tcp"):
    """Return the inode of this namespace's PROTO ("tcp", "udp") socket LOCAL -> REMOTE (from /proc/net), or None."""
    wanted = {proc_net_address(local) + " " + proc_net_address(remote)}
    if ":" not in local[0] and ":" not in remote[0]:     # an AF_INET6 socket may hold it mapped
        wanted.add(proc_net_address(("::ffff:" + local[0], local[1])) + " " +
                   proc_net_address(("::ffff:" + remote[0], remote[1])))
    for name in ("/proc/net/" + proto, "/proc/net/%s6" % proto):
        try:
            with open(name) as f:
                next(f, None)
                for line in f:
                    fields = line.split()
                    if len(fields) > 9 and fields[1] + " " + fields[2] in wanted:
                        return int(fields[9])
        except OSError:
            continue
    return None


def proc_net_address(addr):
    """Return (host, port) as /proc/net/tcp writes it: 32-bit words in host order, hex port."""
    host, port = addr
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    raw = socket.inet_pton(family, host)
    words = struct.unpack("=%dI" % (len(raw) // 4), raw)
    return "".join("%08X" % w for w in words) + ":%04X" % port


# ---------------------------------------------------------------------------
# Privileges: switch user, keep one capability
# ---------------------------------------------------------------------------

def drop_privileges(user, keep_net_raw, bind_low_ports=False):
    """Become USER (name, uid, gid) with no supplementary groups.

    With KEEP_NET_RAW, keep CAP_NET_RAW (and nothing else) in the permitted
    and effective sets, so transparent sockets still work; with
    BIND_LOW_PORTS also CAP_NET_BIND_SERVICE (--udp reply sockets bind the
    original destination's port, often below 1024). Every other
    capability leaves the bounding set, and NoNewPrivs is set, so nothing
    this process runs can gain privileges again. Raise Fatal on failure.
    """
    name, uid, gid = user
    try:
        libc = _libc()
        if os.geteuid() == 0:
            for cap in range(0, 64):
                if not (keep_net_raw and cap == CAP_NET_RAW) and \
                        not (bind_low_ports and cap == CAP_NET_BIND_SERVICE) and \
                        libc.prctl(24, cap, 0, 0, 0) != 0:                      # PR_CAPBSET_DROP
                    if _errno() == errno.EINVAL:
                        break       # past the last capability this kernel knows
                    if _errno() == errno.EPERM and not keep_net_raw:
                        break       # no CAP_SETPCAP: setuid empties the sets; NoNewPrivs below
                    raise OSError(_errno(), os.strerror(_errno()))
        if keep_net_raw and libc.prctl(8, 1, 0, 0, 0) != 0:                     # PR_SET_KEEPCAPS
            raise OSError(_errno(), os.strerror(_errno()))
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)
        if keep_net_raw:
            _capset(1 << CAP_NET_RAW | (1 << CAP_NET_BIND_SERVICE if bind_low_ports else 0))
        if libc.prctl(38, 1, 0, 0, 0) != 0:      # PR_SET_NO_NEW_PRIVS: no setuid gains root
            raise OSError(_errno(), os.strerror(_errno()))
    except OSError as exc:
        status = EX_NOPERM if exc.errno == errno.EPERM else EX_OSERR
        raise Fatal("-r %s: cannot switch user: %s" % (name, exc.strerror), status) from None


def _libc(cache=[]):
    """Return the C library (loaded once: every fork child calls prctl)."""
    if not cache:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl      # made once here, not in every child (about 150 KiB of pages each)
        cache.append(libc)
    return cache[0]


def _errno():
    import ctypes
    return ctypes.get_errno()


def _capset(mask):
    """Set the permitted and effective capability sets to MASK (inheritable empty)."""
    import ctypes

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                    ("inheritable", ctypes.c_uint32)]

    header = Header(0x20080522, 0)      # _LINUX_CAPABILITY_VERSION_3
    data = (Data * 2)()
    data[0].effective = data[0].permitted = mask & 0xFFFFFFFF
    data[1].effective = data[1].permitted = mask >> 32
    if _libc().capset(ctypes.byref(header), data) != 0:
        raise OSError(_errno(), "capset: " + os.strerror(_errno()))


# ---------------------------------------------------------------------------
# Reaching the target: source address, CONNECT, PROXY protocol
# ---------------------------------------------------------------------------

class Dialer:
    """A non-blocking connect to the first reachable of ADDRS (getaddrinfo tuples).

    SOURCE is the --source spec, CLIENT the client's sockaddr, PORTS the
    --source-ports (low, high) and SLOT the loop guard's slot for the socket.
    `start()` and `advance()` leave `sock` connected, or wait on `waits()`
    until `due`; they raise ConnectionFailed naming the last failure.
    Descriptors of failed attempts are listed in `dropped` (an event loop
    must forget them).
    """

    # What a dialer starts with, until it sets its own (one store fewer each per connection).
    last = "no address"
    sock = None             # the attempt in progress, then the connected socket
    connected = transparent = False
    due = sockaddr = None
    peer = None             # the connected socket's peer address, when already asked

    def __init__(self, addrs, timeout, source=None, client=None, log=None, verbose=False,
                 ports=None, slot=None):
        self.addrs, self.next = addrs, 0
        self.timeout, self.source, self.client = timeout, source, client
        self.log, self.verbose, self.ports, self.slot = log, verbose, ports, slot
        self.dropped = []

    def waits(self):
        return {self.sock.fileno(): select.POLLOUT} if self.sock and not self.connected else {}

    def start(self, now):
        """Begin the next attempt; raise ConnectionFailed when no address is left."""
        while self.next < len(self.addrs):
            family, type_, proto, _, self.sockaddr = self.addrs[self.next]
            self.next += 1
            try:
                # socket's C type: socket.py's layer (an enum per family, a Python close)
                # costs a microsecond per connection and nothing here uses it.
                sock = _socket.socket(family, type_ | socket.SOCK_NONBLOCK, proto)
            except OSError as exc:  # no descriptor or memory left: say so, do not crash
                raise ConnectionFailed("no socket for the target: %s" % exc.strerror) from None
            own_upstreams.add(sock, self.sockaddr[1], self.slot)
            self.sock = sock
            try:
                if self.source or self.ports:
                    self.transparent = bind_source(sock, family, self.source, self.client,
                                                   self.log, self.ports)
                err = sock.connect_ex(self.sockaddr)
                own_upstreams.connecting(sock, self.slot)
            except OSError as exc:
                self.fail("connect to %s: %s" % (show_addr(self.sockaddr), exc.strerror or exc))
                continue
            if err == 0:
                return self.established()
            if err == errno.EINPROGRESS:
                # A near target (loopback, the same host) has often answered by the time
                # connect() returns: a peer address means established, one wakeup saved.
                try:
                    self.peer = sock.getpeername()
                except OSError:
                    self.due = now + self.timeout
                    return
                return self.established()
            self.fail("connect to %s: %s" % (show_addr(self.sockaddr), os.strerror(err)))
        raise ConnectionFailed(self.last)

    def advance(self, fired, now):
        """The attempt's socket is writable (FIRED) or its deadline may have passed."""
        if self.sock.fileno() in fired:
            err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err == 0:
                return self.established()
            self.fail("connect to %s: %s" % (show_addr(self.sockaddr), os.strerror(err)))
        elif now >= self.due:
            last = "connect to %s timed out after %gs" % (show_addr(self.sockaddr), self.timeout)
            if self.transparent:
                last += " (transparent source: are replies routed back through this host?)"
            self.fail(last)
        else:
            return
        self.start(now)

    def established(self):
        self.connected = True
        self.due = None
        if self.ports:
            check_source_port(self.sock, self.ports)

    def fail(self, last):
        self.last = last
        self.dropped.append(self.sock.fileno())
        self.sock.close()
        self.sock = None
        if self.verbose and self.log:
            self.log.message(last)


def connect(addrs, timeout, source=None, client=None, log=None, verbose=False, ports=None):
    """Connect to the first reachable of ADDRS, waiting; return the (blocking) socket.

    The blocking face of Dialer (same arguments); raise ConnectionFailed.
    """
    dialer = Dialer(addrs, timeout, source, client, log, verbose, ports)
    dialer.start(time.monotonic())
    poller = select.poll()
    while not dialer.connected:
        fd = dialer.sock.fileno()
        poller.register(fd, select.POLLOUT)
        left = dialer.due - time.monotonic()
        ready = poller.poll(min(max(0, math.ceil(left * 1000)), POLL_MAX_MS))
        poller.unregister(fd)
        dialer.advance({f for f, _ in ready}, time.monotonic())
    dialer.sock.setblocking(True)
    return socket.socket(fileno=dialer.sock.detach())   # socket.py's, as callers expect (makefile)


def bind_source(sock, family, source, client, log, ports=None):
    """Bind SOCK to the --source address and --source-ports; return True if it is transparent."""
    host, transparent = None, False
    if source in ("client", "client-port"):
        host = plain_ip(client[0])
        if (":" in host) != (family == socket.AF_INET6):
            if log:
                log.message("client %s and target differ in family; connecting from "
                            "this host's own address" % show_addr(client))
            host = None
        else:
            level, option = (SOL_IPV6, IPV6_TRANSPARENT) if family == socket.AF_INET6 \
                else (SOL_IP, IP_TRANSPARENT)
            sock.setsockopt(level, option, 1)
            transparent = True
            if source == "client-port":
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind((host, client[1]))
                return True
    elif source is not None and (":" in source) == (family == socket.AF_INET6):
        host = source
    if ports:
        claim_source_port(sock, family, host, ports)
    elif host is not None:
        sock.setsockopt(SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        sock.bind((host, 0))
    return transparent


def claim_source_port(sock, family, host, ports):
    """Make SOCK's local port come from PORTS (low, high), bound to HOST (None: any address).

    IP_LOCAL_PORT_RANGE lets connect() pick a port whose four-tuple is free,
    but the kernel silently ignores each end of it that lies outside the
    namespace's net.ipv4.ip_local_port_range, so it is used only when both
    ends lie inside; otherwise (or before Linux 6.3) a free port of PORTS is
    bound here. check_source_port() confirms the port once connected.
    """
    low, high = ports
    if ports_within(ports, ephemeral_ports()):
        try:
            sock.setsockopt(SOL_IP, IP_LOCAL_PORT_RANGE, struct.pack("=I", high << 16 | low))
        except OSError as exc:
            if exc.errno not in (errno.ENOPROTOOPT, errno.EINVAL):
                raise
        else:
            if host is not None:
                # The range also applies to the port chosen at connect() for a bound address.
                sock.setsockopt(SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
                sock.bind((host, 0))
            return
    bind_port_in_range(sock, host or ("::" if family == socket.AF_INET6 else "0.0.0.0"), ports)


def bind_port_in_range(sock, host, ports):
    """Bind SOCK to HOST and a free port of PORTS, trying each once from a random start.

    Raise OSError(EADDRINUSE) when every port of the range is taken.
    """
    low, high = ports
    size = high - low + 1
    start = int.from_bytes(os.urandom(4), "little") % size
    for step in range(size):
        try:
            sock.bind((host, low + (start + step) % size))
            return
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
    raise OSError(errno.EADDRINUSE, "every local port of --source-ports %d-%d is in use"
                  % (low, high))


def check_source_port(sock, ports):
    """Raise ConnectionFailed (resetting SOCK) if its local port lies outside PORTS."""
    port = sock.getsockname()[1]
    if not ports[0] <= port <= ports[1]:
        peer = show_addr(sock.getpeername())
        abort(sock)
        raise ConnectionFailed("connect to %s: the kernel gave local port %d, outside "
                               "--source-ports %d-%d; closed" % (peer, port, ports[0], ports[1]))


def ephemeral_ports():
    """Return the namespace's net.ipv4.ip_local_port_range as (low, high), or None."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = map(int, f.read().split())
        return low, high
    except (OSError, ValueError):
        return None


def ports_within(ports, outer):
    """Return True if the range PORTS lies wholly inside the range OUTER (None: no)."""
    return outer is not None and outer[0] <= ports[0] and ports[1] <= outer[1]


def connect_request(dest, auth):
    """Return the CONNECT request asking an HTTP proxy for a tunnel to DEST (with AUTH)."""
    authority = ("[%s]:%d" if ":" in dest[0] else "%s:%d") % (dest[0], dest[1])
    head = "CONNECT %s HTTP/1.1\r\nHost: %s\r\n" % (authority, authority)
    if auth:
        import base64
        head += "Proxy-Authorization: Basic %s\r\n" % base64.b64encode(auth).decode()
    return head.encode() + b"\r\n"


def connect_reply(reply):
    """Return the bytes past the proxy's complete reply REPLY, or None while it is incomplete.

    Raise ConnectionFailed with the proxy's status line unless it answers 2xx.
    """
    if b"\r\n\r\n" not in reply:
        if len(reply) > MAX_HEAD:
            raise ConnectionFailed("proxy reply to CONNECT too long")
        return None
    head, _, rest = bytes(reply).partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0]
    words = status_line.split(None, 2)
    if len(words) < 2 or not words[0].startswith(b"HTTP/") or not words[1].startswith(b"2"):
        raise ConnectionFailed('proxy refused CONNECT: "%s"' % escape(status_line))
    return rest


def proxy_header(version, client, dest):
    """Return a PROXY protocol header (v1 text or v2 binary) for CLIENT -> DEST."""
    src, dst = plain_ip(client[0]), plain_ip(dest[0])
    six = ":" in src
    if six != (":" in dst):
        return b"PROXY UNKNOWN\r\n" if version == "v1" else \
            b"\r\n\r\n\x00\r\nQUIT\n" + bytes([0x20, 0x00]) + struct.pack("!H", 0)
    if version == "v1":
        return ("PROXY %s %s %s %d %d\r\n" % ("TCP6" if six else "TCP4", src, dst,
                                               client[1], dest[1])).encode()
    family = socket.AF_INET6 if six else socket.AF_INET
    body = (socket.inet_pton(family, src) + socket.inet_pton(family, dst)
            + struct.pack("!HH", client[1], dest[1]))
    return (b"\r\n\r\n\x00\r\nQUIT\n" + bytes([0x21, 0x21 if six else 0x11])
            + struct.pack("!H", len(body)) + body)


# ---------------------------------------------------------------------------
# Relay engine: two directions, non-blocking, both at once
# ---------------------------------------------------------------------------

class Reset(Exception):
    """A side reset its connection (or vanished); SIDE is "client" or "server"."""

    def __init__(self, side):
        super().__init__(side)
        self.side = side


class Pump:
    """Moves bytes one way, from SRC to DST, without blocking.

    `wanted()` names the (fd, poll event) it waits for, or None once the
    source's EOF has been passed on; `step(drained, hangup)` moves what it can.
    After a short read (or with DRAINED: the source was just read dry) a pump
    waits to be woken rather than read again only to be told EAGAIN (a system
    call and an exception per wakeup); polling is level-triggered. HANGUP: the
    poll said the source's peer has closed, so its EOF is read at once too.
    """

    lean = False    # True: an event loop may step it alone when its source is readable (Session.lean)
    fin_by_close = False    # True: the destination is closed right after the EOF, which sends the FIN
    count = 0               # bytes passed on (each pump's own once it has some)
    eof = done = False

    def __init__(self, src, dst, src_side, dst_side):
        self.src, self.dst = src, dst
        self.src_fd, self.dst_fd = src.fileno(), dst.fileno()
        self.src_side, self.dst_side = src_side, dst_side

    def wanted(self):
        if self.done:
            return None
        if self.pending():
            return self.dst_fd, select.POLLOUT
        return self.src_fd, select.POLLIN

    def finish(self):
        """Pass the source's EOF on as a half-close of the destination (or leave it to the close)."""
        if not self.fin_by_close:
            try:
                self.dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass
        self.done = True

    def close(self):
        """Release what the pump holds besides the two sockets."""

    def deadline(self):
        """Return the monotonic time by which `expire()` is due, or None."""
        return None

    def expire(self):
        """The deadline passed."""


class CopyPump(Pump):
    """A pump through a userspace buffer (recv_into and send).

    The read buffer is one for every pump of the process: what is read is
    taken (copied out) at once, so a held connection does not keep 64 KiB.
    """

    buf = view = None

    def __init__(self, src, dst, src_side, dst_side, initial=b""):
        super().__init__(src, dst, src_side, dst_side)
        if CopyPump.buf is None:
            CopyPump.buf = bytearray(CHUNK)
            CopyPump.view = memoryview(CopyPump.buf)
        self.out = bytearray(initial)

    def pending(self):
        return len(self.out)

    def step(self, drained=False, hangup=False):
        for _ in range(64):
            if self.out:
                try:
                    sent = self.dst.send(self.out)
                except (BlockingIOError, InterruptedError):
                    return
                except OSError:
                    raise Reset(self.dst_side) from None
                del self.out[:sent]
                self.count += sent
                if drained and not self.out and not self.eof:
                    return
                continue
            if self.eof:
                self.finish()
                return
            if self.held():
                return
            try:
                n = self.src.recv_into(self.buf)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                raise Reset(self.src_side) from None
            if n == 0:
                self.eof = True
            else:
                drained = n < CHUNK and not hangup
                self.take(self.view[:n])
                if drained and not self.out and not self.eof:
                    return

    def take(self, data):
        """Queue DATA read from the source for the destination."""
        self.out += data

    def held(self):
        """Return True while the pump must not read more (its filter holds enough)."""
        return False


class RawPump(Pump):
    """An unparsed pump: copies through userspace, then splices once a read fills CHUNK.

    Short exchanges never pay for a pipe pair (two pipes, their resizing and
    four closes per connection); bulk transfers go zero-copy, socket -> pipe
    -> socket with os.splice, where the kernel has it.
    """

    watching = False    # True while a subclass must see every byte (no splice)
    lean = True         # no deadline, no filter: stepping it touches nothing else
    pipe = None         # (read end, write end) once splicing
    in_pipe = 0         # bytes in the pipe

    def __init__(self, src, dst, src_side, dst_side, initial=b""):
        super().__init__(src, dst, src_side, dst_side)
        self.out = bytes(initial)   # read, not yet sent (copy phase)

    def pending(self):
        return self.in_pipe or len(self.out)

    def step(self, drained=False, hangup=False):
        for _ in range(64):
            if self.out:
                try:
                    sent = self.dst.send(self.out)
                except (BlockingIOError, InterruptedError):
                    return
                except OSError:
                    raise Reset(self.dst_side) from None
                self.out = self.out[sent:]
                self.count += sent
                if drained and not self.out and not self.eof:
                    return
            elif self.in_pipe:
                try:
                    n = os.splice(self.pipe[0], self.dst_fd, self.in_pipe, flags=SPLICE_FLAGS)
                except (BlockingIOError, InterruptedError):
                    return
                except OSError:
                    raise Reset(self.dst_side) from None
                self.in_pipe -= n
                self.count += n
            elif self.eof:
                self.finish()
                return
            elif self.pipe and not self.watching:
                try:
                    n = os.splice(self.src_fd, self.pipe[1], PIPE_SIZE, flags=SPLICE_FLAGS)
                except (BlockingIOError, InterruptedError):
                    return
                except OSError:
                    raise Reset(self.src_side) from None
                self.eof = n == 0
                self.in_pipe = n
            else:
                try:
                    self.out = self.src.recv(CHUNK)
                except (BlockingIOError, InterruptedError):
                    return
                except OSError:
                    raise Reset(self.src_side) from None
                size = len(self.out)
                self.eof = not size
                drained = size < CHUNK and not hangup
                if self.watching:
                    self.watch(self.out)
                elif size == CHUNK and SPLICE_FLAGS and not self.pipe:
                    self.pipe = open_pipe()

    def close(self):
        if self.pipe:
            os.close(self.pipe[0])
            os.close(self.pipe[1])


def open_pipe():
    """Return a non-blocking pipe (read end, write end) sized PIPE_SIZE where allowed."""
    pipe = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        import fcntl
        fcntl.fcntl(pipe[1], F_SETPIPE_SZ, PIPE_SIZE)
    except OSError:
        pass    # the default 64 KiB pipe works too, with more wakeups
    return pipe


class Idle(Exception):
    """Neither side sent anything within the idle timeout."""


class Cut(Exception):
    """Shutdown: the grace period ended before the connection did."""


POLL_MAX_MS = 2 ** 31 - 1      # poll(2) takes an int: about 24.8 days
HANGUP = select.POLLHUP | select.POLLRDHUP     # the peer closed (its side, or both)


def abort(sock):
    """Close SOCK with a reset (SO_LINGER 0), passing a peer's reset on."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    except OSError:
        pass


# ---------------------------------------------------------------------------
# HTTP translate: request framing (RFC 9112) and request-line rewriting
# ---------------------------------------------------------------------------

class BadRequest(Exception):
    """A request tproxy refuses: STATUS and REASON go back to the client, the message to the log."""

    def __init__(self, status, reason, detail):
        super().__init__(detail)
        self.status, self.reason = status, reason


def bad_request(detail):
    """Return the BadRequest (400) for DETAIL."""
    return BadRequest(400, "Bad Request", detail)


class Grammar:
    """RFC 9112's request grammar as compiled patterns, built on first use.

    Importing re and compiling cost a few milliseconds of every inetd
    start, which raw and CONNECT modes never need.
    """

    _built = None

    def __init__(self):
        import re
        token = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
        self.request_line = re.compile(rb"(%s) ([\x21-\x7e]+) (HTTP/1\.[0-9])\Z" % token)
        self.http09_line = re.compile(rb"GET ([\x21-\x7e]+)\Z")
        # field-name ":" OWS field-value OWS; a value holds no NUL, CR, LF, VT or FF (h11's rule).
        self.field_line = re.compile(
            rb"(%s):[ \t]*((?:[^\x00\s]+(?:[ \t]+[^\x00\s]+)*)?)[ \t]*\Z" % token)
        # chunk-size (bounded), chunk-ext without control characters, CRLF exactly.
        self.chunk_line = re.compile(
            rb"([0-9A-Fa-f]{1,16})(?:[ \t]*;[^\x00-\x08\x0a-\x1f\x7f]*)?[ \t]*\r\n\Z")
        self.head_end = re.compile(rb"\n\r?\n")
        self.status_line = re.compile(rb"HTTP/1\.[0-9] ([0-9]{3})(?:[ \t][^\r\n]*)?\r?\n")

    @classmethod
    def get(cls):
        if cls._built is None:
            cls._built = cls()
        return cls._built


HOST_CHARS = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
                       b"0123456789.-_~:[]%!$&'()*+,;=")
HOST_CHAR_BYTES = bytes(sorted(HOST_CHARS))
MAX_BLANK_LINES = 8     # empty lines tolerated before a request line (RFC 9112 section 2.2)


class Head:
    """One request head as parsed: what the rewrite and the log need, and its field lines."""

    __slots__ = ("method", "target", "version", "fields", "host", "referer")

    def __init__(self, method, target, version, fields=(), host=None, referer=None):
        self.method, self.target, self.version = method, target, version  # version None: HTTP/0.9
        self.fields = fields            # field lines without their line ends
        self.host, self.referer = host, referer


def split_head_lines(raw):
    """Return the lines of a head ending in an empty line, without line ends; refuse a bare CR."""
    lines = []
    for line in raw.split(b"\n")[:-2]:
        if line.endswith(b"\r"):
            line = line[:-1]
        if b"\r" in line:
            raise bad_request('bare CR in "%s"' % escape(line))
        lines.append(line)
    return lines


def parse_head(raw):
    """Return (Head, body) for one request head RAW; body is "chunked" or a length; raise BadRequest.

    RFC 9112 strictly: one Host (required in HTTP/1.1), no obs-fold, no
    Transfer-Encoding with Content-Length or in HTTP/1.0, only the chunked
    transfer coding, no content on CONNECT.
    """
    lines = split_head_lines(raw)
    grammar = Grammar.get()
    match = grammar.request_line.match(lines[0])
    if not match:
        raise bad_request('bad request line "%s"' % escape(lines[0]))
    method, target, version = match.groups()
    hosts, lengths, codings = [], [], []
    referer = upgrade = None
    fields = lines[1:]
    for line in fields:
        if line[:1] in (b" ", b"\t"):
            raise bad_request('obsolete line folding at "%s"' % escape(line))
        field = grammar.field_line.match(line)
        if not field:
            raise bad_request('bad header line "%s"' % escape(line))
        name, value = field.group(1).lower(), field.group(2)
        if name == b"host":
            hosts.append(value)
        elif name == b"content-length":
            lengths += [v.strip() for v in value.split(b",")]
        elif name == b"transfer-encoding":
            codings += [c.strip().lower() for c in value.split(b",")]
        elif name == b"referer" and referer is None:
            referer = value
        elif name == b"upgrade" and value.strip(b" \t,"):
            upgrade = value
    if len(hosts) > 1:
        raise bad_request("more than one Host header")
    if not hosts and version != b"HTTP/1.0":
        raise bad_request("no Host header in an %s request" % version.decode())
    host = hosts[0] if hosts else None
    if host and host.translate(None, HOST_CHAR_BYTES):     # a byte outside HOST_CHARS is left
        raise bad_request('bad Host header "%s"' % escape(host))
    body = 0
    if codings:
        if version == b"HTTP/1.0":
            raise bad_request("Transfer-Encoding in an HTTP/1.0 request")
        if lengths:
            raise bad_request("both Transfer-Encoding and Content-Length")
        if codings[-1] != b"chunked":
            raise bad_request('Transfer-Encoding "%s" does not end in chunked'
                              % escape(b", ".join(codings)))
        if codings != [b"chunked"]:
            raise BadRequest(501, "Not Implemented", 'Transfer-Encoding "%s": only chunked is '
                             'supported' % escape(b", ".join(codings)))
        body = "chunked"
    elif lengths:
        if len(set(lengths)) != 1 or not lengths[0].isdigit() or len(lengths[0]) > 18:
            raise bad_request('bad Content-Length "%s"' % escape(b", ".join(lengths)))
        body = int(lengths[0])
    if method == b"CONNECT" and body:
        raise bad_request("CONNECT with content")
    head = Head(method, target, version, fields, host, referer)
    return head, body, (method == b"CONNECT" or upgrade is not None)


class RequestFramer:
    """HTTP/1.1 request framing (RFC 9112) as a pure codec: client bytes in, what to forward out.

    `feed(data)` returns, in order, a Head for each request head (the caller
    renders it) and bytes to pass on unchanged (bodies, chunk framing). A
    refused request sets `error` (a BadRequest) and nothing more comes out;
    the requests before it were complete. A CONNECT or Upgrade request is
    followed only as a connection's first request: the framer then holds
    further bytes (`switch_method` set) until `switch(status)` says how the
    server answered; 2xx to CONNECT or 101 to Upgrade turns the rest into a
    tunnel, anything else means requests again. After an HTTP/0.9 request
    the rest is dropped. Work per byte is constant, so a long keep-alive
    connection costs linear time.
    """

    def __init__(self):
        self.buf = bytearray()
        self.state = "head"     # head, body, chunk-size, chunk-data, chunk-end, trailer,
        #                         switch-wait, tunnel, discard, failed
        self.remaining = 0      # body or chunk bytes still to pass
        self.trailer_bytes = 0
        self.requests = 0       # heads passed so far
        self.error = None
        self.switch_method = None   # method of the pending CONNECT/Upgrade request
        self.switch_ok = None       # how the server answered it, once known
        self.scanned = 0        # bytes of buf searched for the end of the head
        self.blank_lines = 0
        self.dropped_lines = 0  # empty lines dropped before request lines, in all
        self.started = False    # bytes of the next head (or empty lines before it) arrived

    @property
    def mid_head(self):
        """True while part of a request head has arrived and the rest has not."""
        return self.state == "head" and (self.started or bool(self.buf))

    @property
    def holding(self):
        """True while client bytes wait for the answer to a CONNECT or Upgrade request."""
        return self.state == "switch-wait"

    def feed(self, data):
        """Take DATA from the client; return the items to forward (Heads and bytes)."""
        if self.state in ("failed", "discard"):
            return []
        if self.state == "tunnel":
            return [bytes(data)] if data else []
        self.buf += data
        return self.run()

    def eof(self):
        """The client closed its side: a request head cut short is an error."""
        if self.state == "head" and self.buf:
            self.fail(bad_request("connection closed in the middle of a request head"))

    def switch(self, status):
        """The server answered the pending CONNECT or Upgrade with STATUS; return items to forward."""
        if self.switch_method is None:
            return []
        if self.switch_method == b"CONNECT":
            self.switch_ok = 200 <= status < 300
        else:
            self.switch_ok = status == 101
        self.switch_method = None
        if self.state != "switch-wait":
            return []           # answered before its request ended: applied at the end
        self.state = "tunnel" if self.switch_ok else "head"
        return self.run()

    def fail(self, error):
        # Kept without its traceback: its frames hold this framer, a cycle otherwise.
        self.error, self.state = error.with_traceback(None), "failed"
        del self.buf[:]

    def run(self):
        out = []
        steps = self.STEPS
        try:
            while self.buf and self.state in steps:
                if not getattr(self, steps[self.state])(out):
                    break
        except BadRequest as exc:
            self.fail(exc)
        if self.state == "tunnel" and self.buf:
            out.append(bytes(self.buf))
            del self.buf[:]
        elif self.state == "discard":
            del self.buf[:]
        return out

    def end_message(self):
        """One request (head and body) has passed: what comes next."""
        if self.switch_method is not None or self.switch_ok is not None:
            ok, self.switch_ok = self.switch_ok, None
            self.state = "switch-wait" if ok is None else "tunnel" if ok else "head"
        else:
            self.state = "head"

    def take_head(self, out):
        buf = self.buf
        while buf[:1] == b"\n" or buf[:2] == b"\r\n":
            del buf[:1 if buf[:1] == b"\n" else 2]
            self.started = True
            self.blank_lines += 1
            self.dropped_lines += 1
            if self.blank_lines > MAX_BLANK_LINES:
                raise bad_request("more than %d empty lines before a request" % MAX_BLANK_LINES)
        if not buf or buf == b"\r":
            return False
        self.started = True
        first = buf.find(b"\n", 0, MAX_HEAD + 1)
        if first < 0:
            if len(buf) > MAX_HEAD:
                raise BadRequest(414, "URI Too Long", "request line longer than %d bytes" % MAX_HEAD)
            return False
        line = bytes(buf[:first])
        old = Grammar.get().http09_line.match(line[:-1] if line.endswith(b"\r") else line)
        if old:
            del buf[:first + 1]
            self.passed_head(out, Head(b"GET", old.group(1), None))
            self.state = "discard"
            return True
        end = Grammar.get().head_end.search(buf, max(0, self.scanned - 2))
        if end is None or end.end() > MAX_HEAD:
            self.scanned = len(buf)
            if len(buf) > MAX_HEAD:
                raise BadRequest(431, "Request Header Fields Too Large",
                                 "request head longer than %d bytes" % MAX_HEAD)
            return False
        raw = bytes(buf[:end.end()])
        del buf[:end.end()]
        self.scanned = 0
        head, body, switch = parse_head(raw)
        if switch and self.requests:
            raise bad_request("%s after earlier requests on the connection (protocol switches "
                              "are followed on a connection's first request only)"
                              % ("CONNECT" if head.method == b"CONNECT" else "Upgrade"))
        self.passed_head(out, head)
        if switch:
            self.switch_method = b"CONNECT" if head.method == b"CONNECT" else b"UPGRADE"
        if body == "chunked":
            self.state = "chunk-size"
        elif body:
            self.state, self.remaining = "body", body
        else:
            self.end_message()
        return True

    def passed_head(self, out, head):
        out.append(head)
        self.requests += 1
        self.blank_lines = 0
        self.started = False

    def take_body(self, out):
        n = min(self.remaining, len(self.buf))
        out.append(bytes(self.buf[:n]))
        del self.buf[:n]
        self.remaining -= n
        if not self.remaining:
            if self.state == "chunk-data":
                self.state = "chunk-end"
            else:
                self.end_message()
        return True

    def take_chunk_size(self, out):
        end = self.buf.find(b"\n", 0, MAX_HEAD + 1)
        if end < 0:
            if len(self.buf) > MAX_HEAD:
                raise bad_request("chunk-size line longer than %d bytes" % MAX_HEAD)
            return False
        line = bytes(self.buf[:end + 1])
        match = Grammar.get().chunk_line.match(line)
        if not match:
            raise bad_request('bad chunk-size line "%s"' % escape(line))
        del self.buf[:end + 1]
        out.append(line)
        self.remaining = int(match.group(1), 16)
        self.state = "chunk-data" if self.remaining else "trailer"
        self.trailer_bytes = 0
        return True

    def take_chunk_end(self, out):
        if self.buf[:2] != b"\r\n"[:len(self.buf)]:
            raise bad_request("chunk data not followed by CRLF")
        if len(self.buf) < 2:
            return False
        del self.buf[:2]
        out.append(b"\r\n")
        self.state = "chunk-size"
        return True

    def take_trailer(self, out):
        end = self.buf.find(b"\n", 0, MAX_HEAD + 1)
        if end < 0 or self.trailer_bytes + end > MAX_HEAD:
            if len(self.buf) > MAX_HEAD or self.trailer_bytes + len(self.buf) > MAX_HEAD:
                raise BadRequest(431, "Request Header Fields Too Large",
                                 "trailer section longer than %d bytes" % MAX_HEAD)
            return False
        line = bytes(self.buf[:end])
        del self.buf[:end + 1]
        self.trailer_bytes += end + 1
        if line.endswith(b"\r"):
            line = line[:-1]
        if b"\r" in line:
            raise bad_request('bare CR in trailer "%s"' % escape(line))
        if not line:
            out.append(b"\r\n")
            self.end_message()
            return True
        if line[:1] in (b" ", b"\t"):
            raise bad_request('obsolete line folding in the trailer at "%s"' % escape(line))
        field = Grammar.get().field_line.match(line)
        if not field:
            raise bad_request('bad trailer line "%s"' % escape(line))
        if field.group(1).lower() in (b"content-length", b"transfer-encoding", b"host"):
            raise bad_request('framing field "%s" in the trailer' % escape(field.group(1)))
        out.append(line + b"\r\n")
        return True

    # The method each state hands its bytes to (a table built once, not per feed).
    STEPS = {"head": "take_head", "body": "take_body", "chunk-size": "take_chunk_size",
             "chunk-data": "take_body", "chunk-end": "take_chunk_end", "trailer": "take_trailer"}


class StatusSniffer:
    """Reads the final status of the first response on a connection, a pure codec.

    `feed(data)` returns None while more bytes are needed, else the status
    code: interim 1xx responses other than 101 are skipped, and bytes that
    are no HTTP/1 response give 0. The bytes themselves pass on untouched.
    """

    def __init__(self):
        self.buf = bytearray()

    def feed(self, data):
        self.buf += data
        while True:
            end = Grammar.get().head_end.search(self.buf)
            if end is None:
                return 0 if len(self.buf) > MAX_HEAD else None
            status = Grammar.get().status_line.match(self.buf)
            if not status:
                return 0
            code = int(status.group(1))
            if code == 101 or not 100 <= code < 200:
                return code
            del self.buf[:end.end()]


def render_head(head, target):
    """Return the bytes of HEAD with TARGET as its request target; field lines end in CRLF."""
    line = head.method + b" " + target
    if head.version is None:
        return line + b"\r\n"
    return b"".join([line, b" ", head.version, b"\r\n"]
                    + [field + b"\r\n" for field in head.fields] + [b"\r\n"])


class HttpRequestPump(CopyPump):
    """Client -> cache pump: frames requests with a RequestFramer and rewrites each request line.

    Heads are rewritten (origin form -> absolute form, -f) with every field
    passed on; bodies pass by their framing. A refused request stops the
    pump: what came before it is passed on, then the cache's side is
    half-closed so its responses to the earlier requests drain to the client
    (`failed` holds the reason). A head must be complete within
    REQUEST_TIMEOUT seconds of its first byte.
    """

    def __init__(self, src, dst, rewrite, orig, force_url, on_request, framer=None, items=(),
                 request_timeout=None):
        super().__init__(src, dst, "client", "server")
        self.rewrite = rewrite          # False when talking to the origin directly
        self.orig = orig
        self.force_url = force_url
        self.on_request = on_request    # called with (method, target, host) per request
        self.framer = framer or RequestFramer()
        self.request_timeout = request_timeout
        self.head_since = None          # when the head in progress began
        self.failed = None              # the BadRequest that stopped the pump
        self.forward(items)

    def take(self, data):
        self.forward(self.framer.feed(bytes(data)))

    def finish(self):
        if self.framer.holding:
            return      # the client's EOF passes on once the held bytes have
        self.framer.eof()
        self.check()
        super().finish()

    def held(self):
        # Bytes sent before the answer to CONNECT or Upgrade wait, up to a bound.
        return self.framer.holding and (self.eof or len(self.framer.buf) >= CHUNK)

    def wanted(self):
        if self.held() and not self.out:
            return None     # woken by switched(), through the other pump
        return super().wanted()

    def switched(self, status):
        """The server answered the CONNECT or Upgrade request with STATUS."""
        self.forward(self.framer.switch(status))

    def forward(self, items):
        for item in items:
            self.out += self.render(item) if isinstance(item, Head) else item
        self.check()

    def check(self):
        """Stop reading after a refused request; time the head in progress."""
        if self.framer.error is not None and self.failed is None:
            self.failed = self.framer.error
            self.eof = True
        if not self.framer.mid_head:
            self.head_since = None
        elif self.head_since is None:
            self.head_since = time.monotonic()

    def deadline(self):
        if self.request_timeout is None or self.head_since is None or self.failed:
            return None
        return self.head_since + self.request_timeout

    def expire(self):
        """The head in progress missed its deadline: stop as for a refused request."""
        self.framer.fail(BadRequest(408, "Request Timeout", "no complete request head within %gs"
                                    % self.request_timeout))
        self.check()

    def render(self, head):
        self.on_request(head.method, head.target, head.host)
        target = head.target
        if self.force_url and not (head.referer or b"").startswith(self.force_url):
            target = self.force_url
        elif self.rewrite and target.startswith(b"/"):
            target = b"http://" + authority(head.host, self.orig) + target
        return render_head(head, target)


class SniffingPump(RawPump):
    """Cache -> client pump that reads the status of the first response for ON_STATUS.

    Used when the first request is CONNECT or Upgrade; it copies (no
    splice) until the status is known, then runs as a RawPump.
    """

    lean = False        # the status it reads starts the other pump (switched)

    def __init__(self, src, dst, src_side, dst_side, initial, on_status):
        super().__init__(src, dst, src_side, dst_side, b"")
        self.sniffer = StatusSniffer()
        self.on_status = on_status
        self.watching = True
        if initial:
            self.out = bytes(initial)
            self.watch(self.out)

    def watch(self, data):
        status = self.sniffer.feed(data) if data else 0
        if status is not None:
            self.watching = False
            self.sniffer = None
            self.on_status(status)


def authority(host, orig):
    """Return the authority for an absolute URL: the Host header, else ORIG."""
    if host:
        return host
    addr = plain_ip(orig[0])
    text = "[%s]" % addr if ":" in addr else addr
    return (text if orig[1] == 80 else "%s:%d" % (text, orig[1])).encode()


def http_error_bytes(status, reason):
    """Return a short HTTP error response (it closes the connection)."""
    body = ("<html><body><h1>%d %s</h1></body></html>\n" % (status, reason)).encode()
    head = ("HTTP/1.1 %d %s\r\nContent-Type: text/html\r\nContent-Length: %d\r\n"
            "Connection: close\r\n\r\n" % (status, reason, len(body))).encode()
    return head + body


# ---------------------------------------------------------------------------
# Serving one connection: decide, connect, relay, log
# ---------------------------------------------------------------------------

class Server:
    """What every connection needs from the process that accepted it."""

    def __init__(self, cfg, log, listen_port):
        self.cfg = cfg
        self.log = log
        self.listen_port = listen_port  # a destination on this port of this host is a loop
        self.rotation = 0               # which target address to try first (round robin)
        self.parent_fds = []            # descriptors children close at once
        self.on_record = lambda record: None    # status counters (SIGUSR1), set by the server shape

    def target_addrs(self):
        """Return the target's cached addresses, starting at the next in turn."""
        addrs = self.cfg.target_addrs
        if len(addrs) < 2:
            return addrs
        start = self.rotation % len(addrs)
        return list(addrs[start:]) + list(addrs[:start])


class Session:
    """One client connection as a non-blocking state machine; never blocks.

    accepted -> checked (ACL, original destination, loop guard) -> head (HTTP:
    the first complete request head within --request-timeout) -> connecting
    (--source, --source-ports, each address in turn, the HTTP fallback) ->
    handshake (CONNECT, with one deadline for the reply) -> relay (the pumps;
    a PROXY header goes first) -> flush (an error reply, or the lingering
    close after a refused request) -> done (one record, logged once).
    A driver calls `start(now)`, then waits on `waits` ({fd: poll events}, with
    POLLRDHUP added to POLLIN) until `due` (monotonic time, or None) and calls
    `advance(fired, now)`, FIRED the {fd: poll events} that came;
    `cut()` ends the session at once (shutdown's grace is over). `status` is
    the exit status of a process serving only this connection. Descriptors
    the session closed while running are listed in `dropped`.
    `lean` names the descriptors that only one pump waits on, for input, while
    relaying: an event loop may hand such a descriptor's events to
    `lean_step()` instead of `advance()`.
    """

    FLUSH_SEND = 5.0        # seconds to send an error reply
    LINGER = 2.0            # seconds, and bytes below, to read after it (linger_close)
    LINGER_BYTES = 1 << 20
    lean = ()       # replaced, never changed in place
    # True where this process holds the only descriptor of the client's and the upstream's
    # sockets (an event loop's worker): a close then sends the FIN itself, so the pump that
    # finishes last needs no shutdown of its own (one system call less per connection).
    # Not in inetd (fd 0 stays open) nor in a fork child (the parent may hold the client).
    close_sends_fin = False
    # What a session starts with, until it sets its own (one store fewer each per connection).
    record = upstream = framer = dialer = None
    items = pumps = ()
    stage = None            # the unbound method run by advance()
    due = None
    settled = done = False
    status = EX_OK
    before_record = None    # called just before the record is logged
    hand_off = None     # hand_off(session, initial, header): another process relays (relay_elsewhere)

    def __init__(self, conn, server, slot=None, peer=None):
        self.conn, self.server, self.cfg = conn, server, server.cfg
        self.slot = slot                # the loop guard's slot (None: the process's own)
        self.peer = peer                # the client's address, if accept() said it
        self.rewrite = self.cfg.mode == "http"
        self.waits = {}
        self.dropped = []

    # -- driving ------------------------------------------------------------

    def start(self, now):
        self.run(Session.check, (), now)

    def advance(self, fired, now):
        self.run(self.stage, fired, now)

    def lean_step(self, fd, events, now):
        """Relay EVENTS of FD, one of `lean`; return True when `waits` or `due` changed.

        The short way for the common wakeup: only the pump reading FD steps,
        and what the session waits on is computed again only when that pump
        has something pending or is done.
        """
        waits = self.waits
        try:
            self.stepping(fd, events, now)      # run()'s refresh has nothing to do while relaying
        except Exception as exc:
            self.run(Session.outcome, exc, now)     # every outcome is handled in run()
            exc.__traceback__ = None    # it holds run()'s frame, which holds it: no cycle
        return self.waits is not waits

    def outcome(self, exc, now):
        """A stage for run() that ended with EXC."""
        raise exc

    def stepping(self, fd, events, now):
        self.idle_at = now + self.cfg.idle_timeout
        pump = self.pumps[0]
        if pump.src_fd != fd:
            pump = self.pumps[1]
        pump.step(False, events & HANGUP)
        if pump.done or pump.pending():
            self.relaying(None, now)

    def run(self, stage, fired, now):
        """Run STAGE; turn how it ended into the record's outcome, as one place."""
        cfg = self.cfg
        try:
            stage(self, fired, now)
            if not self.done:
                self.refresh()
            return
        except ConnectionFailed as exc:
            self.record.outcome = str(exc)
            self.status = EX_UNAVAILABLE
            self.settle()
        except BadRequest as exc:
            exc.with_traceback(None)    # the framer keeps it: its frames would hold this session
            self.settle()
            self.record.outcome = "%d %s: %s" % (exc.status, exc.reason, exc)
            return self.flush(http_error_bytes(exc.status, exc.reason), now)
        except Reset as exc:
            self.settle()
            self.record.outcome = then(self.record.outcome, "reset by %s" % exc.side)
            abort(self.conn if exc.side == "server" else self.upstream)
        except Idle:
            self.settle()
            self.record.outcome = then(self.record.outcome, "idle timeout (%gs)" % cfg.idle_timeout)
        except Cut:
            return self.cut()
        except OSError as exc:  # what the kernel refused mid-way (a descriptor, memory)
            self.settle()
            self.record.outcome = "error: %s" % (exc.strerror or exc)
            cut_short(self.conn, self.upstream)
            self.status = EX_UNAVAILABLE
        except Exception as exc:    # a bug: still one honest record, and a reset, not a clean end
            if self.record is None:
                self.record = Record(("?", 0), cfg.mode)
            self.settle()
            self.record.outcome = "internal error: %s: %s" % (type(exc).__name__, exc)
            cut_short(self.conn, self.upstream)
            self.status = EX_SOFTWARE
        self.finish()

    def cut(self):
        """Shutdown: the grace period is over; reset both sides (never a clean-looking end)."""
        if self.done:
            return
        self.settle()
        if self.record is not None:
            self.record.outcome = "cut at shutdown after the %gs grace period" % self.cfg.grace
        cut_short(self.conn, self.upstream)
        self.status = EX_UNAVAILABLE
        self.finish()

    def refresh(self):
        """Recompute what the current stage waits on and until when."""
        if self.dialer is not None and self.dialer.dropped:
            self.dropped += self.dialer.dropped
            self.dialer.dropped = []
        if self.stage is Session.connecting:
            self.waits, self.due = self.dialer.waits(), self.dialer.due

    def finish(self):
        """Close both sides and log the record, once."""
        if self.dialer is not None and self.upstream is None and self.dialer.sock is not None:
            self.upstream = self.dialer.sock
        for sock in (self.upstream, self.conn):
            if sock is not None:
                try:
                    sock.close()
                except OSError:
                    pass
        self.done, self.waits, self.due, self.lean = True, {}, None, ()
        if self.slot is not None:
            own_upstreams.release(self.slot)
        if self.record is not None:
            if self.before_record:
                self.before_record()
            self.server.log.connection(self.record.line())
            self.server.on_record(self.record)

    # -- stages -------------------------------------------------------------

    def check(self, fired, now):
        """accepted -> checked: ACL, original destination, loop guard."""
        cfg, conn = self.cfg, self.conn
        client = self.peer
        if client is None:
            try:
                client = conn.getpeername()
            except OSError:
                self.finish()       # gone before we looked: nothing to record
                return
        self.record = record = Record(client, cfg.mode)
        conn.setblocking(False)
        if not acl_allows(cfg.acl, client):
            record.outcome = "denied by access list"
            self.finish()
            return
        record.orig = original_destination(conn)
        if own_upstreams.is_own(client, record.orig):
            raise ConnectionFailed("refused: a loop: %s is this proxy's own connection to %s "
                                   "coming back" % (show_addr(client), show_addr(record.orig)))
        if cfg.mode == "http":
            # The cache is connected only for a complete, acceptable first request.
            self.framer = RequestFramer()
            self.stage = Session.reading_head
            self.head_due = now + cfg.request_timeout
            self.waits, self.due = {conn.fileno(): select.POLLIN}, self.head_due
            # The head has often arrived with the connection: read it now, not after a wakeup.
            return self.reading_head(self.waits, now)
        self.dial(now)

    def reading_head(self, fired, now):
        """head: read until the first request head is complete (or refused, or late)."""
        record = self.record
        if not fired:
            if now < self.head_due:
                return
            if self.framer.mid_head:
                raise BadRequest(408, "Request Timeout", "no complete request head within %gs"
                                 % self.cfg.request_timeout)
            record.outcome = "no request within %gs" % self.cfg.request_timeout
            return self.finish()
        try:
            data = self.conn.recv(CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            record.outcome = "reset by client"
            return self.finish()
        if not data:
            self.framer.eof()
            if self.framer.error is not None:
                raise self.framer.error
            record.outcome = "closed by client before a request"
            return self.finish()
        self.items = self.framer.feed(data)
        if self.framer.error is not None and not self.items:
            raise self.framer.error
        if self.items:
            self.dial(now)

    def dial(self, now):
        """checked/head -> connecting: to the target, or to the original destination."""
        cfg, server, record = self.cfg, self.server, self.record
        orig = record.orig
        needs_orig = cfg.mode != "http" and not (cfg.mode == "raw" and cfg.target)
        if needs_orig and is_self(orig, server.listen_port):
            raise ConnectionFailed("refused: original destination %s is this proxy itself"
                                   % show_addr(orig))
        addrs = resolve_quiet(orig) if cfg.mode == "raw" and not cfg.target \
            else server.target_addrs()
        self.dialer = Dialer(addrs, cfg.connect_timeout, cfg.source, record.client, server.log,
                             cfg.verbose, cfg.source_ports, self.slot)
        self.stage = Session.connecting
        self.fallen_back = False
        try:
            self.dialer.start(now)
        except ConnectionFailed as exc:
            if not self.fall_back(exc, now):
                raise
        self.connected_maybe(now)

    def connecting(self, fired, now):
        try:
            self.dialer.advance(fired, now)
        except ConnectionFailed as exc:
            if not self.fall_back(exc, now):
                raise
        self.connected_maybe(now)

    def fall_back(self, exc, now):
        """HTTP mode: the cache cannot be reached; go direct (unless -p); else return False.

        The caller raises EXC again: raised here, its traceback would hold this frame,
        which holds EXC, a cycle keeping the Session until the next collection.
        """
        cfg, orig = self.cfg, self.record.orig
        self.dropped += self.dialer.dropped
        if cfg.mode != "http" or cfg.no_fallback or self.fallen_back:
            return False
        if is_self(orig, self.server.listen_port):
            raise ConnectionFailed("%s; no fallback: original destination is this proxy"
                                   % exc) from None
        self.server.log.message("cache unreachable (%s); going direct to %s"
                                % (exc, show_addr(orig)))
        self.fallen_back, self.rewrite = True, False
        self.dialer = Dialer(resolve_quiet(orig), cfg.connect_timeout, cfg.source,
                             self.record.client, self.server.log, False, cfg.source_ports,
                             self.slot)
        self.dialer.start(now)
        return True

    def connected_maybe(self, now):
        """connecting -> handshake (CONNECT) or relay, once the dialer has a connection."""
        if not self.dialer.connected:
            return
        self.upstream = self.dialer.sock
        if self.cfg.mode == "connect":
            self.stage = Session.handshaking
            self.out = connect_request(self.record.orig, self.cfg.proxy_auth)
            self.reply = bytearray()
            self.due = now + self.cfg.connect_timeout    # for the whole reply, not each read
            self.waits = {self.upstream.fileno(): select.POLLOUT}
            return
        self.relay(b"", now)

    def handshaking(self, fired, now):
        """handshake: send CONNECT, read the proxy's reply within --connect-timeout."""
        if not fired:
            if now >= self.due:
                raise ConnectionFailed("proxy did not answer CONNECT within %gs"
                                       % self.cfg.connect_timeout)
            return
        try:
            if self.out:
                self.out = self.out[self.upstream.send(self.out):]
                if not self.out:
                    self.waits = {self.upstream.fileno(): select.POLLIN}
                return
            data = self.upstream.recv(CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            raise ConnectionFailed("proxy CONNECT failed: %s" % exc.strerror) from None
        if not data:
            raise ConnectionFailed("proxy closed the connection after CONNECT")
        self.reply += data
        rest = connect_reply(self.reply)
        if rest is not None:
            self.relay(rest, now)

    def relay(self, initial, now):
        """-> relay: INITIAL (bytes past the CONNECT reply) go to the client first."""
        cfg, record = self.cfg, self.record
        record.target = self.dialer.peer or self.upstream.getpeername()
        header = proxy_header(cfg.send_proxy, record.client, record.orig) \
            if cfg.send_proxy else b""
        if self.hand_off is not None:
            return self.hand_off(self, initial, header)
        self.pumps = make_pumps(self.conn, self.upstream, self.server, record, self.rewrite,
                                initial, self.framer, self.items, header)
        self.stage = Session.relaying
        self.idle_at = now + cfg.idle_timeout
        up, down = self.pumps
        # The client has usually sent already (HTTP: its head was read just now, to the
        # last byte); the target, just connected, has not.
        up.step(drained=self.framer is not None)
        if down.pending():
            down.step()
        self.relaying(None, now)

    def relaying(self, fired, now):
        """relay: step the pumps whose descriptors fired or whose deadline passed."""
        if fired:
            self.idle_at = now + self.cfg.idle_timeout
        elif fired is not None and now >= self.idle_at:
            raise Idle()
        for pump in self.pumps:
            if not pump.lean:       # a lean pump has no deadline
                deadline = pump.deadline()
                if deadline is not None and now >= deadline:
                    pump.expire()
                    pump.step()
                    continue
            if fired:
                want = pump.wanted()
                if want and want[0] in fired:
                    pump.step(hangup=fired.get(pump.src_fd, 0) & HANGUP)
        # What the pumps wait on now, and until when (refresh() leaves this stage to us).
        # A lean pump's descriptor is lean only while nothing else waits on it.
        waits, due, lean = {}, self.idle_at, ()
        for pump in self.pumps:
            want = pump.wanted()
            if want:
                fd, event = want
                if fd in waits:
                    waits[fd] |= event
                    lean = tuple([lean_fd for lean_fd in lean if lean_fd != fd])
                else:
                    waits[fd] = event
                    if pump.lean and event == select.POLLIN:
                        lean += (fd,)
            if not pump.lean:
                deadline = pump.deadline()
                if deadline is not None and deadline < due:
                    due = deadline
        self.waits, self.due, self.lean = waits, due, lean
        if waits:
            if self.close_sends_fin:
                # The other pump is done: this one's EOF ends the relay and the session closes
                # both sockets at once. Both read queues are empty then (each side's EOF was
                # read), so the close sends a FIN, not a reset.
                up, down = self.pumps
                if up.done or down.done:
                    up.fin_by_close = down.fin_by_close = True
            return
        refused = self.settle()
        if refused is not None:
            return self.flush(b"", now)
        self.finish()

    def settle(self):
        """Take the byte counts from the pumps and release them, once; return the refusal."""
        if not self.pumps or self.settled:
            return None
        self.settled = True
        record = self.record
        record.up, record.down = self.pumps[0].count, self.pumps[1].count
        for pump in self.pumps:
            pump.close()
        refused = getattr(self.pumps[0], "failed", None)
        if refused is not None:     # kept when a reset or idle timeout follows
            record.outcome = "%d %s: %s; closed after the responses to %d earlier request(s)" \
                % (refused.status, refused.reason, refused, self.framer.requests)
        return refused

    def flush(self, reply, now):
        """-> flush: send REPLY to the client, then close without a reset (linger_close)."""
        if self.upstream is not None:
            self.dropped.append(self.upstream.fileno())
            try:
                self.upstream.close()
            except OSError:
                pass
        self.stage = Session.flushing
        self.lean = ()
        self.out = reply
        self.linger_left = self.LINGER_BYTES
        self.due = now + self.FLUSH_SEND
        if not reply:
            return self.linger(now)
        self.waits = {self.conn.fileno(): select.POLLOUT}
        self.flushing(self.waits, now)

    def flushing(self, fired, now):
        """flush: the reply goes out, then what the client still sends is read and dropped.

        A close with unread bytes resets the connection and can destroy the
        response the client has not read yet (Apache's "lingering close").
        """
        if not fired:
            if now >= self.due:
                self.finish()
            return
        conn = self.conn
        try:
            if self.out:
                self.out = self.out[conn.send(self.out):]
                if not self.out:
                    self.linger(now)
                return
            while self.linger_left > 0:
                data = conn.recv(CHUNK)
                if not data:
                    break
                self.linger_left -= len(data)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            pass
        self.finish()

    def linger(self, now):
        try:
            self.conn.shutdown(socket.SHUT_WR)
        except OSError:
            return self.finish()
        self.due = now + self.LINGER
        self.waits = {self.conn.fileno(): select.POLLIN}


def run_session(session, started=False):
    """Drive SESSION to its end in this process (a fork child, inetd); start it unless STARTED.

    A Cut (SIGALRM: shutdown's grace is over) ends it with resets. Return
    its exit status.
    """
    session.before_record = lambda: signal.setitimer(signal.ITIMER_REAL, 0)
    poller = select.poll()
    try:
        if not started:
            session.start(time.monotonic())
        while not session.done:
            waits = session.waits
            for fd, events in waits.items():
                poller.register(fd, events | select.POLLRDHUP if events & select.POLLIN else events)
            timeout = -1 if session.due is None else \
                min(max(0, math.ceil((session.due - time.monotonic()) * 1000)), POLL_MAX_MS)
            ready = poller.poll(timeout)
            for fd in waits:
                poller.unregister(fd)
            session.advance(dict(ready), time.monotonic())
    except Cut:
        session.cut()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)     # a grace period ending now cuts nothing
    return session.status


def relay_state(session, initial, header):
    """Return what a relay-only child needs of SESSION (at its relay stage: Session.relay), as bytes.

    (client, orig, target, started, INITIAL, PROXY HEADER, title): at most a
    few hundred bytes (three addresses, a header of at most 108 bytes).
    """
    record = session.record
    title = "tproxy: %s -> %s" % (show_addr(record.client), show_addr(record.orig))
    return marshal.dumps((record.client, record.orig, record.target, record.started, initial,
                          header, title))


def relay_only(server, conn, upstream, fields, slot=None):
    """Relay CONN and UPSTREAM (connected) until both sides end; log the record; return the exit status.

    What a fork-mode child runs when the parent has checked and connected
    (ForkingServer.relay_elsewhere): two raw pumps and relay_pumps, no
    Session (nor Record) until the end, because every object and function
    a child touches costs it a copied page (bench/results/2026-11-29-fork-cost-3.md).
    The end goes through a Session (outcome, resets, record), as in every
    mode. FIELDS are relay_state's: its initial bytes go to the client
    first, its PROXY header to the target first.
    """
    client, orig, target, started, initial, header, _ = fields
    pumps = [RawPump(conn, upstream, "client", "server", header),
             RawPump(upstream, conn, "server", "client", initial)]
    ending = None
    try:
        relay_pumps(pumps, server.cfg.idle_timeout)
    except Exception as exc:    # Reset, Idle, OSError, Cut, a bug: the Session says what each means
        ending = exc
    session = Session(conn, server, slot)
    session.record = record = Record(client, server.cfg.mode)
    record.orig, record.target, record.started = orig, target, started
    session.upstream, session.pumps = upstream, pumps
    session.before_record = lambda: signal.setitimer(signal.ITIMER_REAL, 0)
    try:
        if isinstance(ending, Cut):
            session.cut()
        else:
            session.run(ended_relay, ending, time.monotonic())
    except Cut:
        session.cut()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)     # a grace period ending now cuts nothing
    return session.status


def ended_relay(session, ending, now):
    """A Session stage: relay_pumps has ended; raise how (ENDING), or settle and log a clean end."""
    if ending is not None:
        raise ending
    session.idle_at = now
    session.relaying(None, now)


def relay_pumps(pumps, idle_timeout):
    """Step the two raw PUMPS as their descriptors come ready until both are done; raise Idle.

    Idle: nothing came for IDLE_TIMEOUT seconds. Session.relaying's loop,
    for raw pumps (they have no deadlines), kept small: a relay-only child
    runs nothing else while it holds a connection.
    """
    poller = select.poll()
    registered = {}
    idle_at = time.monotonic() + idle_timeout
    while True:
        waits = {}
        for pump in pumps:
            want = pump.wanted()
            if want:
                waits[want[0]] = waits.get(want[0], 0) | want[1]
        if not waits:
            return
        if waits != registered:
            for fd in registered:
                poller.unregister(fd)
            for fd, events in waits.items():
                poller.register(fd, events | select.POLLRDHUP if events & select.POLLIN else events)
            registered = waits
        ready = poller.poll(min(max(0, math.ceil((idle_at - time.monotonic()) * 1000)), POLL_MAX_MS))
        if not ready:
            if time.monotonic() >= idle_at:
                raise Idle()
            continue
        idle_at = time.monotonic() + idle_timeout
        fired = dict(ready)
        for pump in pumps:
            want = pump.wanted()
            if want and want[0] in fired:
                pump.step(hangup=fired.get(pump.src_fd, 0) & HANGUP)


def cut_short(conn, upstream):
    """Reset both sides: a transfer cut short must never look complete (a clean EOF)."""
    for sock in (conn, upstream):
        if sock is not None:
            abort(sock)


def resolve_quiet(dest):
    """Return getaddrinfo tuples for a numeric DEST address."""
    host = plain_ip(dest[0])
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return [(family, socket.SOCK_STREAM, 0, "", (host, dest[1]))]


def then(outcome, ending):
    """Return the outcome ENDING, after OUTCOME when something was already said."""
    return ending if outcome == "ok" else "%s; then %s" % (outcome, ending)


def make_pumps(conn, upstream, server, record, rewrite, initial, framer=None, items=(), header=b""):
    """Return [client->server pump, server->client pump] for this connection's mode.

    INITIAL goes to the client first, HEADER (a PROXY header) to the target first.
    """
    cfg = server.cfg
    if cfg.mode == "http":
        def on_request(method, target, host):
            if record.host is None and host is not None:
                record.host = host
            if cfg.verbose:
                server.log.message("%s request %s %s host=%s" % (
                    show_addr(record.client), escape(method), escape(target),
                    escape(host or b"-")))
        up = HttpRequestPump(conn, upstream, rewrite, record.orig, cfg.force_url, on_request,
                             framer, items, cfg.request_timeout)
        if up.framer.switch_method is not None:
            return [up, SniffingPump(upstream, conn, "server", "client", initial, up.switched)]
    else:
        up = RawPump(conn, upstream, "client", "server", header)
    down = RawPump(upstream, conn, "server", "client", initial)
    return [up, down]


# ---------------------------------------------------------------------------
# inetd mode: the client is standard input
# ---------------------------------------------------------------------------

def run_inetd(cfg):
    """Serve the connection on fd 0 and return an exit status."""
    try:
        conn = socket.socket(fileno=os.dup(0))
    except OSError:
        raise Fatal("standard input is not a socket; use -s PORT for standalone mode",
                    EX_USAGE) from None
    if conn.type != socket.SOCK_STREAM or conn.family not in (socket.AF_INET, socket.AF_INET6):
        raise Fatal("standard input is not a TCP socket", EX_USAGE)
    other = other_stream(conn)
    if other:
        raise Fatal("standard input is an %s socket, not a TCP socket" % other, EX_USAGE)
    log = open_log(cfg.logfile)
    log.use_syslog(stderr_usable=False)
    port = conn.getsockname()[1]
    if conn.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        conn = accept_one(conn, log)
        if conn is None:
            return EX_OK
    finish_within_grace(cfg.grace)
    return run_session(Session(conn, Server(cfg, log, port)))


OTHER_STREAMS = {132: "SCTP", 262: "MPTCP"}     # IPPROTO_*: stream sockets that are not TCP


def other_stream(sock):
    """Name the protocol of an inet stream socket that is not TCP; None for TCP.

    inetd's sctp services and systemd's SocketProtocol= hand over such
    sockets; tproxy relays TCP only and says so rather than serve them as TCP.
    """
    if sock.proto == socket.IPPROTO_TCP:
        return None
    return OTHER_STREAMS.get(sock.proto, "IP protocol %d" % sock.proto)


def accept_one(listener, log):
    """An inetd "wait" service passed its listening socket: accept one client; None if none came.

    inetd watches the socket again once this process exits, so one client
    per start is served in turn and none is left queued to make it respawn.
    """
    log.message("standard input is a listening socket (an inetd wait service): serving one "
                "connection per start; configure tproxy as a nowait service", error=True)
    ready, _, _ = select.select([listener], [], [], 1.0)
    if not ready:
        log.message("no client was waiting on the listening socket")
        return None
    try:
        return listener.accept()[0]
    except OSError as exc:
        log.message("accept: %s" % exc.strerror, error=True)
        return None


def open_log(logfile, user=None):
    """Return a Log writing to stderr and LOGFILE; raise Fatal if it cannot be opened."""
    return Log(logfile, user)


# ---------------------------------------------------------------------------
# Standalone mode: listen, switch user, daemonize, fork per connection
# ---------------------------------------------------------------------------

def open_listeners(cfg):
    """Bind and listen on -b ADDR (or every address); return the sockets; raise Fatal."""
    if cfg.bind:
        try:
            infos = socket.getaddrinfo(cfg.bind, cfg.port, type=socket.SOCK_STREAM,
                                       flags=socket.AI_PASSIVE)
        except (socket.gaierror, UnicodeError) as exc:
            raise Fatal("-b: cannot resolve %s: %s" % (cfg.bind, getattr(exc, "strerror", exc)),
                        EX_NOHOST) from None
        candidates = [(infos[0][0], infos[0][4])]
    else:
        candidates = [(socket.AF_INET6, ("::", cfg.port)), (socket.AF_INET, ("0.0.0.0", cfg.port))]
    last = None
    for family, sockaddr in candidates:
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError as exc:          # no IPv6 on this host: fall back to IPv4
            last = exc
            continue
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6 and not cfg.bind:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            make_transparent(sock, family)
            sock.bind(sockaddr)
            sock.listen(LISTEN_BACKLOG)
            sock.setblocking(False)
            return [sock]
        except OSError as exc:
            sock.close()
            last = exc
            if exc.errno != errno.EAFNOSUPPORT and exc.errno != errno.EADDRNOTAVAIL:
                break
    where = "%s port %d" % (cfg.bind or "*", cfg.port)
    if last.errno in (errno.EACCES, errno.EPERM):
        raise Fatal("cannot listen on %s: %s" % (where, last.strerror), EX_NOPERM)
    raise Fatal("cannot listen on %s: %s" % (where, last.strerror), EX_OSERR)


def make_transparent(sock, family):
    """Give SOCK IP_TRANSPARENT when allowed, so TPROXY can deliver to it."""
    level, option = (SOL_IPV6, IPV6_TRANSPARENT) if family == socket.AF_INET6 \
        else (SOL_IP, IP_TRANSPARENT)
    try:
        sock.setsockopt(level, option, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(SOL_IP, IP_TRANSPARENT, 1)
    except OSError:
        pass            # without privilege: REDIRECT still works, TPROXY cannot


def pidfile_name(path, given):
    """Name the pid file in a message: as the -P option given, or as the default."""
    return ("-P %s" if given else "the default pid file %s") % path


class PidFile:
    """The -P file: created and locked before the user switch, removed at exit."""

    def __init__(self, path, user, given=True):
        import fcntl
        self.path = os.path.abspath(path)      # removed at exit, after the daemon's chdir("/")
        self.fd = open_own_file(path, pidfile_name(path, given), os.O_RDWR, user, 0o644,
                                pid_file=True)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            other = os.pread(self.fd, 32, 0).decode("ascii", "replace").strip()
            os.close(self.fd)
            raise Fatal("%s: another tproxy (pid %s) holds it" % (name, other or "?"),
                        EX_CANTCREAT) from None
        # Never given to USER: the daemon empties it through this descriptor at exit.

    def write(self):
        """Record this process's pid."""
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, ("%d\n" % os.getpid()).encode(), 0)

    def remove(self):
        """Remove the file (where the directory forbids it, empty it) and release its lock; once."""
        if self.fd is None:
            return
        try:
            os.unlink(self.path)
        except OSError:
            os.ftruncate(self.fd, 0)
        os.close(self.fd)       # a new server may take the file while old connections finish
        self.fd = None

    # python-daemon's pidfile protocol
    def __enter__(self):
        self.write()
        return self

    def __exit__(self, *exc):
        return False


def run_standalone(cfg):
    """Listen, switch user, go to the background, and serve until SIGTERM."""
    log = open_log(cfg.logfile, cfg.user)
    listeners = inherited_listeners(cfg.udp) if cfg.activated else None
    if listeners:
        cfg.port = listeners[0].getsockname()[1]
    if any(is_self(a[4], cfg.port) for a in cfg.target_addrs):
        raise Fatal("target %s:%d is this proxy itself" % cfg.target, EX_USAGE)
    if cfg.udp and not listeners:
        listeners = open_udp_listeners(cfg, cfg.workers or 1)
    listeners = listeners or open_listeners(cfg)
    pidfile = PidFile(cfg.pidfile, cfg.user, cfg.pidfile_given) if cfg.pidfile else None
    if cfg.source in ("client", "client-port"):
        warn_missing_return_path(log)
    if cfg.source_ports:
        report_source_ports(cfg.source_ports, cfg.max_conns, log)
    preload(cfg)
    # The terminal that started a daemon sees the notice before the log moves to syslog.
    told_terminal = bool(cfg.prefork) and not cfg.log_to_stderr and os.isatty(2)
    if told_terminal:
        log.message(prefork_notice(cfg))
    if cfg.user:
        drop_privileges(cfg.user, keep_net_raw=cfg.udp or cfg.source is not None and
                        cfg.source.startswith("client"), bind_low_ports=cfg.udp)
    if not cfg.foreground:
        import daemon
        keep = [s.fileno() for s in listeners]
        keep += [fd for fd in (log.log_fd, pidfile and pidfile.fd) if fd is not None]
        # Without syslog, stderr is the only place left to log to: kept if it can be.
        no_syslog = syslog_unreachable()
        keep_stderr = bool(no_syslog) and stderr_outlives_start()
        if no_syslog and not keep_stderr:
            log.message("no syslog (%s); in the background, messages go to the -l file only"
                        % no_syslog)
        context = daemon.DaemonContext(files_preserve=keep, working_directory="/",
                                       umask=0o022, pidfile=pidfile, signal_map={},
                                       stderr=sys.stderr if keep_stderr else None)
        context.open()
        global errors_to_syslog
        # only now: DaemonContext closed every other descriptor
        errors_to_syslog = log.use_syslog(stderr_usable=keep_stderr)
    else:
        if pidfile:
            pidfile.write()
        if not cfg.log_to_stderr:
            log.use_syslog()
    server = Server(cfg, log, cfg.port)
    if pidfile:
        server.parent_fds.append(pidfile.fd)    # children must not hold its lock
    log.message("listening on %s, %s mode, target %s%s" % (
        ", ".join(show_addr(s.getsockname()) for s in listeners), cfg.mode,
        show_addr(cfg.target) if cfg.target else "original destination",
        " (socket from systemd)" if cfg.activated else ""))
    if cfg.prefork and not (told_terminal and log.to_stderr):
        log.message(prefork_notice(cfg))
    notify_ready()
    shape = WorkerPool if cfg.workers else ForkingServer
    if cfg.udp:
        shape = UdpPool
    supervisor = shape(listeners, server)
    if pidfile:
        supervisor.on_stop = pidfile.remove
    try:
        return supervisor.run()
    finally:
        if pidfile:
            pidfile.remove()


def prefork_notice(cfg):
    """Return the start-up message saying what --prefork runs since the prefork pool was retired."""
    return ("--prefork %s: the prefork pool is retired; running %d event-driven worker(s), as "
            "--workers=%d --max-conns=%d (see tproxy(8))"
            % (cfg.prefork, cfg.workers, cfg.workers, cfg.max_conns))


def socket_activated():
    """Return True when systemd passed this process listening sockets (LISTEN_PID/LISTEN_FDS)."""
    return os.environ.get("LISTEN_PID") == str(os.getpid()) and listen_fds() > 0


def listen_fds():
    """Return LISTEN_FDS as a count (0 when not digits); a count past any fd table is sys.maxsize."""
    text = os.environ.get("LISTEN_FDS", "0")
    if not is_digits(text):
        return 0
    count = bounded_number(text, sys.maxsize)
    return sys.maxsize if count is None else count


def inherited_listeners(udp=False):
    """Return the listening sockets systemd passed from fd 3 on; raise Fatal if unusable.

    They are TCP listeners, or with UDP bound UDP sockets (ListenDatagram=),
    told apart by SO_TYPE: a socket of the other kind is an error, not a
    silent switch of protocol.
    """
    count = listen_fds()
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)      # children must not think the sockets are theirs
    socks = []
    for fd in range(3, 3 + count):
        try:
            sock = socket.socket(fileno=fd)
        except OSError as exc:
            raise Fatal("socket activation: fd %d: %s" % (fd, exc.strerror), EX_USAGE) from None
        inet = sock.family in (socket.AF_INET, socket.AF_INET6)
        datagram = sock.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE) == socket.SOCK_DGRAM
        if udp:
            if not (inet and datagram) or \
                    sock.getsockopt(socket.SOL_SOCKET, socket.SO_PROTOCOL) != socket.IPPROTO_UDP:
                raise Fatal("socket activation: fd %d is not a UDP socket (--udp needs a "
                            "socket unit with ListenDatagram=PORT)" % fd, EX_USAGE)
            if sock.getsockname()[1] == 0:
                raise Fatal("socket activation: fd %d is a UDP socket bound to no port" % fd,
                            EX_USAGE)
            peer = peer_of(sock)
            if peer is not None:        # it would hear one client only
                raise Fatal("socket activation: fd %d is a UDP socket connected to %s" % (fd, peer),
                            EX_USAGE)
        elif inet and datagram:
            raise Fatal("socket activation: fd %d is a UDP socket (serve it with --udp; "
                        "for TCP, tproxy.socket needs ListenStream=PORT and Accept=no)" % fd,
                        EX_USAGE)
        elif not inet or sock.type != socket.SOCK_STREAM or \
                not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            raise Fatal("socket activation: fd %d is not a listening TCP socket "
                        "(tproxy.socket needs ListenStream=PORT and Accept=no)" % fd, EX_USAGE)
        elif other_stream(sock):        # SocketProtocol=sctp or mptcp
            raise Fatal("socket activation: fd %d is an %s listener, not a TCP one "
                        "(tproxy.socket needs no SocketProtocol=)" % (fd, other_stream(sock)),
                        EX_USAGE)
        os.set_inheritable(fd, False)
        if udp:
            prepare_udp_listener(sock, sock.family, dual_stack=False)   # bound: V6ONLY is fixed
            share_udp_port(sock)
        else:
            sock.setblocking(False)
            make_transparent(sock, sock.family)
        socks.append(sock)
    return socks


def peer_of(sock):
    """Return the address SOCK is connected to, as text, or None when it is not connected."""
    try:
        return show_addr(sock.getpeername())
    except OSError:
        return None


def notify_ready():
    """Tell systemd (NOTIFY_SOCKET) that tproxy is ready; do nothing without it."""
    path = os.environ.pop("NOTIFY_SOCKET", None)
    if not path:
        return
    if path.startswith("@"):
        path = "\0" + path[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(path)
            sock.sendall(b"READY=1\nMAINPID=%d" % os.getpid())
    except OSError:
        pass


def preload(cfg):
    """Import now what connections will need, while every file is still readable.

    After the switch to USER the interpreter's library may be out of reach,
    and modules imported in the parent are shared with every child.
    """
    import gc, ipaddress, fcntl, base64, syslog  # noqa: F401
    if not cfg.foreground:
        import daemon  # noqa: F401
    "".encode("idna")   # getaddrinfo's codec, otherwise loaded by each child
    if cfg.mode == "http":
        Grammar.get()   # compiled once, shared by every child
    _libc()             # ctypes and the C library: every child calls prctl


def warn_missing_return_path(log):
    """Log the commands to add when replies to spoofed sources cannot come back."""
    import subprocess
    missing = []
    for family, flag in (("IPv4", "-4"), ("IPv6", "-6")):
        try:
            rules = subprocess.run(["ip", flag, "rule", "show"], capture_output=True,
                                   text=True, timeout=5).stdout
        except (OSError, subprocess.SubprocessError):
            return
        if "fwmark" not in rules:
            missing.append(family)
    for family in missing:
        six = family == "IPv6"
        log.message(
            "--source: no fwmark policy rule for %s; replies to the client's address will "
            "not reach this host. Add: `ip%s rule add fwmark 1 lookup 100; ip%s route add "
            "local %s dev lo table 100` and mark transparent sockets: `%s -t mangle -A "
            "PREROUTING -p tcp -m socket --transparent -j MARK --set-mark 1` or `nft add "
            "rule inet filter prerouting socket transparent 1 meta mark set 1` "
            "(see tproxy(8), RETURN PATH)" % (
                family, " -6" if six else "", " -6" if six else "",
                "::/0" if six else "0.0.0.0/0", "ip6tables" if six else "iptables"),
            error=True)


def report_source_ports(ports, max_conns, log):
    """Log how --source-ports will be honoured, and whether it is small for --max-conns."""
    low, high = ports
    size = high - low + 1
    kernel = ephemeral_ports()
    if not ports_within(ports, kernel):
        log.message("--source-ports %d-%d: outside net.ipv4.ip_local_port_range %s, so "
                    "IP_LOCAL_PORT_RANGE would be ignored; binding ports from the range" % (
                        low, high, "%d-%d" % kernel if kernel else "(unreadable)"))
    if size < max_conns:
        log.message("--source-ports %d-%d holds %d ports, fewer than --max-conns %d: "
                    "beyond %d connections at once from one source address (to one target, "
                    "with IP_LOCAL_PORT_RANGE) will fail" % (low, high, size, max_conns, size), error=True)


def raise_descriptor_limit(max_conns, log):
    """Raise the soft RLIMIT_NOFILE to what MAX_CONNS connections being connected need here.

    Fork mode's parent holds two descriptors per such connection (client,
    upstream), where each child once held its own: at the usual soft limit
    of 1024 a few hundred connections to targets slow to answer would fail
    with EMFILE. Up to the hard limit; beyond it, say so once.
    """
    import resource     # here: only this process needs it, not every child's pages
    need = 2 * max_conns + 64       # and the listeners, the log, the forker's socket...
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= need:
        return
    want = need if hard == resource.RLIM_INFINITY else min(need, hard)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    except (ValueError, OSError):
        want = soft
    if want < need:
        log.message("--max-conns %d: up to %d descriptors needed (two per connection being "
                    "connected), RLIMIT_NOFILE allows %d: beyond, connections fail (EMFILE)"
                    % (max_conns, need, want), error=True)


# ---------------------------------------------------------------------------
# Status (SIGUSR1) and process titles
# ---------------------------------------------------------------------------

OUTCOME_KINDS = ("served", "refused", "failed")
REPORT = struct.Struct("=BQQ")  # one ended connection: outcome kind, bytes up, bytes down
PR_SET_NAME = 15


def outcome_kind(record):
    """Return the status counter RECORD's outcome adds to: served (ok), refused (-a), failed."""
    if record.outcome == "ok":
        return "served"
    if record.outcome == "denied by access list":
        return "refused"
    return "failed"


class Stats:
    """Connections and bytes since start, per outcome kind, for the SIGUSR1 status line."""

    def __init__(self):
        self.started = time.monotonic()
        self.totals = {kind: [0, 0, 0] for kind in OUTCOME_KINDS}     # connections, up, down

    def add(self, kind, up, down):
        total = self.totals[kind]
        total[0] += 1
        total[1] += up
        total[2] += down

    def add_record(self, record):
        self.add(outcome_kind(record), record.up, record.down)

    def line(self, who, active):
        """Return "status: WHO active=N served=N refused=N failed=N up=B down=B ..." (one line)."""
        parts = ["status: %s active=%d" % (who, active)]
        parts += ["%s=%d" % (kind, self.totals[kind][0]) for kind in OUTCOME_KINDS]
        parts.append("up=%d down=%d" % (sum(t[1] for t in self.totals.values()),
                                        sum(t[2] for t in self.totals.values())))
        parts += ["%s_up=%d %s_down=%d" % (kind, self.totals[kind][1], kind, self.totals[kind][2])
                  for kind in OUTCOME_KINDS]
        parts.append("uptime=%d" % (time.monotonic() - self.started))
        return " ".join(parts)


class Reports:
    """Fork mode: each child writes its connection's outcome to a pipe; the parent adds them up.

    A report (17 bytes) is below PIPE_BUF, so children's writes never interleave.
    """

    def __init__(self):
        self.read_fd, self.write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def send(self, record):
        """In a child: report RECORD; a full pipe loses the report rather than block."""
        try:
            os.write(self.write_fd, REPORT.pack(OUTCOME_KINDS.index(outcome_kind(record)),
                                                record.up, record.down))
        except OSError:
            pass

    def collect(self, stats):
        """In the parent: add every waiting report to STATS."""
        while True:
            try:
                data = os.read(self.read_fd, REPORT.size * 1024)   # whole reports only
            except (BlockingIOError, InterruptedError):
                return
            if not data:
                return
            for kind, up, down in REPORT.iter_unpack(data):
                stats.add(OUTCOME_KINDS[kind], up, down)


def title_setter():
    """Return set_title(SHORT, LONG): LONG as the ps title and SHORT (15 bytes) as the comm name.

    setproctitle (optional) rewrites what ps shows for the command line; without
    it only the comm name (ps -e, top) changes, through PR_SET_NAME.
    """
    titles = setproctitle_module()
    if titles is None:
        libc = _libc()
        return lambda short, long: libc.prctl(PR_SET_NAME, short.encode()[:15], 0, 0, 0)

    def set_title(short, long):
        titles.setproctitle(long)
        titles.setthreadtitle(short)       # the main thread's name is the process's comm
    return set_title


def setproctitle_module():
    """Return setproctitle's C module, or None when it is not installed (or cannot load).

    Not through the package: its __init__ imports logging, and logging
    imports threading, whose fork hooks then run in the parent and in
    every child (os.register_at_fork): about 300 KiB more private memory
    and more CPU per fork-mode connection. setproctitle < 1.2 is the C
    module itself.
    """
    import importlib.machinery
    finder = importlib.machinery.PathFinder
    try:
        spec = finder.find_spec("setproctitle")
        if spec is not None and spec.submodule_search_locations is None:
            import setproctitle
            return setproctitle
        if spec is not None:
            spec = finder.find_spec("setproctitle._setproctitle", spec.submodule_search_locations)
        if spec is None or spec.loader is None:
            return None
        module = spec.loader.create_module(spec)
        spec.loader.exec_module(module)
        return module
    except (ImportError, OSError):
        return None


def connection_title(conn):
    """Return "CLIENT -> ORIGINAL DESTINATION" for an accepted CONN (what its client reached for)."""
    try:
        client = show_addr(conn.getpeername())
    except OSError:
        return "?"
    try:
        return "%s -> %s" % (client, show_addr(original_destination(conn)))
    except (OSError, ValueError, struct.error):
        return client


class Supervisor:
    """What both server shapes share: signals through a wakeup pipe, SIGHUP reload, forking."""

    cut_pending_at = None   # fork mode, raw relay: when SIGTERM's grace ends, for every connection
    joined_late = frozenset()   # ... and the children that got SIGTERM after it came (connected since)

    def __init__(self, listeners, server):
        self.listeners = listeners
        self.server = server
        self.log = server.log
        self.stopping = False
        self.reload = False
        self.status = False             # SIGUSR1: log a status line
        self.set_title = title_setter()
        self.on_stop = lambda: None     # called once accepting has stopped (the pid file goes)
        self.cut_now = False            # a second SIGTERM came: the grace period ends now

    def install_signals(self):
        """Route SIGTERM, SIGINT, SIGHUP, SIGCHLD and SIGUSR1 into flags and a wakeup pipe."""
        self.wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.wake_w = wake_w
        signal.set_wakeup_fd(wake_w)
        signal.signal(signal.SIGTERM, self._on_term)
        signal.signal(signal.SIGINT, self._on_term)
        signal.signal(signal.SIGHUP, self._on_hup)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.signal(signal.SIGUSR1, self._on_usr1)

    def _on_usr1(self, *_):
        self.status = True

    def listening_on(self):
        """Return the listening addresses, for titles."""
        return ", ".join(show_addr(s.getsockname()) for s in self.listeners)

    def _on_term(self, *_):
        if self.stopping:
            self.cut_now = True
        self.stopping = True

    def stop_accepting(self):
        """Close the listeners at once (a restart may bind the port) and drop the pid file."""
        for sock in self.listeners:
            sock.close()
        self.on_stop()

    def wind_down(self, pids):
        """Tell PIDS to finish within --grace, wait for them, kill stragglers; return EX_OK.

        Each child runs the grace period itself (see finish_within_grace) and
        resets what is still open when it ends; the parent waits a little
        longer, so that an init system sees the service stop when the last
        connection has, and SIGKILLs only a child that failed to.
        """
        pids = set(pids)
        grace = self.server.cfg.grace
        for pid in pids:
            signal_quietly(pid, signal.SIGTERM)
        told_cut = told_late = False
        deadline = time.monotonic() + grace + 5.0
        while pids and time.monotonic() < deadline:
            if self.cut_now and not told_cut:
                for pid in pids:
                    signal_quietly(pid, signal.SIGALRM)     # their grace ends now
                told_cut = told_late = True
            if self.joined_late and not told_late and time.monotonic() >= self.cut_pending_at:
                for pid in pids & self.joined_late:     # their own timers run past the grace
                    signal_quietly(pid, signal.SIGALRM)
                told_late = True
            try:
                select.select([self.wake_r], [], [], 0.2)
            except InterruptedError:
                pass
            drain(self.wake_r)
            pids.difference_update(self.reap())
        for pid in pids:
            self.log.message("shutdown: child %d outlived the grace period; killed" % pid,
                             error=True)
            signal_quietly(pid, signal.SIGKILL)
        while pids:
            try:
                pids.discard(os.waitpid(-1, 0)[0])
            except ChildProcessError:
                break
        return EX_OK

    def _on_hup(self, *_):
        self.reload = True

    def reopen(self):
        """SIGHUP: reopen the -l file and re-resolve the target."""
        self.reload = False
        try:
            self.log.reopen()
        except Fatal as exc:
            self.log.message("SIGHUP: %s; the old file stays in use" % exc, error=True)
        self.re_resolve()

    def re_resolve(self, quiet=False):
        """SIGHUP: resolve the target again; keep the old addresses if that fails (logged unless QUIET)."""
        cfg = self.server.cfg
        if cfg.target:
            try:
                cfg.target_addrs = resolve(*cfg.target)
            except Fatal as exc:
                if not quiet:
                    self.log.message("SIGHUP: %s; keeping the old addresses" % exc, error=True)

    def freeze_heap(self):
        """Move the parent's objects out of the GC's reach so children keep pages shared."""
        import gc
        gc.collect()
        if hasattr(gc, "freeze"):
            gc.freeze()

    def fork(self, work):
        """Fork a child that runs WORK() and always ends in os._exit; return its pid or None."""
        parent = os.getpid()
        try:
            pid = os.fork()
        except OSError as exc:
            self.log.message("fork: %s" % exc.strerror, error=True)
            return None
        if pid:
            return pid
        status = EX_SOFTWARE
        try:
            import gc
            gc.disable()
            signal.set_wakeup_fd(-1)
            set_handler(signal.SIGCHLD, _signal.SIG_DFL)
            # Ctrl-C reaches the whole process group: the server turns it into SIGTERM for each.
            set_handler(signal.SIGINT, _signal.SIG_IGN)
            for fd in [self.wake_r, self.wake_w] + self.server.parent_fds:
                os.close(fd)
            self.parent_pid = parent
            finish_within_grace(self.server.cfg.grace)
            die_with(parent)
            status = work()
        except BaseException as exc:        # never let a child return into the parent's loop
            try:
                self.log.message("internal error: %r" % (exc,), error=True)
            except BaseException:
                pass
        finally:
            os._exit(status)

    def reap(self):
        """Collect every exited child without blocking; return their pids."""
        gone = []
        while True:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return gone
            if pid == 0:
                return gone
            gone.append(pid)


class ForkingServer(Supervisor):
    """The accept loop: one child per connection (the default), at most --max-conns at once.

    The children are forked by a Forker, a process of their own started
    before the first accept: the pages this loop writes would otherwise be
    copied into every child held at the time (see Forker). Where Python
    cannot make a child of this process from another one (sibling_fork is
    None), this loop forks them itself.
    """

    FORKER_RETRY = 0.5      # seconds between attempts to start a forker (the fork failed)
    FORKER_STOP = 10.0      # seconds at shutdown for the forker's children to tell their pids

    def __init__(self, listeners, server):
        super().__init__(listeners, server)
        self.children = set()
        self.paused_until = 0.0
        self.stats = Stats()
        self.reports = Reports()
        server.on_record = self.reports.send        # called in the children
        server.parent_fds.append(self.reports.read_fd)
        self.client_of = {}     # child pid -> client address key (for --max-per-client)
        self.per_client = {}    # client address key -> its children (for --max-per-client)
        self.held = None        # (conn, key) accepted when fork failed: it waits for the next try
        cap = server.cfg.max_conns
        own_upstreams.create(cap)
        self.free_slots = list(range(cap - 1, -1, -1))     # own_upstreams slots not in use
        self.slot_of = {}                                    # child pid -> its slot
        self.sibling_fork = sibling_fork()
        self.forker = None          # the Forker's pid, once started
        self.forker_sock = None     # our end of its socket pair, until its end of file
        self.forker_was = None      # the forker's pid once reaped, until its socket's end of file
        self.handed = {}            # slot -> client key: handed to the forker, its pid not yet told
        self.forker_ready = False   # it has proved that it can clone: hand it connections
        self.probes = set()         # the forker's probe children (they exit at once): not counted
        self.ended_untold = set()   # children reaped before they told us their pid
        self.poller = None
        # Raw relay with a forker: each connection is checked and connected here, and a
        # child is cloned only to relay it (relay_elsewhere): its pages are then few.
        self.splits = server.cfg.mode == "raw"
        if self.splits:
            raise_descriptor_limit(cap, server.log)
        self.pending = {}           # Session being checked and connected here -> client key
        self.dialing = {}           # descriptor -> the pending Session waiting on it
        self.held_relays = []       # (session, state, key) connected, waiting for the forker to take them
        self.handed_relays = {}     # slot -> session handed, kept until its child tells its pid
        self.cut_pending_at = None  # SIGTERM: when the pending sessions' grace ends
        self.joined_late = set()    # children counted after SIGTERM: cut when cut_pending_at comes

    def run(self):
        """Accept until SIGTERM; return the exit status."""
        self.install_signals()
        self.set_parent_title()
        self.freeze_heap()
        poller = self.poller = select.poll()
        poller.register(self.wake_r, select.POLLIN)
        poller.register(self.reports.read_fd, select.POLLIN)
        listening = False
        by_fd = {s.fileno(): s for s in self.listeners}
        while not self.stopping or self.pending or self.held_relays:
            if self.sibling_fork and self.forker is None and self.forker_sock is None \
                    and time.monotonic() >= self.paused_until:
                self.start_forker()
            if self.held is not None and time.monotonic() >= self.paused_until:
                self.start_child(*self.held)
            if self.held_relays and time.monotonic() >= self.paused_until:
                self.hand_held_relays()
            # At the cap, new clients wait in the kernel's listen queue.
            want = len(self.children) + len(self.handed) + len(self.pending) \
                < self.server.cfg.max_conns and not self.stopping \
                and self.held is None and not self.held_relays \
                and time.monotonic() >= self.paused_until \
                and (self.forker_ready or not self.sibling_fork)
            if want != listening:
                for fd in by_fd:
                    if want:
                        poller.register(fd, select.POLLIN)
                    else:
                        poller.unregister(fd)
                listening = want
            if self.stopping:
                self.wind_down_pending()
            reported = told = False
            fired = {}
            for fd, events in poller.poll(self.poll_timeout(listening)):
                if fd == self.wake_r:
                    drain(self.wake_r)
                elif fd == self.reports.read_fd:
                    reported = True
                elif self.forker_sock is not None and fd == self.forker_sock.fileno():
                    told = True
                elif fd in self.dialing:
                    fired.setdefault(self.dialing[fd], {})[fd] = events
                elif listening and not self.stopping:
                    self.accept(by_fd[fd])
            self.step_pending(fired)
            if told:        # before reaping: a child may have ended already
                self.read_started()
            for pid in self.reap():
                self.child_ended(pid)
            if reported:    # only then: an empty pipe's read raises, once per connection
                self.reports.collect(self.stats)
            if self.status:
                self.status = False
                self.log.message(self.stats.line("parent", len(self.children) + len(self.handed)
                                                 + len(self.pending) + len(self.held_relays)))
            if self.reload:
                self.reopen()
                self.log.message("SIGHUP: log reopened, target re-resolved")
        if self.cut_pending_at is None:     # else said when SIGTERM came (wind_down_pending)
            self.stop_accepting()
            self.log.message("SIGTERM: stopped accepting; %d connection(s) get %gs to finish"
                             % (len(self.children) + len(self.handed), self.server.cfg.grace))
        self.stop_forker()
        if self.held is not None:
            abort(self.held[0])
        self.drop_held_relays()
        return self.wind_down(self.children)

    def set_parent_title(self):
        self.set_title("tproxy parent", "tproxy: parent, fork per connection, %s"
                       % self.listening_on())

    def re_resolve(self, quiet=False):
        """SIGHUP: resolve the target again here, and tell the forker, which forks the children.

        Here too: a forker started later is forked from this process, with
        the addresses it holds. (In the forker itself forker_sock is None.)
        """
        super().re_resolve(quiet)
        if self.forker_sock is None:
            return
        try:
            self.forker_sock.send(FORKER_SLOT.pack(RELOAD_SLOT))
        except OSError:
            pass        # gone: the next one starts with the log and target as they are

    def accept(self, listener):
        try:
            conn, peer = listener.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                # Waiting lets children finish and free descriptors; no busy loop.
                self.log.message("accept: %s; pausing 0.5 s" % exc.strerror, error=True)
                self.paused_until = time.monotonic() + 0.5
            elif exc.errno not in (errno.EPROTO, errno.EPERM, errno.ECONNRESET):
                self.log.message("accept: %s" % exc.strerror, error=True)
            return
        key = None
        cap = self.server.cfg.max_per_client
        if cap < self.server.cfg.max_conns:
            key = client_key(peer)
            held = self.per_client.get(key, 0)
            if held >= cap:
                refuse_over_cap(conn, peer, held, self.server)
                return
        self.server.rotation += 1
        self.start_child(conn, key, peer)

    def start_child(self, conn, key, peer=None):
        """Fork a child for CONN (from address KEY, or None); if fork fails, hold it, retry in 0.5 s.

        With a forker, CONN is handed to it, which forks; the child is
        counted from now on, and known by its pid once it tells it. In raw
        relay mode, CONN is first checked and connected here (check_and_connect).
        """
        slot = self.free_slots.pop()
        if self.sibling_fork and self.splits:
            return self.check_and_connect(conn, key, slot, peer)
        if self.sibling_fork:
            started = self.hand_over(conn, slot)
            if started:
                self.handed[slot] = key
        else:
            pid = self.fork(lambda: self.child(conn, slot))
            started = pid is not None
            if started:
                self.count_in(pid, slot, key)
        if not started:
            self.free_slots.append(slot)
            self.held = conn, key
            self.paused_until = time.monotonic() + 0.5
            return
        self.held = None
        conn.close()
        if key is not None:
            self.per_client[key] = self.per_client.get(key, 0) + 1

    def count_in(self, pid, slot, key):
        """Child PID serves the connection of SLOT, from client address KEY (None: not counted)."""
        self.children.add(pid)
        self.slot_of[pid] = slot
        if key is not None:
            self.client_of[pid] = key
        if self.cut_pending_at is not None:     # connected during shutdown: its grace, what is left of it
            signal_quietly(pid, signal.SIGTERM)
            self.joined_late.add(pid)

    def child_ended(self, pid):
        """Reaped PID: the forker, a child (its slot and counts are free again), or one not yet told."""
        if pid == self.forker:
            return self.forker_ended()
        if pid in self.probes:
            self.probes.discard(pid)
            return
        if pid not in self.slot_of and self.forker_sock is not None:
            self.ended_untold.add(pid)      # its word (pid, slot) is on its way
            return
        self.children.discard(pid)
        self.count_out(self.client_of.pop(pid, None))
        slot = self.slot_of.pop(pid, None)
        if slot is not None:
            own_upstreams.release(slot)
            self.free_slots.append(slot)

    def count_out(self, key):
        """A child of client address KEY (None: not counted) has ended."""
        if key is not None:
            left = self.per_client.pop(key) - 1
            if left:
                self.per_client[key] = left

    def child(self, conn, slot):
        for sock in self.listeners:
            sock.close()
        return self.serve(conn, slot)

    def serve(self, conn, slot):
        """In a child: serve CONN, with loop guard SLOT; return the exit status."""
        own_upstreams.take(slot)
        self.set_title("tproxy child", "tproxy: " + connection_title(conn))
        return run_session(Session(conn, self.server))

    # -- raw relay: checked and connected here, relayed by a child -----------

    def check_and_connect(self, conn, key, slot, peer):
        """Run CONN's Session here, in SLOT, up to its relay stage, which a child of its own gets.

        A child that only relays writes far fewer pages than one that also
        checks and connects (bench/results/2026-11-29-fork-cost-3.md); the
        pages this process writes are not shared with any child.
        """
        session = Session(conn, self.server, slot, peer)
        session.hand_off = self.relay_elsewhere
        self.pending[session] = key
        if key is not None:
            self.per_client[key] = self.per_client.get(key, 0) + 1
        session.start(time.monotonic())
        self.track(session, {})

    def poll_timeout(self, listening):
        """Return poll's timeout (ms, None: none): the earliest pending deadline, the next retry."""
        timeout = None if listening or not self.paused_until else 100
        dues = [session.due for session in self.pending if session.due is not None]
        if self.cut_pending_at is not None:
            dues.append(self.cut_pending_at)
        if dues:
            left = min(max(0, math.ceil((min(dues) - time.monotonic()) * 1000)), POLL_MAX_MS)
            timeout = left if timeout is None else min(timeout, left)
        return timeout

    def step_pending(self, fired):
        """Advance each pending Session whose descriptor FIRED ({session: {fd: events}}) or deadline passed."""
        if not self.pending:
            return
        now = time.monotonic()
        for session in list(self.pending):
            events = fired.get(session)
            if events or (session.due is not None and now >= session.due):
                waits = session.waits
                session.advance(events or {}, now)
                self.track(session, waits)

    def track(self, session, old):
        """After SESSION stepped: poll its new descriptors instead of OLD; settle it if it ended here."""
        for fd in old:
            self.poller.unregister(fd)
            del self.dialing[fd]
        if not session.done:
            for fd, events in session.waits.items():
                self.poller.register(fd, events)
                self.dialing[fd] = session
            return
        if session not in self.pending:
            return      # handed to a child (relay_elsewhere), or held until the forker takes it
        # Ended here (denied, refused, not connected): the Session has logged and counted it.
        self.count_out(self.pending.pop(session))
        self.free_slots.append(session.slot)

    def relay_elsewhere(self, session, initial, header):
        """SESSION's hand_off: it is connected; a child relays it (INITIAL to the client, HEADER to the target first)."""
        session.done, session.waits, session.due = True, {}, None
        self.held_relays.append((session, relay_state(session, initial, header),
                                 self.pending.pop(session)))
        self.hand_held_relays()

    def hand_held_relays(self):
        """Give the connected sessions to the forker in turn while it takes them; else retry in 0.5 s."""
        while self.held_relays:
            if not self.hand_relay(*self.held_relays[0]):
                self.paused_until = time.monotonic() + 0.5
                return
            self.held_relays.pop(0)

    def hand_relay(self, session, state, key):
        """Give SESSION's two descriptors and STATE to the forker (or fork its child here); False if not now."""
        slot = session.slot
        if self.sibling_fork:
            if not self.hand_over(session.conn, slot, session.upstream, state):
                return False
            self.handed[slot] = key
            # Kept open until its child tells its pid: a forker dying first resets it (forker_gone).
            self.handed_relays[slot] = session
            return True
        else:       # clone refused since this connection began: fork mode's fallback
            pid = self.fork(lambda: self.relay_child(session, state))
            if pid is None:
                return False
            self.count_in(pid, slot, key)
        session.conn.close()
        session.upstream.close()
        return True

    def drop_held_relays(self):
        """Once SIGTERM's grace is over: cut the connections the forker never took, with their records."""
        for session, _, key in self.held_relays:
            self.end_unrelayed(session, "cut at shutdown after the %gs grace period"
                               % self.server.cfg.grace)
            self.free_slots.append(session.slot)
            self.count_out(key)
        self.held_relays = []

    def end_unrelayed(self, session, outcome):
        """End SESSION (connected), taken by no child: reset both sides, log OUTCOME."""
        session.record.outcome, session.status = outcome, EX_UNAVAILABLE
        cut_short(session.conn, session.upstream)
        session.done = False        # handed to no child after all: it ends here
        session.finish()            # frees its loop guard slot, logs its record

    def close_connections(self, keep=None):
        """In a process forked from this one: close the sockets of the connections this one holds, but KEEP's.

        Else a copy would keep each open (no end of file, no reset) for as
        long as the new process lives.
        """
        for session in self.pending:
            for sock in (session.conn, session.dialer and session.dialer.sock):
                if sock is not None:
                    sock.close()
        for session in [held[0] for held in self.held_relays] + list(self.handed_relays.values()):
            if session is not keep:
                session.conn.close()
                session.upstream.close()

    def wind_down_pending(self):
        """SIGTERM: stop accepting; the connections being connected get --grace to reach their child, then are cut.

        The children relaying already get SIGTERM now, so their grace starts with it.
        """
        now = time.monotonic()
        if self.cut_pending_at is None:
            self.stop_accepting()
            self.cut_pending_at = now + self.server.cfg.grace
            for pid in self.children:
                signal_quietly(pid, signal.SIGTERM)
            live = len(self.children) + len(self.handed) + len(self.pending) + len(self.held_relays)
            self.log.message("SIGTERM: stopped accepting; %d connection(s) get %gs to finish"
                             % (live, self.server.cfg.grace))
        if self.cut_now or now >= self.cut_pending_at:
            for session in list(self.pending):
                waits = session.waits
                session.cut()
                self.track(session, waits)
            self.drop_held_relays()     # connected, but the forker has not taken them in time

    def relay_child(self, session, state):
        """In a child forked here (no forker): relay SESSION, checked and connected already."""
        for sock in self.listeners:
            sock.close()
        self.close_connections(keep=session)
        own_upstreams.slot = session.slot
        fields = marshal.loads(state)
        self.set_title("tproxy child", fields[-1])
        return relay_only(self.server, session.conn, session.upstream, fields, session.slot)

    def serve_relay(self, fds, slot, state, server=None):
        """In a child: relay the connection of descriptors FDS (client, upstream) whose Session ran in the parent.

        SERVER: this process's (the forker's rehearsal has its own).
        """
        own_upstreams.slot = slot       # the parent has written this connection's upstream there
        fields = marshal.loads(state)
        self.set_title("tproxy child", fields[-1])
        # Non-blocking already (the parent's check and dialer made them so): no call needed here.
        conn, upstream = _socket.socket(fileno=fds[0]), _socket.socket(fileno=fds[1])
        return relay_only(server or self.server, conn, upstream, fields, slot)

    # -- the forker, seen from here ------------------------------------------

    def start_forker(self):
        """Fork the Forker, with a socket pair to it; on failure, try again in FORKER_RETRY."""
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.server.parent_fds.append(mine.fileno())        # the forker closes our end
        # Named before it is born: the children it forks inherit the name until they take theirs.
        self.forker_title = ("tproxy forker", "tproxy: forker, fork per connection, %s"
                             % self.listening_on())
        self.set_title(*self.forker_title)
        pid = self.fork(lambda: Forker(self, theirs).run())
        self.set_parent_title()
        self.server.parent_fds.remove(mine.fileno())
        theirs.close()
        if pid is None:
            mine.close()
            self.paused_until = time.monotonic() + self.FORKER_RETRY
            return
        mine.setblocking(False)
        self.forker, self.forker_sock, self.forker_ready = pid, mine, False
        self.poller.register(mine.fileno(), select.POLLIN)

    def hand_over(self, conn, slot, upstream=None, state=b""):
        """Send CONN and its SLOT to the forker; return False if it cannot take it now.

        With UPSTREAM (connected) and STATE (relay_state), its child only relays.
        """
        if self.forker_sock is None:
            return False
        fds = FORKER_SLOT.pack(conn.fileno()) if upstream is None \
            else FORKER_FDS.pack(conn.fileno(), upstream.fileno())
        try:
            self.forker_sock.sendmsg([FORKER_SLOT.pack(slot) + state], [(
                socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
        except OSError:         # its queue is full (it cannot fork), or it has just died
            return False
        return True

    def read_started(self):
        """Take each new child's word (pid and slot), and the forker's probe, until none is waiting.

        Each child the forker clones tells its pid on its copy of the
        forker's socket, so a forker that dies after a clone loses no word;
        end of file (the forker and every child have closed their copies)
        means every child has told.
        """
        while True:
            try:
                data = self.forker_sock.recv(FORKER_STARTED.size)
            except (BlockingIOError, InterruptedError, socket.timeout):
                return
            except OSError:
                data = b""
            if len(data) != FORKER_STARTED.size:
                return self.forker_hung_up()
            pid, slot = FORKER_STARTED.unpack(data)
            if slot == PROBE_SLOT:
                self.probed(pid)
                continue
            self.count_in(pid, slot, self.handed.pop(slot))
            if slot in self.handed_relays:      # its child has both descriptors: ours go
                session = self.handed_relays.pop(slot)
                session.conn.close()
                session.upstream.close()
            if pid in self.ended_untold:
                self.ended_untold.discard(pid)
                self.child_ended(pid)

    def probed(self, pid):
        """The forker's probe: PID > 0 its child (clone works), 0 not known yet, -errno refused.

        Refused (a seccomp filter, a kernel without CLONE_PARENT), fork mode
        goes on without a forker: this process forks the children, as where
        clone's number is not known.
        """
        if pid >= 0:
            self.forker_ready = True
            if pid in self.ended_untold:
                self.ended_untold.discard(pid)
            elif pid:
                self.probes.add(pid)
            return
        self.sibling_fork = None
        self.log.message("clone(CLONE_PARENT): %s; the parent forks each child itself"
                         % os.strerror(-pid), error=True)

    def forker_hung_up(self):
        """End of file on the forker's socket: every child it forked has told its pid."""
        self.poller.unregister(self.forker_sock.fileno())
        self.forker_sock.close()
        self.forker_sock = None
        self.forker_gone()

    def forker_ended(self):
        """The forker is reaped: its children tell their pids until its socket's end of file."""
        self.forker_was, self.forker, self.forker_ready = self.forker, None, False
        if self.forker_sock is not None:
            self.read_started()
        self.forker_gone()

    def forker_gone(self):
        """Once the forker is reaped and every child has told: what it still held is lost.

        Its children are ours (CLONE_PARENT) and live on; a new forker starts
        after FORKER_RETRY.
        """
        if self.forker is not None or self.forker_sock is not None or self.forker_was is None:
            return
        pid, self.forker_was = self.forker_was, None
        for slot, key in self.handed.items():
            if slot in self.handed_relays:
                self.end_unrelayed(self.handed_relays.pop(slot),
                                   "lost: the forker died before it took it")
            own_upstreams.release(slot)
            self.free_slots.append(slot)
            self.count_out(key)
        lost, self.handed = len(self.handed), {}
        self.ended_untold.clear()       # their slots were among those handed: freed above
        if not self.stopping and self.sibling_fork:
            self.log.message("the forker (pid %d) died; %d connection(s) handed to it were lost; "
                             "starting a new one" % (pid, lost), error=True)
            self.paused_until = time.monotonic() + self.FORKER_RETRY

    def stop_forker(self):
        """At shutdown: let the forker fork for what it was handed and exit; learn every child.

        Our end shut for writing, it forks for what it has already received
        and then reads end of file; each child tells its pid, so each gets
        the grace. Bounded by FORKER_STOP (a child stopped before it told).
        """
        if self.forker_sock is not None:
            try:
                self.forker_sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            self.forker_sock.settimeout(0.2)
            deadline = time.monotonic() + self.FORKER_STOP
            while self.forker_sock is not None and time.monotonic() < deadline:
                self.read_started()
            if self.forker_sock is not None:
                if self.forker is not None:
                    signal_quietly(self.forker, signal.SIGKILL)
                self.forker_hung_up()
        if self.forker is not None:
            try:
                os.waitpid(self.forker, 0)
            except ChildProcessError:
                pass
            self.forker_ended()


FORKER_SLOT = struct.Struct("=i")       # parent -> forker: a connection's slot (its fd alongside)
FORKER_FDS = struct.Struct("=ii")       # ... or its two fds (client, upstream): a relay-only child
FORKER_STARTED = struct.Struct("=ii")   # new child (on the forker's socket) -> parent: its pid and slot
RELOAD_SLOT = -1                        # parent -> forker, no fd: SIGHUP came (re-resolve)
PROBE_SLOT = -2                         # forker -> parent: its probe's pid, 0, or -errno (probed)
RELAY_STATE_MOST = 2048                 # bytes of a hand-over: the slot and relay_state (a few hundred)


class Forker:
    """Fork mode's forking process: forks a child for each connection the parent hands it.

    A page that the forking process writes after a child's fork is copied
    for that child (the child keeps the old page): every held child owned a
    copy of each page the parent's accept loop writes (polls, accepts,
    counts, reaps, logs: about 80 pages a loop). The forker's loop is a
    receive and a fork (the child tells the parent its pid): about 45 (bench/results/2026-11-29-fork-cost-2.md). The parent
    keeps everything else, and the children are still the parent's own
    (CLONE_PARENT): it reaps, counts and signals them as before, and a
    forker that dies loses no live connection. Started through Supervisor.fork,
    the forker is already set up as a child must be (signals, gc, closed
    descriptors), so each child inherits that instead of redoing it.
    """

    def __init__(self, shape, sock):
        self.shape, self.sock = shape, sock
        self.server = shape.server
        self.fork = shape.sibling_fork
        self.fd = sock.fileno()
        self.fd_space = socket.CMSG_SPACE(FORKER_FDS.size)    # a client and its upstream
        self.begin_grace = None     # raw relay: the children's SIGTERM handler (not ours)

    def run(self):
        """Fork children until the parent hangs up (or is gone); return the exit status."""
        for sock in self.shape.listeners:
            sock.close()
        self.shape.close_connections()
        if self.shape.splits:
            # The parent hands what it connects during the grace too: only its hang-up (or
            # its end) stops us, not the SIGTERM an init system sends every process.
            self.begin_grace = _signal.getsignal(signal.SIGTERM)
            set_handler(signal.SIGTERM, lambda *_: None)
        self.sock.setblocking(True)
        self.rehearse()
        if not self.probe():
            return EX_OK
        held = None
        try:
            while True:
                if held is None:
                    held = self.receive()
                    if held is None:
                        return EX_OK
                if _signal.getsignal(signal.SIGTERM) == _signal.SIG_IGN:
                    for fd in held[0]:      # SIGTERM came (its grace began): fork no more
                        os.close(fd)
                    return EX_OK
                if self.spawn(*held):
                    held = None
                elif self.hung_up(ForkingServer.FORKER_RETRY):
                    for fd in held[0]:
                        abort(socket.socket(fileno=fd))
                    return EX_OK
        except Cut:
            return EX_OK

    def rehearse(self):
        """Relay one connection over loopback, quietly, before forking any child.

        What a process does the first time (type and method caches, instance
        layouts, first calls) writes pages that every child forked later
        would copy again; done here once, the children share them. A raw
        relay between sockets of our own with one-second timeouts: nothing
        is logged or counted, and a failure only loses the gain. The loop
        guard's board is swapped for one of its own (one slot) meanwhile: the
        real one's slots may be in use (a new forker, live children).
        (Like Android's zygote, which preloads and warms for the same reason.)
        No byte goes to anything but its own sockets: each connection is
        checked, by address, to have reached its own listener before anything
        is sent (an OUTPUT-chain REDIRECT may take loopback connections
        elsewhere, even to tproxy itself); if not, it resets them and skips.
        """
        global own_upstreams
        opened = []
        board, own_upstreams = own_upstreams, OwnUpstreams()    # a board of its own: one slot
        try:
            own_upstreams.create(1)
            own_upstreams.take(0)
            self.shape.set_title(*self.shape.forker_title)     # the name it has already
            listener = socket.create_server(("127.0.0.1", 0))
            target = socket.create_server(("127.0.0.1", 0))
            opened += [listener, target]
            cfg = Config()
            cfg.mode, cfg.target = "raw", target.getsockname()
            cfg.target_addrs = resolve_quiet(cfg.target)
            cfg.connect_timeout = cfg.idle_timeout = 1.0
            server = Server(cfg, QuietLog(), listener.getsockname()[1])
            client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            opened.append(client)
            client.settimeout(1.0)
            client.connect(listener.getsockname())
            conn = socket.socket(fileno=own_peer(listener, client, opened).detach())
            opened.append(conn)
            connection_title(conn)
            session = Session(conn, server)
            relayed = []        # the relay-only child's path, when children take that (splits)

            def hand_off(session, initial, header):
                session.done, session.waits, session.due = True, {}, None
                relayed.append(relay_state(session, initial, header))
            if self.shape.splits:
                session.hand_off = hand_off
            session.start(time.monotonic())
            if session.dialer is None or session.dialer.sock is None:
                return
            opened.append(session.dialer.sock)
            upstream = own_peer(target, session.dialer.sock, opened)
            client.sendall(b"x")
            client.shutdown(socket.SHUT_WR)
            upstream.sendall(b"y")
            upstream.shutdown(socket.SHUT_WR)
            if relayed:     # the two sockets become the relay's own, as in a child (closed by it)
                self.shape.serve_relay((conn.detach(), session.dialer.sock.detach()), 0, relayed[0],
                                       server)
            else:
                run_session(session, started=True)
        except Exception:       # OSError, a timeout, Cut (SIGTERM's grace ended meanwhile)
            pass
        finally:
            own_upstreams = board
            for sock in opened:
                abort(sock)     # a reset: nothing looks like a clean exchange to anyone
            self.shape.set_title(*self.shape.forker_title)     # serve_relay took a child's

    def probe(self):
        """Prove that clone works before the parent hands us anything; tell it; False if refused.

        A refused clone (EPERM from a seccomp filter, ENOSYS, EINVAL) would
        refuse every child: the parent must fork them itself. The probe
        child exits at once; the parent, whose child it is, reaps it.
        """
        try:
            pid = self.fork()
            if pid == 0:
                os._exit(EX_OK)
        except OSError as exc:
            pid = -exc.errno if exc.errno in CLONE_REFUSED else 0   # 0: spawn will retry
        self.sock.send(FORKER_STARTED.pack(pid, PROBE_SLOT))
        return pid >= 0

    def receive(self):
        """Wait for the next connection; return (fds, slot, state), or None when the parent hangs up.

        FDS is (client,) or, for a child that only relays, (client, upstream)
        with STATE (relay_state); STATE is empty otherwise.
        """
        while True:
            try:
                data, ancillary, _, _ = self.sock.recvmsg(RELAY_STATE_MOST, self.fd_space)
            except (ConnectionResetError, BrokenPipeError):
                return None
            if len(data) < FORKER_SLOT.size:
                return None
            slot = FORKER_SLOT.unpack_from(data)[0]
            if slot != RELOAD_SLOT and ancillary:
                fds = ancillary[0][2]
                fds = FORKER_FDS.unpack(fds) if len(fds) == FORKER_FDS.size else FORKER_SLOT.unpack(fds)
                return fds, slot, data[FORKER_SLOT.size:]
            if slot == RELOAD_SLOT:
                self.reload()

    def reload(self):
        """SIGHUP (told by the parent): reopen the -l file (quietly: the parent says why not) and re-resolve."""
        try:
            self.server.log.reopen()
        except Fatal:
            pass
        self.shape.re_resolve(quiet=True)       # a failure: the parent has said so

    def spawn(self, fds, slot, state):
        """Fork the child for connection FDS in SLOT (it tells the parent); False if fork failed."""
        self.server.rotation += 1
        try:
            pid = self.fork()
        except OSError as exc:
            self.server.rotation -= 1
            self.server.log.message("fork: %s" % exc.strerror, error=True)
            return False
        if pid == 0:
            status = EX_SOFTWARE
            try:
                if self.begin_grace is not None:    # before our word: the parent may SIGTERM us
                    set_handler(signal.SIGTERM, self.begin_grace)
                try:    # first: our word cannot be lost with the forker (the parent counts us)
                    self.sock.send(FORKER_STARTED.pack(os.getpid(), slot))
                except OSError:
                    pass        # the parent is gone: die_with ends us
                os.close(self.fd)
                die_with(self.shape.parent_pid)
                if state:
                    status = self.shape.serve_relay(fds, slot, state)
                else:
                    status = self.shape.serve(socket.socket(fileno=fds[0]), slot)
            except BaseException as exc:    # never return into the forker's loop
                try:
                    self.server.log.message("internal error: %r" % (exc,), error=True)
                except BaseException:
                    pass
            finally:
                os._exit(status)
        for fd in fds:
            os.close(fd)
        return True

    def hung_up(self, wait):
        """Wait up to WAIT seconds; return True if the parent has hung up meanwhile."""
        try:
            ready, _, _ = select.select([self.fd], [], [], wait)
        except InterruptedError:
            return False
        if not ready:
            return False
        try:
            return not self.sock.recv(FORKER_SLOT.size, socket.MSG_PEEK)
        except OSError:
            return True


def own_peer(listener, client, opened):
    """Accept (1 s) on LISTENER the connection of our own socket CLIENT; raise OSError if not.

    Compared by address (CLIENT's local one): a connection redirected
    elsewhere never arrives here, and one from anybody else is not ours.
    The accepted socket is added to OPENED.
    """
    listener.settimeout(1.0)
    conn, peer = listener.accept()
    opened.append(conn)
    if peer != client.getsockname():
        raise OSError(errno.ECONNREFUSED, "the rehearsal's connection went elsewhere")
    return conn


class QuietLog(Log):
    """A Log that says nothing: the forker's rehearsal (Forker.rehearse)."""

    def message(self, text, error=False):
        pass


def sibling_fork(cache=[]):
    """Return fork_sibling(): os.fork(), but the child is our parent's (CLONE_PARENT); None where unknown.

    Python has no clone(): this calls the clone system call through PyDLL
    (the GIL stays held, as os.fork holds it), between PyOS_BeforeFork and
    PyOS_AfterFork_Parent or PyOS_AfterFork_Child, exactly as os.fork does:
    skipping the first two saves a few pages per child on Python 3.11, but
    on 3.13 the child's after-fork work releases the import lock that
    PyOS_BeforeFork took, and without it every child dies with a fatal
    error. Skipped is glibc's fork() wrapper, whose at-fork handlers reset
    locks another thread could hold (tproxy has one thread) and the thread
    id it caches: in a child, pthread calls on itself (pthread_kill,
    raise(), pthread_setaffinity_np, pthread_setschedparam,
    pthread_getcpuclockid) would act on the forker's id; children must make
    none (tproxy makes none). The arguments are made once, so a call
    allocates nothing but its result. fork_sibling() returns the child's pid, 0 in the child;
    raises OSError.
    """
    if cache:
        return cache[0]
    number = CLONE_SYSCALL.get(process_abi())
    if number is None:
        cache.append(None)
        return None
    import ctypes
    getpid = os.getpid
    api = ctypes.PyDLL(None, use_errno=True)
    clone = api.syscall
    clone.restype = ctypes.c_long
    before, in_parent, in_child = api.PyOS_BeforeFork, api.PyOS_AfterFork_Parent, api.PyOS_AfterFork_Child
    for step in (before, in_parent, in_child):
        step.restype, step.argtypes = None, ()
    null = ctypes.c_void_p(0)       # new stack (none: a copy of ours), tid pointers, TLS
    args = (ctypes.c_long(number), ctypes.c_ulong(CLONE_PARENT | signal.SIGCHLD)) + (null,) * 4

    def fork_sibling():
        forking = getpid()
        before()
        pid = clone(*args)
        if pid == 0 and getpid() != forking:
            in_child()
            return 0
        in_parent()
        if pid == 0:        # not clone at all (a number of another ABI), which "returned" 0
            raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))
        if pid < 0:
            error = ctypes.get_errno()
            raise OSError(error, os.strerror(error))
        return pid
    cache.append(fork_sibling)
    return fork_sibling


CLONE_PARENT = 0x8000
# The clone system call's number where its first argument is the flags (not s390), by the
# ABI this Python was built for: the kernel's own machine (os.uname) may differ (a 32-bit
# Python on a 64-bit kernel), and another ABI's number is another system call.
CLONE_SYSCALL = {"x86_64-linux-gnu": 56, "aarch64-linux-gnu": 220, "riscv64-linux-gnu": 220,
                 "loongarch64-linux-gnu": 220, "i386-linux-gnu": 120, "arm-linux-gnueabihf": 120,
                 "arm-linux-gnueabi": 120, "powerpc64le-linux-gnu": 120}
CLONE_REFUSED = (errno.EPERM, errno.ENOSYS, errno.EINVAL)   # clone errors no retry cures


def process_abi():
    """Return this Python's multiarch triplet (x86_64-linux-gnu, i386-linux-gnu...), or None."""
    abi = getattr(sys.implementation, "_multiarch", None)
    if not abi:
        import sysconfig
        abi = sysconfig.get_config_var("MULTIARCH")
    return abi or None


def client_key(peer):
    """Return the 16-byte address of a client sockaddr (IPv4 as v4-mapped IPv6)."""
    host = peer[0].split("%", 1)[0]
    if ":" not in host:
        host = "::ffff:" + host
    return socket.inet_pton(socket.AF_INET6, host)


def refuse_over_cap(conn, peer, held, server):
    """Reset CONN, a client over --max-per-client, and log its record."""
    record = Record(peer, server.cfg.mode)
    record.outcome = ("refused: %d connection(s) from this address already (--max-per-client %d)"
                      % (held, server.cfg.max_per_client))
    abort(conn)
    server.log.connection(record.line())


def finish_within_grace(grace):
    """In a process serving one connection: SIGTERM starts GRACE seconds, then Cut; no SIGHUP.

    Only the parent reopens logs, so SIGHUP (say, `killall -HUP tproxy`
    from logrotate) must not kill a connection. Return the SIGTERM handler,
    which also ends a connection's wait for a parent that has died.
    """
    def begin(*_):
        set_handler(signal.SIGTERM, _signal.SIG_IGN)
        signal.setitimer(signal.ITIMER_REAL, max(grace, 0.001))

    def end(*_):
        raise Cut()
    set_handler(signal.SIGHUP, _signal.SIG_IGN)
    set_handler(signal.SIGALRM, end)
    set_handler(signal.SIGTERM, begin)
    return begin


def set_handler(sig, handler):
    """Set HANDLER (a function, or _signal's plain-int SIG_DFL or SIG_IGN) for SIG.

    signal.signal() also turns the old handler into an enum, and when that
    is a Python function (the parent's), the enum machinery raises and
    catches a ValueError: in a fork child that first call alone touched
    about 230 KiB of the parent's pages, copied for every connection.
    """
    _signal.signal(sig, handler)


def die_with(parent):
    """Get SIGTERM when PARENT dies (PR_SET_PDEATHSIG); send it now if it already has."""
    if _libc().prctl(1, signal.SIGTERM, 0, 0, 0) != 0:     # PR_SET_PDEATHSIG
        return
    if os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGTERM)


def signal_quietly(pid, sig):
    """Send SIG to PID unless it is gone already."""
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


class EventLoop:
    """Drives many Sessions in one process: epoll for their descriptors, a heap for their deadlines.

    The heap is lazy: a session has at most one entry that matters (the
    earliest it asked for); when an entry comes due early, the session is
    pushed again for its current deadline. Entries of ended sessions are
    dropped when they come up, or all at once when they outnumber the live.
    """

    def __init__(self):
        self.epoll = select.epoll()
        self.by_fd = {}         # fd -> session waiting on it
        self.timers = []        # heap of (due, sequence number, session)
        self.seq = 0
        self.sessions = set()
        self.handlers = {}      # fd -> callable(events): listeners, the signal pipe
        self.round_size = 0     # how many descriptors the last wait found ready

    def watch(self, fd, handler, events=select.EPOLLIN):
        self.epoll.register(fd, events)
        self.handlers[fd] = handler

    def forget(self, fd):
        if self.handlers.pop(fd, None) is not None:
            try:
                self.epoll.unregister(fd)
            except OSError:
                pass

    def add(self, session, now):
        """Start SESSION and keep driving it until it is done."""
        session.registered = {}
        session.timer_at = None
        self.sessions.add(session)
        session.start(now)
        self.sync(session)

    def sync(self, session):
        """Bring epoll and the heap in line with what SESSION now waits on."""
        old = session.registered
        if session.dropped:
            for fd in session.dropped:      # closed: epoll forgot it with the descriptor
                old.pop(fd, None)
                self.by_fd.pop(fd, None)
            session.dropped = []
        if session.done:
            for fd in old:
                self.by_fd.pop(fd, None)    # closed by the session
            session.registered = {}
            self.sessions.discard(session)
            self.ended(session)
            return
        new = session.waits
        if new != old:
            self.register(session, old, new)
        due = session.due
        if due is not None and (session.timer_at is None or due < session.timer_at):
            self.schedule(session, due)

    def schedule(self, session, due):
        """Put SESSION on the timer heap for DUE; entries left stale pile up until compacted here."""
        session.timer_at = due
        self.seq += 1
        heapq.heappush(self.timers, (due, self.seq, session))
        if len(self.timers) > 2 * len(self.sessions) + 64:
            self.timers = [t for t in self.timers if not t[2].done and t[0] == t[2].timer_at]
            heapq.heapify(self.timers)

    def register(self, session, old, new):
        """Change epoll's interest in SESSION's descriptors from OLD to NEW (OLD is updated)."""
        for fd in [fd for fd in old if fd not in new] if old else ():
            del old[fd]
            self.by_fd.pop(fd, None)
            try:
                self.epoll.unregister(fd)
            except OSError:
                pass
        for fd, events in new.items():
            was = old.get(fd)
            if was == events:
                continue
            asked = events | select.EPOLLRDHUP if events & select.EPOLLIN else events
            if was is None:
                self.epoll.register(fd, asked)
            else:
                self.epoll.modify(fd, asked)
            old[fd] = events
            self.by_fd[fd] = session

    def ended(self, session):
        """Called once per session that is done (the owner's bookkeeping)."""

    def timeout(self, now):
        """Return seconds until the earliest deadline (-1: none)."""
        if not self.timers:
            return -1
        return min(max(0.0, self.timers[0][0] - now), POLL_MAX_MS // 1000)  # epoll takes an int of ms

    def poll(self, limit=None):
        """Wait for events or the next deadline (at most LIMIT seconds) and handle them."""
        timeout = self.timeout(time.monotonic()) if self.timers else -1
        if limit is not None and (timeout < 0 or timeout > limit):
            timeout = limit
        try:
            ready = self.epoll.poll(timeout)
        except InterruptedError:
            ready = []
        now = time.monotonic()
        self.round_size = len(ready)
        fired, later, by_fd = {}, [], self.by_fd
        for fd, events in ready:
            session = by_fd.get(fd)
            if session is None:
                handler = self.handlers.get(fd)
                if handler is not None:
                    later.append((handler, events))
            elif fd in session.lean:
                if session.lean_step(fd, events, now):
                    self.sync(session)
            else:
                fired.setdefault(session, {})[fd] = events
        # Only now may new descriptors be made (connects, accepts): one closed above and
        # made again must not receive the events of this round that were its namesake's.
        for session, fds in fired.items():
            if not session.done:
                session.advance(fds, now)
                self.sync(session)
        for handler, events in later:
            handler(events)
        timers = self.timers
        if timers:
            now = time.monotonic()
            if timers[0][0] <= now:
                self.expire(now)

    def expire(self, now):
        """Advance every session whose deadline has come."""
        timers = self.timers
        while timers and timers[0][0] <= now:
            due, _, session = heapq.heappop(timers)
            if session.done or due != session.timer_at:
                continue
            session.timer_at = None
            if session.due is not None and session.due <= now:
                session.advance({}, now)
            self.sync(session)

    def cut_all(self):
        """Shutdown's grace is over: end every live session with resets."""
        for session in list(self.sessions):
            session.cut()
            self.sync(session)


class ClientCounts:
    """Live connections per client address across a pool of workers, in shared memory.

    Each worker counts in its own row, so no two processes ever write the
    same word; a client's count is its bucket summed over the rows. An
    address is hashed into one of BUCKETS buckets (the low 16 bits of an
    IPv4 address pick its bucket directly, so the clients of one /16 never
    share one); clients whose buckets collide share their cap.

    A worker claims a slot under a POSIX record lock on its bucket's byte of
    an empty memfd, so that two workers cannot both see a client one under
    its cap and both count one more. The kernel drops the locks of a process
    that dies; an uncontended claim costs two fcntl calls. Releasing a slot
    only lowers the worker's own word and takes no lock.
    """

    BUCKETS = 1 << 16

    KNOWN = 4096        # addresses whose bucket is remembered (then forgotten all at once)

    def __init__(self, rows):
        import fcntl
        self.rows = rows
        self.map = shared_memory(4 * self.BUCKETS * rows)
        self.counts = memoryview(self.map).cast("I")
        try:
            self.locks = os.memfd_create("tproxy-per-client-locks")
        except OSError as exc:
            raise Fatal("cannot make the lock file of --max-per-client for --workers: %s"
                        % exc.strerror, EX_OSERR) from None
        self.fcntl = fcntl
        self.known = {}         # the host of a peer address -> its bucket

    def bucket_of(self, peer):
        """Return the bucket of PEER, a sockaddr (remembered: clients come back)."""
        bucket = self.known.get(peer[0])
        if bucket is None:
            if len(self.known) >= self.KNOWN:
                self.known.clear()
            bucket = self.known[peer[0]] = self.bucket(client_key(peer))
        return bucket

    def bucket(self, key):
        """Return the bucket of the 16-byte address KEY (see client_key)."""
        import zlib
        return (int.from_bytes(key[12:], "big") ^ zlib.crc32(key[:12])) & (self.BUCKETS - 1)

    def held(self, bucket):
        return sum(self.counts[bucket::self.BUCKETS])       # one word per row

    def claim(self, row, bucket, cap):
        """Count one more connection of BUCKET in ROW if the bucket holds fewer than CAP.

        Return None when counted, else how many the bucket holds. Atomic
        across the pool's processes (the bucket's lock is held throughout).
        """
        self.fcntl.lockf(self.locks, self.fcntl.LOCK_EX, 1, bucket)
        try:
            held = self.held(bucket)
            if held >= cap:
                return held
            self.add(row, bucket, 1)
            return None
        finally:
            self.fcntl.lockf(self.locks, self.fcntl.LOCK_UN, 1, bucket)

    def add(self, row, bucket, change):
        self.counts[row * self.BUCKETS + bucket] += change

    def clear(self, row):
        """Forget a row (its worker has died)."""
        size = 4 * self.BUCKETS
        self.map[size * row:size * (row + 1)] = bytes(size)


class WorkerPool(Supervisor):
    """--workers=N: N processes, each an EventLoop serving many connections at once.

    Every worker watches the shared listeners with EPOLLEXCLUSIVE (a new
    client wakes one worker, not all). One SO_REUSEPORT listener per worker
    measured the same (relaybench, bench/results/2026-11-29-relaybench-workers-
    reuseport-vs-exclusive.md) and would not work with the one socket systemd
    passes, nor keep a dead worker's queued clients. --max-conns is split into equal
    shares, one per worker (a worker at its share stops accepting, so
    clients wait in the listen queue or go to another worker);
    --max-per-client counts across the pool (ClientCounts). A worker that
    dies is replaced.
    """

    RESPAWN_AFTER = 1.0     # seconds between replacing workers that died

    def __init__(self, listeners, server):
        super().__init__(listeners, server)
        cfg = server.cfg
        self.count = cfg.workers
        self.share = -(-cfg.max_conns // self.count)
        own_upstreams.create(self.share * self.count)
        self.clients = ClientCounts(self.count)
        self.workers = {}           # pid -> worker index
        self.respawn_at = 0.0

    def run(self):
        """Keep N workers running until SIGTERM; return the exit status."""
        self.install_signals()
        self.set_title("tproxy parent", "tproxy: parent, %d workers, %s"
                       % (self.count, self.listening_on()))
        self.freeze_heap()
        self.staff()
        while not self.stopping:
            try:
                select.select([self.wake_r], [], [], 1.0)
            except InterruptedError:
                pass
            drain(self.wake_r)
            for pid in self.reap():
                index = self.workers.pop(pid, None)
                if index is not None and not self.stopping:
                    self.log.message("worker %d (pid %d) ended unexpectedly; replacing it"
                                     % (index, pid), error=True)
                    self.clients.clear(index)
                    for slot in range(index * self.share, (index + 1) * self.share):
                        own_upstreams.release(slot)
            if self.reload:
                self.reopen()
                for pid in self.workers:
                    signal_quietly(pid, signal.SIGHUP)
                self.log.message("SIGHUP: log reopened, target re-resolved, workers told")
            if self.status:
                self.status = False
                self.log.message("status: parent workers=%d" % len(self.workers))
                for pid in self.workers:
                    signal_quietly(pid, signal.SIGUSR1)
            if not self.stopping and time.monotonic() >= self.respawn_at:
                self.staff()
        self.stop_accepting()
        self.log.message("SIGTERM: stopped accepting; %d worker(s) get %gs to finish"
                         % (len(self.workers), self.server.cfg.grace))
        return self.wind_down(self.workers)

    def staff(self):
        """Start the missing workers."""
        missing = set(range(self.count)) - set(self.workers.values())
        if missing:
            self.respawn_at = time.monotonic() + self.RESPAWN_AFTER
        for index in sorted(missing):
            pid = self.fork(lambda: self.worker(index))
            if pid is None:
                return
            self.workers[pid] = index

    def worker(self, index):
        """Serve connections from the listeners with one event loop until told to stop."""
        return Worker(self, index).run()


class Worker(EventLoop):
    """One process of a WorkerPool: accepts and drives Sessions until SIGTERM and its grace end."""

    ACCEPT_BATCH = 64       # clients taken per wakeup, so a flood cannot starve the others
    ACCEPT_PAUSE = 0.5      # seconds without accepting after accept(2) failed (EMFILE...)
    GC_YOUNG = 10000        # the young generation's collection threshold (CPython's: 700)

    def __init__(self, pool, index):
        super().__init__()
        import gc
        gc.enable()     # fork() disabled it for short-lived children; a worker lives long
        # The live sessions' container objects number hundreds, so the young generation's
        # count (allocations less deallocations) crossed the default 700 back and forth as
        # connections came and went: a collection of every live session's objects each few
        # dozen connections (185 per 20,000 at c=32, ~110 us each). Sessions make no cycles
        # of their own to collect, not even those ending in an error (test_worker_cycles),
        # so a higher bound only makes those collections rare.
        gc.set_threshold(self.GC_YOUNG, *gc.get_threshold()[1:])
        self.pool, self.index = pool, index
        self.server, self.log = pool.server, pool.log
        self.cfg = self.server.cfg
        first = index * pool.share
        self.free = list(range(first + pool.share - 1, first - 1, -1))     # loop guard slots
        self.stats = Stats()
        self.server.on_record = self.stats.add_record
        self.flags = set()          # what signals asked: "stop", "cut", "hup", "status"
        self.listening = False
        self.paused_until = 0.0

    def run(self):
        """Serve until SIGTERM and its grace end, the log's lines of each round written at its end."""
        self.log.gather()
        try:
            return self.serve()
        finally:
            self.log.flush()

    def poll(self, limit=None):
        """Write the log lines gathered so far, then wait and dispatch (EventLoop.poll)."""
        if self.log.gathered:
            self.log.flush()
        EventLoop.poll(self, limit)

    def serve(self):
        pool = self.pool
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wake_w)
        self.watch(wake_r, lambda events: drain(wake_r))
        for sig, flag in ((signal.SIGTERM, "stop"), (signal.SIGALRM, "cut"),
                          (signal.SIGHUP, "hup"), (signal.SIGUSR1, "status")):
            signal.signal(sig, lambda *_, flag=flag: self.flags.add(flag))
        pool.set_title("tproxy worker", "tproxy: worker %d of %d, %s"
                       % (self.index, pool.count, pool.listening_on()))
        if os.getppid() != pool.parent_pid:     # died before PR_SET_PDEATHSIG was set
            self.flags.add("stop")
        grace_at = None
        while True:
            now = time.monotonic()
            if "stop" in self.flags and grace_at is None:
                self.stop_listening(close=True)
                grace_at = now + self.cfg.grace
            if grace_at is not None and not self.sessions:
                return EX_OK
            if "cut" in self.flags or (grace_at is not None and now >= grace_at):
                self.cut_all()
                return EX_OK
            if "hup" in self.flags:
                self.flags.discard("hup")
                pool.reopen()
            if "status" in self.flags:
                self.flags.discard("status")
                self.log.message(self.stats.line("worker %d" % self.index, len(self.sessions)))
            if grace_at is None:
                want = len(self.sessions) < pool.share and now >= self.paused_until
                if want and not self.listening:
                    self.start_listening()
                elif not want and self.listening:
                    self.stop_listening()
            limit = None
            if grace_at is not None:
                limit = grace_at - now
            elif self.paused_until > now:
                limit = self.paused_until - now
            self.poll(limit)
            # The common round changes nothing checked above: wait again at once.
            while not self.flags and self.listening and len(self.sessions) < pool.share:
                self.poll()

    def start_listening(self):
        exclusive = getattr(select, "EPOLLEXCLUSIVE", 0)
        for sock in self.pool.listeners:
            self.watch(sock.fileno(), lambda events, sock=sock, family=int(sock.family):
                       self.accept(sock, family), select.EPOLLIN | exclusive)
        self.listening = True

    def stop_listening(self, close=False):
        for sock in self.pool.listeners:
            if sock.fileno() >= 0:
                self.forget(sock.fileno())
                if close:
                    sock.close()
        self.listening = False

    def accept(self, listener, family):
        """Take waiting clients (up to ACCEPT_BATCH, and this worker's share) of LISTENER (of FAMILY) and start them."""
        pool, server = self.pool, self.server
        now = time.monotonic()
        # As fork mode: a cap no client can reach (all connections from one) is not counted.
        counted = self.cfg.max_per_client < pool.share * pool.count
        # An accept(2) that finds no client costs more than one that finds one (the kernel
        # makes the socket first): take as many as wait (1 if unknown), not until EAGAIN.
        # A round that found only the listener is an idle worker's: most likely one client
        # waits (any others wake the next round; polling is level-triggered).
        waiting = listen_queue(listener) or 1 if self.round_size > 1 else 1
        for _ in range(min(waiting, self.ACCEPT_BATCH)):
            if len(self.sessions) >= pool.share:
                return
            try:
                # socket.accept() less its three enum conversions per call and the
                # Python layer of socket.socket, which nothing here needs.
                fd, peer = listener._accept()
                conn = _socket.socket(family, socket.SOCK_STREAM, 0, fd)
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as exc:
                self.log.message("accept: %s" % exc.strerror, error=True)
                self.paused_until = now + self.ACCEPT_PAUSE
                self.stop_listening()
                return
            bucket = None
            if counted:
                bucket = pool.clients.bucket_of(peer)
                held = pool.clients.claim(self.index, bucket, self.cfg.max_per_client)
                if held is not None:
                    refuse_over_cap(conn, peer, held, server)
                    continue
            server.rotation += 1
            session = Session(conn, server, self.free.pop(), peer)
            session.bucket = bucket
            session.close_sends_fin = True
            self.add(session, now)

    def ended(self, session):
        if session.bucket is not None:
            self.pool.clients.add(self.index, session.bucket, -1)
        self.free.append(session.slot)


def listen_queue(sock):
    """Return how many connections wait in listening SOCK's accept queue (0 if unknown)."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 32)
    except OSError:
        return 0
    return struct.unpack_from("I", info, 24)[0]    # tcpi_unacked: the queue, on a listener


def drain(fd):
    """Read and discard whatever is waiting on the non-blocking FD."""
    try:
        while os.read(fd, 512):
            pass
    except (BlockingIOError, InterruptedError):
        pass


# ---------------------------------------------------------------------------
# UDP relay (--udp): datagrams in flows, each flow with its own sockets
# ---------------------------------------------------------------------------

IP_RECVORIGDSTADDR = 20     # SOL_IP: a datagram's original destination as ancillary data
IPV6_RECVORIGDSTADDR = 74   # SOL_IPV6: the same for IPv6
UDP_BUFFER = 65535 + 1      # a datagram longer than 65535 bytes shows as MSG_TRUNC, never split
UDP_RCVBUF = 4 << 20        # a listener's receive buffer: the default holds ~256 small datagrams
UDP_BATCH = 64              # datagrams read from one socket per wakeup, so none starves the rest
UDP_ANCILLARY = socket.CMSG_SPACE(28)
SO_RCVBUFFORCE = 33         # SO_RCVBUF beyond net.core.rmem_max, with CAP_NET_ADMIN
UDP_SEND_FULL = (errno.EAGAIN, errno.EINTR, errno.ENOBUFS)     # a datagram lost, the flow kept


def open_udp_listeners(cfg, count):
    """Bind COUNT UDP sockets on -b ADDR (or every address) and -s PORT; raise Fatal.

    More than one form an SO_REUSEPORT group, one per worker: the kernel
    hashes each datagram's addresses and ports to one of them, so every
    first datagram of a flow reaches the same worker. The first is bound
    with neither SO_REUSEADDR nor SO_REUSEPORT, so that any socket already
    on the port (another tproxy too, even one of the same user, which
    SO_REUSEPORT alone would let join the group) makes it fail as TCP's
    bind does; see share_udp_port for what is set after.
    """
    if cfg.bind:
        try:
            info = socket.getaddrinfo(cfg.bind, cfg.port, type=socket.SOCK_DGRAM,
                                      flags=socket.AI_PASSIVE)[0]
        except (socket.gaierror, UnicodeError) as exc:
            raise Fatal("-b: cannot resolve %s: %s" % (cfg.bind, getattr(exc, "strerror", exc)),
                        EX_NOHOST) from None
        candidates = [(info[0], info[4])]
    else:
        candidates = [(socket.AF_INET6, ("::", cfg.port)), (socket.AF_INET, ("0.0.0.0", cfg.port))]
    last = None
    for family, sockaddr in candidates:
        socks = []
        try:
            for _ in range(count):
                sock = socket.socket(family, socket.SOCK_DGRAM)
                socks.append(sock)
                prepare_udp_listener(sock, family, dual_stack=not cfg.bind)
                if len(socks) > 1:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                sock.bind(sockaddr)
                share_udp_port(sock)
            return socks
        except OSError as exc:
            for sock in socks:
                sock.close()
            last = exc
            if exc.errno not in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL):
                break
    where = "%s UDP port %d" % (cfg.bind or "*", cfg.port)
    status = EX_NOPERM if last.errno in (errno.EACCES, errno.EPERM) else EX_OSERR
    raise Fatal("cannot listen on %s: %s" % (where, last.strerror), status)


def share_udp_port(sock):
    """Once SOCK is bound: let the pool's next listeners and this server's reply sockets share its port.

    The kernel checks SO_REUSEPORT and SO_REUSEADDR of the sockets already
    bound when a new one binds (udp_lib_lport_inuse): set now, they admit
    the group's other listeners (SO_REUSEPORT, same user) and reply sockets
    bound to an address on this port (SO_REUSEADDR: a fixed target's, or a
    TPROXY flow's to this port on another host), while a new tproxy's first
    listener, which has neither, still finds the port in use.
    """
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)


def prepare_udp_listener(sock, family, dual_stack):
    """Set SOCK's options before bind: transparency, original destinations, buffer."""
    if family == socket.AF_INET6:
        if dual_stack:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.setsockopt(SOL_IPV6, IPV6_RECVORIGDSTADDR, 1)
    # On a dual-stack socket IPv4 datagrams carry theirs only with the SOL_IP option too.
    sock.setsockopt(SOL_IP, IP_RECVORIGDSTADDR, 1)
    make_transparent(sock, family)
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, UDP_RCVBUF)
    except OSError:             # without CAP_NET_ADMIN: as much as net.core.rmem_max allows
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, UDP_RCVBUF)
    sock.setblocking(False)


def datagram_destination(ancillary, fallback):
    """Return the (host, port) a datagram was sent to, from its recvmsg ANCILLARY data.

    Without IP_ORIGDSTADDR data (no TPROXY, no transparent socket) it is
    FALLBACK, the receiving socket's own address.
    """
    for level, kind, data in ancillary:
        if level == SOL_IP and kind == IP_RECVORIGDSTADDR and len(data) >= 8:
            return socket.inet_ntoa(data[4:8]), struct.unpack_from("!H", data, 2)[0]
        if level == SOL_IPV6 and kind == IPV6_RECVORIGDSTADDR and len(data) >= 24:
            host = plain_ip(socket.inet_ntop(socket.AF_INET6, data[8:24]))
            return host, struct.unpack_from("!H", data, 2)[0]
    return plain_ip(fallback[0]), fallback[1]


class UdpRecord:
    """What happened to one flow: a connection's Record, in slots, plus datagrams counted each way.

    Not a subclass: Record keeps its fields in a dict, which a flow that
    lives for --idle-timeout with thousands of others cannot afford.
    """

    __slots__ = ("started", "client", "orig", "target", "up", "down", "outcome",
                 "datagrams_up", "datagrams_down", "truncated", "dropped")
    mode = "udp"
    host = None

    def __init__(self, client):
        self.started = time.monotonic()
        self.client = client
        self.orig = self.target = None
        self.up = self.down = 0
        self.outcome = "ok"
        self.datagrams_up = self.datagrams_down = 0
        self.truncated = 0      # longer than UDP_BUFFER (MSG_TRUNC): counted, not relayed
        self.dropped = 0        # a socket's send buffer was full: the datagram was lost

    def line(self):
        """Return the connection line (Record.line) with the datagram counts before the outcome."""
        head, _, outcome = Record.line(self).rpartition(" outcome=")
        extra = " datagrams_up=%d datagrams_down=%d" % (self.datagrams_up, self.datagrams_down)
        if self.truncated or self.dropped:
            extra += " truncated=%d dropped=%d" % (self.truncated, self.dropped)
        return "%s%s outcome=%s" % (head, extra, outcome)


class Flow:
    """One UDP flow: a client's datagrams to one original destination, and the answers.

    It has an upstream socket (connected to the target, bound as --source
    says) and a reply socket bound (IP_TRANSPARENT) to the address and port
    the client sent to and connected to the client: the answers leave from
    there, and the client's later datagrams arrive there, not on the
    listener. A refused flow (access list, loop) has no sockets; it only
    counts what it drops until it goes idle. It ends when idle for
    --idle-timeout, at an ICMP error for the upstream socket (the client's
    next datagram starts a new flow), or at shutdown; it is logged once.
    Driven by a UdpWorker's EventLoop like a Session (due, advance, cut),
    but registered once: both sockets wait for input for the flow's life
    (see UdpWorker.add), so a flow keeps no dict of what it waits on.
    """

    __slots__ = ("relay", "client", "orig", "record", "upstream", "reply",
                 "done", "last", "timer_at", "slot")   # many idle flows: no __dict__ each
    lean = ()       # EventLoop: no descriptor of a flow takes Session.lean_step's short way

    def __init__(self, relay, client, orig, now):
        self.relay = relay
        self.client, self.orig = client, orig
        self.record = UdpRecord(client)
        self.record.orig = orig
        self.upstream = self.reply = None
        self.done = False
        self.last = now
        self.slot = None        # the loop guard's slot (OwnUpstreams) while the upstream is open

    @property
    def due(self):
        return None if self.done else self.last + self.relay.cfg.idle_timeout

    def open(self, target, slot):
        """Open the upstream and reply sockets for TARGET; raise OSError or ConnectionFailed.

        The upstream socket goes on the loop guard's board in SLOT (None:
        no slot left), so that its datagrams, if a rule brings them back
        to the listener, are known for this server's own.
        """
        cfg = self.relay.cfg
        self.record.target = target
        self.slot = slot        # given back when the flow ends, whatever fails here
        family = socket.AF_INET6 if ":" in target[0] else socket.AF_INET
        self.upstream = socket.socket(family, socket.SOCK_DGRAM)
        self.upstream.setblocking(False)
        if cfg.source or cfg.source_ports:
            bind_source(self.upstream, family, cfg.source, self.client, None, cfg.source_ports)
        if slot is not None:
            own_upstreams.add(self.upstream, target[1], slot)
        self.upstream.connect(target)
        if slot is not None:
            own_upstreams.connecting(self.upstream, slot)
        if cfg.source_ports and cfg.source != "client-port":
            check_source_port(self.upstream, cfg.source_ports)
        family = socket.AF_INET6 if ":" in self.orig[0] else socket.AF_INET
        self.reply = socket.socket(family, socket.SOCK_DGRAM)
        self.reply.setblocking(False)
        self.reply.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        make_transparent(self.reply, family)
        self.reply.bind(self.orig)
        self.reply.connect(self.client)

    def send_up(self, data, size, now):
        """Relay one client datagram of SIZE bytes (DATA holds at most UDP_BUFFER) to the target."""
        record = self.record
        self.last = now
        if size > UDP_BUFFER - 1:
            record.truncated += 1
            return
        if self.upstream is None:       # refused: counted, dropped
            record.datagrams_up += 1
            record.up += size
            return
        try:
            self.upstream.send(data[:size])
        except OSError as exc:
            if exc.errno in UDP_SEND_FULL:
                record.dropped += 1
            else:                       # an ICMP error for an earlier datagram
                self.finish(icmp_outcome(exc))
            return
        record.datagrams_up += 1
        record.up += size

    def advance(self, fds, now):
        """Relay what is waiting on the ready FDS; end the flow when it has been idle long enough."""
        if not fds:
            if now >= self.due:
                self.finish("ok")
            return
        if self.reply.fileno() in fds:
            self.from_reply_socket(now)
        if not self.done and self.upstream.fileno() in fds:
            self.from_upstream(now)

    def from_upstream(self, now):
        """Send the target's answers to the client, one datagram each, from the reply socket."""
        buf, view, record = self.relay.buffer, self.relay.view, self.record
        for _ in range(UDP_BATCH):
            try:
                size = self.upstream.recv_into(buf, UDP_BUFFER, socket.MSG_TRUNC)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:      # an ICMP error for an earlier datagram
                self.finish(icmp_outcome(exc))
                return
            self.last = now
            if size > UDP_BUFFER - 1:
                record.truncated += 1
                continue
            try:
                self.reply.send(view[:size])
            except OSError:             # buffer full, or an ICMP error from the client: it may retry
                record.dropped += 1
                continue
            record.datagrams_down += 1
            record.down += size

    def from_reply_socket(self, now):
        """Take the client's later datagrams, and any other client's that arrived before connect()."""
        buf, view = self.relay.buffer, self.relay.view
        for _ in range(UDP_BATCH):
            try:
                size, source = self.reply.recvfrom_into(buf, UDP_BUFFER, socket.MSG_TRUNC)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                continue        # an ICMP error for an answer sent to the client
            if (plain_ip(source[0]), source[1]) == self.client:
                self.send_up(view, size, now)
            else:
                self.relay.dispatch(view, size, source, self.orig, now)
            if self.done:
                return

    def finish(self, outcome):
        """Close the sockets and log the flow once."""
        if self.done:
            return
        self.done = True
        for sock in (self.upstream, self.reply):
            if sock is not None:
                self.relay.by_fd.pop(sock.fileno(), None)
                sock.close()            # epoll forgets it with the descriptor
        if self.record.outcome == "ok":
            self.record.outcome = outcome
        self.relay.server.log.connection(self.record.line())
        self.relay.server.on_record(self.record)

    def cut(self):
        """Shutdown's grace is over (or a second SIGTERM ended it): the outcome says so, as a connection's."""
        self.finish("cut at shutdown after the %gs grace period" % self.relay.cfg.grace
                    if self.record.outcome == "ok" else self.record.outcome)


def icmp_outcome(exc):
    """Return a flow's outcome for an error on its upstream socket (an ICMP error, mostly)."""
    if exc.errno == errno.ECONNREFUSED:
        return "target refused (ICMP port unreachable)"
    return "upstream error: %s" % (exc.strerror or exc)


class UdpPool(WorkerPool):
    """--udp: one worker process relaying flows (--workers=N: N), each on its own listener.

    The listeners form an SO_REUSEPORT group, so a flow's first datagrams
    always reach the same worker, and its later ones reach the reply socket
    that worker owns: a flow never moves between workers. A worker that
    dies takes its flows with it; its replacement reads the same listener.
    """

    def __init__(self, listeners, server):
        server.cfg.workers = len(listeners)         # one listener per worker
        super().__init__(listeners, server)

    def worker(self, index):
        return UdpWorker(self, index).run()


class UdpWorker(Worker):
    """One process of a UdpPool: reads its listener and drives Flows until SIGTERM and its grace end."""

    def __init__(self, pool, index):
        super().__init__(pool, index)
        self.flows = {}         # (client, original destination) -> Flow
        self.buffer = bytearray(UDP_BUFFER)
        self.view = memoryview(self.buffer)
        self.listener = pool.listeners[index % len(pool.listeners)]
        self.listen_at = self.listener.getsockname()
        self.full_logged = False

    def start_listening(self):
        self.watch(self.listener.fileno(), lambda events: self.receive())
        self.listening = True
        self.full_logged = False

    def stop_listening(self, close=False):
        if self.listener.fileno() >= 0:
            self.forget(self.listener.fileno())
        if close:
            for sock in self.pool.listeners:
                sock.close()
        elif not self.full_logged:
            self.full_logged = True
            self.log.message("--max-conns: %d flows in worker %d; new flows wait in the "
                             "listener's buffer" % (len(self.sessions), self.index), error=True)
        self.listening = False

    def receive(self):
        """Read waiting datagrams from the listener and hand each to its flow."""
        view, now = self.view, time.monotonic()
        for _ in range(UDP_BATCH):
            if len(self.sessions) >= self.pool.share:
                return
            try:
                size, ancillary, flags, source = self.listener.recvmsg_into(
                    [view], UDP_ANCILLARY)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                continue
            if flags & socket.MSG_TRUNC:
                size = UDP_BUFFER       # its true length is lost; counted as truncated
            self.dispatch(view, size, source, datagram_destination(ancillary, self.listen_at), now)

    def dispatch(self, data, size, source, orig, now):
        """Relay one datagram from SOURCE to ORIG through its flow, starting the flow if new."""
        client = (plain_ip(source[0]), source[1])
        flow = self.flows.get((client, orig))
        if flow is None:
            flow = self.new_flow(client, orig, now)
            if flow is None:
                return
        flow.send_up(data, size, now)
        if flow.done:
            self.sync(flow)

    def new_flow(self, client, orig, now):
        """Start and return the flow CLIENT -> ORIG, or None (its failure logged)."""
        cfg, server = self.cfg, self.server
        # Flows from one host, or to one server, share its address string (interned while in use).
        client, orig = (sys.intern(client[0]), client[1]), (sys.intern(orig[0]), orig[1])
        flow = Flow(self, client, orig, now)
        if not acl_allows(cfg.acl, client):
            flow.record.outcome = "denied by access list"
        elif cfg.target is None and is_self(orig, server.listen_port):
            flow.record.outcome = "loop: the original destination is this proxy itself"
        elif own_upstreams.is_own(client, orig, "udp"):
            flow.record.outcome = "loop: %s is this proxy's own upstream socket to %s" % (
                show_addr(client), show_addr(orig))
        else:
            if cfg.target is None:
                target = orig
            else:
                server.rotation += 1
                target = server.target_addrs()[0][4][:2]
            try:
                flow.open((plain_ip(target[0]), target[1]), self.free.pop() if self.free else None)
            except (OSError, ConnectionFailed) as exc:
                flow.record.outcome = str(exc) if isinstance(exc, ConnectionFailed) else \
                    "cannot open the flow: %s" % (exc.strerror or exc)
                flow.finish(flow.record.outcome)
                self.ended(flow)
                return None
        self.flows[(client, orig)] = flow
        self.add(flow, now)
        return flow

    def add(self, flow, now):
        """Drive FLOW until it ends: its sockets wait for input from now on, and its idle deadline."""
        flow.timer_at = None
        self.sessions.add(flow)
        for sock in (flow.upstream, flow.reply):
            if sock is not None:
                self.epoll.register(sock.fileno(), select.EPOLLIN)
                self.by_fd[sock.fileno()] = flow
        self.sync(flow)

    def sync(self, flow):
        """EventLoop.sync for a flow: nothing to change in epoll; forget it once done, else keep its timer.

        A flow's deadline only moves later, so it needs a new heap entry
        only once the last one has come up (expire sets timer_at to None).
        """
        if flow.done:
            self.sessions.discard(flow)
            self.ended(flow)
        elif flow.timer_at is None:
            self.schedule(flow, flow.due)

    def ended(self, flow):
        if self.flows.get((flow.client, flow.orig)) is flow:
            del self.flows[(flow.client, flow.orig)]
        if flow.slot is not None:
            own_upstreams.release(flow.slot)
            self.free.append(flow.slot)
            flow.slot = None


# ---------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------

def main(argv=None):
    """Run tproxy with ARGV (default sys.argv[1:]); return the exit status."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        cfg = parse_args(argv)
        if cfg.port is None:
            return run_inetd(cfg)
        return run_standalone(cfg)
    except Fatal as exc:
        report_error(str(exc))
        return exc.status
    except SystemExit:
        raise
    except KeyboardInterrupt:
        return EX_OK
    except BaseException as exc:        # a traceback helps no administrator
        report_error("internal error: %s: %s" % (type(exc).__name__, exc))
        return EX_SOFTWARE


errors_to_syslog = False       # set once the server has gone to the background


def report_error(text):
    """Print "tproxy: TEXT" on stderr; to syslog in the background or when stderr is inetd's socket."""
    import stat
    try:
        on_socket = stat.S_ISSOCK(os.fstat(2).st_mode)
    except OSError:
        on_socket = True
    if on_socket or errors_to_syslog:
        import syslog
        syslog.openlog("tproxy", syslog.LOG_PID, syslog.LOG_DAEMON)
        syslog.syslog(syslog.LOG_ERR, printable(text))
    else:
        sys.stderr.write("tproxy: %s\n" % text)


if __name__ == "__main__":
    sys.exit(main())
