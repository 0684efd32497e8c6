"""Scale out: three tproxy nodes behind a router that learns them over BGP (bird2).

The lab (tests/scale_lab.py) is built from contrib/scale-out and
contrib/firewall as shipped. Real BGP sessions, the kernel's ECMP with
layer-4 hashing on the router, --source=client with disjoint --source-ports
on the nodes, --dport return routes on the server.
"""
import collections
import os
import signal

import pytest

from lab import have, stop
from scale_lab import BIRD_ROUTE, CLIENT, MIRROR, NODES, SCALE_OUT, ScaleOutLab, node_of_port

pytestmark = pytest.mark.skipif(not (have("bird") and have("birdc")),
                                reason="bird2 is needed (tools/install-deps installs it)")

TOTAL, PARALLEL, LONG = 300, 24, 30


def served_by(seen):
    """Return {node name: connections} for what the server SEEN, checking each came from the client."""
    assert None not in seen, "%d of %d connections failed" % (seen.count(None), len(seen))
    assert {addr for addr, _ in seen} == {CLIENT}
    nodes = [node_of_port(port) for _, port in seen]
    assert None not in nodes, sorted(port for _, port in seen)
    return collections.Counter(nodes)


@pytest.mark.parametrize("routing, leaving", [("bird", 1), ("resilient", 2)])
def test_nodes_share_the_load_and_one_leaves_cleanly(lab, open_tmp, routing, leaving):
    """The load is shared; a node whose tproxy stops is withdrawn; the others' connections live.

    With bird's own multipath route (the kernel's hash-threshold ECMP) the
    middle one of the three next hops leaves: the nodes on either side keep
    their flows (an end one leaving would move half of its neighbour's:
    bench/results/2026-11-29-ecmp-failover.md). With contrib/scale-out's
    ecmp-resilient mirroring bird's route into a resilient nexthop group, an
    end one leaves, and still no other connection moves.
    """
    scale = ScaleOutLab(lab, open_tmp)
    scale.start()
    if routing == "resilient":
        scale.start_resilient()
    fronts = {name: front for name, front, _, _, _ in NODES}
    routes = [BIRD_ROUTE] + ([MIRROR] if routing == "resilient" else [])
    for route in routes:
        scale.wait_next_hops(fronts.values(), route=route)

    # Hundreds of connections: all served, by every node in a fair share, the server
    # seeing the client's own address on each.
    share = served_by(scale.connect_many(TOTAL, PARALLEL))
    assert set(share) == set(fronts), share
    assert min(share.values()) >= TOTAL // 3 // 2, share

    # Long connections through every node, then one node's tproxy stops.
    held = scale.hold(LONG)
    on = [node_of_port(port) for port in held.ports]
    assert set(on) == set(fronts), on
    assert all(held.check())
    leaving = scale.nodes[leaving]
    scale.stop_tproxy(leaving)
    # Its announcement goes, and with it the router's next hop.
    for route in routes:
        scale.wait_next_hops([f for n, f in fronts.items() if n != leaving.name], timeout=15,
                             route=route)

    # New connections all reach the others.
    share = served_by(scale.connect_many(TOTAL // 2, PARALLEL))
    assert set(share) == set(fronts) - {leaving.name}, share
    # The long connections held through the other nodes keep working.
    alive = held.check()
    kept = [ok for ok, node in zip(alive, on) if node != leaving.name]
    assert kept and all(kept), list(zip(on, alive))
    assert not any(ok for ok, node in zip(alive, on) if node == leaving.name)
    held.close()

    # The check loop stopped (TERM) withdraws its node on the way out; killed, it cannot,
    # and the withdraw command (the unit's ExecStopPost) does.
    first, last = [n for n in scale.nodes if n is not leaving]
    stop(first.announce)
    scale.wait_next_hops([last.front], timeout=15)
    os.killpg(last.announce.pid, signal.SIGKILL)
    last.announce.wait(10)
    last.host.run("sh", os.path.join(SCALE_OUT, "tproxy-announce"), "withdraw",
                  "--socket", scale.path(last.name, "ctl"))
    for route in routes:
        scale.wait_next_hops([], timeout=15, route=route)
