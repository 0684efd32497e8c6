"""tproxy in the book's lab: REDIRECT on a router, tproxy as nobody, real servers."""
import json
import os
import subprocess
import time

import pytest

from support import (PEERS, PYTHON, children_of, connection_children, proc_status, process_uid,
                     requests_seen, the_forker, tproxy_cmd, wait_for, wait_logged)

GET = b"GET /index.html HTTP/1.1\r\nHost: moose.mancill.com\r\nConnection: close\r\n\r\n"


@pytest.mark.every_mode
def test_http_translate_sends_absolute_requests_to_cache(book):
    cow_log = book.web(book.cow)
    book.redirect()
    proc, err = book.tproxy("-r", "nobody", book.COW, 80)
    reply = book.send(book.MOOSE, 80, GET)
    assert reply.startswith(b"HTTP/1.1 200"), reply
    seen = requests_seen(cow_log)
    assert [r["request_line"] for r in seen] == ["GET http://moose.mancill.com/index.html HTTP/1.1"]
    assert seen[0]["head"].split("\r\n")[1:] == GET.decode().split("\r\n")[1:]
    assert seen[0]["peer"] == "203.0.113.1"         # not transparent: the router's address
    assert process_uid(proc.pid) == 65534       # ip netns exec execs: the Popen is tproxy
    log = wait_logged(err, "outcome=")
    assert "client=192.0.2.10:" in log and "orig=198.51.100.10:80" in log
    assert 'host="moose.mancill.com"' in log and "outcome=ok" in log


def test_http_translate_without_host_uses_original_destination(book):
    cow_log = book.web(book.cow)
    book.redirect()
    book.tproxy("-r", "nobody", book.COW, 80)
    book.send(book.MOOSE, 80, b"GET /old HTTP/1.0\r\n\r\n")
    assert [r["request_line"] for r in requests_seen(cow_log)] == \
        ["GET http://198.51.100.10/old HTTP/1.0"]


@pytest.mark.every_mode
def test_raw_fixed_target_is_the_books_setup(book):
    cow_log = book.web(book.cow)
    book.redirect()
    book.tproxy("-t", "-r", "nobody", book.COW, 80)
    reply = book.send(book.MOOSE, 80, GET)
    assert reply.startswith(b"HTTP/1.1 200")
    assert [r["request_line"] for r in requests_seen(cow_log)] == ["GET /index.html HTTP/1.1"]


@pytest.mark.every_mode
def test_raw_without_target_goes_to_original_destination(book):
    moose_log = book.web(book.moose)
    book.redirect()
    book.tproxy("-t", "-r", "nobody")
    reply = book.send(book.MOOSE, 80, GET)
    assert reply.startswith(b"HTTP/1.1 200")
    seen = requests_seen(moose_log)
    assert [r["request_line"] for r in seen] == ["GET /index.html HTTP/1.1"]
    assert seen[0]["peer"] == "198.51.100.1"


@pytest.mark.every_mode
def test_cache_down_falls_back_to_origin_unless_p(book):
    moose_log = book.web(book.moose)
    book.redirect()
    book.tproxy("-r", "nobody", "--connect-timeout", "2", book.COW, 8080)   # nothing there
    reply = book.send(book.MOOSE, 80, GET)
    assert reply.startswith(b"HTTP/1.1 200")
    # Straight to the origin, the request stays in origin form.
    assert [r["request_line"] for r in requests_seen(moose_log)] == ["GET /index.html HTTP/1.1"]


@pytest.mark.every_mode
def test_cache_down_with_p_closes_client(book):
    moose_log = book.web(book.moose)
    book.redirect()
    _, err = book.tproxy("-p", "-r", "nobody", "--connect-timeout", "2", book.COW, 8080)
    assert book.send(book.MOOSE, 80, GET) == b""
    assert requests_seen(moose_log) == []
    wait_for(lambda: "Connection refused" in open(err).read(), what="refusal logged")


@pytest.mark.every_mode
def test_acl_allows_and_denies(book):
    cow_log = book.web(book.cow)
    book.redirect(80, 12970)
    book.redirect(81, 12971)
    book.tproxy("-t", "-a", "192.0.2.0", "-a", "2001:db8:ffff::/48", book.COW, 80)
    _, err = book.tproxy("-t", "-a", "203.0.113.0/24", book.COW, 80, port=12971)
    assert book.send(book.MOOSE, 80, GET).startswith(b"HTTP/1.1 200")
    assert book.send(book.MOOSE, 81, GET) == b""
    assert len(requests_seen(cow_log)) == 1
    wait_for(lambda: "outcome=denied by access list" in open(err).read(), what="denial logged")


@pytest.mark.every_mode
def test_keepalive_chunked_and_pipelined_requests(book):
    cow_log = book.web(book.cow)
    book.redirect()
    book.tproxy("-r", "nobody", book.COW, 80)
    body = b"x" * 5000
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in (body[:3000], body[3000:]))
    data = (b"GET /one HTTP/1.1\r\nHost: moose.mancill.com\r\n\r\n"
            b"POST /two HTTP/1.1\r\nHost: moose.mancill.com\r\nContent-Length: 5000\r\n\r\n" + body +
            b"POST /three HTTP/1.1\r\nHost: moose.mancill.com:8080\r\nTransfer-Encoding: chunked\r\n\r\n"
            + chunked + b"0\r\nX-Trailer: yes\r\n\r\n"
            b"GET /four HTTP/1.1\r\nHost: moose.mancill.com\r\nConnection: close\r\n\r\n")
    reply = book.send(book.MOOSE, 80, data)
    assert reply.count(b"HTTP/1.1 200") == 4
    seen = requests_seen(cow_log)
    assert [r["request_line"] for r in seen] == [
        "GET http://moose.mancill.com/one HTTP/1.1",
        "POST http://moose.mancill.com/two HTTP/1.1",
        "POST http://moose.mancill.com:8080/three HTTP/1.1",
        "GET http://moose.mancill.com/four HTTP/1.1"]
    assert len({r["peer_port"] for r in seen}) == 1          # one connection, kept alive
    import hashlib
    assert seen[1]["body_sha256"] == seen[2]["body_sha256"] == hashlib.sha256(body).hexdigest()


@pytest.mark.every_mode
def test_connect_through_a_real_tinyproxy_cache(book):
    pytest.importorskip("json")
    conf = book.tmp / "tinyproxy.conf"
    conf.write_text("Port 3128\nListen 203.0.113.20\nTimeout 30\nMaxClients 20\n"
                    "Allow 203.0.113.0/24\nConnectPort 443\nLogLevel Info\n"
                    "LogFile \"%s\"\n" % (book.tmp / "tinyproxy.log"))
    book.cow.popen("tinyproxy", "-d", "-c", str(conf), stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    book.cow.wait_listening(3128)
    book.moose.popen(PYTHON, PEERS, "who", 443, "--lifetime", 120)
    book.moose.wait_listening(443)
    moose_log = book.web(book.moose)
    book.redirect()
    book.tproxy("-r", "nobody", book.COW, 3128)
    reply = book.send(book.MOOSE, 80, b"CONNECT 198.51.100.10:443 HTTP/1.1\r\n"
                                      b"Host: 198.51.100.10:443\r\n\r\n", half_close=False)
    head, _, tunnel = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.") and b" 200 " in head.split(b"\r\n")[0], reply
    # The tunnel reached moose's port 443 from the cache.
    assert tunnel.split()[0] == b"203.0.113.20" and tunnel.split()[3] == b"443"
    # An ordinary request through the same real cache also works.
    reply = book.send(book.MOOSE, 80, b"GET /via-tinyproxy HTTP/1.1\r\nHost: 198.51.100.10\r\n"
                                      b"Connection: close\r\n\r\n")
    assert b"200" in reply.split(b"\r\n")[0]
    assert [r["request_line"] for r in requests_seen(moose_log)] == ["GET /via-tinyproxy HTTP/1.1"]


@pytest.mark.parametrize("request_bytes, status", [
    (b"GARBAGE\r\n\r\n", b"400"),
    (b"GET / HTTP/1.1\r\nBad Header Line\r\n\r\n", b"400"),
    (b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n", b"400"),
    (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n", b"400"),
    (b"GET / HTTP/1.1\r\nHost: x\r\n" + b"X-Big: " + b"a" * 20000 + b"\r\n\r\n", b"431"),
    (b"GET /" + b"a" * 20000, b"414"),
])
def test_malformed_requests_get_4xx_and_are_logged(book, request_bytes, status):
    cow_log = book.web(book.cow)
    book.redirect()
    _, err = book.tproxy("-r", "nobody", book.COW, 80)
    reply = book.send(book.MOOSE, 80, request_bytes)
    assert reply.split(b" ")[1] == status, reply[:200]
    assert requests_seen(cow_log) == []
    wait_for(lambda: "outcome=%s" % status.decode() in open(err).read(), what="4xx logged")


@pytest.mark.every_mode
def test_raw_half_close_and_100_mb_integrity(book):
    book.cow.popen(PYTHON, PEERS, "sink", 9000, "--lifetime", 300)
    book.cow.wait_listening(9000)
    book.redirect(9000, 12970)
    book.tproxy("-t", "-r", "nobody", book.COW, 9000)
    n = 100 * 1024 * 1024
    out = book.client.run(PYTHON, PEERS, "bulk", book.MOOSE, 9000, n, timeout=120).stdout
    report = json.loads(out)
    # The sink replied only after our half-close reached it, with the digest of all we sent.
    assert report["sink_sha256"] == report["sent_sha256"]
    assert report["received"] == n and report["received_ok"]


@pytest.mark.every_mode
def test_reset_is_passed_on(book):
    """A server that resets makes the client see a reset, not a clean close."""
    script = ("import socket,struct,time\n"
              "s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
              "s.bind(('0.0.0.0', 7000)); s.listen(1); s.settimeout(30)\n"
              "c,_=s.accept(); c.recv(10)\n"
              "c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack('ii',1,0)); c.close()\n")
    book.cow.popen(PYTHON, "-c", script)
    book.cow.wait_listening(7000)
    book.redirect(7000, 12970)
    _, err = book.tproxy("-t", book.COW, 7000)
    probe = ("import socket,sys\n"
             "s=socket.create_connection(('198.51.100.10',7000),timeout=20); s.sendall(b'hello')\n"
             "try:\n    d=s.recv(10)\n    print('eof' if d==b'' else 'data')\n"
             "except ConnectionResetError:\n    print('reset')\n")
    assert book.client.run(PYTHON, "-c", probe).stdout.strip() == "reset"
    wait_for(lambda: "outcome=reset by server" in open(err).read(), what="reset logged")


def test_no_zombies_after_many_connections(book):
    book.web(book.cow)
    book.redirect()
    proc, _ = book.tproxy("-t", "-r", "nobody", book.COW, 80)
    load = ("import socket\n"
            "for i in range(200):\n"
            "    s=socket.create_connection(('198.51.100.10',80),timeout=10)\n"
            "    s.sendall(b'GET / HTTP/1.1\\r\\nHost: x\\r\\nConnection: close\\r\\n\\r\\n')\n"
            "    while s.recv(4096): pass\n"
            "    s.close()\n")
    book.client.run(PYTHON, "-c", load, timeout=120)
    server = proc.pid

    wait_for(lambda: not connection_children(server), what="all children reaped")
    forker = the_forker(server)     # fork mode's forker (tproxy(8)) lives on, and is no zombie
    assert children_of(server) == [forker] and proc_status(forker)["State"] != "Z"
    assert proc.poll() is None


def test_inetd_mode_under_openbsd_inetd(book):
    cow_log = book.web(book.cow)
    conf = book.tmp / "inetd.conf"
    script = os.path.join(os.path.dirname(PYTHON), "tproxy")
    assert os.access(script, os.X_OK), "the tproxy console script is not installed in the venv"
    conf.write_text("12970 stream tcp nowait nobody %s tproxy -t %s 80\n"
                    "12971 stream tcp nowait nobody %s tproxy %s 80\n"
                    % (script, book.COW, script, book.COW))
    book.router.popen("inetd", "-d", str(conf), stdout=subprocess.DEVNULL,
                      stderr=subprocess.DEVNULL)
    book.router.wait_listening(12970)
    book.redirect(80, 12970)
    book.redirect(8080, 12971)
    assert book.send(book.MOOSE, 80, GET).startswith(b"HTTP/1.1 200")
    book.send(book.MOOSE, 8080, b"GET /inetd HTTP/1.1\r\nHost: moose.mancill.com:8080\r\n"
                                b"Connection: close\r\n\r\n")
    assert [r["request_line"] for r in requests_seen(cow_log)] == [
        "GET /index.html HTTP/1.1", "GET http://moose.mancill.com:8080/inetd HTTP/1.1"]


def root_only_dir(book):
    """Return a directory only root may write (tproxy refuses -P anywhere else)."""
    path = book.tmp / "root-only"
    path.mkdir(mode=0o755, exist_ok=True)
    return path


def test_background_mode_pidfile_logfile_hup_and_term(book):
    book.web(book.cow)
    book.redirect()
    run = book.tmp / "run"              # nobody's log directory: -l is opened as nobody
    run.mkdir()
    os.chown(str(run), 65534, 65534)
    pidfile, logfile = root_only_dir(book) / "tproxy.pid", run / "conn.log"
    started = book.router.run(*tproxy_cmd("-s", 12970, "-r", "nobody", "-P", pidfile,
                                          "-l", logfile, "-t", book.COW, 80))
    # Without a syslog daemon here, tproxy says so (tproxy(8) LOGGING) and nothing else.
    assert started.stdout == "" and all("no syslog" in line for line in started.stderr.splitlines())
    pid = wait_for(lambda: pidfile.exists() and pidfile.read_text().strip(), what="pid file")
    pid = int(pid)
    assert process_uid(pid) == 65534
    book.router.wait_listening(12970)
    assert book.send(book.MOOSE, 80, GET).startswith(b"HTTP/1.1 200")
    wait_for(lambda: "outcome=ok" in logfile.read_text(), what="connection logged")
    os.rename(str(logfile), str(run / "conn.log.1"))
    os.kill(pid, 1)
    wait_for(logfile.exists, what="log reopened on SIGHUP")
    book.send(book.MOOSE, 80, GET)
    wait_for(lambda: "outcome=ok" in logfile.read_text(), what="logged to the new file")
    os.kill(pid, 15)
    wait_for(lambda: not os.path.exists("/proc/%d" % pid) or
             open("/proc/%d/stat" % pid).read().split()[2] == "Z", what="exit on SIGTERM")
    assert pidfile.read_text() == ""    # nobody may not remove it from root's directory
    assert os.stat(str(pidfile)).st_uid == 0 and os.stat(str(logfile)).st_uid == 65534


# A client that sends one keep-alive request, notes in FILE that it was answered, and holds on.
HOLDER = """
import socket, sys, time
s = socket.create_connection(("198.51.100.10", 80))
s.sendall(b"GET /hold HTTP/1.1\\r\\nHost: moose.mancill.com\\r\\n\\r\\n")
head = b""
while b"\\r\\n\\r\\n" not in head:
    data = s.recv(4096)
    if not data:
        sys.exit(1)
    head += data
open(sys.argv[1], "w").write(head.split(b"\\r\\n", 1)[0].decode())
time.sleep(60)
"""


def listen_queue(host, port):
    """Return how many clients wait in HOST's accept queues for PORT (ss: a listener's Recv-Q)."""
    listeners = host.run("ss", "-Hltn", "sport = :%d" % port).stdout.splitlines()
    return sum(int(line.split()[1]) for line in listeners)


def test_prefork_runs_workers_and_its_max_caps_connections(book):
    """--prefork 2:4, tproxy 1.0's pool: two event-driven workers, at most 4 connections at once."""
    cow_log = book.web(book.cow)
    book.redirect()
    proc, err = book.tproxy("-t", "--prefork", "2:4", "-r", "nobody", book.COW, 80)
    server = proc.pid
    notice = ("tproxy[%d]: --prefork 2:4: the prefork pool is retired; running 2 event-driven "
              "worker(s), as --workers=2 --max-conns=4 (see tproxy(8))\n" % server)
    assert wait_logged(err, notice).count(notice) == 1

    def workers():
        return book.router.run("pgrep", "-P", server, check=False).stdout.split()
    wait_for(lambda: len(workers()) == 2, what="two workers")
    for pid in workers():
        assert process_uid(int(pid)) == 65534
    # Six clients send a request and hold their connections: MAX (4) are served, two wait in
    # the listen queue with their requests unanswered...
    marks = [book.tmp / ("holder-%d" % i) for i in range(6)]
    holders = [book.client.popen(PYTHON, "-c", HOLDER, mark) for mark in marks]
    answered = lambda: [m for m in marks if m.exists() and m.read_text()]   # noqa: E731
    wait_for(lambda: len(answered()) == 4 and listen_queue(book.router, 12970) == 2,
             what="four holders answered and two in the listen queue")
    first = answered()
    assert all(m.read_text() == "HTTP/1.1 200 OK" for m in first)
    # ...and those two are answered once the first four leave.
    for mark, holder in zip(marks, holders):
        if mark in first:
            holder.kill()
    wait_for(lambda: len(answered()) == 6, what="the two waiting clients answered")
    assert len(requests_seen(cow_log)) == 6
    for holder in holders:
        holder.kill()
    proc.terminate()
    assert proc.wait(10) == 0
    wait_for(lambda: not workers(), what="workers gone after SIGTERM")
    assert open(err).read().count("the prefork pool is retired") == 1


def test_restart_while_old_connections_still_run(book):
    """The pid file and the port are free at SIGTERM: a restart works during the grace period."""
    book.moose.popen(PYTHON, "-c", "import socket,time; s=socket.socket(); s.bind(('0.0.0.0',80)); "
                     "s.listen(5); c,_=s.accept(); time.sleep(30)")
    book.moose.wait_listening(80)
    book.redirect()
    pidfile = root_only_dir(book) / "tproxy.pid"    # emptied at exit, not removed
    book.router.run(*tproxy_cmd("-s", 12970, "-r", "nobody", "-P", pidfile, "-t"))
    first = int(wait_for(lambda: pidfile.exists() and pidfile.read_text().strip(), what="pid"))
    book.client.popen(PYTHON, "-c", "import socket,time; s=socket.create_connection"
                      "(('198.51.100.10',80)); time.sleep(30)")
    wait_for(lambda: connection_children(first), what="a child holding a connection")
    os.kill(first, 15)
    wait_for(lambda: pidfile.read_text().strip() != str(first), what="the pid file released")
    again = book.router.run(*tproxy_cmd("-s", 12970, "-r", "nobody", "-P", pidfile, "-t"),
                            check=False)
    assert again.returncode == 0, again.stderr
    second = int(wait_for(lambda: pidfile.read_text().strip(), what="new pid"))
    assert second != first
    assert os.path.exists("/proc/%d" % first)      # still in its grace period
    os.kill(second, 15)
