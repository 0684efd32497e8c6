"""HTTP translate against hostile clients, through real tproxy processes in the book's lab.

The cache is a real process that records what reaches it: `peers.py tap`
(exactly the bytes of each connection) or `peers.py web` (each request,
answered). Issue 10, items 2 and 3.
"""
import hashlib
import json
import subprocess

import pytest

import tproxy
from support import PEERS, PYTHON, requests_seen, tproxy_cmd, wait_for

ORIG = b"198.51.100.10"
CHUNKED = b"POST /up HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"

# (name, what the client sends, how tproxy's reply starts, the bytes the cache receives
# or None when no connection to the cache may be made)
MATRIX = [
    ("valid chunked request passes exactly",
     CHUNKED + b"5;x=1\r\nhello\r\n0\r\nT: 1\r\n\r\n", b"",
     b"POST http://h/up HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"5;x=1\r\nhello\r\n0\r\nT: 1\r\n\r\n"),
    ("Transfer-Encoding with Content-Length smuggles a request",
     b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 42\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: h\r\n\r\n", b"HTTP/1.1 400 ", None),
    ("chunk size 1_0 (Python int syntax)",
     CHUNKED + b"1_0\r\n" + b"x" * 16 + b"\r\n0\r\n\r\n", b"",
     b"POST http://h/up HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"),
    ("bytes other than CRLF after chunk data",
     CHUNKED + b"5\r\nhelloXY0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: h\r\n\r\n", b"",
     b"POST http://h/up HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello"),
    ("bare CR in the target reaches the rewritten request line",
     b"GET http://h/a\rInjected:1 HTTP/1.1\r\nHost: h\r\n\r\n", b"HTTP/1.1 400 ", None),
    ("NUL in a target", b"GET /a\x00b HTTP/1.1\r\nHost: h\r\n\r\n", b"HTTP/1.1 400 ", None),
    ("NUL in a field name", b"GET / HTTP/1.1\r\nHost: h\r\nX\x00: v\r\n\r\n", b"HTTP/1.1 400 ", None),
    ("NUL in a field value", b"GET / HTTP/1.1\r\nHost: h\r\nX: a\x00b\r\n\r\n", b"HTTP/1.1 400 ", None),
    ("two Host headers", b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", b"HTTP/1.1 400 ", None),
    ("Transfer-Encoding in HTTP/1.0",
     b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", b"HTTP/1.1 400 ", None),
    ("obsolete line folding", b"GET / HTTP/1.1\r\nHost: h\r\nX: a\r\n Host: b\r\n\r\n",
     b"HTTP/1.1 400 ", None),
    ("bytes after an HTTP/0.9 request",
     b"GET /old\r\nGET /second HTTP/1.1\r\nHost: h\r\n\r\n", b"", b"GET http://" + ORIG + b"/old\r\n"),
    ("a bad request after a good one",
     b"GET /a HTTP/1.1\r\nHost: h\r\n\r\nGET /b HTTP/1.1\r\nHost: h\r\nHost: i\r\n\r\n", b"",
     b"GET http://h/a HTTP/1.1\r\nHost: h\r\n\r\n"),
]


def tap_records(path):
    return [bytes.fromhex(r["data"]) for r in requests_seen(path)]


@pytest.mark.every_mode
def test_smuggling_and_injection_matrix(book):
    tap_log = str(book.tmp / "tap.jsonl")
    book.cow.popen(PYTHON, PEERS, "tap", 8080, tap_log, "--lifetime", 300)
    book.cow.wait_listening(8080)
    book.redirect(80, 12970)
    _, err = book.tproxy("-r", "nobody", book.COW, 8080)
    problems, expected = [], []
    for name, data, reply_start, at_cache in MATRIX:
        before = len(tap_records(tap_log))
        reply = book.send(book.MOOSE, 80, data)
        got = tap_records(tap_log)[before:]
        if not reply.startswith(reply_start) or (not reply_start and reply):
            problems.append("%s: the client got %r" % (name, reply[:80]))
        if at_cache is not None:
            expected.append(at_cache)
            if got != [at_cache]:
                problems.append("%s: the cache got %r, not %r" % (name, got, at_cache))
        elif got:
            problems.append("%s: the cache got %r, expected no connection" % (name, got))
    # No connection for a refused first request arrived late either.
    assert tap_records(tap_log) == expected or problems, "late connections to the cache"
    assert not problems, "\n".join(problems)
    log = open(err).read()
    assert log.count("outcome=400 Bad Request") >= 8, log
    assert "closed after the responses to 1 earlier request(s)" in log


@pytest.mark.every_mode
def test_pipelined_bad_request_is_answered_after_earlier_responses(book):
    cow_log = book.web(book.cow)
    book.redirect()
    book.tproxy("-r", "nobody", book.COW, 80)
    reply = book.send(book.MOOSE, 80, b"GET /a HTTP/1.1\r\nHost: h\r\n\r\nGET /b HTTP/1.1\r\nHost: h\r\n\r\n"
                                      b"GET /c\x00 HTTP/1.1\r\nHost: h\r\n\r\n")
    # The cache's two responses, in order, then the end: never tproxy's 400 before them.
    assert reply.count(b"HTTP/1.1 200 OK") == 2 and b"400" not in reply, reply
    assert reply.index(b"http://h/a") < reply.index(b"http://h/b")
    assert [r["request_line"] for r in requests_seen(cow_log)] == \
        ["GET http://h/a HTTP/1.1", "GET http://h/b HTTP/1.1"]


@pytest.mark.every_mode
def test_refused_connect_parses_again(book):
    cow_log = book.web(book.cow)
    book.redirect()
    book.tproxy("-r", "nobody", book.COW, 80)
    reply = book.send(book.MOOSE, 80, b"CONNECT refused.example:443 HTTP/1.1\r\nHost: refused.example:443\r\n\r\n"
                                      b"GET /after HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 403") and b"http://h/after" in reply, reply
    assert [r["request_line"] for r in requests_seen(cow_log)] == [
        "CONNECT refused.example:443 HTTP/1.1", "GET http://h/after HTTP/1.1"]


@pytest.mark.every_mode
def test_upgrade_with_101_becomes_a_tunnel(book):
    cow_log = book.web(book.cow)
    book.redirect()
    book.tproxy("-r", "nobody", book.COW, 80)
    # Frames sent right behind the Upgrade request wait for the 101, then pass raw.
    frames = b"\x81\x05hello GET / HTTP/1.1\r\n\r\n\x00"
    reply = book.send(book.MOOSE, 80, b"GET /ws HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\n"
                                      b"Upgrade: websocket\r\n\r\n" + frames)
    assert reply.startswith(b"HTTP/1.1 101") and reply.endswith(b"\r\n\r\n" + frames), reply
    assert [r["request_line"] for r in requests_seen(cow_log)] == ["GET http://h/ws HTTP/1.1"]


HALF_HEAD = """
import socket, sys
s = socket.create_connection(("198.51.100.10", 80), timeout=30)
s.sendall(b"GET /late HTTP/1.1\\r\\nHost: h\\r\\n")
print("partial", flush=True)
sys.stdin.readline()
s.sendall(b"\\r\\n")
reply = b""
while b"\\n" not in reply:
    piece = s.recv(4096)
    if not piece:
        break
    reply += piece
print(reply.split(b"\\r\\n")[0].decode(), flush=True)
"""


def cache_connections(book, port):
    out = book.cow.run("ss", "-Htn", "state", "established", "( sport = :%d )" % port).stdout
    return len(out.splitlines())


@pytest.mark.every_mode
def test_cache_is_connected_only_after_a_complete_head(book):
    book.web(book.cow)
    book.redirect()
    _, err = book.tproxy("-r", "nobody", book.COW, 80)
    client = subprocess.Popen(book.client.cmd(PYTHON, "-c", HALF_HEAD), stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, start_new_session=True)
    book.lab.processes.append(client)
    assert client.stdout.readline().strip() == "partial"
    # The client's connection is accepted (a child serves it) ...
    wait_for(lambda: book.router.run("ss", "-Htn", "state", "established",
                                     "( sport = :12970 )").stdout.strip(), what="client accepted")
    assert cache_connections(book, 80) == 0
    client.stdin.write("\n")
    client.stdin.flush()
    assert client.stdout.readline().strip() == "HTTP/1.1 200 OK"


SLOWLORIS = """
import json, selectors, socket, sys, time
count, timeout = int(sys.argv[1]), float(sys.argv[2])
sel = selectors.DefaultSelector()
head = b"GET /slow HTTP/1.1\\r\\nHost: h\\r\\nX-Pad: " + b"a" * 200
conns = {}
for i in range(count):
    s = socket.socket()
    s.setblocking(False)
    start = time.monotonic()    # before the SYN: tproxy's deadline starts later, at accept
    s.connect_ex(("198.51.100.10", 80))
    conns[s] = {"start": start, "sent": 0, "end": None, "reply": b"", "reset": False}
    sel.register(s, selectors.EVENT_READ)
print("started", flush=True)
deadline = time.monotonic() + timeout
next_drip = time.monotonic()
while any(c["end"] is None for c in conns.values()) and time.monotonic() < deadline:
    for key, _ in sel.select(0.2):
        s, c = key.fileobj, conns[key.fileobj]
        try:
            data = s.recv(4096)
        except OSError:
            data, c["reset"] = b"", True
        c["reply"] += data
        if not data:
            c["end"] = time.monotonic()
            sel.unregister(s)
    if time.monotonic() >= next_drip:        # one byte per second on each open connection
        next_drip += 1.0
        for s, c in conns.items():
            if c["end"] is None and c["sent"] < len(head):
                try:
                    s.send(head[c["sent"]:c["sent"] + 1])
                    c["sent"] += 1
                except BlockingIOError:
                    pass
                except OSError:
                    c["reset"] = True
print(json.dumps([{"held": (c["end"] or deadline) - c["start"], "open": c["end"] is None,
                   "reset": c["reset"], "status": c["reply"][:12].decode("latin-1")}
                  for c in conns.values()]), flush=True)
"""

NORMAL = """
import socket, time
s = socket.create_connection(("198.51.100.10", 80), source_address=("192.0.2.11", 0), timeout=30)
t = time.monotonic()
s.sendall(b"GET /normal HTTP/1.1\\r\\nHost: h\\r\\nConnection: close\\r\\n\\r\\n")
reply = s.recv(4096)
print("%.3f %s" % (time.monotonic() - t, reply.split(b"\\r\\n")[0].decode()))
"""


def test_slowloris_tricklers_are_capped_and_cut_while_others_are_served(book):
    """300 tricklers from one address against 100 slots: a client at another address is served."""
    TRICKLERS, SLOTS, PER_CLIENT, DEADLINE = 300, 100, 40, 6
    book.web(book.cow)
    book.redirect()
    dev = book.client.run("ip", "-o", "addr", "show", "to", "192.0.2.10/32").stdout.split()[1]
    book.client.run("ip", "addr", "add", "192.0.2.11/24", "dev", dev)
    _, err = book.tproxy("-r", "nobody", "--max-conns", SLOTS, "--max-per-client", PER_CLIENT,
                         "--request-timeout", DEADLINE, book.COW, 80)
    tricklers = subprocess.Popen(book.client.cmd(PYTHON, "-c", SLOWLORIS, TRICKLERS, DEADLINE + 30),
                                 stdout=subprocess.PIPE, text=True, start_new_session=True)
    book.lab.processes.append(tricklers)
    assert tricklers.stdout.readline().strip() == "started"
    wait_for(lambda: open(err).read().count("--max-per-client %d" % PER_CLIENT) >= TRICKLERS - PER_CLIENT,
             timeout=30, what="tricklers over the cap refused")
    normal = book.client.run(PYTHON, "-c", NORMAL).stdout.split()
    # Served while the held tricklers still wait for their deadline: no trickler was cut yet.
    log = open(err).read()
    assert normal[1:3] == ["HTTP/1.1", "200"], normal
    assert "408 Request Timeout" not in log, "the normal client waited for the tricklers' deadline"
    results = json.loads(tricklers.stdout.readline())
    tricklers.wait(30)
    held = [r for r in results if not r["reset"]]
    assert len(held) == PER_CLIENT, [r for r in results if not r["reset"]][:3]
    assert all(r["status"].startswith("HTTP/1.1 408") and not r["open"] for r in held), held[:3]
    assert all(r["held"] >= DEADLINE for r in held), min(r["held"] for r in held)
    # Each record is written after its sockets close: wait for the last of them.
    wait_for(lambda: open(err).read().count("outcome=408 Request Timeout") >= PER_CLIENT,
             timeout=30, what="a 408 record for every held trickler")
    assert open(err).read().count("outcome=408 Request Timeout") == PER_CLIENT
    print("normal client served in %s s with %d tricklers held" % (normal[0], len(held)))


HOLDER = """
import socket, sys
held = []
for _ in range(int(sys.argv[1])):
    try:                        # a reset may come while connect() returns
        held.append(socket.create_connection(("198.51.100.10", 80), timeout=30))
    except OSError:
        pass
print("connected", flush=True)
sys.stdin.readline()
alive = 0
for s in held:
    try:
        s.sendall(b"x")
        s.shutdown(socket.SHUT_WR)
        alive += len(s.recv(100)) == 65        # the sink's digest line: served end to end
    except OSError:
        pass
print(alive, flush=True)
"""


@pytest.mark.parametrize("pool", [(), ("--workers=2",)], ids=["fork", "workers"])
def test_pool_caps_connections_per_client_address(book, pool):
    """The cap counts across the children or the pool's processes, and frees as connections end."""
    book.cow.popen(PYTHON, PEERS, "sink", 80, "--lifetime", 300)
    book.cow.wait_listening(80)
    book.redirect()
    _, err = book.tproxy("-t", "-r", "nobody", *pool, "--max-per-client", 2, book.COW, 80)
    holder = subprocess.Popen(book.client.cmd(PYTHON, "-c", HOLDER, 5), stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, start_new_session=True)
    book.lab.processes.append(holder)
    assert holder.stdout.readline().strip() == "connected"
    try:
        wait_for(lambda: open(err).read().count("already (--max-per-client 2)") == 3,
                 what="three connections over the cap refused")
    except AssertionError as exc:
        raise AssertionError("%s; tproxy's log:\n%s" % (exc, open(err).read())) from None
    holder.stdin.write("\n")
    holder.stdin.flush()
    assert holder.stdout.readline().strip() == "2"
    # The slots are free again once those two ended.
    assert book.send(book.MOOSE, 80, b"again").strip() == hashlib.sha256(b"again").hexdigest().encode()


KEEP_ALIVE_TRICKLE = """
import socket, time
s = socket.create_connection(("198.51.100.10", 80), timeout=30)
s.sendall(b"GET /first HTTP/1.1\\r\\nHost: h\\r\\n\\r\\n")
first = s.recv(4096)
start = time.monotonic()
head = b"GET /second HTTP/1.1\\r\\nHost: h\\r\\nX-Pad: " + b"a" * 100
ended = None
for byte in head:                       # one byte every 0.2 s: never idle, never complete
    try:
        s.sendall(bytes([byte]))
    except OSError:
        break
    time.sleep(0.2)
    s.setblocking(False)
    try:
        if s.recv(4096) == b"":
            ended = time.monotonic() - start
            break
    except BlockingIOError:
        pass
    except OSError:
        ended = time.monotonic() - start
        break
    s.setblocking(True)
print(first.split(b" ")[1].decode(), "ended" if ended else "open", "%.1f" % (ended or 0))
"""


@pytest.mark.every_mode
def test_later_head_on_keep_alive_has_its_own_deadline(book):
    """A second head trickled on a kept-alive connection is cut, though it is never idle."""
    book.web(book.cow)
    book.redirect()
    _, err = book.tproxy("-r", "nobody", "--idle-timeout", 3, "--request-timeout", 2, book.COW, 80)
    status, state, after = book.client.run(PYTHON, "-c", KEEP_ALIVE_TRICKLE, timeout=60).stdout.split()[-3:]
    assert status == "200" and state == "ended" and float(after) >= 2, (status, state, after)
    wait_for(lambda: "outcome=408 Request Timeout: no complete request head within 2s; closed after "
             "the responses to 1 earlier request(s)" in open(err).read(), what="the 408 record")


@pytest.mark.parametrize("option, message", [
    ("--max-per-client=0", "tproxy: --max-per-client: '0' is not a positive whole number"),
    ("--request-timeout=0", "tproxy: --request-timeout: '0' is not a number of seconds"),
    ("--request-timeout=soon", "tproxy: --request-timeout: 'soon' is not a number of seconds"),
])
def test_bad_limits_are_usage_errors(option, message):
    proc = subprocess.run(tproxy_cmd("-s", 8080, option, "192.0.2.1", 80), capture_output=True,
                          text=True, timeout=30)
    assert (proc.returncode, proc.stderr.strip()) == (64, message)


def test_client_key_counts_ipv4_the_same_on_either_listener():
    assert tproxy.client_key(("192.0.2.10", 1)) == tproxy.client_key(("::ffff:192.0.2.10", 2, 0, 0))
    assert tproxy.client_key(("fe80::1%eth0", 1, 0, 2)) == tproxy.client_key(("fe80::1", 1, 0, 0))
    assert tproxy.client_key(("2001:db8::1", 1, 0, 0)) != tproxy.client_key(("2001:db8::2", 1, 0, 0))
