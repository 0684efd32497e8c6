#!/usr/bin/env python3
"""What a node leaving (and coming back) does to the connections held by the others.

Builds the scale-out lab of tests/scale_lab.py (three tproxy nodes, bird2
BGP, ECMP router with layer-4 hashing), holds LONG IPv4 connections spread over
the nodes, stops one node's tproxy (its route is withdrawn), and counts, per
surviving node, the held connections that no longer echo; then starts it
again and counts, among connections opened while it was away, those its
return breaks, and how many new connections it then gets. Routing on the router, one of:

  bird      the multipath route bird2 installs (RTA_MULTIPATH: hash-threshold)
  resilient the same next hops in a kernel resilient nexthop group
            (ip nexthop ... type resilient), kept in step with bird's route by
            contrib/scale-out/ecmp-resilient

Run as root: python3 bench/ecmp_failover.py [--long N] [--leaving node1|node2|node3]...
Prints one Markdown table row per run.
"""
import argparse
import os
import pathlib
import shutil
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

from lab import Lab  # noqa: E402
from scale_lab import NODES, Failure, ScaleOutLab, node_of_port  # noqa: E402

NAMES = sorted(plan.name for plan in NODES)
NEW = 90        # new connections made once the node is back


def broken(held, alive, leaving=None):
    """Return {node: "broken/held"} for the held connections, leaving out LEAVING."""
    on = [node_of_port(port) for port in held.ports]
    out = {}
    for name in NAMES:
        if name == leaving:
            continue
        mine = [ok for ok, node in zip(alive, on) if node == name]
        out[name] = "%d/%d" % (mine.count(False), len(mine))
    return out


def run(mode, leaving, count):
    tmp = tempfile.mkdtemp(prefix="ecmp-failover-")
    try:
        with Lab("ecmp") as lab:
            scale = ScaleOutLab(lab, pathlib.Path(tmp))
            scale.start(resilient=mode == "resilient")
            route = scale.router.run("ip", "-d", "route", "show", "table", "main").stdout
            held = scale.hold(4, count)
            assert all(held.check())
            node = next(n for n in scale.nodes if n.name == leaving)
            scale.stop_tproxy(node)
            scale.wait_next_hops(set(NAMES) - {leaving}, timeout=15)
            after_leave = broken(held, held.check(), leaving)
            # Connections made while it is away; its return may move them.
            meanwhile = scale.hold(4, count)
            assert all(meanwhile.check())
            scale.start_tproxy(node)
            scale.wait_next_hops(NAMES, timeout=15)
            after_return = broken(meanwhile, meanwhile.check(), leaving)
            made = scale.connect_many(4, NEW, 16)
            failed = [r for r in made if isinstance(r, Failure)]
            if failed:
                raise SystemExit("fresh connections failed: %s\n%s" % (failed, scale.diagnostics(4)))
            fresh = [node_of_port(port) for _, port in made]
            held.close()
            meanwhile.close()
            return route, after_leave, after_return, fresh.count(leaving)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--long", type=int, default=300)
    parser.add_argument("--mode", action="append", choices=["bird", "resilient"])
    parser.add_argument("--leaving", action="append", choices=NAMES)
    args = parser.parse_args()
    print("| routing | leaving | the others' connections broken by its leaving | "
          "connections made while it was away, broken by its return | "
          "of %d new connections then, to it |" % NEW)
    print("|---|---|---|---|---|")
    for mode in args.mode or ["bird", "resilient"]:
        for leaving in args.leaving or NAMES:
            route, leave, back, fresh = run(mode, leaving, args.long)
            print("| %s | %s | %s | %s | %d |" % (
                mode, leaving, ", ".join("%s %s" % kv for kv in leave.items()),
                ", ".join("%s %s" % kv for kv in back.items()), fresh), flush=True)
    print("\nthe router's routes (last run):\n" + route)


if __name__ == "__main__":
    main()
