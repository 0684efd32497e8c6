#!/usr/bin/env python3
"""Time ipchains-translate on generated scripts of 10,000 and 100,000 rules.

For each size and output format, N runs (default 3) of translate(): the
best and worst wall seconds, and the CPU seconds (user + system) of the
whole process tree in the best run: this process and everything it
started, the sandbox's bash included.  bubblewrap does not wait for its
pid-namespace init, so that init's CPU (bash's) would be lost to
RUSAGE_CHILDREN: this process becomes a child subreaper and reaps it.
Then the load average, since other work on the machine slows both.
Targets (issue 11): linear growth; 10k rules <= 1 s, 100k rules <= 10 s
per format.  bench.py runs this with no arguments.
"""
import argparse
import ctypes
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from translate.pipeline import translate  # noqa: E402
from translate.semantics import Options  # noqa: E402

FORMATS = ("iptables", "iptables-restore", "nft")


def script(count):
    """Return an ipchains script of COUNT rules over a few chains, with REDIRECT and MASQ."""
    lines = ["#!/bin/sh", "IPCHAINS=/sbin/ipchains", "LAN=192.0.2.0/24",
             "$IPCHAINS -P input DENY", "$IPCHAINS -P forward DENY",
             "$IPCHAINS -N svc", "$IPCHAINS -A input -j svc"]
    kinds = (
        "$IPCHAINS -A input -p tcp -s $LAN -d 198.51.100.%d/32 %d -j ACCEPT",
        "$IPCHAINS -A svc -p udp -s 203.0.113.%d/32 -d 0/0 %d -j DENY -l",
        "$IPCHAINS -A forward -p tcp -s 192.0.2.%d/32 -d 0/0 %d -j MASQ",
        "$IPCHAINS -A input -p tcp -i eth1 -s 192.0.2.%d -d 0/0 %d -j REDIRECT 3128",
        "$IPCHAINS -A output -p icmp -s 0/0 echo-request -d 198.51.100.%d ! -f -j %s",
    )
    for i in range(count - 3):
        kind = kinds[i % len(kinds)]
        if "%s" in kind:
            lines.append(kind % (i % 250 + 1, "ACCEPT"))
        else:
            lines.append(kind % (i % 250 + 1, 1 + i % 65000))
    return "\n".join(lines) + "\n"


PR_SET_CHILD_SUBREAPER = 36


def become_subreaper():
    """Adopt orphaned descendants (bwrap's init) so their CPU time reaches us when reaped."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


def reap_all():
    """Wait for every descendant left (adopted ones too), so their CPU is counted."""
    while True:
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            return


def timed(text, fmt):
    """Return (wall s, CPU s of the process tree, Result) of one translation of TEXT to FMT."""
    before, start = os.times(), time.perf_counter()
    result = translate([("bench.sh", text)], Options(fmt=fmt))
    wall = time.perf_counter() - start
    reap_all()
    after = os.times()
    cpu = sum(after[:4]) - sum(before[:4])     # user, system, children's user, system
    return wall, cpu, result


def arguments(argv):
    """Return the parsed command line (argparse exits 2 with a usage line on bad input)."""
    parser = argparse.ArgumentParser(
        prog="translate_bench.py", description=__doc__.split("\n\n")[0],
        epilog="Prints one line per size and format: best wall s (worst), CPU s of the "
               "best run, output lines, exit status; then the load average.")
    parser.add_argument("--repeat", type=positive, default=3, metavar="N",
                        help="runs per size and format (default 3)")
    parser.add_argument("counts", nargs="*", type=positive, metavar="COUNT",
                        help="rules per generated script (default 10000 100000)")
    return parser.parse_args(argv)


def positive(text):
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError("not a number: %r" % text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1: %r" % text)
    return value


def main(argv):
    args = arguments(argv)
    become_subreaper()
    for count in args.counts or [10000, 100000]:
        text = script(count)
        for fmt in FORMATS:
            runs = [timed(text, fmt) for _ in range(args.repeat)]
            wall, cpu, result = min(runs, key=lambda run: run[0])
            worst = max(run[0] for run in runs)
            print("%7d rules  %-17s %6.2f s (worst %.2f)  CPU %.2f s  (%d output lines, exit %d)"
                  % (count, fmt, wall, worst, cpu, result.text.count("\n"), result.status))
    print("load average %.2f %.2f %.2f (best of %d runs; CPU: user+sys of the whole "
          "process tree, bash in the sandbox included)" % (os.getloadavg() + (args.repeat,)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
