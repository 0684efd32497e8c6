"""A network lab made of namespaces: hosts, veth links, processes, and cleanup.

Every namespace, link and process made here is owned by one `Lab` and is
removed by `Lab.close()` (also on error, as a context manager). Nothing here
touches the namespace the tests were started in, and only documentation
addresses (192.0.2.0/24, 198.51.100.0/24, 203.0.113.0/24, 2001:db8::/32) are
ever assigned.
"""
import itertools
import os
import shutil
import signal
import socket
import subprocess
import time

_lab_serial = itertools.count()


def have(tool):
    """Return True when TOOL is on PATH (including sbin directories)."""
    path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    return shutil.which(tool, path=path) is not None


def poll(predicate, timeout, interval=0.05):
    """Call PREDICATE every INTERVAL seconds until it returns a true value (returned); None after TIMEOUT.

    Bounded in count as well as in time, as every loop of the tests is.
    """
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / interval) + 2):
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            break
        time.sleep(interval)
    return None


class LabError(Exception):
    """A lab command failed; the message holds the command and its stderr."""


class Host:
    """One network namespace; commands given to it run inside it."""

    def __init__(self, lab, name):
        self.lab = lab
        self.name = name
        self.netns = "%s-%s" % (lab.prefix, name)

    def cmd(self, *argv):
        """Return ARGV prefixed so that it runs inside this namespace."""
        return ["ip", "netns", "exec", self.netns] + [str(a) for a in argv]

    def run(self, *argv, check=True, input=None, timeout=30, env=None):
        """Run ARGV here to completion; return the CompletedProcess (text)."""
        proc = subprocess.run(self.cmd(*argv), input=input, capture_output=True,
                              text=True, timeout=timeout, env=env)
        if check and proc.returncode != 0:
            raise LabError("%s: %s exited %d: %s" % (
                self.name, " ".join(map(str, argv)), proc.returncode,
                proc.stderr.strip()))
        return proc

    def sh(self, script, **kw):
        """Run a shell SCRIPT here; return the CompletedProcess."""
        return self.run("sh", "-ec", script, **kw)

    def popen(self, *argv, **kw):
        """Start ARGV here in its own process group; the lab stops it at close."""
        kw.setdefault("stdin", subprocess.DEVNULL)
        proc = subprocess.Popen(self.cmd(*argv), start_new_session=True, **kw)
        self.lab.processes.append(proc)
        return proc

    def socket(self, family=socket.AF_INET, type=socket.SOCK_STREAM, proto=0):
        """Return a socket created inside this namespace (the test's own thread visits it)."""
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        clone_newnet = 0x40000000
        with open("/proc/thread-self/ns/net") as home, open("/run/netns/" + self.netns) as there:
            if libc.setns(there.fileno(), clone_newnet) != 0:
                raise LabError("%s: setns: %s" % (self.name, os.strerror(ctypes.get_errno())))
            try:
                return socket.socket(family, type, proto)
            finally:
                if libc.setns(home.fileno(), clone_newnet) != 0:
                    raise LabError("setns back home: %s" % os.strerror(ctypes.get_errno()))

    def connect(self, port, addr="127.0.0.1", timeout=10.0, proto=0):
        """Return a socket (TCP, or stream PROTO) connected from this namespace to ADDR:PORT (raises OSError)."""
        sock = self.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET, proto=proto)
        sock.settimeout(timeout)
        try:
            sock.connect((addr, port))
        except OSError:
            sock.close()
            raise
        return sock

    def accepted_connection(self, proto=0):
        """Return (client, server end) of a loopback stream connection here, as inetd accepts one.

        TCP unless PROTO names another stream protocol (SCTP, MPTCP); raises
        OSError (EPROTONOSUPPORT) where the kernel lacks it.
        """
        with self.socket(proto=proto) as listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen(1)
            client = self.connect(listener.getsockname()[1], proto=proto)
            conn, _ = listener.accept()
        return client, conn

    def sysctl(self, key, value):
        """Set a sysctl inside this namespace only."""
        self.run("sysctl", "-q", "-w", "%s=%s" % (key, value))

    def wait_listening(self, port, proto="tcp", timeout=10.0):
        """Wait until something listens on PORT here; raise LabError if not."""
        flag = "-ltn" if proto == "tcp" else "-lun"

        def listening():
            out = self.run("ss", "-H", flag, check=False).stdout
            return any(len(fields) >= 4 and fields[3].rsplit(":", 1)[-1] == str(port)
                       for fields in (line.split() for line in out.splitlines()))
        if not poll(listening, timeout):
            raise LabError("%s: nothing listens on %s port %s after %.0f s"
                           % (self.name, proto, port, timeout))


    def ipv6_settled(self):
        """Return True when every interface up here (loopback aside) has a link-local address
        that duplicate address detection has passed; raise LabError if it failed.

        Until then the kernel sends no neighbour solicitation for a packet whose
        source is not one of the interface's own addresses (a forwarded packet,
        a transparent socket's): ndisc_send_ns() needs a link-local source that
        is not tentative. Such packets wait a whole retransmission time (1 s).
        """
        links = self.run("ip", "-o", "link", "show", "up").stdout
        addrs = self.run("ip", "-6", "-o", "addr", "show", "scope", "link").stdout
        failed = [line.split()[1] for line in addrs.splitlines() if "dadfailed" in line]
        if failed:
            raise LabError("%s: duplicate address detection failed on %s" % (self.name, failed))
        usable = {line.split()[1] for line in addrs.splitlines() if "tentative" not in line}
        up = {line.split(":")[1].strip().split("@")[0] for line in links.splitlines()
              if "LOWER_UP" in line and "LOOPBACK" not in line}
        return up <= usable

    def wait_ipv6_settled(self, timeout=10.0):
        """Wait until ipv6_settled(); raise LabError if not within TIMEOUT seconds."""
        if not poll(self.ipv6_settled, timeout):
            raise LabError("%s: IPv6 link-local addresses still tentative after %.0f s:\n%s" % (
            self.name, timeout, self.run("ip", "-6", "addr", "show", "tentative").stdout))


class Lab:
    """A set of hosts (namespaces) joined by veth links; closes what it made."""

    def __init__(self, tag="lab"):
        self.prefix = "tp%d%s%d" % (os.getpid(), tag[:6], next(_lab_serial))
        self.hosts = []
        self.processes = []
        self._links = itertools.count()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def host(self, name, forwarding=False):
        """Create a namespace for NAME with loopback up; return its Host."""
        host = Host(self, name)
        subprocess.run(["ip", "netns", "add", host.netns], check=True)
        self.hosts.append(host)
        host.run("ip", "link", "set", "lo", "up")
        if forwarding:
            host.sysctl("net.ipv4.ip_forward", 1)
            host.sysctl("net.ipv6.conf.all.forwarding", 1)
        return host

    def wait_ipv6_settled(self):
        """Wait until IPv6 neighbour discovery works on every host's links (Host.wait_ipv6_settled).

        Before, a forwarded IPv6 packet, a transparent socket's or a NATed
        reply may wait a whole second for its neighbour solicitation.
        """
        for host in self.hosts:
            host.wait_ipv6_settled()

    def link(self, a, b, a_addrs=(), b_addrs=()):
        """Join hosts A and B with a veth pair; return the two interface names.

        Addresses are CIDR strings such as "192.0.2.1/24" or "2001:db8::1/64";
        IPv6 addresses are added with nodad so they are usable at once.
        """
        n = next(self._links)
        a_if, b_if = "v%d%s" % (n, b.name[:8]), "v%d%s" % (n, a.name[:8])
        tmp_a, tmp_b = "%sa%d" % (self.prefix[-8:], n), "%sb%d" % (self.prefix[-8:], n)
        subprocess.run(["ip", "link", "add", tmp_a, "netns", a.netns, "type", "veth",
                        "peer", "name", tmp_b, "netns", b.netns], check=True)
        for host, tmp, name, addrs in ((a, tmp_a, a_if, a_addrs), (b, tmp_b, b_if, b_addrs)):
            host.run("ip", "link", "set", tmp, "name", name)
            for addr in addrs:
                extra = ["nodad"] if ":" in addr else []
                host.run("ip", "addr", "add", addr, "dev", name, *extra)
            host.run("ip", "link", "set", name, "up")
        return a_if, b_if

    def close(self):
        """Stop every process (by pid, group first) and delete every namespace."""
        for proc in reversed(self.processes):
            stop(proc)
        self.processes.clear()
        for host in reversed(self.hosts):
            # Anything still inside (say, a daemon that forked away) goes too.
            pids = subprocess.run(["ip", "netns", "pids", host.netns],
                                  capture_output=True, text=True).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            subprocess.run(["ip", "netns", "del", host.netns], capture_output=True)
        self.hosts.clear()


def stop(proc, timeout=5.0):
    """Stop a Popen started in its own session: TERM its group, then KILL."""
    if proc.poll() is not None:
        return proc.returncode
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, timeout)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            return proc.wait(wait)
        except subprocess.TimeoutExpired:
            continue
    return proc.poll()


def free_port(family=socket.AF_INET):
    """Return a TCP port number free on this host's loopback right now."""
    with socket.socket(family) as s:
        s.bind(("::1" if family == socket.AF_INET6 else "127.0.0.1", 0))
        return s.getsockname()[1]
