"""Transparency on modern kernels: TPROXY, --source=client, --connect, PROXY protocol, loops.

Every test asks the server itself who connected (the `who` peer answers with
the peer and local address it sees) and uses the contrib/firewall recipes as
they are shipped.
"""
import os
import shutil
import subprocess
import time

import pytest

from support import (PEERS, PYTHON, REPO, connection_children, describe, family_status, forkers_of,
                     proc_status, requests_seen, tproxy_cmd, wait_for, wait_logged)

RECIPES = os.path.join(REPO, "contrib", "firewall")


def recipe(host, name, *args):
    """Run a contrib/firewall recipe inside HOST."""
    return host.run("sh", os.path.join(RECIPES, name), *args)


def who(host, addr, port, timeout=20):
    """Connect from HOST to ADDR:PORT; return the `who` peer's words (peer ip, port, local ip, port).

    The client never half-closes: the peer closes first, and tinyproxy would end
    a CONNECT tunnel on a half-close before the answer came back.
    """
    proc = subprocess.run(host.cmd(PYTHON, PEERS, "ask", addr, port), input=b"",
                          capture_output=True, timeout=timeout)
    return proc.stdout.decode().split()


def caps(status):
    """Return the Uid and the Cap* sets (as numbers) of a process's STATUS (support.proc_status)."""
    return dict({k: int(v, 16) for k, v in status.items() if k.startswith("Cap")}, Uid=status["Uid"])


@pytest.mark.every_mode
@pytest.mark.parametrize("backend", ["iptables", "nft"])
def test_tproxy_interception_keeps_client_and_destination(book, backend):
    """Case 1: TPROXY on the router, -t --source=client, no fixed target, as nobody."""
    nft = ["--nft"] if backend == "nft" else []
    recipe(book.router, "proxy-return-path", "add", *nft)
    recipe(book.router, "proxy-return-path", "add", *nft)        # idempotent
    recipe(book.router, "tproxy-intercept", "add", "--port", 80, "--to", 12970,
           "--in", book.router_if, *nft)
    book.moose.popen(PYTHON, PEERS, "who", 80, "--lifetime", 120)
    book.moose.wait_listening(80)
    _, err = book.tproxy("-t", "--source=client", "-r", "nobody")
    book.settle_ipv6()
    for client, server in ((book.CLIENT, book.MOOSE), (book.CLIENT6, book.MOOSE6)):
        words = who(book.client, server, 80)
        assert words[0] == client and words[2] == server and words[3] == "80", (words, open(err).read())
    log = wait_logged(err, "orig=198.51.100.10:80", "orig=[2001:db8:2::10]:80")
    assert "no fwmark policy rule" not in log


ASK_FROM_PORT = """
import socket, sys
s = socket.socket(socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET)
s.bind(("", int(sys.argv[3])))
s.settimeout(20)
s.connect((sys.argv[1], int(sys.argv[2])))
print(s.makefile().readline().strip())
"""


@pytest.mark.every_mode
def test_tproxy_interception_keeps_the_client_port_as_nobody(book):
    """--source=client-port after -r nobody: whoever connects upstream (in fork mode the parent
    now, CAP_NET_RAW kept) binds the client's address and port, IPv4 and IPv6."""
    recipe(book.router, "proxy-return-path", "add")
    recipe(book.router, "tproxy-intercept", "add", "--port", 80, "--to", 12970, "--in", book.router_if)
    book.moose.popen(PYTHON, PEERS, "who", 80, "--lifetime", 120)
    book.moose.wait_listening(80)
    _, err = book.tproxy("-t", "--source=client-port", "-r", "nobody")
    for client, server, port in ((book.CLIENT, book.MOOSE, 41234), (book.CLIENT6, book.MOOSE6, 41236)):
        words = book.client.run(PYTHON, "-c", ASK_FROM_PORT, server, 80, port).stdout.split()
        assert words == [client, str(port), server, "80"], (words, open(err).read())


def test_child_keeps_only_cap_net_raw_as_nobody(book):
    recipe(book.router, "proxy-return-path", "add")
    recipe(book.router, "tproxy-intercept", "add", "--port", 80, "--to", 12970)
    hold = "import socket,time; s=socket.socket(); s.bind(('0.0.0.0',80)); s.listen(5); c,_=s.accept(); time.sleep(30)"
    book.moose.popen(PYTHON, "-c", hold)
    book.moose.wait_listening(80)
    proc, _ = book.tproxy("-t", "--source=client", "-r", "nobody")
    client = book.client.popen(PYTHON, "-c", "import socket,time; s=socket.create_connection(('198.51.100.10',80)); time.sleep(30)")
    server = proc.pid
    wait_for(lambda: connection_children(server), what="a child serving the connection")
    wanted = 1 << 13
    family = family_status(server)      # fork mode: its forker too
    for pid in family:
        status = caps(family[pid])
        assert status["Uid"] == "65534", [describe(p) for p in family]
        assert status["CapPrm"] == wanted and status["CapEff"] == wanted, status
        assert status["CapInh"] == 0 and status["CapAmb"] == 0 and status["CapBnd"] == wanted
    client.kill()


# ip as tproxy's start-up check of the return path (`ip rule show`, as root) meets it
# on a loaded host: late. The window it widens is there at every start.
SLOW_IP = """#!/bin/sh
case "$*" in *"rule show"*) sleep 2;; esac
exec %s "$@"
"""


def test_tproxy_started_is_nobody_already_even_when_its_start_is_slow(book, monkeypatch):
    """book.tproxy returns once tproxy has switched user: then no process of its tree is root.

    tproxy listens as root and switches user after its start-up checks; a
    test that took "listening" for "started" saw the parent and its `ip`
    child as uid 0 (test_child_keeps_only_cap_net_raw_as_nobody, twice in CI).
    """
    slow = book.tmp / "slow-ip"
    slow.mkdir()
    (slow / "ip").write_text(SLOW_IP % shutil.which("ip", path=os.environ["PATH"] + ":/usr/sbin:/sbin"))
    (slow / "ip").chmod(0o755)
    monkeypatch.setenv("PATH", "%s:%s" % (slow, os.environ["PATH"]))
    proc, _ = book.tproxy("-t", "--source=client", "-r", "nobody")
    started = family_status(proc.pid)
    wait_for(lambda: forkers_of(proc.pid), what="the forker")
    for family in (started, family_status(proc.pid)):
        assert [pid for pid in family if family[pid]["Uid"] != "65534"] == [], \
            {pid: [family[pid][key] for key in ("Name", "State", "PPid", "Uid")] for pid in family}


def test_without_source_option_nothing_is_kept(book):
    book.web(book.cow)
    book.redirect()
    proc, _ = book.tproxy("-t", "-r", "nobody", book.COW, 80)
    status = caps(proc_status(proc.pid))
    assert status["Uid"] == "65534" and status["CapPrm"] == 0 and status["CapEff"] == 0


@pytest.fixture
def reverse(lab, open_tmp):
    """Case 2: client -- proxy -- server, the server's default route is not the proxy.

    client 192.0.2.10 -> proxy 192.0.2.1:80; proxy 198.51.100.1 -> server
    198.51.100.10 (and dedicated 198.51.100.11); the server's default route
    points at 198.51.100.254, where nothing answers.
    """
    client, proxy, server = lab.host("client"), lab.host("proxy", forwarding=True), lab.host("server")
    lab.link(proxy, client, ["192.0.2.1/24"], ["192.0.2.10/24"])
    lab.link(proxy, server, ["198.51.100.1/24"], ["198.51.100.10/24", "198.51.100.11/24"])
    client.run("ip", "route", "add", "default", "via", "192.0.2.1")
    server.run("ip", "route", "add", "default", "via", "198.51.100.254")
    recipe(proxy, "proxy-return-path", "add")
    server.popen(PYTHON, PEERS, "who", 80, "--lifetime", 300)
    server.wait_listening(80)
    return client, proxy, server, open_tmp


def run_parallel_clients(client, addr, port, total, parallel):
    """Make TOTAL connections, PARALLEL at a time, from CLIENT; return the peer addresses seen."""
    code = ("import socket, sys\n"
            "from concurrent.futures import ThreadPoolExecutor\n"
            "def one(i):\n"
            "    s = socket.create_connection((%r, %d), timeout=20)\n"
            "    data = b''\n"
            "    while True:\n"
            "        d = s.recv(4096)\n"
            "        if not d: break\n"
            "        data += d\n"
            "    s.close()\n"
            "    return data.split()[0].decode() if data else 'none'\n"
            "with ThreadPoolExecutor(%d) as pool:\n"
            "    print(' '.join(pool.map(one, range(%d))))\n" % (addr, port, parallel, total))
    return client.run(PYTHON, "-c", code, timeout=180).stdout.split()


@pytest.mark.parametrize("route_by", ["sport", "sport-nft", "dedicated-address"])
def test_reverse_proxy_server_sees_client(reverse, route_by):
    client, proxy, server, tmp = reverse
    target = "198.51.100.11" if route_by == "dedicated-address" else "198.51.100.10"
    err = str(tmp / "tproxy.err")
    with open(err, "wb") as f:
        relay = proxy.popen(*tproxy_cmd("-d", "-s", 80, "-t", "--source=client", "-r", "nobody",
                                        "--connect-timeout", 2, target, 80), stdout=f, stderr=f)
    proxy.wait_listening(80)
    # Before the server routes replies back, a transparent connection cannot complete,
    # and the log says why.
    assert who(client, "192.0.2.1", 80) == []
    wait_for(lambda: "are replies routed back through this host?" in open(err).read(),
             what="the likely cause logged")
    if route_by == "dedicated-address":
        recipe(server, "server-return-route", "add", "--via", "198.51.100.1", "--from", target)
    else:
        nft = ["--nft"] if route_by == "sport-nft" else []
        recipe(server, "server-return-route", "add", "--via", "198.51.100.1", "--sport", 80, *nft)
    peers = run_parallel_clients(client, "192.0.2.1", 80, total=400, parallel=32)
    assert len(peers) == 400 and set(peers) == {"192.0.2.10"}, set(peers)
    wait_for(lambda: not connection_children(relay.pid), what="no children left")


@pytest.fixture
def gateway(lab, open_tmp):
    """Case 3: a gateway with no route to the destination, a real tinyproxy beyond it.

    client 192.0.2.10 -- gw 192.0.2.1 | 203.0.113.1 -- cow 203.0.113.20 | 198.51.100.1 -- moose 198.51.100.10
    gw has no route to 198.51.100.0/24; only cow (the corporate proxy) reaches moose.
    """
    client, gw = lab.host("client"), lab.host("gw", forwarding=True)
    cow, moose = lab.host("cow"), lab.host("moose")
    gw_if, _ = lab.link(gw, client, ["192.0.2.1/24"], ["192.0.2.10/24"])
    lab.link(gw, cow, ["203.0.113.1/24"], ["203.0.113.20/24"])
    lab.link(cow, moose, ["198.51.100.1/24"], ["198.51.100.10/24"])
    client.run("ip", "route", "add", "default", "via", "192.0.2.1")
    moose.run("ip", "route", "add", "default", "via", "198.51.100.1")
    for port in (80, 443):
        gw.run("iptables", "-t", "nat", "-A", "PREROUTING", "-i", gw_if, "-p", "tcp",
               "--dport", port, "-j", "REDIRECT", "--to-ports", 12970)
    moose.popen(PYTHON, PEERS, "who", 443, "--lifetime", 300)
    web_log = str(open_tmp / "moose.jsonl")
    moose.popen(PYTHON, PEERS, "web", 80, web_log, "--lifetime", 300)
    moose.wait_listening(80)
    moose.wait_listening(443)
    return client, gw, cow, open_tmp, web_log


def start_tinyproxy(cow, tmp, auth=None):
    conf = tmp / "tinyproxy.conf"
    conf.write_text("Port 3128\nListen 203.0.113.20\nTimeout 30\nMaxClients 50\nAllow 203.0.113.0/24\n"
                    "LogLevel Info\nLogFile \"%s\"\n%s" % (
                        tmp / "tinyproxy.log", "BasicAuth %s %s\n" % auth if auth else ""))
    proc = cow.popen("tinyproxy", "-d", "-c", str(conf), stdout=subprocess.DEVNULL,
                     stderr=subprocess.DEVNULL)
    cow.wait_listening(3128)
    return proc


def test_connect_through_tinyproxy_reaches_80_and_443(gateway):
    client, gw, cow, tmp, web_log = gateway
    tiny = start_tinyproxy(cow, tmp)
    err = str(tmp / "tproxy.err")
    with open(err, "wb") as f:
        proc = gw.popen(*tproxy_cmd("-d", "-s", 12970, "--connect", "-r", "nobody",
                                    "203.0.113.20", 3128), stdout=f, stderr=f)
    gw.wait_listening(12970)
    words = who(client, "198.51.100.10", 443)
    assert words[:1] == ["198.51.100.1"] and words[2:] == ["198.51.100.10", "443"], open(err).read()
    reply = subprocess.run(client.cmd(PYTHON, PEERS, "ask", "198.51.100.10", 80),
                           input=b"GET /through HTTP/1.1\r\nHost: moose\r\nConnection: close\r\n\r\n",
                           capture_output=True, timeout=20).stdout
    assert reply.startswith(b"HTTP/1.1 200")
    assert [r["request_line"] for r in requests_seen(web_log)] == ["GET /through HTTP/1.1"]
    # The upstream proxy disappears: clients are closed promptly, tproxy keeps running.
    from lab import stop
    stop(tiny)
    started = time.monotonic()
    assert who(client, "198.51.100.10", 443) == []
    assert time.monotonic() - started < 3
    assert proc.poll() is None
    wait_for(lambda: "connect to 203.0.113.20:3128: Connection refused" in open(err).read(),
             what="refusal logged")
    start_tinyproxy(cow, tmp)
    assert who(client, "198.51.100.10", 443)[2:] == ["198.51.100.10", "443"], open(err).read()


def test_connect_with_credentials_and_refusal_logged(gateway):
    client, gw, cow, tmp, _ = gateway
    start_tinyproxy(cow, tmp, auth=("alice", "s3cret"))
    auth = tmp / "auth"
    auth.write_text("alice:s3cret\n")
    os.chmod(str(auth), 0o600)
    err_ok, err_no = str(tmp / "ok.err"), str(tmp / "no.err")
    with open(err_ok, "wb") as f:
        gw.popen(*tproxy_cmd("-d", "-s", 12970, "--connect", "--proxy-auth-file", auth,
                             "-r", "nobody", "203.0.113.20", 3128), stdout=f, stderr=f)
    with open(err_no, "wb") as f:
        gw.popen(*tproxy_cmd("-d", "-s", 12971, "--connect", "203.0.113.20", 3128),
                 stdout=f, stderr=f)
    gw.wait_listening(12970)
    gw.wait_listening(12971)
    assert who(client, "198.51.100.10", 443)[2:] == ["198.51.100.10", "443"], open(err_ok).read()
    gw.run("iptables", "-t", "nat", "-I", "PREROUTING", "-p", "tcp", "--dport", 443,
           "-j", "REDIRECT", "--to-ports", 12971)
    assert who(client, "198.51.100.10", 443) == []
    wait_for(lambda: 'proxy refused CONNECT: "HTTP/1.0 407' in open(err_no).read(),
             what="the proxy's status line logged")


def test_credentials_come_from_a_file_or_the_environment(tmp_path):
    """No option takes a password on the command line, where ps would show it."""
    from tproxy import Fatal, parse_args
    with pytest.raises(Fatal) as bad:
        parse_args(["--connect", "--proxy-auth-file=alice:pw", "192.0.2.1", "3128"])
    assert bad.value.status == 64 and "No such file" in str(bad.value)
    os.environ["TPROXY_PROXY_AUTH"] = "bob:pw2"
    try:
        assert parse_args(["--connect", "192.0.2.1", "3128"]).proxy_auth == b"bob:pw2"
        assert "TPROXY_PROXY_AUTH" not in os.environ        # read once, then forgotten
        # The variable concerns --connect only; other modes start as usual.
        os.environ["TPROXY_PROXY_AUTH"] = "bob:pw2"
        assert parse_args(["-t", "192.0.2.1", "3128"]).proxy_auth is None
    finally:
        os.environ.pop("TPROXY_PROXY_AUTH", None)


@pytest.mark.every_mode
@pytest.mark.parametrize("version", ["v1", "v2"])
def test_send_proxy_read_by_haproxy(book, version):
    cfg = book.tmp / "haproxy.cfg"
    cfg.write_text(
        "global\n    maxconn 100\n"
        "defaults\n    mode http\n    timeout connect 5s\n    timeout client 10s\n    timeout server 10s\n"
        "frontend fe\n    bind 203.0.113.20:8000 accept-proxy\n"
        "    http-request return status 200 content-type text/plain lf-string \"client=%[src] port=%[src_port]\\n\"\n")
    book.cow.popen("haproxy", "-db", "-f", str(cfg), stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    book.cow.wait_listening(8000)
    book.redirect()
    book.tproxy("-t", "--send-proxy=%s" % version, "-r", "nobody", book.COW, 8000)
    reply = book.send(book.MOOSE, 80, b"GET / HTTP/1.1\r\nHost: moose\r\nConnection: close\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 200"), reply
    assert b"client=192.0.2.10 port=" in reply


@pytest.mark.every_mode
def test_client_connecting_to_proxy_port_directly_is_refused(book):
    """Case 5: no loop, no pile of children."""
    book.redirect()
    proc, err = book.tproxy("-t", "-r", "nobody")
    for _ in range(5):
        assert book.send(book.ROUTER_IN, 12970, b"GET / HTTP/1.0\r\n\r\n") == b""
    wait_logged(err, "is this proxy itself", count=5)
    if not book.serving:    # fork mode; workers stay, their loops hold nothing (the records)
        wait_for(lambda: not connection_children(proc.pid), what="no children left")
    assert open(err).read().count("outcome=") == 5
    assert proc.poll() is None


@pytest.mark.every_mode
def test_ipv6_redirect_original_destination(book):
    book.moose.popen(PYTHON, PEERS, "who", 80, "--lifetime", 120)
    book.moose.wait_listening(80)
    book.router.run("ip6tables", "-t", "nat", "-A", "PREROUTING", "-i", book.router_if, "-p", "tcp",
                    "--dport", 80, "-j", "REDIRECT", "--to-ports", 12970)
    _, err = book.tproxy("-t", "-r", "nobody")
    book.settle_ipv6()
    words = who(book.client, book.MOOSE6, 80)
    assert words[2:] == [book.MOOSE6, "80"], open(err).read()
    wait_logged(err, "orig=[2001:db8:2::10]:80")
