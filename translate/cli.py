"""ipchains-translate: the command line (the only module touching files and exit codes).

Exit status: 0 everything translated (notes allowed), 1 some commands could
not be translated (each reported on stderr; the output refuses to load
unless --partial) or --check was refused by the kernel, 2 unreadable input,
input without an ipchains command (or, flat formats, a script that ran
none, or could not run in the sandbox) or bad usage.
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile

from .ipchains import parse_ipv4
from .pipeline import VERSION, InputError, refuse_partial, rule_script, translate
from .report import Progress, check_plan, summary
from .semantics import Options

PROG = "ipchains-translate"
FORMATS = ("iptables", "iptables-restore", "nft")


class UsageError(Exception):
    """Bad command line (exit status 2)."""


class _ArgParser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)


def build_parser():
    """Return the argument parser (options as in ipchains-translate(8))."""
    p = _ArgParser(prog=PROG, description="Translate ipchains firewall scripts, "
                   "ipchains-save files and single rules to iptables or nftables.")
    p.add_argument("files", nargs="*", metavar="FILE",
                   help="ipchains scripts or ipchains-save files (default: stdin)")
    p.add_argument("--check", action="store_true",
                   help="load the result in a private network namespace and report "
                        "the kernel's verdict")
    p.add_argument("-D", "--define", action="append", default=[], metavar="NAME=VALUE",
                   help="set a shell variable of the script (wins over its assignments); "
                        "a NAME of digits is a positional parameter: -D 1=start")
    p.add_argument("-e", "--rule", action="append", default=[], metavar="RULE",
                   help="translate this ipchains command (may be repeated); without "
                        "FILEs print its rules alone, for a translation loaded before")
    p.add_argument("--host", action="append", default=[], metavar="NAME=ADDRESS",
                   help="resolve host NAME to ADDRESS (may be repeated)")
    p.add_argument("--hosts", action="append", default=[], metavar="FILE",
                   help="read host names from FILE in hosts(5) format")
    p.add_argument("--masq-mark", default="0x40000000", metavar="MARK",
                   help="packet mark bit that tells POSTROUTING to masquerade "
                        "(default 0x40000000)")
    p.add_argument("--masq-source", metavar="ADDRESS",
                   help="the address masquerading uses: decides output rules' source "
                        "tests for masqueraded packets (default: none, tested as is)")
    p.add_argument("-o", "--output", metavar="FILE", help="write here, not to stdout")
    p.add_argument("--partial", action="store_true",
                   help="print a translation that left commands out in a loadable form "
                        "(default: it refuses to load and names the first gap)")
    p.add_argument("-q", "--quiet", action="store_true", help="do not print notes")
    p.add_argument("--redirect", choices=("nat", "tproxy"), default="nat",
                   help="REDIRECT as nat REDIRECT or as TPROXY (default nat)")
    p.add_argument("--table", default="ipchains", metavar="NAME",
                   help="nft table name (default ipchains)")
    p.add_argument("--to", choices=FORMATS, default="iptables", metavar="FORMAT",
                   help="iptables, iptables-restore or nft (default iptables)")
    p.add_argument("--tproxy-mark", default="0x1", metavar="MARK",
                   help="mark set by TPROXY for the policy routing (default 0x1)")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="end with the summary line even when stderr is not a terminal")
    p.add_argument("-V", "--version", action="version", version="%s %s" % (PROG, VERSION))
    return p


def parse_defines(items, what):
    """Return {NAME: VALUE} from 'NAME=VALUE' words; UsageError if malformed."""
    out = {}
    for item in items:
        name, eq, value = item.partition("=")
        if not eq or not name:
            raise UsageError("%s needs NAME=VALUE, not '%s'" % (what, item))
        out[name] = value
    return out


def parse_mark(text, what):
    """Return a one-bit (or any non-zero) 32-bit mark; UsageError if bad."""
    try:
        value = int(text, 0)
    except ValueError:
        raise UsageError("%s must be a number, not '%s'" % (what, text))
    if not 0 < value <= 0xFFFFFFFF:
        raise UsageError("%s must be a non-zero 32-bit value" % what)
    return value


def read_hosts(paths, pairs):
    """Return {name: [addresses]} from hosts(5) files and NAME=ADDRESS pairs."""
    hosts = {}
    for path in paths:
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                text = f.read()
        except OSError as exc:
            raise InputError("%s: %s" % (path, exc.strerror))
        for line in text.split("\n"):
            fields = line.split("#", 1)[0].split()
            if len(fields) >= 2 and parse_ipv4(fields[0]) is not None:
                for name in fields[1:]:
                    hosts.setdefault(name, []).append(fields[0])
    for name, value in parse_defines(pairs, "--host").items():
        if parse_ipv4(value) is None:
            raise UsageError("--host %s: '%s' is not an IPv4 address" % (name, value))
        hosts.setdefault(name, []).append(value)
    return hosts


def read_sources(files, rules):
    """Return (name, text) pairs: -e rules, then FILEs, else stdin."""
    sources = [("-e", "\n".join(rule_script(r) for r in rules))] if rules else []
    for path in files:
        if path == "-":
            sources.append(("<stdin>", read_stdin()))
            continue
        try:
            with open(path, encoding="utf-8", errors="surrogateescape") as f:
                sources.append((path, f.read()))
        except OSError as exc:
            raise InputError("%s: %s" % (path, exc.strerror or exc))
    if not files and not rules:
        sources.append(("<stdin>", read_stdin()))
    return sources


def read_stdin():
    """Return standard input as text; bytes that are not UTF-8 survive as-is."""
    if hasattr(sys.stdin, "buffer"):
        return sys.stdin.buffer.read().decode("utf-8", "surrogateescape")
    return sys.stdin.read()


def check(text, fmt):
    """Load TEXT in a private network namespace; return (ok, message)."""
    if shutil.which("unshare") is None:
        raise InputError("--check needs unshare(1)")
    unshare = ["unshare", "--net"] if os.geteuid() == 0 else \
        ["unshare", "--net", "--user", "--map-root-user"]
    if fmt == "nft":
        script = 'nft -c -f "$1" && nft -f "$1" && nft -f "$1"'
    else:
        script = ('iptables-restore --noflush --test < "$1" && '
                  'iptables-restore --noflush < "$1"')
    with tempfile.NamedTemporaryFile("w", suffix=".rules") as f:
        f.write(text)
        f.flush()
        try:
            proc = subprocess.run(unshare + ["sh", "-c", script, "sh", f.name],
                                  capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise InputError("--check could not run: %s" % exc)
    if proc.returncode == 0:
        return True, "the kernel accepts the ruleset (loaded in a private network namespace)"
    err = proc.stderr.strip()
    if "unshare" in err and ("Operation not permitted" in err or "failed" in err):
        raise InputError("--check cannot make a network namespace: %s" % err)
    return False, "the kernel refuses the ruleset: %s" % err


def run(argv):
    """Run the command line ARGV; return the exit status (0, 1 or 2)."""
    args = build_parser().parse_args(argv)
    opts = Options(fmt=args.to, redirect=args.redirect,
                   masq_mark=parse_mark(args.masq_mark, "--masq-mark"),
                   tproxy_mark=parse_mark(args.tproxy_mark, "--tproxy-mark"),
                   table=args.table, masq_source=args.masq_source)
    if args.masq_source is not None and parse_ipv4(args.masq_source) is None:
        raise UsageError("--masq-source must be an IPv4 address, not '%s'" % args.masq_source)
    if not args.table.replace("_", "a").isalnum() or not args.table[0].isalpha():
        raise UsageError("--table must be a plain name, not '%s'" % args.table)
    defines = parse_defines(args.define, "-D")
    hosts = read_hosts(args.hosts, args.host)
    progress = Progress(sys.stderr)
    sources = read_sources(args.files, args.rule)
    snippet = bool(args.rule) and not args.files
    progress.stage("translating %d input(s)" % len(sources))
    result = translate(sources, opts, defines, hosts, snippet)
    for diag in result.diags:
        if diag.level == "note" and args.quiet:
            continue
        print(diag.format(PROG), file=sys.stderr)
    # A snippet in the iptables and nft formats is shell commands.
    refusal = "iptables" if snippet and args.to != "iptables-restore" else args.to
    write_output(args.output, result.text if args.partial else refuse_partial(result, refusal))
    status = result.status
    if args.check:
        text = result.text
        if args.to == "iptables" or snippet:
            # The script and snippet formats are checked as the whole
            # ruleset they make (a snippet: with the skeleton it needs).
            fmt = "nft" if args.to == "nft" else "iptables-restore"
            checked = translate(sources, Options(fmt=fmt, redirect=args.redirect,
                                                 masq_mark=opts.masq_mark,
                                                 masq_source=opts.masq_source,
                                                 tproxy_mark=opts.tproxy_mark,
                                                 table=opts.table), defines, hosts)
            text = checked.text
        loaded = "nft" if args.to == "nft" else "iptables-restore"
        print(check_plan(text, loaded), file=sys.stderr)
        progress.stage("checking with the kernel")
        ok, message = check(text, loaded)
        print("%s: check: %s" % (PROG, message), file=sys.stderr)
        if not ok:
            status = 1
    report_end(progress, result, args)
    return status


def report_end(progress, result, args):
    """Stop PROGRESS; print the summary line on a terminal or with -v, never with -q."""
    seconds = progress.close()
    if not args.quiet and (args.verbose or sys.stderr.isatty()):
        print(summary(result, args.to, seconds), file=sys.stderr)


def write_output(path, text):
    """Write TEXT to PATH (or stdout)."""
    if path is None:
        data = text.encode("utf-8", "surrogateescape")
        if hasattr(sys.stdout, "buffer"):
            sys.stdout.flush()
            sys.stdout.buffer.write(data)
            sys.stdout.buffer.flush()
        else:
            sys.stdout.write(text)
        return
    try:
        with open(path, "w", encoding="utf-8", errors="surrogateescape") as f:
            f.write(text)
    except OSError as exc:
        raise InputError("%s: %s" % (path, exc.strerror or exc))


def main(argv=None):
    """Entry point: exit status 0, 1 or 2; never a traceback."""
    try:
        return run(sys.argv[1:] if argv is None else argv)
    except UsageError as exc:
        print("%s: %s (see --help)" % (PROG, exc), file=sys.stderr)
        return 2
    except InputError as exc:
        print("%s: %s" % (PROG, exc), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 2
    except BrokenPipeError:
        return 2
    except Exception as exc:  # last resort: report, never a traceback
        print("%s: internal error: %s: %s" % (PROG, type(exc).__name__, exc), file=sys.stderr)
        return 2
