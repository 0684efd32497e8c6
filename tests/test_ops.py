"""What an administrator meets day to day: versions, hints, start-up lines, pid file errors.

Real processes on loopback or in a private mount/network namespace; nothing on
the host is changed.
"""
import glob
import os
import re
import signal
import socket
import subprocess

import pytest

from support import (FORKER, PRIVATE_DEV, PYTHON, REPO, TPROXY, children_of, comm_of,
                     connection_children, stop_daemon, the_forker, tproxy_cmd, wait_for)
from lab import free_port, have, stop
import tproxy
from translate import pipeline

UNSHARE_NEEDS = pytest.mark.skipif(os.geteuid() != 0 or not have("unshare"),
                                   reason="needs root and unshare(1)")


def run(*args, **kw):
    return subprocess.run(tproxy_cmd(*args), capture_output=True, text=True, timeout=30,
                          stdin=subprocess.DEVNULL, **kw)


def test_dash_capital_v_prints_the_version_like_long_option():
    """tproxy -V is --version: one line, status 0, as ipchains-translate -V does."""
    short, long = run("-V"), run("--version")
    assert (short.returncode, short.stdout, short.stderr) == (0, "tproxy 1.1.0\n", "")
    assert (long.returncode, long.stdout, long.stderr) == (0, short.stdout, "")


def test_one_version_for_both_tools_the_package_and_the_man_pages():
    """tproxy, ipchains-translate, debian/changelog and both .TH lines name one version."""
    with open(os.path.join(REPO, "debian", "changelog")) as f:
        package_version = re.match(r"tproxy \(([^)]+)\)", f.readline()).group(1)
    assert tproxy.__version__ == pipeline.VERSION == package_version
    for page in ("tproxy.8", "ipchains-translate.8"):
        with open(os.path.join(REPO, "man", page)) as f:
            th = next(line for line in f if line.startswith(".TH"))
        assert '"tproxy %s"' % package_version in th, th


def test_man_pages_are_quiet_under_mandoc_lint():
    """mandoc -Tlint has nothing to say at warning level (the .TH date included)."""
    if not have("mandoc"):
        pytest.skip("mandoc is not installed (tools/install-deps installs it)")
    pages = [os.path.join(REPO, "man", p) for p in ("tproxy.8", "ipchains-translate.8")]
    ran = subprocess.run(["mandoc", "-Tlint", "-Wwarning"] + pages, capture_output=True, text=True)
    assert (ran.returncode, ran.stdout + ran.stderr) == (0, "")


@pytest.mark.parametrize("target, shown", [
    (("2001:db8::10", "80"), "target [2001:db8::10]:80"),
    (("192.0.2.10", "80"), "target 192.0.2.10:80"),
])
def test_start_up_line_brackets_an_ipv6_target(tproxies, target, shown):
    """The first line names the target as host:port, an IPv6 host in brackets."""
    port = free_port()
    proc = tproxies.popen(tproxy_cmd("-d", "-t", "-s", port, "-b", "127.0.0.1", *target),
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()
    finally:
        stop(proc)
        proc.stderr.close()
    assert line == "tproxy[%d]: listening on 127.0.0.1:%d, raw mode, %s\n" % (proc.pid, port, shown)


PIDFILE_SCRIPT = r"""
ip link set lo up
mount -t tmpfs tproxy-run /run
mkdir /run/tproxy.pid /run/held
exec "$@"
"""


@UNSHARE_NEEDS
@pytest.mark.parametrize("option, named", [
    ((), "the default pid file /var/run/tproxy.pid"),
    (("-P", "/run/held"), "-P /run/held"),
])
def test_pid_file_error_names_minus_p_only_when_given(option, named):
    """An unwritable pid file is named as the -P given, or as the default one."""
    if not os.path.islink("/var/run") or os.readlink("/var/run") not in ("/run", "../run"):
        pytest.skip("/var/run is not a link to /run here")
    ran = subprocess.run(["unshare", "--mount", "--net", "sh", "-ec", PIDFILE_SCRIPT, "sh",
                          PYTHON, TPROXY, "-t", "-s", "12970", "-b", "127.0.0.1", *option,
                          "192.0.2.10", "80"],
                         capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert (ran.returncode, ran.stderr) == (73, "tproxy: %s: Is a directory\n" % named)


def relay_one(port, target, source="127.0.0.1"):
    """Send one exchange through tproxy at PORT (from SOURCE) to the listener TARGET."""
    with socket.create_connection(("127.0.0.1", port), timeout=10,
                                  source_address=(source, 0)) as client:
        served, _ = target.accept()
        with served:
            client.sendall(b"ping")
            assert served.recv(4) == b"ping"
            served.sendall(b"pong")
        client.shutdown(socket.SHUT_WR)
        assert client.recv(4) == b"pong"


@UNSHARE_NEEDS
def test_without_syslog_the_background_server_says_so_and_logs_to_stderr(tproxies, tmp_path):
    """No /dev/log: one line says so at start; start-up and connection lines stay on stderr."""
    errors, pidfile = tmp_path / "stderr", tmp_path / "tproxy.pid"
    port = free_port()
    with socket.create_server(("127.0.0.1", 0)) as target, open(errors, "w") as err:
        started = subprocess.run(["unshare", "-m", "sh", "-c", PRIVATE_DEV, "sh", PYTHON, TPROXY,
                                  "-t", "-s", str(port), "-b", "127.0.0.1", "-P", str(pidfile),
                                  "127.0.0.1", str(target.getsockname()[1])],
                                 stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                                 timeout=30)
        assert started.returncode == 0, errors.read_text()
        pid = tproxies.background(pidfile)
        try:
            relay_one(port, target)
            wait_for(lambda: "outcome=" in errors.read_text(), what="the connection's line on stderr")
        finally:
            stop_daemon(pid)
    lines = errors.read_text().splitlines()
    said = [line for line in lines if "no syslog" in line]
    assert said == ["tproxy[%d]: no syslog (/dev/log: No such file or directory); "
                    "logging to standard error" % pid], lines
    assert any(re.match(r"tproxy\[%d\]: listening on 127\.0\.0\.1:%d, raw mode" % (pid, port), line)
               for line in lines), lines
    assert any(re.match(r"tproxy\[\d+\]: client=127\.0\.0\.1:\d+ .* outcome=ok$", line)
               for line in lines), lines



@UNSHARE_NEEDS
def test_without_syslog_a_pipe_is_let_go_and_messages_go_to_the_l_file(tproxies, tmp_path):
    """No /dev/log, stderr a pipe: one line says where messages go; the starter is not held."""
    logfile, pidfile = tmp_path / "conn.log", tmp_path / "tproxy.pid"
    port = free_port()
    with socket.create_server(("127.0.0.1", 0)) as target:
        started = subprocess.run(["unshare", "-m", "sh", "-c", PRIVATE_DEV, "sh", PYTHON, TPROXY,
                                  "-t", "-s", str(port), "-b", "127.0.0.1", "-P", str(pidfile),
                                  "-l", str(logfile), "127.0.0.1", str(target.getsockname()[1])],
                                 stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                 timeout=30)       # returns only once the pipe is closed
        pid = tproxies.background(pidfile)
        try:
            relay_one(port, target)
            wait_for(lambda: "outcome=ok" in logfile.read_text(), what="the connection's line")
        finally:
            stop_daemon(pid)
    assert started.returncode == 0 and started.stdout == ""
    assert re.fullmatch(r"tproxy\[\d+\]: no syslog \(/dev/log: No such file or directory\); "
                        r"in the background, messages go to the -l file only\n", started.stderr)
    logged = logfile.read_text()
    assert re.search(r"tproxy\[%d\]: listening on 127\.0\.0\.1:%d, raw mode" % (pid, port), logged)
    assert re.search(r"tproxy\[%d\]: SIGTERM: stopped accepting" % pid, logged), logged


@UNSHARE_NEEDS
def test_without_syslog_inetd_mode_writes_messages_to_the_l_file_not_the_client(tmp_path):
    """inetd, no /dev/log: -v's failed attempt reaches the -l file; the client gets nothing."""
    logfile = tmp_path / "conn.log"
    with socket.create_server(("127.0.0.1", 0)) as front, \
            socket.create_server(("127.0.0.1", 0)) as closed:
        dead = closed.getsockname()[1]
        closed.close()                              # nothing listens there any more
        client = socket.create_connection(front.getsockname(), timeout=10)
        conn, _ = front.accept()
        with client, conn:
            ran = subprocess.run(["unshare", "-m", "sh", "-c", PRIVATE_DEV, "sh", PYTHON, TPROXY,
                                  "-v", "-t", "-l", str(logfile), "127.0.0.1", str(dead)],
                                 stdin=conn, stdout=conn, stderr=conn, timeout=30)
            conn.close()
            assert client.recv(100) == b""
    lines = logfile.read_text().splitlines()
    refused = "connect to 127.0.0.1:%d: Connection refused" % dead
    assert ran.returncode == 69
    assert [bool(re.search(r"tproxy\[\d+\]: %s$" % refused, line)) for line in lines] == \
        [True, False], lines
    assert lines[1].endswith("outcome=" + refused), lines

# Run as [PYTHON, "-c", SYSLOG_THEN, LOG or "-", COMMAND...] in a private /dev: with LOG,
# a datagram socket at /dev/log writes what it gets to LOG until the server stops accepting.
SYSLOG_THEN = r"""
import socket, subprocess, sys, time
log, command = sys.argv[1], sys.argv[2:]
sink = None
if log != "-":
    sink = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sink.bind("/dev/log")
    sink.settimeout(1.0)
subprocess.run(command, check=True)         # returns once the server is in the background
deadline = time.monotonic() + 60
while sink and time.monotonic() < deadline:
    try:
        line = sink.recv(4096).decode("utf-8", "replace")
    except socket.timeout:
        continue
    with open(log, "a") as out:
        out.write(line + "\n")
    if "SIGTERM: stopped accepting" in line:
        break
"""


def read_terminal(master, timeout=30.0):
    """Return what reached the pty MASTER, once every writer has closed its side (lines, no CR)."""
    import select
    got = b""
    while select.select([master], [], [], timeout)[0]:
        try:
            data = os.read(master, 4096)
        except OSError:             # EIO: nobody holds the terminal any more
            return got.decode().replace("\r\n", "\n").splitlines()
        got += data
    raise AssertionError("the terminal was still held after %gs: %r" % (timeout, got))


@UNSHARE_NEEDS
@pytest.mark.parametrize("syslog", [True, False], ids=["syslog", "no-syslog"])
def test_prefork_from_a_terminal_says_once_that_it_runs_workers(tproxies, tmp_path, syslog):
    """--prefork in the background: the notice on the terminal once, in the log once (or both at once)."""
    import pty
    master, slave = pty.openpty()
    log, pidfile = tmp_path / "syslog", tmp_path / "tproxy.pid"
    port = free_port()
    with socket.create_server(("127.0.0.1", 0)) as target:
        starter = tproxies.popen(["unshare", "-m", "sh", "-c", PRIVATE_DEV, "sh", PYTHON, "-c",
                                  SYSLOG_THEN, str(log) if syslog else "-", PYTHON, TPROXY,
                                  "--prefork=1:3", "-t", "-s", str(port), "-b", "127.0.0.1",
                                  "-P", str(pidfile), "127.0.0.1", str(target.getsockname()[1])],
                                 stdout=subprocess.DEVNULL, stderr=slave)
        os.close(slave)
        try:
            pid = tproxies.background(pidfile)
            try:
                relay_one(port, target)
            finally:
                stop_daemon(pid)
            assert starter.wait(30) == 0
        finally:
            stop(starter)
    terminal = read_terminal(master)
    os.close(master)
    notice = ("--prefork 1:3: the prefork pool is retired; running 1 event-driven worker(s), "
              "as --workers=1 --max-conns=3 (see tproxy(8))")
    said = [line for line in terminal if "prefork" in line]
    assert len(said) == 1, terminal
    assert said[0].endswith("]: " + notice), terminal
    if syslog:
        logged = log.read_text().splitlines()
        assert [line for line in logged if "prefork" in line][0].endswith("[%d]: %s" % (pid, notice))
        assert sum("prefork" in line for line in logged) == 1, logged
        assert any("listening on" in line for line in logged), logged
        assert not any("listening on" in line for line in terminal), terminal
    else:
        assert any("listening on 127.0.0.1:%d" % port in line for line in terminal), terminal


# ---------------------------------------------------------------------------
# SIGUSR1 status lines and process titles
# ---------------------------------------------------------------------------

def read_proc(pid, name):
    """Return /proc/PID/NAME as text, NULs as spaces, stripped."""
    with open("/proc/%d/%s" % (pid, name), "rb") as f:
        return f.read().replace(b"\0", b" ").decode().strip()


def has_setproctitle():
    return subprocess.run([PYTHON, "-c", "import setproctitle"], capture_output=True).returncode == 0


class Running:
    """A foreground tproxy on loopback with its stderr in a file; owned by TPROXIES (the fixture)."""

    def __init__(self, tproxies, tmp_path, *args):
        self.errors = tmp_path / "stderr"
        self.port = free_port()
        with open(self.errors, "w") as err:
            self.proc = tproxies.popen(tproxy_cmd("-d", "-t", "-s", self.port, "-b", "127.0.0.1",
                                                  *args),
                                       stdout=subprocess.DEVNULL, stderr=err)
        self.wait_line("listening on")

    def lines(self, word):
        return [line for line in self.errors.read_text().splitlines() if word in line]

    def wait_line(self, word, count=1):
        return wait_for(lambda: len(self.lines(word)) >= count and self.lines(word),
                        what="%d line(s) with %r from tproxy" % (count, word))

    def client(self, source="127.0.0.1"):
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=10,
                                        source_address=(source, 0))
        return sock

    def exchange(self, target, source="127.0.0.1"):
        """One relayed exchange of 4 bytes each way (or a refused client)."""
        relay_one(self.port, target, source)

    def stop(self):
        stop(self.proc)


STATUS_LINE = re.compile(r"tproxy\[(\d+)\]: status: (parent|worker \d+) active=(\d+) "
                         r"served=(\d+) refused=(\d+) failed=(\d+) up=(\d+) down=(\d+) "
                         r"served_up=(\d+) served_down=(\d+) refused_up=(\d+) refused_down=(\d+) "
                         r"failed_up=(\d+) failed_down=(\d+) uptime=\d+$")


def test_sigusr1_fork_mode_parent_sums_its_children(tproxies, tmp_path):
    """Fork mode: the parent's one line counts what its (exited) children served, refused, failed."""
    target = socket.create_server(("127.0.0.1", 0))
    tport = target.getsockname()[1]
    server = Running(tproxies, tmp_path, "-a", "127.0.0.1/32", "127.0.0.1", tport)
    try:
        server.exchange(target)
        server.exchange(target)
        with server.client(source="127.0.0.2") as refused:      # not in -a
            assert refused.recv(10) == b""
        target.close()
        with server.client() as failed:                           # nothing listens any more
            assert failed.recv(10) == b""
        server.wait_line("outcome=", 4)
        wait_for(lambda: not connection_children(server.proc.pid), what="the children to exit")
        os.kill(server.proc.pid, signal.SIGUSR1)
        [line] = server.wait_line("status:")
    finally:
        server.stop()
        target.close()
    fields = STATUS_LINE.match(line)
    assert fields, line
    assert fields.group(1, 2) == (str(server.proc.pid), "parent")
    assert [int(v) for v in fields.groups()[2:]] == [0, 2, 1, 1, 8, 8, 8, 8, 0, 0, 0, 0], line
    assert server.proc.returncode == 0


def test_fork_mode_titles_tell_parent_forker_and_child(tproxies, tmp_path):
    """ps names the parent, its forker and each child; with setproctitle the child shows its connection."""
    target = socket.create_server(("127.0.0.1", 0))
    server = Running(tproxies, tmp_path, "127.0.0.1", target.getsockname()[1])
    try:
        with server.client() as client:
            served, _ = target.accept()
            [child] = wait_for(lambda: connection_children(server.proc.pid), what="the child")
            forker = the_forker(server.proc.pid)
            pids = (server.proc.pid, forker, child)
            comm = {pid: read_proc(pid, "comm") for pid in pids}
            cmdline = {pid: read_proc(pid, "cmdline") for pid in pids}
            client_addr = "%s:%d" % client.getsockname()
            for pid in (forker, child):
                os.kill(pid, signal.SIGUSR1)            # e.g. systemctl kill: the whole group
            served.sendall(b"x")
            assert client.recv(1) == b"x"               # the child lives on
            served.close()
        server.exchange(target)                         # and the forker still forks
        os.kill(server.proc.pid, signal.SIGUSR1)
        [line] = server.wait_line("status:")            # the others' signal logged nothing
    finally:
        server.stop()
        target.close()
    assert comm == {server.proc.pid: "tproxy parent", forker: FORKER, child: "tproxy child"}
    if has_setproctitle():
        assert cmdline[child] == "tproxy: %s -> 127.0.0.1:%d" % (client_addr, server.port)
        assert cmdline[server.proc.pid] == \
            "tproxy: parent, fork per connection, 127.0.0.1:%d" % server.port
        assert cmdline[forker] == "tproxy: forker, fork per connection, 127.0.0.1:%d" % server.port


NO_CLONE = ("import sys, tproxy\n"
            "tproxy.CLONE_SYSCALL.clear()      # a machine whose clone number tproxy does not know\n"
            "sys.exit(tproxy.main(sys.argv[1:]))\n")
# The number of another system call, which returns 0 as a child would (as armhf's 120 is
# on aarch64): sched_yield, x86_64's 24.
NOT_CLONE = ("import sys, tproxy\n"
             "tproxy.CLONE_SYSCALL.update(dict.fromkeys(tproxy.CLONE_SYSCALL, 24))\n"
             "sys.exit(tproxy.main(sys.argv[1:]))\n")
# `PYTHON -c NO_CLONE_PARENT ARGV...` runs ARGV under a seccomp filter (libseccomp, which apt
# itself needs) that refuses clone with CLONE_PARENT (EPERM), as container runtimes may;
# fork() (clone without it) still works.
NO_CLONE_PARENT = """import ctypes, os, sys
lib = ctypes.CDLL("libseccomp.so.2")
class Compare(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int), ("a", ctypes.c_uint64), ("b", ctypes.c_uint64)]
lib.seccomp_init.restype = ctypes.c_void_p
filter = ctypes.c_void_p(lib.seccomp_init(ctypes.c_uint32(0x7fff0000)))        # default: allow
clone = lib.seccomp_syscall_resolve_name(b"clone")
masked_eq = 7       # SCMP_CMP_MASKED_EQ: (flags & CLONE_PARENT) == CLONE_PARENT
refuse = ctypes.c_uint32(0x00050000 | 1)    # SCMP_ACT_ERRNO(EPERM)
assert lib.seccomp_rule_add_array(filter, refuse, clone, 1, (Compare * 1)(Compare(0, masked_eq, 0x8000, 0x8000))) == 0
assert lib.seccomp_load(filter) == 0
os.execv(sys.argv[1], sys.argv[1:])
"""
X86_64 = tproxy.process_abi() == "x86_64-linux-gnu"
CLONE_CASES = {     # how tproxy is started: its argv up to its options; the line it must log
    "unknown": ([PYTHON, "-c", NO_CLONE], None),
    "not-clone": ([PYTHON, "-c", NOT_CLONE],
                  "clone(CLONE_PARENT): %s; the parent forks each child itself" % os.strerror(38)),
    "refused": ([PYTHON, "-c", NO_CLONE_PARENT, PYTHON, TPROXY],
                "clone(CLONE_PARENT): %s; the parent forks each child itself" % os.strerror(1)),
}


@pytest.mark.parametrize("case", CLONE_CASES)
def test_fork_mode_without_a_working_clone_forks_in_the_parent(tproxies, tmp_path, case):
    """No clone number for this process's ABI, a number that is not clone, or a clone refused:
    the parent forks each child itself; a refusal is found by the forker and logged once."""
    if case == "not-clone" and not X86_64:
        pytest.skip("sched_yield's number is x86_64's")
    if case == "refused" and (os.geteuid() != 0 or not glob.glob("/usr/lib/*/libseccomp.so.2")):
        pytest.skip("needs root and libseccomp")
    argv, logged = CLONE_CASES[case]
    target = socket.create_server(("127.0.0.1", 0))
    target.settimeout(30)       # a server that serves nobody fails the test, not hangs it
    port, errors = free_port(), tmp_path / "stderr"
    with open(errors, "w") as err:
        proc = tproxies.popen(argv + ["-d", "-t", "-s", str(port), "-b", "127.0.0.1",
                                      "--max-conns", "1", "127.0.0.1", str(target.getsockname()[1])],
                              cwd=REPO, stdout=subprocess.DEVNULL, stderr=err)
    try:
        wait_for(lambda: "listening on" in errors.read_text(), what="tproxy listening")
        relay_one(port, target)
        relay_one(port, target)     # --max-conns 1: the first child was reaped, its slot freed
        with socket.create_connection(("127.0.0.1", port), timeout=10):
            served, _ = target.accept()
            [child] = wait_for(lambda: connection_children(proc.pid), what="the child")
            assert wait_for(lambda: comm_of(child) == "tproxy child", what="the child's name")
            assert children_of(proc.pid) == [child]         # no forker left
            served.close()
    finally:
        stop(proc)
        target.close()
    lines = errors.read_text().splitlines()
    if logged is None:
        assert "forker" not in errors.read_text() and "clone" not in errors.read_text()
    else:
        assert [l for l in lines if "clone" in l or "fork" in l] == \
            ["tproxy[%d]: %s" % (proc.pid, logged)]


# Runs as INTERPRETER -S -c CLONER REPO: forks a sibling (CLONE_PARENT: a child
# of the test itself) that imports a module and exits 0, and prints its pid.
CLONER = """
import os, sys
sys.path.insert(0, sys.argv[1])
import tproxy
pid = tproxy.sibling_fork()()
if pid == 0:
    import decimal
    os._exit(0)
print(pid, flush=True)
"""


def interpreters():
    """Return the CPython 3.9+ interpreters on this machine: ours, Debian's, pyenv's."""
    found = set()
    for path in [PYTHON] + glob.glob("/usr/bin/python3.[0-9]*") + glob.glob(
            os.path.expanduser("~/.pyenv/versions/3.*/bin/python3")):
        if re.search(r"python3(\.\d+)?$", path) and os.access(path, os.X_OK):
            found.add(os.path.realpath(path))
    return sorted(path for path in found if subprocess.run(
        [path, "-S", "-c", "import sys; sys.exit(sys.version_info < (3, 9))"],
        capture_output=True, timeout=30).returncode == 0)


def reaped(pid):
    """Return (PID, wait status) once our child PID has ended, else None."""
    got, status = os.waitpid(pid, os.WNOHANG)
    return (got, status) if got else None


def test_sibling_fork_children_live_under_every_python_here():
    """A child made by sibling_fork runs Python (an import) and exits 0, on every CPython here.

    Without PyOS_BeforeFork before the clone, Python 3.13's after-fork work
    in the child releases an import lock it does not hold: a fatal error in
    every fork-mode child.
    """
    if tproxy.sibling_fork() is None:
        pytest.skip("no clone system call number for this machine: the parent forks")
    results = {}
    for path in interpreters():
        proc = subprocess.run([path, "-S", "-c", CLONER, REPO], capture_output=True, text=True,
                              timeout=60)
        assert proc.returncode == 0, (path, proc.stderr)
        pid = int(proc.stdout)
        _, status = wait_for(lambda: reaped(pid), what="the sibling of %s ending" % path)
        results[path] = os.waitstatus_to_exitcode(status)
    assert results and set(results.values()) == {0}, results


def test_fork_mode_imports_no_module_with_python_fork_hooks(tproxies, tmp_path, monkeypatch):
    """Neither threading nor logging is imported, in the parent or a child, with setproctitle too.

    Their os.register_at_fork hooks run Python code in the parent and in
    every child at each fork; setproctitle's package imports logging, which
    imports threading: about 300 KiB more private memory per connection.
    """
    monkeypatch.setenv("PYTHONPROFILEIMPORTTIME", "1")     # each import, a line on stderr
    target = socket.create_server(("127.0.0.1", 0))
    server = Running(tproxies, tmp_path, "127.0.0.1", target.getsockname()[1])
    try:
        server.exchange(target)
        server.wait_line("outcome=")
    finally:
        server.stop()
        target.close()
    imported = {line.rsplit("|", 1)[1].strip() for line in server.lines("import time:")}
    assert "select" in imported and "ctypes" in imported     # the profile is there
    assert imported & {"threading", "logging"} == set()


def test_sigusr1_workers_each_worker_logs_its_own_line(tproxies, tmp_path):
    """--workers=2: the parent logs the pool, each worker its own counters while serving."""
    target = socket.create_server(("127.0.0.1", 0))
    server = Running(tproxies, tmp_path, "--workers=2", "127.0.0.1", target.getsockname()[1])
    try:
        workers = wait_for(lambda: len(children_of(server.proc.pid)) == 2 and
                           children_of(server.proc.pid), what="two workers")
        for _ in range(3):
            server.exchange(target)
        server.wait_line("outcome=", 3)
        comms = sorted(read_proc(pid, "comm") for pid in workers)
        with server.client() as held:                   # one live connection meanwhile
            served, _ = target.accept()
            with served:
                held.sendall(b"held")
                assert served.recv(4) == b"held"
                os.kill(server.proc.pid, signal.SIGUSR1)
                lines = server.wait_line("status:", 3)
    finally:
        server.stop()
        target.close()
    assert comms == ["tproxy worker", "tproxy worker"]
    assert lines[0].endswith("status: parent workers=2"), lines
    worker_lines = [STATUS_LINE.match(line) for line in lines[1:]]
    assert all(worker_lines), lines
    assert sorted(int(m.group(1)) for m in worker_lines) == sorted(workers)
    assert sum(int(m.group(3)) for m in worker_lines) == 1             # active
    assert sum(int(m.group(4)) for m in worker_lines) == 3             # served, ended ones only
    assert sum(int(m.group(7)) for m in worker_lines) == 12            # up: 3 x 4 bytes


def test_workers_claiming_one_clients_last_slot_never_exceed_its_cap():
    """--workers: ClientCounts.claim is atomic across processes (the cap is exact).

    Four processes, each a worker's row of one shared ClientCounts, claim and
    release a slot of one client address as fast as they can; whoever holds
    a slot checks that the client's count never exceeds the cap of 1. With
    a check and a separate add, two workers both saw 0 and both counted one.
    """
    rows, claims = 4, 100000
    counts = tproxy.ClientCounts(rows)
    bucket = counts.bucket(tproxy.client_key(("192.0.2.10", 80)))
    start_r, start_w = os.pipe()
    pids = []
    for row in range(rows):
        pid = os.fork()
        if pid == 0:            # a worker: exit status = how often it saw the cap exceeded
            over = 0
            try:
                os.close(start_w)
                os.read(start_r, 1)             # all start together
                for _ in range(claims):
                    if counts.claim(row, bucket, 1) is None:
                        over += counts.held(bucket) > 1
                        counts.add(row, bucket, -1)
            finally:
                os._exit(min(over, 100))
        pids.append(pid)
    os.close(start_r)
    os.close(start_w)                           # EOF starts them
    over = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids]
    assert over == [0] * rows, "cap 1 exceeded (per worker, at most 100 counted): %s" % over
    assert counts.held(bucket) == 0
