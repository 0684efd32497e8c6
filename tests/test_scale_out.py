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
from scale_lab import FAMILIES, Failure, NODES, SCALE_OUT, ScaleOutLab, node_of_port

pytestmark = pytest.mark.skipif(not (have("bird") and have("birdc")),
                                reason="bird2 is needed (tools/install-deps installs it)")

TOTAL, PARALLEL, LONG = 300, 24, 30
NAMES = {plan.name for plan in NODES}


def served_by(scale, seen, family):
    """Return {node name: connections} for what the server SEEN, checking each came from the client.

    Failed connections fail the test with how each failed and SCALE's diagnostics.
    """
    failed = [r for r in seen if isinstance(r, Failure)]
    assert not failed, "IPv%d: %d of %d connections failed:\n%s\n%s" % (
        family, len(failed), len(seen), "\n".join(map(str, failed)), scale.diagnostics(family))
    assert {addr for addr, _ in seen} == {FAMILIES[family].client}
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
    end one leaves, and still no other connection moves. IPv4 and IPv6 alike.
    """
    scale = ScaleOutLab(lab, open_tmp)
    scale.start(resilient=routing == "resilient")

    # Hundreds of connections: all served, by every node in a fair share, the server
    # seeing the client's own address on each. IPv6 first, right after start(): its
    # first SYNs are the ones that catch a lab not yet settled (see ScaleOutLab.start).
    for family, total in ((6, TOTAL // 2), (4, TOTAL)):
        share = served_by(scale, scale.connect_many(family, total, PARALLEL), family)
        assert set(share) == NAMES, share
        assert min(share.values()) >= total // 3 // 2, share

    # Long connections through every node, then one node's tproxies stop.
    held = {family: scale.hold(family, LONG) for family in FAMILIES}
    on = {family: [node_of_port(port) for port in h.ports] for family, h in held.items()}
    for family, h in held.items():
        assert set(on[family]) == NAMES, (family, on[family])
        assert all(h.check())
    leaving = scale.nodes[leaving]
    scale.stop_tproxy(leaving)
    # Its announcements go, and with them the router's next hops.
    scale.wait_next_hops(NAMES - {leaving.name}, timeout=15)

    for family, h in held.items():
        # New connections all reach the others.
        share = served_by(scale, scale.connect_many(family, TOTAL // 2, PARALLEL), family)
        assert set(share) == NAMES - {leaving.name}, share
        # The long connections held through the other nodes keep working.
        alive = h.check()
        kept = [ok for ok, node in zip(alive, on[family]) if node != leaving.name]
        assert kept and all(kept), (family, list(zip(on[family], alive)))
        assert not any(ok for ok, node in zip(alive, on[family]) if node == leaving.name)
        h.close()

    # The check loops stopped (TERM) withdraw their node on the way out; killed, they
    # cannot, and the withdraw command (the unit's ExecStopPost) does.
    first, last = [n for n in scale.nodes if n is not leaving]
    for proc in first.announce.values():
        stop(proc)
    scale.wait_next_hops({last.name}, timeout=15)
    for family, proc in last.announce.items():
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        last.host.run("sh", os.path.join(SCALE_OUT, "tproxy-announce"), "withdraw",
                      "--protocol", FAMILIES[family].protocol,
                      "--socket", scale.path(last.name, "ctl"))
    scale.wait_next_hops(set(), timeout=15)
