"""Helpers shared by the test modules: the programs under test, waiting, the book's lab.

Test modules import from here, never from conftest: tests/ and tests/translate/
each have a conftest.py, and both are registered as the module "conftest".
"""
import os
import signal
import subprocess
import sys

from lab import have, poll, stop  # noqa: F401  (have is re-exported for test modules)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TPROXY = os.path.join(REPO, "tproxy.py")
PEERS = os.path.join(REPO, "tests", "peers.py")
PYTHON = sys.executable

sys.path.insert(0, REPO)

# A private mount namespace with its own /dev (a tmpfs plus the few devices
# Python needs): no /dev/log unless a test binds one, and the host untouched.
# Use as ["unshare", "-m", "sh", "-c", PRIVATE_DEV, "sh", PROGRAM, ARGS...].
PRIVATE_DEV = """
set -e
mount --make-rprivate /
old=$(mktemp -d)
mount --bind /dev "$old"
mount -t tmpfs tmpfs /dev
for d in null zero urandom random; do touch /dev/$d; mount --bind "$old/$d" /dev/$d; done
exec "$@"
"""


# `PYTHON -c LAUNCH FD ARGV...` runs ARGV with descriptor FD moved to 3 and
# LISTEN_PID set to the process's own pid where it is "self", as systemd
# does between fork and exec (socket activation without systemd).
LAUNCH = """import os, sys
fd = int(sys.argv[1])
if fd != 3:
    os.dup2(fd, 3)
if os.environ.get("LISTEN_PID") == "self":
    os.environ["LISTEN_PID"] = str(os.getpid())
os.execv(sys.argv[2], sys.argv[2:])
"""


def proc_status(pid):
    """Return {field: first word} of /proc/PID/status (Uid is the real uid, Cap* in hex)."""
    with open("/proc/%d/status" % pid) as f:
        return {key: value.split()[0] for key, _, value in
                (line.partition(":") for line in f) if value.split()}


def describe(pid):
    """Return one line saying who PID is (pid, comm, State, PPid, Uid line, cmdline), for assertions."""
    try:
        with open("/proc/%d/status" % pid) as f:
            fields = dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            cmdline = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except (FileNotFoundError, ProcessLookupError):
        return "pid %d: gone" % pid
    return "pid %d comm=%r State=%s PPid=%s Uid=%s cmdline=%r" % (
        pid, fields.get("Name"), fields.get("State"), fields.get("PPid"), fields.get("Uid"), cmdline)


def process_uid(pid):
    """Return the real uid of PID."""
    return int(proc_status(pid)["Uid"])


FORKER = "tproxy forker"         # fork mode's process that forks the children (tproxy(8))


def family_status(pid):
    """Return {pid: proc_status} of PID and of its children (fork mode: forker and children), read now.

    A child gone before its status is read (the forker's probe, say, reaped
    meanwhile) is left out, and so is a pid that is no longer PID's child by
    then (reused by another process).
    """
    family = {pid: proc_status(pid)}
    for child in children_of(pid):
        try:
            status = proc_status(child)
        except (FileNotFoundError, ProcessLookupError):
            continue
        if status.get("PPid") == str(pid):
            family[child] = status
    return family


def children_of(pid):
    """Return the pids of PID's children (fork mode: the forker too), oldest first."""
    try:
        with open("/proc/%d/task/%d/children" % (pid, pid)) as f:
            return [int(p) for p in f.read().split()]
    except FileNotFoundError:
        return []


def comm_of(pid):
    """Return PID's comm name ("" once it is gone)."""
    try:
        with open("/proc/%d/comm" % pid) as f:
            return f.read().strip()
    except (FileNotFoundError, ProcessLookupError):
        return ""


def connection_children(pid):
    """Return the pids of tproxy PID's children that serve connections: all but fork mode's forker.

    A child gone between the two reads of /proc (comm "") is not one: the
    forker's probe child, say, reaped just then.
    """
    return [child for child in children_of(pid) if comm_of(child) not in ("", FORKER)]


def forkers_of(pid):
    """Return the pids of tproxy PID's children named as fork mode's forker."""
    return [child for child in children_of(pid) if comm_of(child) == FORKER]


def the_forker(pid, timeout=10.0):
    """Return the pid of tproxy PID's forker (fork mode), once no other child bears its name.

    A name is no identity: each process the forker clones is born with its
    name. Its probe child (which exits at once) keeps it until the parent
    reaps it, which may be after the first connections are served on a
    loaded machine; each connection's child keeps it until it takes its
    own, at once. The forker is the one that stays: wait (TIMEOUT) until
    it is alone, and fail with every child described.
    """
    def alone():
        forkers = forkers_of(pid)
        return forkers[0] if len(forkers) == 1 else None
    forker = poll(alone, timeout)
    if forker:
        return forker
    raise AssertionError("timed out after %.1f s waiting for tproxy %d's forker to be the only child "
                         "named %r: %s" % (timeout, pid, FORKER,
                                           "; ".join(describe(child) for child in children_of(pid))))


def tproxy_cmd(*args):
    """Return the argv that runs the working tree's tproxy with ARGS."""
    return [PYTHON, TPROXY] + [str(a) for a in args]


def wait_for(predicate, timeout=10.0, interval=0.05, what="condition"):
    """Poll PREDICATE until it returns a true value (returned); fail after TIMEOUT."""
    value = poll(predicate, timeout, interval)
    if value:
        return value
    raise AssertionError("timed out after %.1f s waiting for %s" % (timeout, what))


READY = "listening on"          # tproxy's start-up line (run_standalone), logged once it is ready


def wait_ready(proc, err, timeout=20.0):
    """Wait until tproxy PROC has logged READY to its stderr file ERR; return the file's text.

    Listening is not ready: tproxy binds as root, then checks the return path
    (running ip as root), preloads, switches user, and only then logs READY.
    A test that looks at its processes earlier sees root ones. Raise
    AssertionError, with what tproxy said, if PROC exits first.
    """
    def logged():
        with open(str(err), errors="replace") as f:
            text = f.read()
        if READY not in text and proc.poll() is not None:
            raise AssertionError("tproxy exited %d before it was ready: %s" % (proc.returncode, text))
        return text if READY in text else None
    return wait_for(logged, timeout=timeout, what="tproxy's %r line in %s" % (READY, err))


def start_time(pid):
    """Return PID's start time (clock ticks after boot: /proc/PID/stat field 22), or None once it has ended.

    With the pid it names one process: a pid alone may be reused. A zombie
    has ended (it waits only to be reaped).
    """
    try:
        with open("/proc/%d/stat" % pid) as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None if fields[0] == "Z" else int(fields[19])


def is_tproxy(pid):
    """Return True if PID runs tproxy (by its title or, before it names itself, its command line)."""
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            cmdline = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return comm_of(pid).startswith("tproxy") or b"tproxy" in cmdline


def stop_daemon(pid, timeout=10.0):
    """SIGTERM PID (a tproxy in the background: not our child) and wait until it has ended.

    If it outlives TIMEOUT, SIGKILL its process group (the daemon's own
    session: itself, its forker and children) and fail.
    """
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        wait_for(lambda: start_time(pid) is None, timeout=timeout,
                 what="tproxy (pid %d) to exit" % pid)
    except AssertionError:
        group = os.getpgid(pid)
        if group != os.getpgrp():       # never ours: a daemon has a session of its own
            os.killpg(group, signal.SIGKILL)
        raise


class Tproxies:
    """The owner of every tproxy a test starts: its finaliser stops each by pid, however the test ended.

    popen() starts one in a session of its own (its forker and children are
    in its process group); background() learns, from its pid file, the pid of
    one that went to the background. The `tproxies` fixture (conftest) closes
    the owner after the test, also when it failed or timed out half-way.
    """

    PIDFILE_WAIT = 10.0     # seconds for a pid file to appear (a daemon writes it once detached)

    def __init__(self):
        self.procs = []         # Popen objects
        self.daemons = {}       # pid file -> (pid, start time), or None while not read yet

    def popen(self, argv, **kw):
        """Start ARGV (a tproxy, or what runs one) in its own session; return the Popen."""
        kw.setdefault("stdin", subprocess.DEVNULL)
        proc = subprocess.Popen([str(a) for a in argv], start_new_session=True, **kw)
        self.procs.append(proc)
        return proc

    def background(self, pidfile):
        """Own the tproxy that writes PIDFILE when it goes to the background; return its pid."""
        self.daemons[str(pidfile)] = None
        pid = self.read_pidfile(pidfile)
        if pid is None:
            raise AssertionError("no pid in %s after %.0f s" % (pidfile, self.PIDFILE_WAIT))
        return pid

    def read_pidfile(self, pidfile, timeout=PIDFILE_WAIT):
        """Wait for PIDFILE's pid, record it with its start time; return it (None if none came)."""
        def pid_written():
            try:
                with open(str(pidfile)) as f:
                    text = f.read().strip()
            except FileNotFoundError:
                return None
            return int(text) if text.isdigit() else None
        try:
            pid = wait_for(pid_written, timeout=timeout, what="the pid in %s" % pidfile)
        except AssertionError:
            return None
        self.daemons[str(pidfile)] = pid, start_time(pid)
        return pid

    def close(self):
        """Stop every tproxy started here: each Popen's group, then each daemon still running."""
        for proc in reversed(self.procs):
            stop(proc)
        self.procs.clear()
        for pidfile in list(self.daemons):
            if self.daemons[pidfile] is None:       # the test failed before it read the pid
                self.read_pidfile(pidfile)
            pid, started = self.daemons.pop(pidfile) or (None, None)
            if pid is not None and start_time(pid) == started and is_tproxy(pid):
                stop_daemon(pid)


PORT, TARGET = 12970, 7007      # the box fixture: tproxy, and its echo target on loopback
GRACE = 2                       # the box fixture's --grace
# An echo server on loopback: every byte back, until the peer closes (bounded lifetime).
ECHO_SERVER = """
import socket, sys, threading, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen(64); s.settimeout(1)
def echo(c):
    with c:
        while True:
            data = c.recv(65536)
            if not data: return
            c.sendall(data)
end = time.monotonic() + 300
while time.monotonic() < end:
    try: c, _ = s.accept()
    except socket.timeout: continue
    threading.Thread(target=echo, args=(c,), daemon=True).start()
"""


def wait_logged(path, *needles, count=1, timeout=10.0):
    """Wait until the log file PATH holds every one of NEEDLES COUNT times; return its text.

    tproxy writes a connection's record after closing both sockets, so a
    client that has its answer may look before the record is there.
    """
    def text():
        with open(str(path), errors="replace") as f:
            content = f.read()
        return content if all(content.count(n) >= count for n in needles) else None
    return wait_for(text, timeout=timeout, what="%s in %s" % (" and ".join(needles), path))


class BookLab:
    """Mancill's scenario on documentation addresses.

    client 192.0.2.10 -- router 192.0.2.1 | 198.51.100.1 -- moose 198.51.100.10 (origin)
                                          | 203.0.113.1  -- cow   203.0.113.20 (cache)
    """

    CLIENT, ROUTER_IN = "192.0.2.10", "192.0.2.1"
    MOOSE, COW = "198.51.100.10", "203.0.113.20"
    CLIENT6, ROUTER_IN6, MOOSE6, COW6 = "2001:db8:1::10", "2001:db8:1::1", "2001:db8:2::10", "2001:db8:3::20"

    def __init__(self, lab, tmp_path):
        self.lab, self.tmp = lab, tmp_path
        os.chmod(str(tmp_path), 0o777)      # tproxy runs as nobody and may write here
        self.client = lab.host("client")
        self.router = lab.host("router", forwarding=True)
        self.moose = lab.host("moose")
        self.cow = lab.host("cow")
        self.router_if, _ = lab.link(self.router, self.client,
                                     ["192.0.2.1/24", "2001:db8:1::1/64"],
                                     ["192.0.2.10/24", "2001:db8:1::10/64"])
        lab.link(self.router, self.moose, ["198.51.100.1/24", "2001:db8:2::1/64"],
                 ["198.51.100.10/24", "2001:db8:2::10/64"])
        lab.link(self.router, self.cow, ["203.0.113.1/24", "2001:db8:3::1/64"],
                 ["203.0.113.20/24", "2001:db8:3::20/64"])
        self.client.run("ip", "route", "add", "default", "via", "192.0.2.1")
        self.client.run("ip", "-6", "route", "add", "default", "via", "2001:db8:1::1")
        for host, gw, gw6 in ((self.moose, "198.51.100.1", "2001:db8:2::1"),
                              (self.cow, "203.0.113.1", "2001:db8:3::1")):
            host.run("ip", "route", "add", "default", "via", gw)
            host.run("ip", "-6", "route", "add", "default", "via", gw6)

    def settle_ipv6(self):
        """Wait until IPv6 neighbour discovery works on every link (lab.Lab.wait_ipv6_settled).

        An IPv6 test calls it before its first forwarded, intercepted or NATed
        packet: the links' link-local addresses are in duplicate address
        detection for a second or two after the lab is made, and until then
        such a packet waits a second for its neighbour solicitation.
        """
        self.lab.wait_ipv6_settled()

    def web(self, host, port=80, name=None):
        """Start a recording web server on HOST; return the path of its request log."""
        log = str(self.tmp / ("%s-%d.jsonl" % (name or host.name, port)))
        host.popen(PYTHON, PEERS, "web", port, log, "--lifetime", 300)
        host.wait_listening(port)
        return log

    def redirect(self, port=80, to=12970):
        """REDIRECT the client's TCP PORT on the router to local port TO (iptables)."""
        self.router.run("iptables", "-t", "nat", "-A", "PREROUTING", "-i", self.router_if,
                        "-p", "tcp", "--dport", port, "-j", "REDIRECT", "--to-ports", to)

    serving = ()        # options of the serving mode (conftest's `serving`): fork, --workers

    def tproxy(self, *args, port=12970, wait=True):
        """Start tproxy in the foreground (-d) on the router; return (Popen, stderr path)."""
        err = str(self.tmp / ("tproxy-%d.err" % len(self.lab.processes)))
        with open(err, "wb") as f:
            proc = self.router.popen(*tproxy_cmd("-d", "-s", port, *self.serving, *args),
                                     stdout=f, stderr=f)
        if wait:
            wait_ready(proc, err)
        return proc, err

    def send(self, addr, port, data, host=None, timeout=40, half_close=True):
        """Send DATA from the client (or HOST) to ADDR:PORT, half-close, return the reply.

        Without HALF_CLOSE the client keeps sending open (tinyproxy ends a CONNECT
        tunnel as soon as the client half-closes).
        """
        host = host or self.client
        role = "send" if half_close else "ask"
        proc = subprocess.run(host.cmd(PYTHON, PEERS, role, addr, port), input=data,
                              capture_output=True, timeout=timeout)
        return proc.stdout


def requests_seen(log_path):
    """Return the JSON records a `peers.py web` server wrote."""
    import json
    if not os.path.exists(log_path):
        return []
    with open(log_path) as f:
        return [json.loads(line) for line in f if line.strip()]
