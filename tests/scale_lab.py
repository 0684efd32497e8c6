"""The scale-out lab: tproxy nodes behind a BGP-fed ECMP router, one server behind them.

    client 192.0.2.10 -- 192.0.2.1 router (bird2, ECMP, L4 hash)
                                   | bridge "front" 198.51.100.1/24
           node1 .11  node2 .12  node3 .13   each: 203.0.113.80/32 on lo, bird2
                                             announcing it, tproxy -t --source=client
                                             --source-ports=its range, tproxy-announce
           | bridge "back" 203.0.113.128/25, nodes .131 .132 .133
    server 203.0.113.140 (`who-echo` on port 80): no default route, one
           server-return-route --dport rule and table per node

and the same in IPv6 (FAMILIES): client 2001:db8:1::10, front 2001:db8:f::/64,
service 2001:db8:80::80, back 2001:db8:b::/64, server 2001:db8:b::140; one
BGP session per node carries both families, each node runs one tproxy and
one tproxy-announce loop per family.

Everything comes from contrib/ as shipped: the bird configurations (with
this node's addresses and the socket paths filled in), tproxy-announce,
ecmp-resilient and the firewall recipes. Used by tests/test_scale_out.py and
by bench/ecmp_failover.py, which measures what a leaving node does to the
connections of the others.
"""
import collections
import json
import os
import re
import subprocess

from lab import stop
from support import PEERS, PYTHON, REPO, tproxy_cmd, wait_for

SCALE_OUT = os.path.join(REPO, "contrib", "scale-out")
RECIPES = os.path.join(REPO, "contrib", "firewall")

Family = collections.namedtuple(
    "Family", "client router_in front_net back_net service server protocol group")
FAMILIES = {
    4: Family("192.0.2.10", "192.0.2.1/24", "198.51.100.1/24", "203.0.113.140/25",
              "203.0.113.80/32", "203.0.113.140", "service", 4000),
    6: Family("2001:db8:1::10", "2001:db8:1::1/64", "2001:db8:f::1/64", "2001:db8:b::140/64",
              "2001:db8:80::80/128", "2001:db8:b::140", "service6", 5000),
}
NodePlan = collections.namedtuple("NodePlan", "name front back ports table")
# front, back: {family: address on the front (router) and back (server) bridge}.
# node1's range lies below the stock ip_local_port_range (tproxy binds its ports);
# the others inside it (IP_LOCAL_PORT_RANGE).
NODES = (
    NodePlan("node1", {4: "198.51.100.11", 6: "2001:db8:f::11"},
             {4: "203.0.113.131", 6: "2001:db8:b::131"}, (20000, 20999), 201),
    NodePlan("node2", {4: "198.51.100.12", 6: "2001:db8:f::12"},
             {4: "203.0.113.132", 6: "2001:db8:b::132"}, (40000, 40999), 202),
    NodePlan("node3", {4: "198.51.100.13", 6: "2001:db8:f::13"},
             {4: "203.0.113.133", 6: "2001:db8:b::133"}, (41000, 41999), 203),
)

# The route bird installs, and ecmp-resilient's mirror of it (via a resilient nexthop group).
BIRD_ROUTE, MIRROR = ("proto", "bird"), ("metric", "1")


def node_of_port(port):
    """Return the name of the node whose --source-ports hold PORT, or None."""
    for plan in NODES:
        if plan.ports[0] <= port <= plan.ports[1]:
            return plan.name
    return None


def address(cidr):
    """Return the address part of CIDR."""
    return cidr.split("/")[0]


def with_prefix(addr, family):
    """Return ADDR with the prefix length of the lab's networks of FAMILY (/24 or /64)."""
    return addr + ("/64" if family == 6 else "/24")


def shipped(name, replace=()):
    """Return contrib/scale-out/NAME, each (pattern, text) of REPLACE applied exactly once."""
    with open(os.path.join(SCALE_OUT, name)) as f:
        text = f.read()
    for pattern, new in replace:
        text, n = re.subn(pattern, new, text, flags=re.MULTILINE)
        assert n == 1, "%s: %r matched %d times" % (name, pattern, n)
    return text


class Node:
    """One tproxy node: its host, its plan (NodePlan), and its processes by family."""

    def __init__(self, host, plan):
        self.host, self.plan, self.name = host, plan, plan.name
        self.tproxy, self.announce = {}, {}


class ScaleOutLab:
    """Builds the picture above in LAB, with files in TMP; nothing runs until start()."""

    def __init__(self, lab, tmp):
        self.lab, self.tmp = lab, tmp
        self.routes = (BIRD_ROUTE,)     # the router's routes to the service that wait_next_hops checks
        os.chmod(str(tmp), 0o755)       # root writes the pid files before tproxy becomes nobody (tproxy(8), FILES)
        self.client = lab.host("client")
        self.router = lab.host("router", forwarding=True)
        self.server = lab.host("server")
        for v in ("ipv4", "ipv6"):
            self.router.sysctl("net.%s.fib_multipath_hash_policy" % v, 1)
        lab.link(self.router, self.client, [f.router_in for f in FAMILIES.values()],
                 [with_prefix(f.client, v) for v, f in FAMILIES.items()])
        for v, fam in FAMILIES.items():
            self.client.run("ip", "-%d" % v, "route", "add", "default", "via",
                            address(fam.router_in))
        bridge(self.router, "front", [f.front_net for f in FAMILIES.values()])
        bridge(self.server, "back", [f.back_net for f in FAMILIES.values()])
        self.nodes = []
        for plan in NODES:
            host = lab.host(plan.name)
            port_r, _ = lab.link(self.router, host, [],
                                 [with_prefix(plan.front[v], v) for v in FAMILIES])
            self.router.run("ip", "link", "set", port_r, "master", "front")
            port_s, _ = lab.link(self.server, host, [],
                                 [plan.back[v] + "/" + f.back_net.split("/")[1]
                                  for v, f in FAMILIES.items()])
            self.server.run("ip", "link", "set", port_s, "master", "back")
            for v, fam in FAMILIES.items():
                host.run("ip", "addr", "add", fam.service, "dev", "lo")
                host.run("ip", "-%d" % v, "route", "add", "default", "via",
                         address(fam.front_net))
                self.server.run("sh", os.path.join(RECIPES, "server-return-route"), "add",
                                "--via", plan.back[v], "--dport", "%d-%d" % plan.ports,
                                "--table", plan.table)
            host.sysctl("net.ipv4.ip_local_port_range", "32768 60999")
            host.run("sh", os.path.join(RECIPES, "proxy-return-path"), "add")
            self.nodes.append(Node(host, plan))

    def start(self, resilient=False):
        """Start the server, bird everywhere, tproxy and tproxy-announce on every node, and
        (RESILIENT) ecmp-resilient on the router; wait until every node is a next hop and
        IPv6 neighbour discovery works on every link (Host.ipv6_settled)."""
        self.server.popen(PYTHON, PEERS, "who-echo", 80, "--lifetime", 300)
        self.server.wait_listening(80)
        self.bird(self.router, "router", shipped("bird-router.conf"))
        for node in self.nodes:
            self.bird(node.host, node.name, shipped("bird-node.conf", [
                (r"^define NODE_ADDR = [0-9.]+;", "define NODE_ADDR = %s;" % node.plan.front[4]),
                (r"^define NODE_ADDR6 = [0-9a-f:]+;",
                 "define NODE_ADDR6 = %s;" % node.plan.front[6])]))
            self.start_tproxy(node)
            for v, fam in FAMILIES.items():
                with open(self.path(node.name, "announce%d" % v), "wb") as err:
                    node.announce[v] = node.host.popen(
                        "sh", os.path.join(SCALE_OUT, "tproxy-announce"), "watch",
                        "--pidfile", self.path(node.name, "pid%d" % v), "--port", 80,
                        "--protocol", fam.protocol, "--socket", self.path(node.name, "ctl"),
                        "--interval", "0.5", stdout=subprocess.DEVNULL, stderr=err)
        if resilient:
            self.start_resilient()
            self.routes = (BIRD_ROUTE, MIRROR)
        self.wait_next_hops({node.name for node in self.nodes})
        # A client's SYN held back by neighbour discovery (no NS while a link-local is
        # tentative) is retransmitted after 1 s with a new txhash, which the router's
        # ECMP takes from the skb (veth keeps the sender's hash): the copy goes to another
        # node, both answer, and the client is reset.
        self.lab.wait_ipv6_settled()

    def path(self, name, what):
        """Return the lab file WHAT (pid4, ctl, err, ...) of host NAME."""
        return str(self.tmp / ("%s.%s" % (name, what)))

    def bird(self, host, name, conf):
        """Run bird2 in HOST's namespace with CONF, its own control socket, in the foreground."""
        path = self.path(name, "bird.conf")
        with open(path, "w") as f:
            f.write(conf)
        host.run("bird", "-p", "-c", path)
        with open(self.path(name, "bird.err"), "wb") as err:
            host.popen("bird", "-f", "-c", path, "-s", self.path(name, "ctl"),
                       "-P", self.path(name, "bird.pid"), stdout=subprocess.DEVNULL, stderr=err)

    def start_tproxy(self, node):
        """Start NODE's tproxies, one per family: -t --source=client --source-ports, to the server."""
        for v, fam in FAMILIES.items():
            service = address(fam.service)
            with open(self.path(node.name, "err%d" % v), "ab") as err:
                node.tproxy[v] = node.host.popen(*tproxy_cmd(
                    "-d", "-s", 80, "-b", service, "-P", self.path(node.name, "pid%d" % v),
                    "-r", "nobody", "-t", "--source=client", "--source-ports=%d-%d" % node.plan.ports,
                    fam.server, 80), stdout=err, stderr=err)
            shown = "[%s]" % service if v == 6 else service
            wait_for(lambda: node.host.run("ss", "-Hltn", "src %s:80" % shown).stdout.strip(),
                     what="%s's tproxy listening on %s port 80" % (node.name, shown))

    def stop_tproxy(self, node):
        """Stop NODE's tproxies (by pid) and everything they forked."""
        for proc in node.tproxy.values():
            stop(proc)

    def start_resilient(self):
        """Run contrib/scale-out/ecmp-resilient on the router, one per service address."""
        for v, fam in FAMILIES.items():
            with open(self.path("router", "resilient%d" % v), "wb") as err:
                self.router.popen("sh", os.path.join(SCALE_OUT, "ecmp-resilient"), "watch",
                                  "--prefix", fam.service, "--id", fam.group, "--interval", "0.2",
                                  stdout=subprocess.DEVNULL, stderr=err)

    def next_hops(self, family, route=BIRD_ROUTE):
        """Return the sorted gateways of the router's ROUTE (BIRD_ROUTE or MIRROR) to the service."""
        out = self.router.run("ip", "-%d" % family, "route", "show", FAMILIES[family].service,
                              *route).stdout
        return sorted(re.findall(r"via ([0-9a-f.:]+)", out))

    def wait_next_hops(self, names, timeout=30.0):
        """Wait until the router's routes to the service (bird's, and the resilient group's
        mirror once started), both families, go via nodes NAMES."""
        for family in FAMILIES:
            wanted = sorted(p.front[family] for p in NODES if p.name in names)
            for route in self.routes:
                wait_for(lambda: self.next_hops(family, route) == wanted, timeout=timeout,
                         interval=0.1, what="router's IPv%d next hops %s (have %s; bird: %s)" % (
                             family, wanted, self.next_hops(family, route),
                             self.bird_protocols()))

    def bird_protocols(self):
        """Return the router's `birdc show protocols` (for failure messages)."""
        return self.router.run("birdc", "-s", self.path("router", "ctl"), "show", "protocols",
                               check=False).stdout

    def connect_many(self, family, total, parallel):
        """Make TOTAL short connections to the service, PARALLEL at a time, from the client.

        Return one (peer address, peer port) the server saw per connection, or
        a Failure saying in which phase and how a connection failed.
        """
        code = CONNECT_MANY % (address(FAMILIES[family].service), parallel, total)
        lines = self.client.run(PYTHON, "-c", code, timeout=240).stdout.splitlines()
        assert len(lines) == total, lines
        results = [json.loads(line) for line in lines]
        return [Failure(*r) if len(r) == 4 else (r[0], r[1]) for r in results]

    def diagnostics(self, family):
        """Return what explains failed connections of FAMILY: the nodes' tproxy logs, and the
        routes, neighbours and TCP counters of the router, the nodes and the server."""
        parts = []
        for node in self.nodes:
            for what in ("err%d" % family, "announce%d" % family):
                with open(self.path(node.name, what), errors="replace") as f:
                    parts.append("--- %s %s:\n%s" % (node.name, what, f.read()[-20000:]))
        for host in [self.router] + [node.host for node in self.nodes] + [self.server]:
            for argv in (("ip", "-%d" % family, "route", "show", "table", "all"),
                         ("ip", "-%d" % family, "neigh"), ("ip", "-%d" % family, "rule"),
                         ("nstat", "-as")):
                out = host.run(*argv, check=False)
                parts.append("--- %s: %s\n%s%s" % (host.name, " ".join(argv), out.stdout,
                                                     out.stderr))
        return "\n".join(parts)

    def hold(self, family, count):
        """Open COUNT long connections from the client to the service; return a Holder."""
        return Holder(self.client, address(FAMILIES[family].service), count)


Failure = collections.namedtuple("Failure", "index phase error seconds")
# phase: "connect", "recv" (reading the server's line) or "empty" (closed before a line);
# error: the exception (type and message); seconds: from the start of the attempt.

# Runs in the client: make N connections, P at a time, to ADDR port 80; print one JSON
# line per connection, in order: [peer address, peer port] as the server saw them,
# or [index, phase, error, seconds] for one that failed.
CONNECT_MANY = r"""
import json, socket, time
from concurrent.futures import ThreadPoolExecutor
def one(i):
    start, phase = time.monotonic(), "connect"
    try:
        with socket.create_connection((%r, 80), timeout=20) as s:
            phase = "recv"
            words = s.makefile().readline().split()
        if words:
            return [words[0], int(words[1])]
        phase, error = "empty", "end of stream before a line"
    except OSError as exc:
        error = "%%s: %%s" %% (type(exc).__name__, exc)
    return [i, phase, error, round(time.monotonic() - start, 3)]
with ThreadPoolExecutor(%d) as pool:
    for result in pool.map(one, range(%d)):
        print(json.dumps(result))
"""


# Runs in the client: open N echo connections, report the port the server saw for
# each; on each "check" line from stdin, send on every connection and report which
# came back; exit on EOF.
HOLD = r"""
import json, socket, sys
n = int(sys.argv[1])
conns, ports = [], []
for i in range(n):
    s = socket.create_connection((sys.argv[2], 80), timeout=20)
    f = s.makefile("rb")
    ports.append(int(f.readline().split()[1]))
    conns.append((s, f))
print(json.dumps(ports), flush=True)
for line in sys.stdin:
    ok = []
    for i, (s, f) in enumerate(conns):
        try:
            s.sendall(b"ping %d\n" % i)
            ok.append(f.readline() == b"ping %d\n" % i)
        except OSError:
            ok.append(False)
    print(json.dumps(ok), flush=True)
"""


class Holder:
    """Long connections from the client through the nodes, kept open and checked on demand."""

    def __init__(self, client, service, count):
        self.proc = client.popen(PYTHON, "-c", HOLD, count, service, stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        assert line, "the long connections could not be opened"
        self.ports = json.loads(line)

    def check(self):
        """Send a line on every connection; return, per connection, whether it came back."""
        self.proc.stdin.write("check\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self):
        """Close the connections (end of input ends the holder) and its pipes."""
        self.proc.stdin.close()
        self.proc.wait(30)
        self.proc.stdout.close()


def bridge(host, name, addresses):
    """Make a bridge NAME with ADDRESSES in HOST (the veth ends are enslaved to it later)."""
    host.run("ip", "link", "add", name, "type", "bridge")
    for addr in addresses:
        host.run("ip", "addr", "add", addr, "dev", name, *(["nodad"] if ":" in addr else []))
    host.run("ip", "link", "set", name, "up")
