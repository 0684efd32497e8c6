"""tproxy --udp in a namespace lab: DNS-port interception with TPROXY, flows, expiry, loops.

client 192.0.2.10 -- router (tproxy --udp) -- moose 198.51.100.10, answering
every datagram with the peer and local address it saw (peers.py udp-who).
"""
import os
import re
import signal
import socket
import subprocess

import pytest

from support import BookLab, LAUNCH, PEERS, PYTHON, REPO, children_of, proc_status, tproxy_cmd, wait_for
from lab import have

RECIPES = os.path.join(REPO, "contrib", "firewall")
PROXY_PORT, DNS = 5300, 53
CLIENT_PORTS = 36           # "dozens of client ports"
IDLE = 3                    # --idle-timeout of the lab's tproxy: flows expire within the test



@pytest.mark.parametrize("args, message", [
    (["--udp"], "--udp needs -s PORT (standalone mode)"),
    (["--udp", "192.0.2.1", "53"], "--udp needs -s PORT (standalone mode)"),
    (["--udp", "-s", "5300", "-f", "http://x/"], "--udp and -f exclude each other"),
    (["--udp", "-s", "5300", "-p", "192.0.2.1", "53"], "--udp and -p exclude each other"),
    (["--udp", "-s", "5300", "--connect", "192.0.2.1", "3128"], "--udp and --connect exclude each other"),
    (["--udp", "-s", "5300", "--send-proxy=v2"], "--udp and --send-proxy exclude each other"),
    (["--udp", "-s", "5300", "--prefork=2"], "--udp and --prefork exclude each other"),
    (["--udp", "-s", "5300", "--idle-timeout=0"], "--idle-timeout: '0' is not a number of seconds"),
    (["--udp", "-d", "-s", "5300", "127.0.0.1", "5300"], "target 127.0.0.1:5300 is this proxy itself"),
])
def test_udp_refuses_options_without_meaning(args, message):
    """--udp with an option made for TCP or inetd: one line, status 64 (EX_USAGE)."""
    proc = subprocess.run(tproxy_cmd(*args), capture_output=True, text=True, timeout=30,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 64, proc.stderr
    assert proc.stderr == "tproxy: %s\n" % message and proc.stdout == ""


def test_udp_idle_timeout_has_its_own_default():
    """30 s for flows unless --idle-timeout is given; connections keep 120 s."""
    import tproxy
    assert tproxy.parse_args(["--udp", "-s", "5300"]).idle_timeout == 30
    assert tproxy.parse_args(["--udp", "-s", "5300", "--idle-timeout=120"]).idle_timeout == 120
    assert tproxy.parse_args(["-t", "-s", "5300"]).idle_timeout == 120
    assert tproxy.parse_args(["--udp", "-s", "5300", "-t", "192.0.2.1", "53"]).mode == "udp"


def answering_lab(lab, open_tmp):
    """The book's lab with moose answering UDP 53 (peers.py udp-who)."""
    book = BookLab(lab, open_tmp)
    book.moose.popen(PYTHON, PEERS, "udp-who", DNS, book.MOOSE, book.MOOSE6, "--lifetime", 300)
    book.moose.wait_listening(DNS, proto="udp")
    return book


@pytest.fixture(params=["fork", "workers"])
def gateway(request, lab, open_tmp):
    """The book's lab with moose answering UDP 53 and the router intercepting it for tproxy."""
    if not have("iptables"):
        pytest.skip("iptables is needed (tools/install-deps installs it)")
    book = answering_lab(lab, open_tmp)
    book.serving = ("--workers=2",) if request.param == "workers" else ()
    for name, args in (("proxy-return-path", ["--udp"]),
                       ("tproxy-intercept", ["--port", DNS, "--to", PROXY_PORT, "--udp"])):
        book.router.run("sh", os.path.join(RECIPES, name), "add", *args)
    return book


def start(book, *args, port=PROXY_PORT):
    """Start tproxy --udp on the router; return (Popen, stderr path) once it is ready."""
    return book.tproxy("--udp", "--idle-timeout=%d" % IDLE, "-r", "nobody", *args, port=port)


def ask(sock, dest, payload, tries=5):
    """Send PAYLOAD to DEST from SOCK until an answer comes; return (answer words, source)."""
    sock.settimeout(2.0)
    for _ in range(tries):
        sock.sendto(payload, dest)
        try:
            data, source = sock.recvfrom(65536)
        except socket.timeout:
            continue
        peer, peer_port, local, local_port, echoed = data.split(b" ", 4)
        assert echoed == payload
        return (peer.decode(), int(peer_port), local.decode(), int(local_port)), source[:2]
    raise AssertionError("no answer to %r from %s after %d tries" % (payload, dest, tries))


def client_sockets(book, family, count):
    """Return COUNT UDP sockets in the client namespace, each on its own port."""
    if family == socket.AF_INET6:
        book.settle_ipv6()
    addr = book.CLIENT6 if family == socket.AF_INET6 else book.CLIENT
    socks = []
    for _ in range(count):
        sock = book.client.socket(family, socket.SOCK_DGRAM)
        sock.bind((addr, 0))
        socks.append(sock)
    return socks


def fd_count(pid):
    """Descriptors held by PID and its children (the workers)."""
    pids = [pid] + children_of(pid)
    return sum(len(os.listdir("/proc/%d/fd" % p)) for p in pids)


def records(err):
    """Return the flow records tproxy has logged so far."""
    with open(err) as f:
        return [line for line in f if " mode=udp " in line]


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6], ids=["ipv4", "ipv6"])
def test_intercepted_dns_keeps_destination_and_flows_expire(gateway, family):
    """Every datagram answered from the server's own address and port; flows reused, then gone."""
    book = gateway
    six = family == socket.AF_INET6
    server = book.MOOSE6 if six else book.MOOSE
    router = "2001:db8:2::1" if six else "198.51.100.1"
    proc, err = start(book)
    # The count to come back to: once a first flow has come and gone, every worker is at work.
    warm_up = client_sockets(book, family, 1)[0]
    ask(warm_up, (server, DNS), b"warm-up")
    warm_up.close()
    wait_for(lambda: records(err), timeout=IDLE + 30, what="the warm-up flow's record")
    idle_fds = fd_count(proc.pid)
    socks = client_sockets(book, family, CLIENT_PORTS)
    upstream_ports = {}
    for round_ in range(2):
        for i, sock in enumerate(socks):
            seen, source = ask(sock, (server, DNS), b"q%d-%d" % (i, round_))
            assert source == (server, DNS)          # the answer comes from what the client asked
            assert seen[0] == router and seen[2:] == (server, DNS)
            upstream_ports.setdefault(i, set()).add(seen[1])
    assert all(len(ports) == 1 for ports in upstream_ports.values())   # one flow per client port
    assert len({p for ports in upstream_ports.values() for p in ports}) == CLIENT_PORTS
    assert fd_count(proc.pid) >= idle_fds + 2 * CLIENT_PORTS            # two sockets per flow
    flows = wait_for(lambda: len(records(err)) > CLIENT_PORTS and records(err)[1:],
                     timeout=IDLE + 30, what="a record per flow after --idle-timeout")
    assert len(flows) == CLIENT_PORTS
    for line in flows:
        assert re.search(r"orig=%s target=%s mode=udp up=\d+ down=\d+ time=\S+ "
                         r"datagrams_up=2 datagrams_down=2 outcome=ok$" % (
                             re.escape(("[%s]:53" if six else "%s:53") % server),
                             re.escape(("[%s]:53" if six else "%s:53") % server)), line), line
    wait_for(lambda: fd_count(proc.pid) == idle_fds, timeout=10,
             what="the descriptors back to their count before the flows")
    seen, _ = ask(socks[0], (server, DNS), b"again")       # a new flow after expiry
    assert seen[1] not in upstream_ports[0]
    for sock in socks:
        sock.close()


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6], ids=["ipv4", "ipv6"])
def test_source_client_port_keeps_the_clients_address_and_port(gateway, family):
    """--source=client-port: the server sees the client's address and port, answers reach it."""
    book = gateway
    server = book.MOOSE6 if family == socket.AF_INET6 else book.MOOSE
    start(book, "--source=client-port")
    for sock in client_sockets(book, family, 8):
        seen, source = ask(sock, (server, DNS), b"who")
        assert source == (server, DNS)
        assert seen[:2] == sock.getsockname()[:2]       # the server sees the client itself
        sock.close()


def test_source_client_keeps_the_clients_address(gateway):
    """--source=client: the server sees the client's address (the port is the proxy's)."""
    book = gateway
    start(book, "--source=client")
    sock = client_sockets(book, socket.AF_INET, 1)[0]
    seen, source = ask(sock, (book.MOOSE, DNS), b"who")
    assert source == (book.MOOSE, DNS) and seen[0] == book.CLIENT
    sock.close()


def test_datagram_to_the_proxy_port_is_not_relayed_in_a_loop(gateway):
    """A datagram sent to the proxy port itself is dropped and logged once, not relayed to itself."""
    book = gateway
    proc, err = start(book)
    sock = client_sockets(book, socket.AF_INET, 1)[0]
    sock.sendto(b"loop?", (book.ROUTER_IN, PROXY_PORT))
    sock.settimeout(IDLE + 2)
    with pytest.raises(socket.timeout):
        sock.recvfrom(65536)
    [line] = wait_for(lambda: records(err), timeout=IDLE + 30, what="the refused flow's record")
    assert "orig=%s:%d" % (book.ROUTER_IN, PROXY_PORT) in line and "target=-" in line
    assert "datagrams_up=1 datagrams_down=0 outcome=loop" in line
    assert proc.poll() is None
    sock.close()


def test_own_upstream_datagrams_coming_back_are_not_relayed(gateway):
    """A rule that brings tproxy's own upstream datagrams back to it: refused once, no flow per hop.

    The router marks its own datagrams to port 53 for the local route table
    (as a recipe for the proxy host's own clients does, without leaving out
    tproxy's user), so the upstream datagram comes back through lo to the
    TPROXY rule: its source is the flow's upstream socket.
    """
    book = gateway
    book.router.run("iptables", "-t", "mangle", "-A", "OUTPUT", "-p", "udp", "--dport", DNS,
                    "-j", "MARK", "--set-mark", "1")
    proc, err = start(book, "--max-conns=8")
    sock = client_sockets(book, socket.AF_INET, 1)[0]
    sock.sendto(b"round and round", (book.MOOSE, DNS))
    lines = wait_for(lambda: len(records(err)) >= 2 and records(err), timeout=IDLE + 30,
                     what="the client's flow and the refused loop")
    client = "client=%s:%d orig=%s:53 target=%s:53 " % (
        book.CLIENT, sock.getsockname()[1], book.MOOSE, book.MOOSE)
    [mine] = [line for line in lines if client in line]
    assert "datagrams_up=1 datagrams_down=0 outcome=ok" in mine
    [loop] = [line for line in lines if client not in line]
    assert re.search(r"client=198\.51\.100\.1:(\d+) orig=198\.51\.100\.10:53 target=- .* "
                     r"datagrams_up=1 datagrams_down=0 outcome=loop: 198\.51\.100\.1:\1 is this "
                     r"proxy's own upstream socket to 198\.51\.100\.10:53$", loop), loop
    assert len(records(err)) == 2 and proc.poll() is None
    sock.close()


def test_fixed_target_answers_from_the_proxy_port(gateway):
    """PROXYHOST PROXYPORT: clients address the proxy and get answers from its address and port."""
    book = gateway
    start(book, book.MOOSE, DNS, port=PROXY_PORT + 1)
    socks = client_sockets(book, socket.AF_INET, 4)
    for i, sock in enumerate(socks):
        seen, source = ask(sock, (book.ROUTER_IN, PROXY_PORT + 1), b"fixed%d" % i)
        assert source == (book.ROUTER_IN, PROXY_PORT + 1)
        assert seen[0] == "198.51.100.1" and seen[2:] == (book.MOOSE, DNS)
        sock.close()


def test_access_list_refuses_a_flow_and_logs_it_once(gateway):
    """-a decides per datagram source: an unlisted client gets nothing, and one record per flow."""
    book = gateway
    proc, err = start(book, "-a", "203.0.113.0/24")
    sock = client_sockets(book, socket.AF_INET, 1)[0]
    for _ in range(3):
        sock.sendto(b"let me in", (book.MOOSE, DNS))
    sock.settimeout(IDLE + 2)
    with pytest.raises(socket.timeout):
        sock.recvfrom(65536)
    [line] = wait_for(lambda: records(err), timeout=IDLE + 30, what="the refused flow's record")
    assert "client=%s:%d orig=%s:53 target=-" % (book.CLIENT, sock.getsockname()[1], book.MOOSE) in line
    assert line.endswith("datagrams_up=3 datagrams_down=0 outcome=denied by access list\n")
    sock.close()


def test_source_ports_pick_the_upstream_port(gateway):
    """--source-ports: every flow's upstream socket has a port of the range, one per flow."""
    book = gateway
    start(book, "--source-ports=40000-40099")
    ports = set()
    for i, sock in enumerate(client_sockets(book, socket.AF_INET, 6)):
        seen, source = ask(sock, (book.MOOSE, DNS), b"port%d" % i)
        assert source == (book.MOOSE, DNS) and 40000 <= seen[1] <= 40099
        ports.add(seen[1])
        sock.close()
    assert len(ports) == 6


def test_icmp_port_unreachable_ends_the_flow(gateway):
    """No server on the target port: the ICMP error ends the flow with its reason, tproxy lives on."""
    book = gateway
    proc, err = start(book, book.MOOSE, 9, port=PROXY_PORT + 2)
    sock = client_sockets(book, socket.AF_INET, 1)[0]
    sock.sendto(b"anyone?", (book.ROUTER_IN, PROXY_PORT + 2))
    [line] = wait_for(lambda: records(err), timeout=30, what="the flow ended by the ICMP error")
    assert line.endswith("datagrams_up=1 datagrams_down=0 outcome=target refused (ICMP port unreachable)\n")
    assert proc.poll() is None
    sock.close()


def test_workers_keep_only_transparency_and_low_ports_as_nobody(gateway):
    """-r nobody: a UDP worker keeps CAP_NET_RAW and CAP_NET_BIND_SERVICE, nothing else."""
    book = gateway
    proc, _ = start(book)
    workers = wait_for(lambda: children_of(proc.pid), what="tproxy's workers")
    for pid in workers:
        status = proc_status(pid)
        assert int(status["CapEff"], 16) == 1 << 13 | 1 << 10       # CAP_NET_RAW, CAP_NET_BIND_SERVICE
        assert int(status["CapBnd"], 16) == 1 << 13 | 1 << 10
        assert status["Uid"] != "0"


def test_max_conns_counts_flows(gateway):
    """--max-conns=2: a third flow waits in the listener's buffer until one of the two expires."""
    book = gateway
    if book.serving:
        pytest.skip("with --workers the cap is split per worker, and the kernel picks the worker")
    proc, err = start(book, "--max-conns=2")
    first, second, third = client_sockets(book, socket.AF_INET, 3)
    ask(first, (book.MOOSE, DNS), b"one")
    ask(second, (book.MOOSE, DNS), b"two")
    third.sendto(b"three", (book.MOOSE, DNS))
    third.settimeout(0.5)
    for i in range(3):                          # not served while the two flows live
        ask(first, (book.MOOSE, DNS), b"one%d" % i)
        ask(second, (book.MOOSE, DNS), b"two%d" % i)
        with pytest.raises(socket.timeout):
            third.recvfrom(65536)
    third.settimeout(IDLE + 30)
    data, source = third.recvfrom(65536)        # served from the buffer once they have expired
    assert source == (book.MOOSE, DNS) and data.endswith(b" three")
    assert len(records(err)) >= 2 and "--max-conns: 2 flows" in open(err).read()
    for sock in (first, second, third):
        sock.close()


@pytest.mark.parametrize("serving", [(), ("--workers=2",)], ids=["one-worker", "workers"])
def test_a_second_tproxy_cannot_bind_the_same_udp_port(lab, serving):
    """A second `tproxy --udp -s PORT` (same user, same options) fails as TCP does: status 71.

    SO_REUSEADDR on both, or SO_REUSEPORT on both from one user, would let
    the kernel give the port to both (udp_lib_lport_inuse), each then
    getting a share of the flows.
    """
    host = lab.host("router")
    argv = tproxy_cmd("-d", "--udp", "-s", PROXY_PORT, *serving, "127.0.0.1", DNS)
    first = host.popen(*argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    host.wait_listening(PROXY_PORT, proto="udp")
    for again in (argv, argv[:-2] + ["-b", "127.0.0.1", "127.0.0.1", str(DNS)]):
        second = host.run(*again, check=False)
        where = "127.0.0.1" if "-b" in again else "*"
        assert (second.returncode, second.stderr) == (
            71, "tproxy: cannot listen on %s UDP port %d: Address already in use\n" % (
                where, PROXY_PORT))
    assert first.poll() is None


def test_a_udp_port_held_with_so_reuseaddr_is_in_use(lab):
    """Another program's socket with SO_REUSEADDR on the port: tproxy --udp does not share it."""
    host = lab.host("router")
    holder = host.socket(socket.AF_INET, socket.SOCK_DGRAM)
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    holder.bind(("127.0.0.1", PROXY_PORT))
    proc = host.run(*tproxy_cmd("-d", "--udp", "-s", PROXY_PORT, "192.0.2.1", DNS), check=False)
    holder.close()
    assert (proc.returncode, proc.stderr) == (
        71, "tproxy: cannot listen on * UDP port %d: Address already in use\n" % PROXY_PORT)


def test_socket_activation_with_datagram_sockets(lab, open_tmp):
    """Under `systemd-socket-activate --datagram` (ListenDatagram=): the passed sockets serve, none bound besides."""
    if not have("systemd-socket-activate"):
        pytest.skip("systemd-socket-activate is not installed (Debian package systemd)")
    book = answering_lab(lab, open_tmp)
    err = book.tmp / "activated.err"
    with open(err, "wb") as f:
        book.router.popen("systemd-socket-activate", "--datagram",
                          "-l", "%s:%d" % (book.ROUTER_IN, PROXY_PORT),
                          "-l", "[%s]:%d" % (book.ROUTER_IN6, PROXY_PORT),
                          *tproxy_cmd("-d", "--udp", "--idle-timeout=%d" % IDLE, book.MOOSE, DNS),
                          stdout=f, stderr=f)
    book.router.wait_listening(PROXY_PORT, proto="udp")
    # The first datagram starts tproxy, which then reads it from the passed socket.
    for family, proxy in ((socket.AF_INET, book.ROUTER_IN), (socket.AF_INET6, book.ROUTER_IN6)):
        sock = client_sockets(book, family, 1)[0]
        seen, source = ask(sock, (proxy, PROXY_PORT), b"activated")
        assert source == (proxy, PROXY_PORT), err.read_text()
        assert seen[0] == "198.51.100.1" and seen[2:] == (book.MOOSE, DNS)
        sock.close()
    log = err.read_text()
    assert "listening on %s:%d, [%s]:%d, udp mode" % (
        book.ROUTER_IN, PROXY_PORT, book.ROUTER_IN6, PROXY_PORT) in log, log
    assert "(socket from systemd)" in log
    unconnected = book.router.run("ss", "-Hlun", "sport", "= :%d" % PROXY_PORT).stdout
    assert len(unconnected.splitlines()) == 2, unconnected     # the reply sockets are connected
    assert len(wait_for(lambda: records(err) or None, timeout=IDLE + 30,
                        what="the flows' records")) >= 1


@pytest.mark.parametrize("gateway", ["fork"], indirect=True)     # --workers: refused (above)
def test_socket_activation_intercepting_as_a_dynamic_user(gateway):
    """As the example unit runs it: a root-bound socket, tproxy as nobody with two ambient capabilities.

    The reply sockets (bound to port 53 by nobody) must share nothing with
    the passed socket, and transparency is set by tproxy itself.
    """
    book = gateway
    if not (have("systemd-socket-activate") and have("setpriv")):
        pytest.skip("systemd-socket-activate and setpriv are needed (Debian systemd, util-linux)")
    caps = "+net_raw,+net_bind_service"
    err = book.tmp / "activated-nobody.err"
    with open(err, "wb") as f:
        book.router.popen("systemd-socket-activate", "--datagram", "-l", str(PROXY_PORT),
                          "setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
                          "--inh-caps=" + caps, "--ambient-caps=" + caps,
                          *tproxy_cmd("-d", "--udp", "--idle-timeout=%d" % IDLE),
                          stdout=f, stderr=f)
    book.router.wait_listening(PROXY_PORT, proto="udp")
    # TPROXY delivers only to a transparent socket, and systemd-socket-activate
    # has no Transparent=yes: the datagram that starts tproxy goes to the port
    # itself (a loop, refused), and tproxy makes the socket transparent.
    wake = client_sockets(book, socket.AF_INET, 1)[0]
    wake.sendto(b"start", (book.ROUTER_IN, PROXY_PORT))
    wait_for(lambda: "(socket from systemd)" in err.read_text(), timeout=30,
             what="tproxy started by the first datagram")
    wake.close()
    for family, server in ((socket.AF_INET, book.MOOSE), (socket.AF_INET6, book.MOOSE6)):
        for sock in client_sockets(book, family, 3):
            seen, source = ask(sock, (server, DNS), b"who")
            assert source == (server, DNS), err.read_text()
            assert seen[2:] == (server, DNS)
            sock.close()


def passed_socket(kind):
    """Return a socket of KIND, as a misconfigured socket unit would pass it."""
    if kind == "tcp-listener":
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
    elif kind == "udp-lite":        # SOCK_DGRAM too, but not UDP (RFC 3828)
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDPLITE)
        sock.bind(("127.0.0.1", 0))
    else:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        if kind in ("bound-udp", "connected-udp"):
            sock.bind(("127.0.0.1", 0))
        if kind == "connected-udp":
            sock.connect(("127.0.0.1", 9))
    return sock


@pytest.mark.parametrize("kind, args, message", [
    ("tcp-listener", ["--udp"], "socket activation: fd 3 is not a UDP socket "
     "(--udp needs a socket unit with ListenDatagram=PORT)"),
    ("unbound-udp", ["--udp"], "socket activation: fd 3 is a UDP socket bound to no port"),
    # Both were served once: UDP-Lite clients answered over UDP upstream, and a
    # connected socket hears one peer only.
    ("udp-lite", ["--udp"], "socket activation: fd 3 is not a UDP socket "
     "(--udp needs a socket unit with ListenDatagram=PORT)"),
    ("connected-udp", ["--udp"], "socket activation: fd 3 is a UDP socket connected to 127.0.0.1:9"),
    ("bound-udp", ["-t"], "socket activation: fd 3 is a UDP socket (serve it with --udp; "
     "for TCP, tproxy.socket needs ListenStream=PORT and Accept=no)"),
    ("bound-udp", ["--udp", "--workers=2"], "--udp and --workers exclude each other with "
     "sockets from systemd: each passed UDP socket gets one worker"),
], ids=["tcp-with-udp", "unbound-udp", "udp-lite", "connected-udp", "udp-without-udp",
        "udp-with-workers"])
def test_socket_activation_refuses_the_wrong_kind_of_socket(kind, args, message):
    """A stream socket with --udp, a datagram socket without it: one line, status 64."""
    with passed_socket(kind) as sock:
        # systemd-socket-activate passes only bound datagram sockets to a --datagram service.
        proc = subprocess.run([PYTHON, "-c", LAUNCH, str(sock.fileno())] +
                              tproxy_cmd("-d", *args, "192.0.2.20", DNS),
                              env=dict(os.environ, LISTEN_FDS="1", LISTEN_PID="self"),
                              pass_fds=(sock.fileno(),), stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=30)
    assert (proc.returncode, proc.stderr) == (64, "tproxy: %s\n" % message)


def stop_with_grace(book, grace):
    """Start tproxy --udp with --grace=GRACE and flows that outlive it; return (Popen, stderr path)."""
    proc, err = book.tproxy("--udp", "--idle-timeout=600", "--grace=%d" % grace, "-r", "nobody",
                            port=PROXY_PORT, wait=False)
    book.router.wait_listening(PROXY_PORT, proto="udp")
    return proc, err


def test_sigterm_stops_new_flows_and_a_second_one_cuts_the_live(gateway):
    """SIGTERM: no new flow from then on, the live flow relays on; a second SIGTERM cuts it, logged."""
    book = gateway
    proc, err = stop_with_grace(book, 600)
    live, late = client_sockets(book, socket.AF_INET, 2)
    seen, _ = ask(live, (book.MOOSE, DNS), b"before")
    proc.send_signal(signal.SIGTERM)
    wait_for(lambda: "SIGTERM: stopped accepting" in open(err).read(), what="the first SIGTERM")
    wait_for(lambda: not book.router.run("ss", "-Hlun", "sport", "= :%d" % PROXY_PORT).stdout,
             what="every listener closed (parent and workers)")
    late.sendto(b"too late", (book.MOOSE, DNS))
    again, source = ask(live, (book.MOOSE, DNS), b"during the grace period")
    assert source == (book.MOOSE, DNS) and again[1] == seen[1]      # the same flow, relayed on
    late.settimeout(1.0)
    with pytest.raises(socket.timeout):
        late.recvfrom(65536)
    # The port is free for a new tproxy at once (the reply sockets are on port 53).
    book.tproxy("--udp", "-r", "nobody", port=PROXY_PORT, wait=False)
    book.router.wait_listening(PROXY_PORT, proto="udp")
    _, source = ask(late, (book.MOOSE, DNS), b"the new one")
    assert source == (book.MOOSE, DNS)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0                   # not the 600 s of --grace
    [line] = records(err)
    assert "client=%s:%d " % (book.CLIENT, live.getsockname()[1]) in line
    assert line.endswith(" datagrams_up=2 datagrams_down=2 "
                         "outcome=cut at shutdown after the 600s grace period\n"), line
    for sock in (live, late):
        sock.close()


def test_sigterm_lets_live_flows_run_for_the_grace_period(gateway):
    """SIGTERM once: the workers exit when --grace ends, each live flow logged as cut."""
    book = gateway
    proc, err = stop_with_grace(book, 2)
    socks = client_sockets(book, socket.AF_INET, 4)
    for i, sock in enumerate(socks):
        ask(sock, (book.MOOSE, DNS), b"flow%d" % i)
    workers = children_of(proc.pid)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
    assert not [pid for pid in workers if os.path.exists("/proc/%d" % pid)]
    lines = records(err)
    assert len(lines) == 4 and all(line.endswith(
        " datagrams_up=1 datagrams_down=1 outcome=cut at shutdown after the 2s grace period\n")
        for line in lines), lines
    for sock in socks:
        sock.close()
