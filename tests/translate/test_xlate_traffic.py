"""Translated firewalls loaded into a router namespace, probed with real traffic.

inside (192.0.2.10) -- router (192.0.2.1 | 198.51.100.1) -- outside (198.51.100.20)

The gateway case (cases/gateway.ipchains) is translated to each format and
loaded into the router; every probe states what the ipchains firewall did.
The book's REDIR rule is loaded in both --redirect modes and must send the
client's web traffic for moose (203.0.113.80) to a local proxy on port 12970.
"""
import os
import subprocess
import sys
import tempfile

import pytest

from xlate_helpers import CASES, FORMATS, ROOT, needed_commands, run_tool

PEER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "netpeer.py")
PY = sys.executable
DROP_WAIT = 1.5        # seconds a dropped connection is given


def load(router, fmt, text):
    """Load translated TEXT of format FMT into ROUTER."""
    fd, path = tempfile.mkstemp(prefix="xlate", suffix=".rules")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    try:
        if fmt == "nft":
            router.run("nft", "-f", path)
        elif fmt == "iptables-restore":
            router.sh("iptables-restore < %s" % path)
        else:
            router.run("sh", "-e", path)
    finally:
        os.unlink(path)


def serve(host, port, tag, transparent=False):
    """Start a netpeer server on HOST and wait until it listens."""
    argv = [PY, PEER, "serve", port, tag] + (["transparent"] if transparent else [])
    host.popen(*argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    host.wait_listening(port)


def connect(host, addr, port, timeout=DROP_WAIT):
    """Return netpeer's verdict for a TCP connection from HOST to ADDR:PORT."""
    return host.run(PY, PEER, "connect", addr, port, timeout, timeout=30).stdout.strip()


def ping(host, addr):
    return host.run(PY, PEER, "ping", addr, DROP_WAIT, timeout=30).stdout.strip()


def gateway_lab(lab):
    """Build inside -- router -- outside; return (inside, router, outside, intif, extif)."""
    inside = lab.host("inside")
    router = lab.host("router", forwarding=True)
    outside = lab.host("outside")
    intif, _ = lab.link(router, inside, ["192.0.2.1/24"], ["192.0.2.10/24"])
    extif, _ = lab.link(router, outside, ["198.51.100.1/24"], ["198.51.100.20/24"])
    inside.run("ip", "route", "add", "default", "via", "192.0.2.1")
    # A route back, so that a refused inbound connection proves the firewall.
    outside.run("ip", "route", "add", "192.0.2.0/24", "via", "198.51.100.1")
    return inside, router, outside, intif, extif


@pytest.mark.parametrize("fmt", FORMATS)
def test_gateway_script_with_real_traffic(lab, fmt):
    inside, router, outside, intif, extif = gateway_lab(lab)
    status, text, err = run_tool(["--to=" + fmt, "-D", "INTIF=" + intif, "-D", "EXTIF=" + extif,
                                  "--masq-source", "198.51.100.1",
                                  os.path.join(CASES, "gateway.ipchains")])
    assert status == 0, err
    load(router, fmt, text)
    serve(outside, 8080, "server")
    serve(outside, 80, "server80")
    serve(router, 3128, "proxy")
    serve(router, 22, "ssh")
    serve(router, 23, "telnet")
    serve(router, 113, "ident")
    serve(inside, 8080, "inside")

    # Inside to the world: forwarded and masqueraded (the server sees the router).
    assert connect(inside, "198.51.100.20", 8080) == "ok server 198.51.100.1 198.51.100.20:8080"
    # Inside web traffic: redirected to the local proxy, original destination kept.
    assert connect(inside, "198.51.100.20", 80) == "ok proxy 192.0.2.10 198.51.100.20:80"
    # The inside network is trusted by the router itself.
    assert connect(inside, "192.0.2.1", 23).startswith("ok telnet")
    # Services chain: 22 accepted, 113 rejected; anything else denied (dropped).
    assert connect(outside, "198.51.100.1", 22).startswith("ok ssh 198.51.100.20")
    assert connect(outside, "198.51.100.1", 113) == "refused"
    assert connect(outside, "198.51.100.1", 23) == "timeout"
    # Nobody outside reaches the inside directly (forward policy DENY, SYN refused at input).
    assert connect(outside, "192.0.2.10", 8080) == "timeout"
    # The router's own connections get their replies back (the '! -y' rule).
    assert connect(router, "198.51.100.20", 8080) == "ok server 198.51.100.1 198.51.100.20:8080"
    # ICMP echo requests are accepted from anywhere.
    assert ping(outside, "198.51.100.1") == "ok"
    assert ping(inside, "192.0.2.1") == "ok"


def udp_probe(host, addr, port):
    """Return what HOST's kernel got back for one UDP datagram to ADDR:PORT (netpeer udp)."""
    return host.run(PY, PEER, "udp", addr, port, DROP_WAIT, timeout=30).stdout.strip()


REJECT_SCRIPT = """\
ipchains -A input -p udp -d 198.51.100.1 7001 -j REJECT
ipchains -A input -p udp -d 198.51.100.20 7002 -j REJECT
ipchains -A forward -p udp -d 198.51.100.20 7003 -j REJECT
ipchains -A output -p udp -d 198.51.100.20 7004 -j REJECT
"""


@pytest.mark.parametrize("fmt", FORMATS)
def test_reject_answers_as_linux_2_2_did(lab, fmt, tmp_path):
    """The ICMP the sender gets depends on where REJECT ran (expectations.py)."""
    inside, router, outside, intif, extif = gateway_lab(lab)
    script = tmp_path / "reject.sh"
    script.write_text(REJECT_SCRIPT)
    status, text, err = run_tool(["--to=" + fmt, str(script)])
    assert status == 0, err
    load(router, fmt, text)
    # Input chain (ip_input.c: ICMP_PORT_UNREACH), for the router and for a
    # forwarded packet alike; the router answers (from the address asked, or
    # from its inside one), not the destination.
    assert udp_probe(inside, "198.51.100.1", 7001) == "icmp 3 3 198.51.100.1"
    assert udp_probe(inside, "198.51.100.20", 7002) == "icmp 3 3 192.0.2.1"
    # Forward chain, and output chain of a forwarded packet (ip_forward.c:
    # ICMP_HOST_UNREACH).
    assert udp_probe(inside, "198.51.100.20", 7003) == "icmp 3 1 192.0.2.1"
    assert udp_probe(inside, "198.51.100.20", 7004) == "icmp 3 1 192.0.2.1"
    # Output chain of a local packet (ip_output.c): no ICMP, the send fails.
    assert udp_probe(router, "198.51.100.20", 7004) == "eperm"
    # Control: not rejected, the datagram reaches the outside host, which
    # has nothing on the port and answers for itself.
    assert udp_probe(inside, "198.51.100.20", 7005) == "icmp 3 3 198.51.100.20"


MASQ_REPLY_SCRIPT = """\
ipchains -P forward DENY
ipchains -A forward -s 192.0.2.0/24 -j MASQ
ipchains -A input -i {extif} -p tcp -s 198.51.100.20 8081 -j DENY
ipchains -A input -i {extif} -p tcp -d 198.51.100.1 61000:65095 ! -y -j ACCEPT
ipchains -A input -i {extif} -j DENY
"""


@pytest.mark.parametrize("fmt", FORMATS)
def test_masqueraded_replies_meet_the_input_chain(lab, fmt, tmp_path):
    """2.2 ran the input chain on a masqueraded connection's replies as they
    arrived (to the masquerading address and one of ports 61000-65095), then
    de-masqueraded them (expectations.py, context mr)."""
    inside, router, outside, intif, extif = gateway_lab(lab)
    script = tmp_path / "masq.sh"
    script.write_text(MASQ_REPLY_SCRIPT.format(extif=extif))
    status, text, err = run_tool(["--to=" + fmt, str(script)])
    assert status == 0, err
    load(router, fmt, text)
    serve(outside, 8080, "server")
    serve(outside, 8081, "server8081")
    # Replies to 198.51.100.1:61000-65095 are accepted: masqueraded from
    # 2.2's ports, judged by the address and port they arrive with.
    assert connect(inside, "198.51.100.20", 8080) == "ok server 198.51.100.1 198.51.100.20:8080"
    # Replies from port 8081 are stopped by the input rule, as on 2.2.
    assert connect(inside, "198.51.100.20", 8081) == "timeout"


PORTFW_SCRIPT = """\
ipchains -P input DENY
ipchains -A input -i {intif} -j ACCEPT
ipchains -A input -i {extif} -p tcp -d 198.51.100.1 80 -j ACCEPT
ipchains -P forward DENY
ipchains -A forward -s 192.0.2.0/24 -j MASQ
ipmasqadm portfw -a -P tcp -L 198.51.100.1 80 -R 192.0.2.10 8080
"""


@pytest.mark.parametrize("fmt", FORMATS)
def test_port_forward_meets_input_by_the_address_it_arrived_for(lab, fmt, tmp_path):
    """2.2 ran input on a port-forwarded packet by its public address and port,
    then forwarded it past the forward chain (expectations.py, context pf)."""
    inside, router, outside, intif, extif = gateway_lab(lab)
    script = tmp_path / "portfw.sh"
    script.write_text(PORTFW_SCRIPT.format(intif=intif, extif=extif))
    status, text, err = run_tool(["--to=" + fmt, str(script)])
    assert status == 0, err
    load(router, fmt, text)
    serve(inside, 8080, "inside")
    assert connect(outside, "198.51.100.1", 80) == "ok inside 198.51.100.20 192.0.2.10:8080"
    # Control: the inside port itself is not open from outside (input DENY).
    assert connect(outside, "192.0.2.10", 8080) == "timeout"


@pytest.mark.parametrize("fmt", FORMATS)
def test_port_forward_of_an_address_not_the_routers_does_nothing(lab, fmt, tmp_path):
    """2.2 looked for port forwards only in packets it delivered locally
    (ip_input.c:256, ip_fw_demasquerade): a forward whose local address is not
    one of the router's own never matched, and such packets were forwarded as
    they were, through the forward chain."""
    inside, router, outside, intif, extif = gateway_lab(lab)
    script = tmp_path / "portfw.sh"
    script.write_text("ipchains -P forward DENY\n"
                      "ipchains -A forward -s 192.0.2.0/24 -j MASQ\n"
                      "ipmasqadm portfw -a -P tcp -L 198.51.100.1 80 -R 192.0.2.10 8080\n"
                      "ipmasqadm portfw -a -P tcp -L 198.51.100.30 80 -R 192.0.2.10 8080\n")
    status, text, err = run_tool(["--to=" + fmt, str(script)])
    assert status == 0, err
    load(router, fmt, text)
    serve(inside, 8080, "inside")
    # 198.51.100.30 is no host's: the outside host sends it to the router.
    outside.run("ip", "route", "add", "198.51.100.30/32", "via", "198.51.100.1")
    assert connect(outside, "198.51.100.1", 80) == "ok inside 198.51.100.20 192.0.2.10:8080"
    assert connect(outside, "198.51.100.30", 80) == "timeout"


FOREIGN_NAT = """\
table ip foreign {
	chain pre {
		type nat hook prerouting priority dstnat - 10; policy accept;
		tcp dport 81 dnat to 192.0.2.10:8081
		tcp dport 83 dnat to 192.0.2.10:8083
	}
	chain post {
		type nat hook postrouting priority srcnat - 10; policy accept;
		ip saddr 192.0.2.0/24 tcp dport { 8082, 8084 } masquerade
	}
}
"""

FOREIGN_SCRIPT = """\
ipchains -P forward DENY
ipchains -A forward -s 192.0.2.0/24 -p tcp -d 0/0 8082 -j ACCEPT
ipchains -A forward -s 192.0.2.0/24 -p tcp -d 0/0 8084 -j ACCEPT
ipchains -A forward -p tcp -s 0/0 8084 -d 192.0.2.0/24 -j ACCEPT
ipchains -A forward -p tcp -d 192.0.2.10 8083 -j ACCEPT
ipchains -A forward -s 192.0.2.0/24 -j MASQ
ipmasqadm portfw -a -P tcp -L 198.51.100.1 80 -R 192.0.2.10 8080
"""


@pytest.mark.parametrize("fmt", FORMATS)
def test_nat_by_another_table_is_not_taken_for_the_scripts(lab, fmt, tmp_path):
    """Only the script's own port forwards skip the forward chain, and only the
    replies of connections it masqueraded meet input instead of forward: a DNAT
    or SNAT some other table did (a container runtime, say) is forwarded
    traffic like any other, judged by all three chains (fail closed)."""
    inside, router, outside, intif, extif = gateway_lab(lab)
    script = tmp_path / "foreign.sh"
    script.write_text(FOREIGN_SCRIPT)
    status, text, err = run_tool(["--to=" + fmt, str(script)])
    assert status == 0, err
    load(router, fmt, text)
    load(router, "nft", FOREIGN_NAT)
    serve(inside, 8080, "inside")
    serve(inside, 8081, "inside8081")
    serve(inside, 8083, "inside8083")
    serve(outside, 8082, "outside8082")
    serve(outside, 8084, "outside8084")
    # The script's own port forward: input accepts it (policy), forward skipped.
    assert connect(outside, "198.51.100.1", 80) == "ok inside 198.51.100.20 192.0.2.10:8080"
    # The other table's DNAT: the forward chain (policy DENY) stops it, and
    # lets through what it accepts (control: the other table's DNAT works).
    assert connect(outside, "198.51.100.1", 81) == "timeout"
    assert connect(outside, "198.51.100.1", 83) == "ok inside8083 198.51.100.20 192.0.2.10:8083"
    # The other table's masquerading of a connection the script forwards
    # without MASQ: its replies are forwarded packets to 192.0.2.10, which
    # the forward chain (policy DENY) stops, and lets through what it
    # accepts (control: the other table masquerades, the server sees the router).
    assert connect(inside, "198.51.100.20", 8082) == "timeout"
    assert (connect(inside, "198.51.100.20", 8084)
            == "ok outside8084 198.51.100.1 198.51.100.20:8084")


def tproxy_runs():
    """Check that tproxy.py starts (make test installs what it needs: a failure otherwise)."""
    proc = subprocess.run([PY, os.path.join(ROOT, "tproxy.py"), "--help"],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, "tproxy.py --help failed: %s" % proc.stderr.strip()


def book_lab(lab):
    """client -- router -- moose (203.0.113.80); the router does not forward."""
    client = lab.host("client")
    router = lab.host("router")
    moose = lab.host("moose")
    lab.link(router, client, ["192.0.2.1/24"], ["192.0.2.10/24"])
    lab.link(router, moose, ["203.0.113.1/24"], ["203.0.113.80/24"])
    client.run("ip", "route", "add", "default", "via", "192.0.2.1")
    moose.run("ip", "route", "add", "192.0.2.0/24", "via", "203.0.113.1")
    return client, router, moose


@pytest.mark.parametrize("proxy", ["tproxy.py", "listener"])
@pytest.mark.parametrize("mode", ["nat", "tproxy"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_book_rule_sends_web_traffic_to_local_proxy(lab, fmt, mode, proxy):
    if proxy == "tproxy.py":
        tproxy_runs()
    client, router, moose = book_lab(lab)
    status, text, err = run_tool(["--to=" + fmt, "--redirect=" + mode,
                                  "--host", "moose.mancill.com=203.0.113.80",
                                  os.path.join(CASES, "book.ipchains")])
    assert status == 0, err
    if fmt == "iptables":
        # iptables resolves host names itself when the script runs; no DNS here.
        text = text.replace("moose.mancill.com/32", "203.0.113.80/32")
    load(router, fmt, text)
    if mode == "tproxy" and fmt != "iptables":
        commands = needed_commands(text)
        assert commands, "the tproxy translation must name its policy routing"
        for command in commands:
            router.sh(command)
    serve(moose, 80, "moose")
    serve(moose, 8080, "moose8080")
    if proxy == "tproxy.py":
        # No target given: the raw relay goes to the original destination, so
        # reaching moose's port 80 proves tproxy recovered it (SO_ORIGINAL_DST
        # or, with TPROXY, the accepted socket's own address).
        router.popen(PY, os.path.join(ROOT, "tproxy.py"), "-d", "-t", "-s", 12970,
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        router.wait_listening(12970)
        # The relay connects from the router to moose, which sees the router
        # (or the client, when tproxy spoofs the source: both prove the relay,
        # since the router does not forward).
        answer = connect(client, "203.0.113.80", 80, timeout=5)
        assert answer.split()[:2] == ["ok", "moose"], answer
        assert answer.split()[2] in ("203.0.113.1", "192.0.2.10"), answer
    else:
        serve(router, 12970, "proxy", transparent=(mode == "tproxy"))
        answer = connect(client, "203.0.113.80", 80, timeout=5)
        assert answer == "ok proxy 192.0.2.10 203.0.113.80:80"
    # Control: other traffic to moose is not redirected and the router does
    # not forward, so it goes nowhere.
    assert connect(client, "203.0.113.80", 8080) == "timeout"
