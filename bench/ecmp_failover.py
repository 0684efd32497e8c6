#!/usr/bin/env python3
"""What a node leaving (and coming back) does to the connections held by the others.

Builds the scale-out lab of tests/scale_lab.py (three tproxy nodes, bird2
BGP, ECMP router with layer-4 hashing), holds LONG connections spread over
the nodes, stops one node's tproxy (its route is withdrawn), and counts, per
surviving node, the held connections that no longer echo; then starts it
again and counts, among connections opened while it was away, those its
return breaks. Routing on the router, one of:

  bird      the multipath route bird2 installs (RTA_MULTIPATH: hash-threshold)
  resilient the same next hops in a kernel resilient nexthop group
            (ip nexthop ... type resilient), kept in step with bird's route by
            this script, as a routing daemon with nexthop-object support would

Run as root: python3 bench/ecmp_failover.py [--long N] [--leaving node1|node2|node3]...
Prints one Markdown table row per run.
"""
import argparse
import os
import shutil
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

from lab import Lab  # noqa: E402
from scale_lab import NODES, SERVICE, ScaleOutLab, node_of_port  # noqa: E402

FRONTS = {name: front for name, front, _, _, _ in NODES}
GROUP, BUCKETS = 100, 128


def resilient(scale, members):
    """Point the service at a resilient group of MEMBERS (node names), ahead of bird's route."""
    router = scale.router
    for i, (name, front) in enumerate(sorted(FRONTS.items()), 1):
        router.run("ip", "nexthop", "replace", "id", i, "via", front, "dev", "front")
    ids = "/".join(str(i) for i, name in enumerate(sorted(FRONTS), 1) if name in members)
    router.run("ip", "nexthop", "replace", "id", GROUP, "group", ids, "type", "resilient",
               "buckets", BUCKETS)
    # bird's route has metric 32; this one wins while it exists.
    router.run("ip", "route", "replace", SERVICE + "/32", "nhid", GROUP, "metric", 1)


def broken(held, alive, leaving=None):
    """Return {node: "broken/held"} for the held connections, leaving out LEAVING."""
    on = [node_of_port(port) for port in held.ports]
    out = {}
    for name in sorted(FRONTS):
        if name == leaving:
            continue
        mine = [ok for ok, node in zip(alive, on) if node == name]
        out[name] = "%d/%d" % (mine.count(False), len(mine))
    return out


def run(mode, leaving, count):
    tmp = tempfile.mkdtemp(prefix="ecmp-failover-")
    try:
        with Lab("ecmp") as lab:
            scale = ScaleOutLab(lab, __import__("pathlib").Path(tmp))
            scale.start()
            scale.wait_next_hops(FRONTS.values())
            route = scale.router.run("ip", "-d", "route", "show", SERVICE + "/32").stdout
            if mode == "resilient":
                resilient(scale, FRONTS)
            held = scale.hold(count)
            assert all(held.check())
            node = next(n for n in scale.nodes if n.name == leaving)
            scale.stop_tproxy(node)
            scale.wait_next_hops([f for n, f in FRONTS.items() if n != leaving], timeout=15)
            if mode == "resilient":
                resilient(scale, set(FRONTS) - {leaving})
            after_leave = broken(held, held.check(), leaving)
            # Connections made while it is away; its return may move them.
            meanwhile = scale.hold(count)
            assert all(meanwhile.check())
            scale.start_tproxy(node)
            scale.wait_next_hops(FRONTS.values(), timeout=15)
            if mode == "resilient":
                resilient(scale, FRONTS)
            after_return = broken(meanwhile, meanwhile.check(), leaving)
            return route, after_leave, after_return
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--long", type=int, default=300)
    parser.add_argument("--mode", action="append", choices=["bird", "resilient"])
    parser.add_argument("--leaving", action="append", choices=sorted(FRONTS))
    args = parser.parse_args()
    print("| routing | leaving | the others' connections broken by its leaving | "
          "connections made while it was away, broken by its return |")
    print("|---|---|---|---|")
    for mode in args.mode or ["bird", "resilient"]:
        for leaving in args.leaving or sorted(FRONTS):
            route, leave, back = run(mode, leaving, args.long)
            print("| %s | %s | %s | %s |" % (
                mode, leaving, ", ".join("%s %s" % kv for kv in leave.items()),
                ", ".join("%s %s" % kv for kv in back.items())), flush=True)
    print("\nbird's route: " + " ".join(route.split()))


if __name__ == "__main__":
    main()
