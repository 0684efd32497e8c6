"""The scale-out lab: tproxy nodes behind a BGP-fed ECMP router, one server behind them.

    client 192.0.2.10 -- 192.0.2.1 router (bird2, ECMP, L4 hash)
                                   | bridge "front" 198.51.100.1/24
           node1 .11  node2 .12  node3 .13   each: 203.0.113.80/32 on lo, bird2
                                             announcing it, tproxy -t --source=client
                                             --source-ports=its range, tproxy-announce
           | bridge "back" 203.0.113.128/25, nodes .131 .132 .133
    server 203.0.113.140 (`who-echo` on port 80): no default route, one
           server-return-route --dport rule and table per node

Everything comes from contrib/ as shipped: the bird configurations (with
this node's address and the socket paths filled in), tproxy-announce, and
the firewall recipes. Used by tests/test_scale_out.py and by
bench/ecmp_failover.py, which measures what a leaving node does to the
connections of the others.
"""
import json
import os
import re
import subprocess

from lab import stop
from support import PEERS, PYTHON, REPO, tproxy_cmd, wait_for

SCALE_OUT = os.path.join(REPO, "contrib", "scale-out")
RECIPES = os.path.join(REPO, "contrib", "firewall")

CLIENT, ROUTER_IN, ROUTER_FRONT = "192.0.2.10", "192.0.2.1", "198.51.100.1"
SERVICE, SERVER = "203.0.113.80", "203.0.113.140"
# (name, address on the front bridge, address on the back bridge, --source-ports, table)
# node1's range lies below the stock ip_local_port_range (tproxy binds its ports);
# the others inside it (IP_LOCAL_PORT_RANGE).
NODES = (("node1", "198.51.100.11", "203.0.113.131", (20000, 20999), 201),
         ("node2", "198.51.100.12", "203.0.113.132", (40000, 40999), 202),
         ("node3", "198.51.100.13", "203.0.113.133", (41000, 41999), 203))

# The route bird installs, and ecmp-resilient's mirror of it (via a resilient nexthop group).
BIRD_ROUTE, MIRROR = ("proto", "bird"), ("metric", "1")


def node_of_port(port):
    """Return the name of the node whose --source-ports hold PORT, or None."""
    for name, _, _, (low, high), _ in NODES:
        if low <= port <= high:
            return name
    return None


def shipped(name, replace=()):
    """Return contrib/scale-out/NAME, each (pattern, text) of REPLACE applied exactly once."""
    with open(os.path.join(SCALE_OUT, name)) as f:
        text = f.read()
    for pattern, new in replace:
        text, n = re.subn(pattern, new, text, flags=re.MULTILINE)
        assert n == 1, "%s: %r matched %d times" % (name, pattern, n)
    return text


class Node:
    """One tproxy node: its host, bird control socket, and processes."""

    def __init__(self, host, name, front, back, ports, table):
        self.host, self.name, self.front, self.back = host, name, front, back
        self.ports, self.table = ports, table
        self.tproxy = self.announce = None


class ScaleOutLab:
    """Builds the picture above in LAB, with files in TMP; nothing runs until start()."""

    def __init__(self, lab, tmp):
        self.lab, self.tmp = lab, tmp
        os.chmod(str(tmp), 0o777)       # tproxy runs as nobody and writes its pid file here
        self.client = lab.host("client")
        self.router = lab.host("router", forwarding=True)
        self.server = lab.host("server")
        self.router.sysctl("net.ipv4.fib_multipath_hash_policy", 1)
        lab.link(self.router, self.client, [ROUTER_IN + "/24"], [CLIENT + "/24"])
        self.client.run("ip", "route", "add", "default", "via", ROUTER_IN)
        bridge(self.router, "front", ROUTER_FRONT + "/24")
        bridge(self.server, "back", SERVER + "/25")
        self.nodes = []
        for name, front, back, ports, table in NODES:
            host = lab.host(name)
            port_r, _ = lab.link(self.router, host, [], [front + "/24"])
            self.router.run("ip", "link", "set", port_r, "master", "front")
            port_s, _ = lab.link(self.server, host, [], [back + "/25"])
            self.server.run("ip", "link", "set", port_s, "master", "back")
            host.run("ip", "addr", "add", SERVICE + "/32", "dev", "lo")
            host.run("ip", "route", "add", "default", "via", ROUTER_FRONT)
            host.sysctl("net.ipv4.ip_local_port_range", "32768 60999")
            host.run("sh", os.path.join(RECIPES, "proxy-return-path"), "add")
            self.server.run("sh", os.path.join(RECIPES, "server-return-route"), "add",
                            "--via", back, "--dport", "%d-%d" % ports, "--table", table)
            self.nodes.append(Node(host, name, front, back, ports, table))

    def start(self):
        """Start the server, bird everywhere, tproxy and tproxy-announce on every node."""
        self.server.popen(PYTHON, PEERS, "who-echo", 80, "--lifetime", 300)
        self.server.wait_listening(80)
        self.bird(self.router, "router", shipped("bird-router.conf"))
        for node in self.nodes:
            self.bird(node.host, node.name, shipped("bird-node.conf", [
                (r"^define NODE_ADDR = [0-9.]+;", "define NODE_ADDR = %s;" % node.front)]))
            self.start_tproxy(node)
            with open(self.path(node.name, "announce"), "wb") as err:
                node.announce = node.host.popen(
                    "sh", os.path.join(SCALE_OUT, "tproxy-announce"), "watch",
                    "--pidfile", self.path(node.name, "pid"), "--port", 80,
                    "--socket", self.path(node.name, "ctl"), "--interval", "0.5",
                    stdout=subprocess.DEVNULL, stderr=err)

    def path(self, name, what):
        """Return the lab file WHAT (pid, ctl, err, ...) of host NAME."""
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
        """Start NODE's tproxy: -t --source=client --source-ports=its range, to the server."""
        err = self.path(node.name, "err")
        with open(err, "ab") as f:
            node.tproxy = node.host.popen(*tproxy_cmd(
                "-d", "-s", 80, "-P", self.path(node.name, "pid"), "-r", "nobody", "-t",
                "--source=client", "--source-ports=%d-%d" % node.ports, SERVER, 80),
                stdout=f, stderr=f)
        node.host.wait_listening(80)

    def stop_tproxy(self, node):
        """Stop NODE's tproxy (by pid) and everything it forked."""
        stop(node.tproxy)

    def start_resilient(self):
        """Run contrib/scale-out/ecmp-resilient on the router for the service address."""
        with open(self.path("router", "resilient"), "wb") as err:
            self.router.popen("sh", os.path.join(SCALE_OUT, "ecmp-resilient"), "watch",
                              "--prefix", SERVICE + "/32", "--interval", "0.2",
                              stdout=subprocess.DEVNULL, stderr=err)

    def next_hops(self, route=BIRD_ROUTE):
        """Return the sorted gateways of the router's ROUTE to the service (BIRD_ROUTE or MIRROR)."""
        out = self.router.run("ip", "-4", "route", "show", SERVICE + "/32", *route).stdout
        return sorted(re.findall(r"via ([0-9.]+)", out))

    def wait_next_hops(self, wanted, timeout=30.0, route=BIRD_ROUTE):
        """Wait until the router's ROUTE to the service goes via exactly WANTED."""
        wanted = sorted(wanted)
        wait_for(lambda: self.next_hops(route) == wanted, timeout=timeout, interval=0.1,
                 what="router's next hops %s (have %s; bird: %s)" % (
                     wanted, self.next_hops(route), self.bird_protocols()))

    def bird_protocols(self):
        """Return the router's `birdc show protocols` (for failure messages)."""
        return self.router.run("birdc", "-s", self.path("router", "ctl"), "show", "protocols",
                               check=False).stdout

    def connect_many(self, total, parallel):
        """Make TOTAL short connections to the service, PARALLEL at a time, from the client.

        Return one (peer address, peer port) the server saw per connection, or
        None for a connection that failed.
        """
        code = ("import socket, sys\n"
                "from concurrent.futures import ThreadPoolExecutor\n"
                "def one(i):\n"
                "    try:\n"
                "        with socket.create_connection((%r, 80), timeout=20) as s:\n"
                "            line = s.makefile().readline().split()\n"
                "        return '%%s:%%s' %% (line[0], line[1]) if line else 'none'\n"
                "    except OSError as exc:\n"
                "        return 'none'\n"
                "with ThreadPoolExecutor(%d) as pool:\n"
                "    print(' '.join(pool.map(one, range(%d))))\n" % (SERVICE, parallel, total))
        words = self.client.run(PYTHON, "-c", code, timeout=240).stdout.split()
        assert len(words) == total, words
        return [None if w == "none" else (w.rsplit(":", 1)[0], int(w.rsplit(":", 1)[1]))
                for w in words]

    def hold(self, count):
        """Open COUNT long connections from the client; return a Holder."""
        return Holder(self.client, count)


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

    def __init__(self, client, count):
        self.proc = client.popen(PYTHON, "-c", HOLD, count, SERVICE, stdin=subprocess.PIPE,
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


def bridge(host, name, address):
    """Make a bridge NAME with ADDRESS in HOST (the veth ends are enslaved to it later)."""
    host.run("ip", "link", "add", name, "type", "bridge")
    host.run("ip", "addr", "add", address, "dev", name)
    host.run("ip", "link", "set", name, "up")
