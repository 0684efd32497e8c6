"""--source-ports: every upstream connection's local port comes from the range.

The range is honoured two ways (IP_LOCAL_PORT_RANGE inside the namespace's
net.ipv4.ip_local_port_range, explicit binds outside it), for IPv4 and IPv6,
with --source=client (transparent, IP_BIND_ADDRESS_NO_PORT), an address, or
nothing; the server (the `who` peer) says which address and port it saw.
"""
import json
import os
import subprocess

import pytest

from support import PEERS, PYTHON, REPO, tproxy_cmd, wait_for

RECIPES = os.path.join(REPO, "contrib", "firewall")
KERNEL_RANGE = (32768, 60999)       # the stock net.ipv4.ip_local_port_range, set in the lab
CLIENT4, CLIENT6 = "192.0.2.10", "2001:db8:1::10"
OWN4, OWN6 = "198.51.100.1", "2001:db8:2::1"


@pytest.mark.parametrize("args, message", [
    (["--source-ports=40000"], "--source-ports: '40000' is not LOW-HIGH (two port numbers)"),
    (["--source-ports=a-b"], "--source-ports: 'a-b' is not LOW-HIGH (two port numbers)"),
    (["--source-ports=-5"], "--source-ports: '-5' is not LOW-HIGH (two port numbers)"),
    (["--source-ports=0-10"], "--source-ports: '0-10' is not a range of ports (1-65535, LOW <= HIGH)"),
    (["--source-ports=2000-1000"], "--source-ports: '2000-1000' is not a range of ports"),
    (["--source-ports=60000-65536"], "--source-ports: '60000-65536' is not a range of ports"),
    (["--source=client-port", "--source-ports=40000-40999"],
     "--source-ports and --source=client-port exclude each other"),
])
def test_bad_source_ports_is_one_line_and_status_64(args, message):
    proc = subprocess.run(tproxy_cmd("-t", *args), capture_output=True, text=True, timeout=30,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 64, proc.stderr
    assert proc.stderr.startswith("tproxy: " + message), proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


def test_good_source_ports_parse():
    from tproxy import parse_args
    assert parse_args(["-t", "--source-ports=1-65535"]).source_ports == (1, 65535)
    assert parse_args(["-t", "--source=client", "--source-ports", "40000-40000"]).source_ports \
        == (40000, 40000)


@pytest.fixture
def proxy_lab(lab):
    """client -- proxy -- server, replies routed back to the proxy by destination port only.

    client 192.0.2.10 / 2001:db8:1::10 -- proxy 192.0.2.1 / 2001:db8:1::1;
    proxy 198.51.100.1 / 2001:db8:2::1 -- server 198.51.100.10 / 2001:db8:2::10,
    which runs `who` on port 80 and has no default route: only replies to
    ports 20000-20999 and 40000-40999 go back, via the proxy
    (contrib/firewall/server-return-route --dport). The proxy delivers them
    to its transparent sockets (contrib/firewall/proxy-return-path).
    """
    client, proxy, server = lab.host("client"), lab.host("proxy"), lab.host("server")
    lab.link(proxy, client, ["192.0.2.1/24", "2001:db8:1::1/64"], [CLIENT4 + "/24", CLIENT6 + "/64"])
    lab.link(proxy, server, [OWN4 + "/24", OWN6 + "/64"],
             ["198.51.100.10/24", "2001:db8:2::10/64"])
    client.run("ip", "route", "add", "default", "via", "192.0.2.1")
    client.run("ip", "-6", "route", "add", "default", "via", "2001:db8:1::1")
    for via in (OWN4, OWN6):
        for table, ports in ((201, "20000-20999"), (202, "40000-40999")):
            server.run("sh", os.path.join(RECIPES, "server-return-route"), "add", "--via", via,
                       "--dport", ports, "--table", table)
    proxy.sysctl("net.ipv4.ip_local_port_range", "%d %d" % KERNEL_RANGE)
    proxy.run("sh", os.path.join(RECIPES, "proxy-return-path"), "add")
    server.popen(PYTHON, PEERS, "who", 80, "--lifetime", 120)
    server.wait_listening(80)
    return proxy, server, client


# Runs inside the proxy namespace: HOLD connections at once through tproxy.connect,
# then one more; prints what each side saw as JSON.
CONNECT_ALL = r"""
import json, socket, sys
sys.path.insert(0, sys.argv[1])
import tproxy
cases = json.loads(sys.argv[2])
results = []
for family, server, client, source, low, high, hold in cases:
    fam = socket.AF_INET6 if family == 6 else socket.AF_INET
    addrs = [(fam, socket.SOCK_STREAM, 0, "", (server, 80))]
    held, seen = [], []
    for _ in range(hold):
        sock = tproxy.connect(addrs, 5, source, (client, 5555), None, ports=(low, high))
        held.append(sock)
        words = sock.makefile().readline().split()
        seen.append({"local": sock.getsockname()[1], "peer_ip": words[0], "peer_port": int(words[1])})
    try:
        tproxy.connect(addrs, 5, source, (client, 5555), None, ports=(low, high))
        beyond = "connected"
    except tproxy.ConnectionFailed as exc:
        beyond = str(exc)
    for sock in held:
        sock.close()
    results.append({"seen": seen, "beyond": beyond})
print(json.dumps(results))
"""

def source_cases():
    """Yield (id, family, server, client, source, expected peer address or None, base port)."""
    base = 0
    for family, server, client, own in ((4, "198.51.100.10", CLIENT4, OWN4),
                                        (6, "2001:db8:2::10", CLIENT6, OWN6)):
        for source, expected in (("client", client), (own, own), (None, own)):
            for inside in (True, False):
                # Each case its own ports: no four-tuple of one case meets the server's
                # TIME_WAIT of another.
                low = (40000 if inside else 20000) + base
                base += 20
                name = "ipv%d-%s-%s" % (family, "address" if source == own else source,
                                        "inside" if inside else "outside")
                yield name, family, server, client, source, expected, low


def test_source_ports_are_honoured(proxy_lab):
    """Ten connections held at once take ten distinct ports of a ten-port range; an 11th fails."""
    proxy, _, _ = proxy_lab
    cases = list(source_cases())
    argv = [[family, server, client, source, low, low + 9, 10]
            for _, family, server, client, source, _, low in cases]
    out = proxy.run(PYTHON, "-c", CONNECT_ALL, REPO, json.dumps(argv), timeout=120).stdout
    for (name, _, _, _, _, expected, low), result in zip(cases, json.loads(out)):
        ports = sorted(s["local"] for s in result["seen"])
        assert ports == list(range(low, low + 10)), (name, ports)
        for s in result["seen"]:
            # The server saw the connection come from the address and port tproxy bound.
            assert (s["peer_ip"], s["peer_port"]) == (expected, s["local"]), (name, s)
        # Inside, the kernel ran out of four-tuples at connect(); outside, tproxy's binds did.
        why = "Cannot assign requested address" if low >= KERNEL_RANGE[0] else \
            "every local port of --source-ports %d-%d is in use" % (low, low + 9)
        assert why in result["beyond"], (name, result["beyond"])


def test_kernel_alone_ignores_a_range_outside_its_own(proxy_lab):
    """Why tproxy binds itself outside ip_local_port_range: the kernel silently clamps the option."""
    proxy, _, _ = proxy_lab
    code = ("import socket, struct\n"
            "s = socket.socket()\n"
            "s.setsockopt(0, 51, struct.pack('=I', 20009 << 16 | 20000))\n"
            "s.connect(('198.51.100.10', 80))\n"
            "print(s.getsockname()[1])\n")
    port = int(proxy.run(PYTHON, "-c", code).stdout)
    assert KERNEL_RANGE[0] <= port <= KERNEL_RANGE[1], port


def test_start_up_reports_how_the_range_is_honoured(proxy_lab, open_tmp):
    """Outside the namespace's range: said once; fewer ports than --max-conns: warned."""
    proxy, _, _ = proxy_lab
    logs = []
    for port, ports in ((81, "20000-20009"), (82, "40000-49999")):
        err = str(open_tmp / ("tproxy-%d.err" % port))
        with open(err, "wb") as f:
            proxy.popen(*tproxy_cmd("-d", "-s", port, "-t", "--source=client",
                                    "--source-ports=" + ports, "--max-conns=512",
                                    "198.51.100.10", 80), stdout=f, stderr=f)
        proxy.wait_listening(port)
        logs.append(wait_for(lambda: "listening on" in open(err).read() and open(err).read(),
                             what="tproxy on port %d started" % port))
    small, large = logs
    assert "--source-ports 20000-20009: outside net.ipv4.ip_local_port_range 32768-60999" in small
    assert "--source-ports 20000-20009 holds 10 ports, fewer than --max-conns 512" in small
    assert "--source-ports" not in large, large


def test_a_port_outside_the_range_fails_the_connection_with_a_reset():
    """The check after connect(): a port the kernel gave outside the range is never used."""
    import socket
    from tproxy import ConnectionFailed, check_source_port
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        sock = socket.create_connection(listener.getsockname())
        port = sock.getsockname()[1]
        accepted, _ = listener.accept()
        check_source_port(sock, (port, port))          # inside: nothing happens
        outside = (1, 1) if port != 1 else (2, 2)
        with pytest.raises(ConnectionFailed) as failed:
            check_source_port(sock, outside)
        assert str(failed.value) == (
            "connect to 127.0.0.1:%d: the kernel gave local port %d, outside --source-ports "
            "%d-%d; closed" % (listener.getsockname()[1], port, outside[0], outside[1]))
        assert sock.fileno() == -1
        with pytest.raises(ConnectionResetError):
            accepted.recv(1)
        accepted.close()


@pytest.mark.parametrize("ports", ["20000-20999", "40000-40999"])
def test_tproxy_with_source_ports_behind_dport_return_routes(proxy_lab, open_tmp, ports):
    """A real tproxy -t --source=client --source-ports: the server sees the client, IPv4 and IPv6."""
    proxy, _, client = proxy_lab
    low, high = map(int, ports.split("-"))
    for port, target in ((81, "198.51.100.10"), (82, "2001:db8:2::10")):
        err = str(open_tmp / ("tproxy-%d.err" % port))
        with open(err, "wb") as f:
            proxy.popen(*tproxy_cmd("-d", "-s", port, "-r", "nobody", "-t", "--source=client",
                                    "--source-ports=" + ports, target, 80), stdout=f, stderr=f)
        proxy.wait_listening(port)
    for port, front, expected in ((81, "192.0.2.1", CLIENT4), (82, "2001:db8:1::1", CLIENT6)):
        for _ in range(5):
            words = subprocess.run(client.cmd(PYTHON, PEERS, "ask", front, port), input=b"",
                                   capture_output=True, timeout=30).stdout.decode().split()
            assert words[:1] == [expected], (words, open(str(open_tmp / ("tproxy-%d.err" % port))).read())
            assert low <= int(words[1]) <= high, words
