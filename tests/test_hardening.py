"""Hostile local users and bad days: credentials, privileges, loops, timeouts, descriptors."""
import errno
import os
import socket
import subprocess
import time

import pytest

from support import (PORT, PYTHON, TARGET, children_of, connection_children, proc_status,
                     the_forker, tproxy_cmd, wait_for, wait_logged)

SECRET = "user:s3cret-token-4711"
# An HTTP proxy that answers CONNECT one byte at a time, never finishing its reply.
DRIBBLER = """
import socket, sys, threading, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen(8); s.settimeout(1)
def dribble(c):
    try:
        c.recv(4096)
        for _ in range(200):
            c.sendall(b"H"); time.sleep(0.3)
    except OSError: pass
end = time.monotonic() + 120
while time.monotonic() < end:
    try: c, _ = s.accept()
    except socket.timeout: continue
    threading.Thread(target=dribble, args=(c,), daemon=True).start()
"""


def redirect_local_port(box, port=80, to=PORT):
    """Give BOX a documentation network (a neighbour) and REDIRECT its own TCP PORT to TO."""
    box.lab.link(box, box.lab.host("far"), ["192.0.2.1/24"], ["192.0.2.2/24"])
    box.run("iptables", "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "--dport", port,
            "-j", "REDIRECT", "--to-ports", to)


def test_proxy_credentials_leave_every_environment(box):
    proxy = 3129
    box.popen(PYTHON, "-c", DRIBBLER, proxy)
    box.wait_listening(proxy)
    redirect_local_port(box)
    env = dict(os.environ, TPROXY_PROXY_AUTH=SECRET)
    box.lab.processes.append(subprocess.Popen(
        box.cmd(*tproxy_cmd("-d", "-s", PORT, "-b", "127.0.0.1", "-r", "nobody", "--connect",
                            "127.0.0.1", proxy)),
        env=env, start_new_session=True, stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    server = box.lab.processes[-1].pid
    box.wait_listening(PORT)
    client = box.connect(80, "192.0.2.50")       # held in CONNECT by the dribbling proxy
    wait_for(lambda: connection_children(server), what="a child serving the client")
    for pid in [server, the_forker(server)] + connection_children(server):
        with open("/proc/%d/environ" % pid, "rb") as f:
            assert SECRET.split(":")[1].encode() not in f.read()
    client.close()


def test_plain_run_as_user_keeps_no_capability_and_no_new_privileges(box):
    proc, _ = box.start()
    status = proc_status(proc.pid)
    assert status["Uid"] == "65534"
    assert int(status["CapBnd"], 16) == 0 and int(status["CapPrm"], 16) == 0
    assert status["NoNewPrivs"] == "1"


@pytest.mark.every_mode
def test_connect_reply_timeout_is_for_the_whole_reply(box):
    proxy = 3129
    box.popen(PYTHON, "-c", DRIBBLER, proxy)
    box.wait_listening(proxy)
    redirect_local_port(box)
    proc, err = box.start("--connect-timeout=1", target=("--connect", "127.0.0.1", proxy))
    client = box.connect(80, "192.0.2.50")
    client.settimeout(30)
    assert client.recv(100) == b""
    wait_for(lambda: "did not answer CONNECT within 1s" in err.read_text(),
             what="the CONNECT timeout logged")


@pytest.mark.parametrize("mode", [(), ("--workers=2",)], ids=["fork", "workers"])
def test_own_upstream_connection_coming_back_is_refused(box, mode):
    """An OUTPUT REDIRECT also catching tproxy's own connection: one hop refused, no multiplying."""
    redirect_local_port(box)
    proc, err = box.start("--max-conns=16", *mode, "-v", target=("-t",))
    client = box.connect(80, "192.0.2.50")
    client.sendall(b"hello")
    client.settimeout(30)
    try:
        assert client.recv(100) == b""
    except ConnectionResetError:
        pass
    text = wait_for(lambda: "refused: a loop" in err.read_text() and err.read_text(),
                    what="the loop refused")
    assert text.count("outcome=") <= 2, text


def test_local_client_sharing_only_a_port_with_an_upstream_is_not_looked_up(monkeypatch):
    """The loop guard reads /proc/net/tcp only for a client that can be an upstream.

    Local clients and upstreams take ports from the same ephemeral range, so
    a client often has an upstream's local port number; reading the
    namespace's whole socket table (tens of thousands of TIME_WAIT lines under
    load) for each such client kept a worker busy for seconds. The upstream
    itself, coming back, is still recognised.
    """
    import tproxy
    looked_up = []
    real = tproxy.socket_inode
    monkeypatch.setattr(tproxy, "socket_inode", lambda *a: looked_up.append(a) or real(*a))
    guard = tproxy.OwnUpstreams()
    guard.create(4)
    with socket.socket() as target, socket.socket() as other, socket.socket() as upstream:
        target.bind(("127.0.0.1", 0))
        target.listen(1)
        other.bind(("127.0.0.1", 0))
        guard.add(upstream, target.getsockname()[1], slot=2)
        upstream.connect(target.getsockname())
        guard.connecting(upstream, slot=2)
        port = upstream.getsockname()[1]
        assert not guard.is_own(("127.0.0.1", port), other.getsockname())
        assert looked_up == []
        assert guard.is_own(("127.0.0.1", port), target.getsockname())
        guard.release(2)
        assert not guard.is_own(("127.0.0.1", port), target.getsockname())


def test_loop_guard_board_search_finds_whole_slots_only():
    """OwnUpstreams.offsets searches one byte of a port and checks the pair: slots only, never straddling.

    Ports with a zero byte (512, 0xA000) are searched by their other byte;
    two neighbouring slots whose bytes spell the port across their border
    (0x3412, 0x7856 hold 12 34 56 78 in little-endian order) are no match.
    """
    import struct
    import tproxy
    guard = tproxy.OwnUpstreams()
    guard.create(8)
    words = [0x3412, 0x7856, 512, 0xA000, 0x3412, 0, 0x1200, 0x0012]
    for slot, port in enumerate(words):
        guard.port_words[slot] = port
    for port in {0x3412, 0x7856, 512, 0xA000, 0x1200, 0x0012, 0x5634, 0x3478, 0x0200, 0x12, 0x34}:
        needle = struct.pack("=H", port)
        whole = [2 * slot for slot in range(len(words)) if guard.ports[2 * slot:2 * slot + 2] == needle]
        assert list(guard.offsets(guard.ports, port)) == whole, hex(port)
        assert guard.holds(guard.ports, port) == bool(whole), hex(port)
        if whole:
            assert guard.may_hold(guard.ports, port), hex(port)
    assert not guard.may_hold(guard.ports, 0x9999)


@pytest.mark.parametrize("writes_after", [1, 2, 3])
def test_loop_guard_sees_an_upstream_whose_port_is_written_while_it_looks(monkeypatch, writes_after):
    """A worker's upstream gets its local port while another worker's is_own reads the boards.

    connecting() writes the port, then clears the pending destination; the
    reader must look at pending first, so that one of the two reads sees
    the upstream whatever the interleaving (a loop missed is a connection
    relayed to ourselves). The destination board, read before both, holds
    the port throughout.
    """
    import tproxy
    guard = tproxy.OwnUpstreams()
    guard.create(4)
    listener = socket.create_server(("127.0.0.1", 0))
    upstream = socket.socket()
    upstream.bind(("127.0.0.1", 0))
    guard.add(upstream, listener.getsockname()[1], 0)       # pending holds its destination port
    reads = []

    def counted(read):
        def board_read(*args):
            found = read(*args)
            reads.append(read)
            if len(reads) == writes_after:      # the other worker's writes come now
                guard.connecting(upstream, 0)
            return found
        return board_read
    monkeypatch.setattr(tproxy.OwnUpstreams, "may_hold", staticmethod(counted(guard.may_hold)))
    monkeypatch.setattr(tproxy.OwnUpstreams, "holds", counted(tproxy.OwnUpstreams.holds))
    monkeypatch.setattr(tproxy.OwnUpstreams, "holds_pair", counted(tproxy.OwnUpstreams.holds_pair))
    with listener, upstream:
        upstream.connect(listener.getsockname())    # connected; its worker not yet told the board
        client = upstream.getsockname()
        assert guard.is_own(client, listener.getsockname()), reads
        assert len(reads) >= writes_after       # the writes did come between the reads


@pytest.mark.every_mode
def test_idle_timeout_beyond_what_poll_takes(box):
    proc, err = box.start("--idle-timeout=3000000")     # 34.7 days: poll(2) takes 24.8 at most
    client = box.connect(PORT)
    client.sendall(b"ping")
    client.settimeout(20)
    assert client.recv(100) == b"ping"
    client.close()
    wait_for(lambda: "outcome=ok" in err.read_text(), what="the record")


@pytest.mark.every_mode
def test_idle_timeout_beyond_what_poll_takes_after_an_earlier_deadline(box):
    """A connection outliving a shorter deadline of its own still waits on the huge idle one.

    The event loop's timer for the connect deadline comes due while the
    connection lives; the idle deadline that replaces it must not overflow
    epoll's int of milliseconds (the worker died of an OverflowError).
    """
    proc, err = box.start("--idle-timeout=3000000", "--connect-timeout=0.5")
    client = box.connect(PORT)
    client.settimeout(20)
    client.sendall(b"ping")
    assert client.recv(100) == b"ping"
    time.sleep(1.0)     # not a measurement: the 0.5 s connect deadline must have passed
    client.sendall(b"pong")
    assert client.recv(100) == b"pong"
    client.close()
    wait_for(lambda: "outcome=ok" in err.read_text(), what="the record")


def inetd(box, stdin, *extra, limit=None):
    """Run tproxy in inetd mode in BOX with STDIN as fd 0; return (status, stderr text)."""
    wrapper = ("prlimit", "--nofile=%d" % limit) if limit else ()
    proc = subprocess.run(box.cmd(*wrapper, *tproxy_cmd("-t", *extra, "127.0.0.1", TARGET)),
                          stdin=stdin, capture_output=True, timeout=30)
    return proc.returncode, proc.stderr.decode()


def test_inetd_out_of_descriptors_is_a_status_and_an_honest_record(box, open_tmp):
    """No descriptor left for the target: status 69 and the reason in the record, not 70 and ok."""
    log = open_tmp / "conn.log"
    client, conn = box.accepted_connection()
    # fd 0 the client, 1 and 2 pipes, 3 its duplicate, 4 the log: the target's socket gets none.
    status, err = inetd(box, conn, "-l", log, limit=5)
    assert status == 69, err
    assert "outcome=no socket for the target: Too many open files" in log.read_text()
    for sock in (client, conn):
        sock.close()


def test_inetd_unix_socket_on_standard_input(box):
    a, b = socket.socketpair()
    status, err = inetd(box, a)
    assert (status, err) == (64, "tproxy: standard input is not a TCP socket\n")
    a.close(), b.close()


@pytest.mark.parametrize("name, proto", [("SCTP", 132), ("MPTCP", 262)])
def test_inetd_stream_socket_of_another_protocol_is_refused(box, name, proto):
    """inetd's sctp services (and systemd's SocketProtocol=) give a SOCK_STREAM that is not TCP."""
    try:
        client, conn = box.accepted_connection(proto)
    except OSError as exc:
        if exc.errno != errno.EPROTONOSUPPORT:
            raise
        pytest.skip("this kernel has no %s" % name)
    status, err = inetd(box, conn)
    assert (status, err) == (64, "tproxy: standard input is an %s socket, not a TCP socket\n" % name)
    client.close(), conn.close()


def test_inetd_wait_service_serves_the_waiting_client(box):
    listener = box.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    client = box.connect(listener.getsockname()[1])
    client.sendall(b"queued")
    client.shutdown(socket.SHUT_WR)
    status, _ = inetd(box, listener)
    assert status == 0
    client.settimeout(10)
    assert client.recv(100) == b"queued"
    client.close(), listener.close()


def test_inetd_error_with_undecodable_bytes_reaches_syslog(box):
    """Under inetd stderr is the client socket: the message goes to syslog, escaped, not a crash."""
    client, conn = box.accepted_connection()
    proc = subprocess.run(box.cmd(*tproxy_cmd("-t", "-a", os.fsdecode(b"\xff"))), stdin=conn,
                          stdout=conn, stderr=conn, timeout=30)
    assert proc.returncode == 68            # "cannot resolve host \xff": no such host name
    conn.close()
    client.settimeout(10)
    assert client.recv(100) == b""          # nothing, least of all a traceback, to the client
    for sock in (client, conn):
        sock.close()


def test_worker_out_of_descriptors_lives_on_with_an_honest_record(box):
    proc, err = box.start("--workers=1")
    worker = wait_for(lambda: children_of(proc.pid), what="the worker")[0]
    used = {int(fd) for fd in os.listdir("/proc/%d/fd" % worker)}
    free = [fd for fd in range(len(used) + 2) if fd not in used][:2]
    as_nobody = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "prlimit",
                 "--pid", str(worker)]
    hard = subprocess.run(as_nobody + ["--nofile", "--raw", "--noheadings", "-o", "HARD"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # The client gets the first free descriptor; the target's socket would need the second.
    subprocess.run(as_nobody + ["--nofile=%d:%s" % (free[1], hard)], check=True)
    client = box.connect(PORT)
    client.settimeout(20)
    assert client.recv(100) == b""
    wait_logged(err, "outcome=no socket for the target: Too many open files")
    subprocess.run(as_nobody + ["--nofile=%s:%s" % (hard, hard)], check=True)
    again = box.connect(PORT)
    assert echo_back(again, b"the same worker serves on")
    assert children_of(proc.pid) == [worker]


def echo_back(sock, data):
    sock.sendall(data)
    sock.settimeout(20)
    got = b""
    while len(got) < len(data):
        more = sock.recv(65536)
        if not more:
            break
        got += more
    return got == data
