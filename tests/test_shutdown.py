"""Shutdown and supervision: SIGTERM, --grace, a dead server or forker, SIGHUP, a failing fork."""
import os
import resource
import shutil
import signal
import socket
import subprocess
import time

import pytest

from support import (GRACE, PORT, PYTHON, TARGET, children_of, connection_children, proc_status,
                     the_forker, tproxy_cmd, wait_for, wait_logged)

MODES = {"fork": (), "workers": ("--workers=2",)}


def echoed(sock, data=b"ping"):
    """Send DATA on SOCK and return True when it comes back whole."""
    sock.sendall(data)
    got = b""
    while len(got) < len(data):
        more = sock.recv(65536)
        if not more:
            return False
        got += more
    return got == data


def refused(host, port=PORT):
    """Return True when a new client to PORT is refused by the kernel (nobody listens)."""
    try:
        host.connect(port, timeout=2).close()
    except ConnectionRefusedError:
        return True
    except (socket.timeout, ConnectionResetError):
        # Reset: the listener closed while our connection sat in its queue. Ask again.
        return False
    return False


def ends_with_reset(sock, timeout=GRACE + 20):
    """Wait for SOCK's end; return True for a reset, False for a clean end of stream."""
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        return True
    return False


@pytest.mark.parametrize("mode", MODES)
def test_sigterm_refuses_at_once_finishes_within_grace_then_resets(box, mode):
    grace = 8       # long enough for the steps below on a loaded machine; the end is awaited
    proc, err = box.start(*MODES[mode], grace=grace)
    live = box.connect(PORT)
    assert echoed(live)
    proc.send_signal(signal.SIGTERM)
    wait_for(lambda: refused(box), what="new clients refused after SIGTERM")
    assert echoed(live, b"still served during the grace period")
    # A new server binds the same port while the old connection is still in its grace period.
    again, _ = box.start()
    fresh = box.connect(PORT)
    assert echoed(fresh) and proc.poll() is None
    assert ends_with_reset(live, grace + 20), "a connection cut at shutdown must be reset"
    assert proc.wait(grace + 20) == 0
    wait_logged(err, "outcome=cut at shutdown after the %gs grace period" % grace)
    assert echoed(fresh, b"the new server is not disturbed")
    fresh.close()


@pytest.mark.parametrize("mode", MODES)
def test_children_stop_when_the_server_is_killed(box, mode):
    proc, err = box.start(*MODES[mode])
    live = box.connect(PORT)
    assert echoed(live)
    server = proc.pid            # ip netns exec execs: the Popen is tproxy itself
    kids = wait_for(lambda: children_of(server), what="children")
    os.kill(server, signal.SIGKILL)
    proc.wait(10)
    wait_for(lambda: refused(box), what="nothing accepting once the server is dead")
    assert ends_with_reset(live)
    wait_for(lambda: not any(os.path.exists("/proc/%d" % k) and
                             open("/proc/%d/stat" % k).read().split()[2] != "Z" for k in kids),
             timeout=GRACE + 20, what="children gone after the grace period")


@pytest.mark.parametrize("mode", MODES)
def test_sighup_to_everyone_cuts_no_connection(box, mode):
    """`killall -HUP tproxy` (logrotate) reaches children too; they must live on."""
    proc, _ = box.start(*MODES[mode])
    live = box.connect(PORT)
    assert echoed(live)
    for pid in [proc.pid] + wait_for(lambda: children_of(proc.pid), what="children"):
        try:
            os.kill(pid, signal.SIGHUP)
        except ProcessLookupError:
            pass        # fork mode: the forker's probe child, reaped meanwhile (killall skips it too)
    assert echoed(live, b"after SIGHUP")
    assert proc.poll() is None
    live.close()


BANNER = """
import socket, sys
server = socket.create_server((sys.argv[1], int(sys.argv[2])))
while True:
    conn, _ = server.accept()
    conn.sendall(sys.argv[3].encode())
    conn.close()
"""


@pytest.mark.parametrize("mode", MODES)
def test_sighup_resolves_the_target_again_for_new_connections(box, mode):
    """PROXYHOST from /etc/hosts (ip netns exec binds /etc/netns/NS/hosts over it) moves; SIGHUP follows.

    In fork mode the forker, which forks the children, resolves again; the
    parent's word to it comes before any connection accepted after.
    """
    port = 9100
    for addr, name in (("127.0.0.2", "old"), ("127.0.0.3", "new")):
        box.popen(PYTHON, "-c", BANNER, addr, port, name)
        wait_for(lambda: answers(box, addr, port), what="the %s target" % name)
    etc = "/etc/netns/" + box.netns
    made_netns_dir = not os.path.exists("/etc/netns")
    os.makedirs(etc, exist_ok=True)
    try:
        hosts = os.path.join(etc, "hosts")
        with open(hosts, "w") as f:
            f.write("127.0.0.1 localhost\n127.0.0.2 target.test\n")
        proc, err = box.start(*MODES[mode], target=("-t", "target.test", port))
        assert banner(box) == b"old"
        with open(hosts, "w") as f:        # the same file (inode): the bind mount shows it
            f.write("127.0.0.1 localhost\n127.0.0.3 target.test\n")
        proc.send_signal(signal.SIGHUP)
        wait_logged(err, "SIGHUP:")
        if mode == "workers":       # each worker resolves on its own wakeup
            wait_for(lambda: banner(box) == b"new", what="the new address in use")
        else:
            assert banner(box) == b"new"
            # A forker started after the SIGHUP is forked from the parent: it must have them too.
            forker = the_forker(proc.pid)
            os.kill(forker, signal.SIGKILL)
            wait_logged(err, "the forker (pid %d) died" % forker)
            assert banner(box) == b"new"
    finally:
        shutil.rmtree(etc, ignore_errors=True)
        if made_netns_dir:
            try:
                os.rmdir("/etc/netns")
            except OSError:
                pass        # not empty: another namespace's files are there


def answers(box, addr, port):
    """Return True when something accepts on ADDR:PORT in BOX."""
    try:
        box.connect(port, addr).close()
    except OSError:
        return False
    return True


def banner(box):
    """Return what the target said to one client through tproxy."""
    with box.connect(PORT) as sock:
        got = b""
        while True:
            more = sock.recv(100)
            if not more:
                return got
            got += more


def test_ctrl_c_to_the_process_group_gives_grace_not_a_clean_end(box):
    """-d in a terminal: Ctrl-C sends SIGINT to every process; a child must not just exit."""
    proc, _ = box.start(grace=8)
    live = box.connect(PORT)
    assert echoed(live)
    os.killpg(os.getpgid(proc.pid), signal.SIGINT)
    assert echoed(live, b"still served during the grace period")
    assert ends_with_reset(live, 30)
    assert proc.wait(30) == 0


def status_active(err, count):
    """Return the active= count of the COUNT-th status line in ERR (SIGUSR1 sent before)."""
    lines = wait_for(lambda: [l for l in err.read_text().splitlines() if "status: parent" in l][count - 1:],
                     what="status line %d" % count)
    return int(lines[0].split("active=")[1].split()[0])


def test_a_dead_forker_is_replaced_and_its_children_live_on(box):
    """Fork mode: children are the parent's own (CLONE_PARENT), so a forker's death cuts no
    connection and loses no count; the parent says so and starts a new forker."""
    proc, err = box.start("--max-conns=4")
    live = box.connect(PORT)
    assert echoed(live)
    [child] = wait_for(lambda: connection_children(proc.pid), what="the child")
    forker = the_forker(proc.pid)
    os.kill(forker, signal.SIGKILL)
    wait_logged(err, "the forker (pid %d) died; 0 connection(s) handed to it were lost; "
                "starting a new one" % forker)
    assert echoed(live, b"the connection lives on")
    fresh = box.connect(PORT)
    assert echoed(fresh, b"served through a new forker")
    assert the_forker(proc.pid) != forker
    proc.send_signal(signal.SIGUSR1)
    assert status_active(err, 1) == 2           # the old forker's child is still counted
    live.close()
    wait_logged(err, "outcome=ok")
    wait_for(lambda: child not in children_of(proc.pid), what="the old child reaped")
    proc.send_signal(signal.SIGUSR1)
    assert status_active(err, 2) == 1
    assert echoed(fresh) and proc.poll() is None
    fresh.close()


def test_fork_mode_connections_a_dead_forker_held_are_counted_then_reset_with_a_record(box):
    """Raw relay in fork mode: the parent connects, then hands both descriptors to the forker.
    Connections handed to a forker that cannot clone (stopped here) are counted (SIGUSR1);
    when it dies with them, each is reset (not a clean end of file) and logged, once."""
    proc, err = box.start("--max-conns=4")
    first = box.connect(PORT)       # served: the forker has rehearsed and is waiting
    assert echoed(first)
    forker = the_forker(proc.pid)
    os.kill(forker, signal.SIGSTOP)
    handed = box.connect(PORT)
    wait_counted(proc, err, 2)      # the first child and the connection handed to the stopped forker
    os.kill(forker, signal.SIGKILL)
    wait_logged(err, "the forker (pid %d) died; 1 connection(s) handed to it were lost; "
                "starting a new one" % forker)
    assert ends_with_reset(handed), "a connection lost with the forker must be reset"
    wait_logged(err, "target=127.0.0.1:%d mode=raw up=0 down=0 " % TARGET,
                "outcome=lost: the forker died before it took it")
    assert echoed(first, b"the first lives on") and echoed(box.connect(PORT))
    first.close()


def traced(box, pid, *rules):
    """Attach strace to PID with RULES (its -e options: which calls, what to inject); return it once attached.

    None where ptrace is refused (some containers): strace exits. The lab stops it.
    """
    tracer = subprocess.Popen(["strace", "-qq", "-o", "/dev/null", "-p", str(pid)]
                              + [word for rule in rules for word in ("-e", rule)])
    box.lab.processes.append(tracer)
    wait_for(lambda: proc_status(pid)["TracerPid"] != "0" or tracer.poll() is not None,
             what="strace attached")
    return tracer if tracer.poll() is None else None


@pytest.mark.skipif(not shutil.which("strace"), reason="needs strace(1)")
def test_a_forker_killed_right_after_a_clone_loses_no_child(box):
    """Fork mode: the forker dies between a child's clone and any word of it (strace holds
    back the forker's sends): the child is still counted (--max-conns 1, SIGUSR1) and gets
    its grace at SIGTERM."""
    proc, err = box.start("--max-conns=1", grace=8)
    first = box.connect(PORT)       # served: the forker has rehearsed (its own sends are done)
    assert echoed(first)
    first.close()
    wait_for(lambda: not connection_children(proc.pid), what="the first child reaped")
    forker = the_forker(proc.pid)
    # Where ptrace is not allowed (some containers) the test runs without the wait.
    traced(box, forker, "trace=sendto,sendmsg", "inject=sendto,sendmsg:delay_enter=60000000")
    live = box.connect(PORT)
    assert echoed(live)
    os.kill(forker, signal.SIGKILL)
    wait_logged(err, "the forker (pid %d) died; 0 connection(s) handed to it were lost; "
                "starting a new one" % forker)
    proc.send_signal(signal.SIGUSR1)
    assert status_active(err, 1) == 1
    proc.send_signal(signal.SIGTERM)
    wait_logged(err, "SIGTERM: stopped accepting; 1 connection(s) get 8s to finish")
    assert echoed(live, b"served during the grace period")
    assert ends_with_reset(live)
    assert proc.wait(30) == 0


# Which of the rehearsal's connections the REDIRECT takes: all (its client's first), or only
# the second (nat sees a connection's first packet: the Session's own to its target).
REDIRECTED = {"both": (), "upstream": ("-m", "statistic", "--mode", "nth", "--every", "2",
                                       "--packet", "1")}


@pytest.mark.parametrize("which", REDIRECTED)
def test_the_forkers_rehearsal_sends_nothing_to_where_a_redirect_takes_it(box, which):
    """Fork mode: an OUTPUT-chain REDIRECT takes the forker's loopback rehearsal elsewhere (a
    listener that records what it gets): not a byte reaches it, and tproxy logs only our client."""
    recorder = box.socket()
    recorder.bind(("127.0.0.1", 0))
    recorder.listen(16)
    box.run("iptables", "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-m", "multiport", "!",
            "--dports", "%d,%d" % (PORT, TARGET), *REDIRECTED[which], "-j", "REDIRECT",
            "--to-ports", str(recorder.getsockname()[1]))
    proc, err = box.start()
    client = box.connect(PORT)
    assert echoed(client)       # the forker has rehearsed (before it took this connection)
    ours = "client=127.0.0.1:%d " % client.getsockname()[1]
    client.close()
    wait_logged(err, "outcome=ok")
    recorder.setblocking(False)
    received, accepted = b"", 0
    while True:
        try:
            conn, _ = recorder.accept()
        except BlockingIOError:
            break
        accepted += 1
        with conn:
            conn.settimeout(5)
            try:
                while True:
                    more = conn.recv(65536)
                    if not more:
                        break
                    received += more
            except ConnectionResetError:
                pass
    recorder.close()
    assert accepted and received == b""
    records = [line for line in err.read_text().splitlines() if "client=" in line]
    assert len(records) == 1 and ours in records[0]


def stalled_target(box):
    """Return (listener, filler): a loopback target that never answers.

    Its accept queue holds one connection, which FILLER takes: the kernel
    drops every later SYN until the test accepts.
    """
    stalled = box.socket()
    stalled.bind(("127.0.0.1", 0))
    stalled.listen(0)
    filler = box.socket()
    filler.connect(stalled.getsockname())
    return stalled, filler


def wait_counted(proc, err, active=1):
    """Ask tproxy PROC for status lines (SIGUSR1) until one in ERR counts ACTIVE connections."""
    asked = []

    def counted():
        asked.append(proc.send_signal(signal.SIGUSR1))
        return status_active(err, len(asked)) == active
    wait_for(counted, what="%d connection(s) counted as active" % active)


def test_fork_mode_a_connection_being_connected_is_counted_and_gets_the_grace(box):
    """Raw relay in fork mode: the parent connects (a child is cloned only to relay). A target
    that never answers (its accept queue full): the connection has no child yet, is counted
    (SIGUSR1), and at SIGTERM gets the grace, then a reset and its record."""
    stalled, filler = stalled_target(box)
    proc, err = box.start("--max-conns=1", "--connect-timeout=120", grace=3,
                          target=("-t", "127.0.0.1", stalled.getsockname()[1]))
    waiting = box.connect(PORT)
    wait_counted(proc, err)     # accepted, and being connected
    assert connection_children(proc.pid) == []
    proc.send_signal(signal.SIGTERM)
    wait_for(lambda: refused(box), what="new clients refused after SIGTERM")
    assert ends_with_reset(waiting), "a connection cut at shutdown must be reset"
    assert proc.wait(30) == 0
    wait_logged(err, "target=- mode=raw up=0 down=0 ", "outcome=cut at shutdown after the 3s grace period")
    filler.close()
    stalled.close()


def test_fork_mode_connections_being_connected_fit_the_usual_descriptor_limit(box):
    """Raw relay in fork mode: the parent holds two descriptors per connection being connected
    (the client and its upstream), where before each child held its own. At a low soft
    RLIMIT_NOFILE (64, hard 4096), --max-conns=40 clients to a target that never answers
    must all wait for it, as before: none refused for want of a descriptor (EMFILE)."""
    stalled, filler = stalled_target(box)
    proc, err = box.start("--max-conns=40", "--connect-timeout=120",
                          wrapper=("prlimit", "--nofile=64:4096"),
                          target=("-t", "127.0.0.1", stalled.getsockname()[1]))
    clients = [box.connect(PORT) for _ in range(36)]
    asked = []

    def counted_or_ended():     # every one counted, or a record: one has ended already
        asked.append(proc.send_signal(signal.SIGUSR1))
        active = status_active(err, len(asked))
        records = [line for line in err.read_text().splitlines() if "client=" in line]
        return (active == len(clients) or records) and (active, records)
    active, records = wait_for(counted_or_ended, timeout=20, what="the connections counted")
    assert records == [] and active == len(clients)
    for client in clients:
        client.close()
    filler.close()
    stalled.close()


def test_fork_mode_sigterm_to_every_process_relays_a_connection_connected_in_the_grace(box):
    """systemd's stop sends SIGTERM to every process of the unit, the forker too. A raw
    connection being connected then, whose target answers within the grace, is relayed
    until the grace ends, then reset, with its record: as when its own child connected
    it, not closed by a forker that forks no more."""
    stalled, filler = stalled_target(box)
    proc, err = box.start("--connect-timeout=60", grace=60,
                          target=("-t", "127.0.0.1", stalled.getsockname()[1]))
    waiting = box.connect(PORT)
    wait_counted(proc, err)
    os.killpg(os.getpgid(proc.pid), signal.SIGTERM)
    wait_for(lambda: refused(box), what="new clients refused after SIGTERM")
    stalled.settimeout(30)
    stalled.accept()[0].close()         # the filler: room in the queue for tproxy's next SYN
    upstream = stalled.accept()[0]
    upstream.sendall(b"served in the grace")
    waiting.settimeout(30)
    assert waiting.recv(100) == b"served in the grace"
    waiting.sendall(b"and back")
    upstream.settimeout(30)
    assert upstream.recv(100) == b"and back"
    proc.send_signal(signal.SIGTERM)    # again: the grace ends now
    assert ends_with_reset(waiting), "a connection cut at shutdown must be reset"
    assert proc.wait(30) == 0
    wait_logged(err, "outcome=cut at shutdown after the 60s grace period")
    for sock in (upstream, filler, stalled):
        sock.close()


@pytest.mark.skipif(not shutil.which("strace"), reason="needs strace(1)")
@pytest.mark.parametrize("taken", [True, False], ids=["taken-in-the-grace", "never-taken"])
def test_fork_mode_a_connected_client_the_forker_has_not_taken_gets_the_grace(box, taken):
    """Raw relay in fork mode: a connection connected by the parent waits for the forker to
    take it (strace fails every sendmsg with EAGAIN, as a full queue does). SIGTERM then:
    it gets the grace like any other, is relayed if the forker takes it meanwhile, and is
    cut at its end with its record; not reset at once with no record."""
    proc, err = box.start(grace=60)
    first = box.connect(PORT)       # served: the forker has rehearsed and is waiting
    assert echoed(first)
    tracer = traced(box, proc.pid, "trace=sendmsg", "inject=sendmsg:error=EAGAIN")
    if tracer is None:
        pytest.skip("strace cannot attach here (no ptrace)")
    waiting = box.connect(PORT)
    wait_counted(proc, err, 2)      # the first child and the connection held in the parent
    proc.send_signal(signal.SIGTERM)
    wait_for(lambda: refused(box), what="new clients refused after SIGTERM")
    if taken:
        tracer.terminate()      # detaches: the forker can take it now
        tracer.wait(10)
        assert echoed(waiting, b"served in the grace")
    proc.send_signal(signal.SIGTERM)    # again: the grace ends now
    assert ends_with_reset(waiting), "a connection cut at shutdown must be reset"
    assert proc.wait(30) == 0
    wait_logged(err, "outcome=cut at shutdown after the 60s grace period", count=2)


@pytest.mark.skipif(not shutil.which("strace"), reason="needs strace(1)")
def test_fork_mode_connected_clients_wait_in_turn_when_the_forker_cannot_take_them(box):
    """Raw relay in fork mode: the parent connects, then hands both descriptors to the forker.
    When that hand-over fails (strace makes the parent's first three sendmsg calls fail with
    EAGAIN, as a full queue does), the connected clients wait in the parent, in turn, and
    are each served in a child of their own once the forker takes them."""
    proc, err = box.start("--max-conns=8")
    first = box.connect(PORT)       # served: the forker has rehearsed and is waiting
    assert echoed(first)
    tracer = traced(box, proc.pid, "trace=sendmsg", "inject=sendmsg:error=EAGAIN:when=1..3")
    if tracer is None:
        pytest.skip("strace cannot attach here (no ptrace)")
    clients = [box.connect(PORT) for _ in range(4)]
    for i, client in enumerate(clients):
        assert echoed(client, b"client %d" % i)
    assert len(connection_children(proc.pid)) == 5
    tracer.terminate()      # detaches
    tracer.wait(10)
    for client in clients + [first]:
        client.close()
    wait_logged(err, "outcome=ok", count=5)


def test_fork_mode_sigterm_is_logged_at_once_with_connections_being_connected(box):
    """The line saying SIGTERM came, accepting stopped, and how many connections get the grace
    is logged when it comes, as in every mode: not once the grace is over because a
    raw connection was still being connected (its target never answers)."""
    stalled, filler = stalled_target(box)
    proc, err = box.start("--connect-timeout=120", grace=60,
                          target=("-t", "127.0.0.1", stalled.getsockname()[1]))
    waiting = box.connect(PORT)
    wait_counted(proc, err)
    proc.send_signal(signal.SIGTERM)
    wait_logged(err, "SIGTERM: stopped accepting; 1 connection(s) get 60s to finish")
    proc.send_signal(signal.SIGTERM)    # again: the grace ends now
    assert ends_with_reset(waiting)
    assert proc.wait(30) == 0
    assert err.read_text().count("SIGTERM: stopped accepting") == 1
    filler.close()
    stalled.close()


def syn_retransmits(pid, port):
    """Return how many times the SYN of PID's namespace's connection to PORT was sent again, or None."""
    with open("/proc/%d/net/tcp" % pid) as table:
        for line in table.readlines()[1:]:
            fields = line.split()
            if int(fields[2].split(":")[1], 16) == port and fields[3] == "02":     # SYN_SENT
                return int(fields[6], 16)
    return None


def test_fork_mode_a_connection_connected_late_in_the_grace_ends_with_it(box):
    """--grace bounds shutdown (a service manager's stop timeout is set above it): a raw
    connection the parent connects late in the grace (its target's queue freed 3.5 s in, so
    the SYN sent again next gets through) is cut when the grace ends, with every other
    connection; not given a whole grace of its own from then."""
    grace = 10
    stalled, filler = stalled_target(box)
    port = stalled.getsockname()[1]
    proc, err = box.start("--connect-timeout=60", grace=grace, target=("-t", "127.0.0.1", port))
    late = box.connect(PORT)
    wait_for(lambda: syn_retransmits(proc.pid, port) is not None, what="the parent connecting")
    proc.send_signal(signal.SIGTERM)
    ends = time.monotonic() + grace
    wait_for(lambda: refused(box), what="new clients refused after SIGTERM")
    # SYNs are sent again at 1 s, 2 s, 3 s... (net.ipv4.tcp_syn_linear_timeouts), or at 1 s,
    # 3 s, 7 s (RFC 6298's backoff): the one after 3.5 s comes between 4 and 7 s in.
    wait_for(lambda: (syn_retransmits(proc.pid, port) or 0) >= 2, what="the SYN sent again twice")
    time.sleep(max(0, ends - grace + 3.5 - time.monotonic()))
    stalled.settimeout(30)
    stalled.accept()[0].close()         # the filler: room in the queue for the next SYN
    upstream = stalled.accept()[0]
    upstream.sendall(b"served in the grace")
    late.settimeout(30)
    assert late.recv(100) == b"served in the grace"
    # Without the bound it would live a whole grace from now (past ENDS + 3 s).
    late.settimeout(max(0.1, ends + 3 - time.monotonic()))
    try:
        assert late.recv(100) == b"", "nothing else comes"
        pytest.fail("a connection cut at shutdown must be reset")
    except ConnectionResetError:
        pass
    except socket.timeout:
        pytest.fail("connected in the grace, it outlived the grace by 3 s or more")
    assert proc.wait(30) == 0
    wait_logged(err, "outcome=cut at shutdown after the %gs grace period" % grace)
    for sock in (upstream, filler, stalled):
        sock.close()


def test_fork_failure_holds_the_client_until_a_child_can_start(box):
    """At the run-as user's process limit nobody is refused: the client waits, then is served.

    A uid of its own (no other process of it anywhere) with a soft limit of one
    process: the server itself. Raising the limit later needs that same uid.
    """
    uid, hard = 54321, resource.getrlimit(resource.RLIMIT_NPROC)[1]
    hard = "unlimited" if hard == resource.RLIM_INFINITY else hard
    proc, err = box.start(user="#%d" % uid, wrapper=("prlimit", "--nproc=1:%s" % hard))
    client = box.connect(PORT)
    client.sendall(b"waiting")
    wait_for(lambda: "fork: " in err.read_text(), what="the failed fork logged")
    subprocess.run(["setpriv", "--reuid=%d" % uid, "--regid=%d" % uid, "--clear-groups",
                    "prlimit", "--pid", str(proc.pid), "--nproc=%s" % hard], check=True)
    client.settimeout(20)
    assert client.recv(100) == b"waiting"
    client.close()


def test_a_forker_that_cannot_fork_holds_the_client_until_it_can(box):
    """Fork mode: at the process limit the forker (not the parent) holds the client and retries.

    A uid of its own with a soft limit of two processes: the server and its
    forker. The forker inherited the limit; raising it there lets the child start.
    """
    uid, hard = 54322, resource.getrlimit(resource.RLIMIT_NPROC)[1]
    hard = "unlimited" if hard == resource.RLIM_INFINITY else hard
    proc, err = box.start(user="#%d" % uid, wrapper=("prlimit", "--nproc=2:%s" % hard))
    forker = the_forker(proc.pid)
    client = box.connect(PORT)
    client.sendall(b"waiting")
    wait_logged(err, "tproxy[%d]: fork: " % forker)
    subprocess.run(["setpriv", "--reuid=%d" % uid, "--regid=%d" % uid, "--clear-groups",
                    "prlimit", "--pid", str(forker), "--nproc=%s" % hard], check=True)
    client.settimeout(20)
    assert client.recv(100) == b"waiting"
    assert children_of(proc.pid)[0] == forker       # the same forker, the child beside it
    client.close()


def test_inetd_mode_sigterm_gives_grace_then_resets(box):
    """One process, one connection: SIGTERM (or SIGHUP) must not end it cleanly mid-transfer."""
    client, conn = box.accepted_connection()
    proc = subprocess.Popen(box.cmd(*tproxy_cmd("-t", "--grace=%g" % GRACE, "127.0.0.1", TARGET)),
                            stdin=conn, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    box.lab.processes.append(proc)
    conn.close()
    assert echoed(client)
    proc.send_signal(signal.SIGHUP)
    proc.send_signal(signal.SIGTERM)
    assert echoed(client, b"served during the grace period")
    assert ends_with_reset(client)
    assert proc.wait(30) == 69
    client.close()
