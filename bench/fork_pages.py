#!/usr/bin/env python3
"""What a fork-mode tproxy child owns, and what a connection costs in CPU (bench/results/2026-11-29-fork-cost-3.md).

    fork_pages.py held TPROXY_PY [N] [--stop POINT]   hold N connections (default 30)
    fork_pages.py cpu N TPROXY_PY...                   N sequential connections per build, in turn

Each build is started as `python3 TPROXY_PY -d -t -s PORT -b 127.0.0.1 --max-conns 1100
--max-per-client 1100 127.0.0.1 ECHO_PORT` in front of an echo server of this process, on
loopback only. Every connection sends 4 bytes and reads them back.

held: after three connections (the forker has rehearsed and served), N connections are
opened and kept; it prints the median, min and max Private_Dirty (smaps_rollup) of the
connection children and the tree's Pss per held connection (loaded minus idle, over N).
With --stop POINT the build's children are expected to SIGSTOP themselves at POINT
(a measurement copy of tproxy.py reading TPROXY_STOP): each one is measured while stopped
(the forker then idles, so what it owns privately is what it wrote itself) and continued.

cpu: after 20 connections, N connections one at a time; the tree's CPU (the parent's
utime, stime and its reaped children's, the forker's own) per connection, and the rate.
Run it under `flock /work/wt/bench.lock`. Set ROUNDS for more rounds (default 2).
"""
import os
import selectors
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time

PYTHON = "/usr/bin/python3"
TICK = os.sysconf("SC_CLK_TCK")


def echo_server():
    """Start an echo server on loopback in a thread; return its port."""
    listener = socket.create_server(("127.0.0.1", 0), backlog=2048)
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ)

    def loop():
        while True:
            for key, _ in sel.select():
                sock = key.fileobj
                if sock is listener:
                    conn, _ = listener.accept()
                    sel.register(conn, selectors.EVENT_READ)
                    continue
                try:
                    data = sock.recv(65536)
                except OSError:
                    data = b""
                if data:
                    try:
                        sock.sendall(data)
                    except OSError:
                        pass
                else:
                    sel.unregister(sock)
                    sock.close()
    threading.Thread(target=loop, daemon=True).start()
    return listener.getsockname()[1]


def rollup(pid):
    """Return {field: KiB} of /proc/PID/smaps_rollup ({} once it is gone)."""
    fields = {}
    try:
        with open("/proc/%d/smaps_rollup" % pid) as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3 and parts[2] == "kB":
                    fields[parts[0].rstrip(":")] = int(parts[1])
    except OSError:
        pass
    return fields


def children(pid):
    try:
        with open("/proc/%d/task/%d/children" % (pid, pid)) as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def comm(pid):
    try:
        with open("/proc/%d/comm" % pid) as f:
            return f.read().strip()
    except OSError:
        return ""


def state(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


def cpu_seconds(pid):
    """utime + stime + cutime + cstime of PID."""
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return sum(int(x) for x in fields[11:15]) / TICK


class Tproxy:
    """A tproxy build serving raw relay to the echo server; the context stops it (SIGTERM)."""

    def __init__(self, path, echo_port, env=None):
        self.path, self.echo_port, self.env = path, echo_port, env
        self.forker = None

    def __enter__(self):
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        self.port = probe.getsockname()[1]
        probe.close()
        self.proc = subprocess.Popen(
            [PYTHON, self.path, "-d", "-t", "-s", str(self.port), "-b", "127.0.0.1",
             "--max-conns", "1100", "--max-per-client", "1100", "127.0.0.1", str(self.echo_port)],
            env=self.env, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        return self

    def __exit__(self, *exc):
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def connection_children(self):
        """The children serving connections (the forker, named first, left out)."""
        kids = children(self.proc.pid)
        if self.forker is None:
            self.forker = next((k for k in kids if comm(k) == "tproxy forker"), 0)
        return [k for k in kids if k != self.forker]

    def tree_pss(self):
        return sum(rollup(p).get("Pss", 0) for p in [self.proc.pid] + children(self.proc.pid))

    def continue_stopped(self, seen, timeout=5.0):
        """Wait for a child not in SEEN to stop itself; return its Private_Dirty KiB (None if none), continue it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for kid in self.connection_children():
                if kid not in seen and state(kid) == "T":
                    seen.add(kid)
                    private = rollup(kid).get("Private_Dirty")
                    os.kill(kid, signal.SIGCONT)
                    return private
            time.sleep(0.005)
        return None

    def echo(self, keep=False, stops=None, seen=None):
        """One connection: 4 bytes there and back; kept open if KEEP (returned)."""
        conn = socket.create_connection(("127.0.0.1", self.port), timeout=5)
        if stops is not None:
            stops.append(self.continue_stopped(seen))
        conn.sendall(b"ping")
        if conn.recv(16) != b"ping":
            raise SystemExit("%s: no echo" % self.path)
        if keep:
            return conn
        conn.close()


def held(path, count, stop=None):
    env = dict(os.environ, TPROXY_STOP=stop) if stop else None
    with Tproxy(path, echo_server(), env) as server:
        seen, stops = set(), ([] if stop else None)
        if stop:        # the first probe of __enter__ stopped a child too
            server.continue_stopped(seen)
        for _ in range(3):
            server.echo(stops=stops, seen=seen)
        time.sleep(0.5)
        idle = server.tree_pss()
        if stops:
            stops.clear()
        kept = [server.echo(True, stops, seen) for _ in range(count)]
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and len(server.connection_children()) < count:
            time.sleep(0.05)
        time.sleep(0.5)
        private = [rollup(k).get("Private_Dirty", 0) for k in server.connection_children()]
        per_conn = (server.tree_pss() - idle) / count
        print("%s: %d held, Private_Dirty median %d KiB (min %d, max %d), Pss per held %.0f KiB%s"
              % (path, len(private), statistics.median(private), min(private), max(private),
                 per_conn, "" if not stop else ", stopped at %s: %s KiB" % (stop, stops)))
        for conn in kept:
            conn.close()


def cpu(count, paths):
    echo_port = echo_server()
    for round_ in range(int(os.environ.get("ROUNDS", "2"))):
        for path in paths:
            with Tproxy(path, echo_port) as server:
                for _ in range(20):
                    server.echo()
                time.sleep(0.5)
                server.connection_children()
                before, start = cpu_seconds(server.proc.pid) + cpu_seconds(server.forker), time.monotonic()
                for _ in range(count):
                    server.echo()
                took = time.monotonic() - start
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline and server.connection_children():
                    time.sleep(0.02)
                spent = cpu_seconds(server.proc.pid) + cpu_seconds(server.forker) - before
                print("round %d %s: %.2f ms CPU per connection, %.0f conn/s"
                      % (round_, path, spent / count * 1000, count / took), flush=True)


def main(argv):
    if len(argv) >= 2 and argv[0] == "held":
        stop = None
        if "--stop" in argv:
            at = argv.index("--stop")
            stop = argv[at + 1]
            argv = argv[:at] + argv[at + 2:]
        return held(argv[1], int(argv[2]) if len(argv) > 2 else 30, stop)
    if len(argv) >= 3 and argv[0] == "cpu":
        return cpu(int(argv[1]), argv[2:])
    raise SystemExit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
