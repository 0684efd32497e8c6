#!/usr/bin/env python3
"""Time ipchains-translate on generated scripts of 10,000 and 100,000 rules.

Usage: python3 bench/translate_bench.py [--repeat N] [COUNT...]
Prints, for each size and output format, the best of N runs (default 3):
wall seconds, and the CPU seconds of this process and its children (the
flat formats run the script in bash, in the sandbox) in that run; then
the load average, since other work on the machine slows both.
Targets: linear growth; 10k rules <= 1 s, 100k rules <= 10 s per format.
"""
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


def timed(text, fmt):
    """Return (wall s, CPU s with children, Result) of one translation of TEXT to FMT."""
    before, start = os.times(), time.perf_counter()
    result = translate([("bench.sh", text)], Options(fmt=fmt))
    wall, after = time.perf_counter() - start, os.times()
    cpu = sum(after[:4]) - sum(before[:4])     # user, system, children's user, system
    return wall, cpu, result


def main(argv):
    repeat = 3
    if argv[:1] == ["--repeat"]:
        repeat, argv = max(1, int(argv[1])), argv[2:]
    counts = [int(a) for a in argv] or [10000, 100000]
    for count in counts:
        text = script(count)
        for fmt in FORMATS:
            wall, cpu, result = min((timed(text, fmt) for _ in range(repeat)),
                                    key=lambda run: run[0])
            print("%7d rules  %-17s %6.2f s  (CPU %.2f s; %d output lines, exit %d)"
                  % (count, fmt, wall, cpu, result.text.count("\n"), result.status))
    print("load average %.2f %.2f %.2f (best of %d runs)" % (os.getloadavg() + (repeat,)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
