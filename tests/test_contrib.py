"""The contrib/ files as shipped: inetd, xinetd, systemd units, firewall recipes.

Each test takes a shipped file, changes only what differs on this machine
(the program path: the venv's tproxy; the target host: a lab address), and
runs it under the real program: openbsd-inetd, Debian's xinetd (unpacked by
tools/fetch-xinetd, since it conflicts with openbsd-inetd as a package),
systemd-socket-activate and systemd-analyze, the kernel's iptables and nft.
"""
import os
import re
import shlex
import socket
import subprocess

import pytest

from support import LAUNCH, PEERS, PYTHON, REPO, process_uid, requests_seen, wait_for
from lab import LabError, have

CONTRIB = os.path.join(REPO, "contrib")
RECIPES = os.path.join(CONTRIB, "firewall")
FETCH_XINETD = os.path.join(REPO, "tools", "fetch-xinetd")
TPROXY_SCRIPT = os.path.join(os.path.dirname(PYTHON), "tproxy")

# What the shipped files name that this machine does not have.
SHIPPED_PROGRAM = "/usr/bin/tproxy"
SHIPPED_HOSTS = ("cow.mancill.com", "cache.mancill.com")

GET = b"GET /index.html HTTP/1.1\r\nHost: moose.mancill.com\r\nConnection: close\r\n\r\n"
EX_USAGE = 64                   # sysexits.h, as tproxy(8) documents it


# ---------------------------------------------------------------------------
# Helpers: shipped files, systemd command lines, sd_notify
# ---------------------------------------------------------------------------

def shipped(relpath, target=None):
    """Return contrib/RELPATH with the program path (and target hosts) made local.

    Fails when a file that runs tproxy (all but a .socket unit) or is given
    a TARGET does not name the placeholders, so a test can never silently
    run something other than what ships.
    """
    with open(os.path.join(CONTRIB, relpath)) as f:
        text = f.read()
    if not relpath.endswith(".socket"):
        assert SHIPPED_PROGRAM in text, "%s does not run %s" % (relpath, SHIPPED_PROGRAM)
    text = text.replace(SHIPPED_PROGRAM, TPROXY_SCRIPT)
    if target:
        named = [h for h in SHIPPED_HOSTS if h in text]
        assert named, "%s names none of %s" % (relpath, SHIPPED_HOSTS)
        for host in named:
            text = text.replace(host, target)
    return text


def unit_settings(text, key):
    """Return the values of every KEY= line of a unit file TEXT, in order."""
    return [line.split("=", 1)[1] for line in text.splitlines() if line.startswith(key + "=")]


def exec_argv(text, instance=None):
    """Return the argv systemd would run for the unit TEXT's one ExecStart= line.

    Expands %i to INSTANCE, "$VAR" (a whole word: split into words) and
    "${VAR}" (one word) from the unit's Environment= lines, as systemd.service(5) says.
    """
    env = {}
    for value in unit_settings(text, "Environment"):
        for word in shlex.split(value):
            name, _, val = word.partition("=")
            env[name] = val
    [line] = unit_settings(text, "ExecStart")
    assert line[:1] not in "-@:+!", "ExecStart prefixes are not modelled here: %s" % line
    if instance is not None:
        line = line.replace("%i", instance)
    argv = []
    for word in shlex.split(line):
        whole = re.fullmatch(r"\$(\w+)", word)
        if whole:
            argv += env.get(whole.group(1), "").split()
        else:
            argv.append(re.sub(r"\$\{(\w+)\}", lambda m: env.get(m.group(1), ""), word))
    return argv


class NotifySocket:
    """A unix datagram socket standing in for systemd's NOTIFY_SOCKET."""

    def __init__(self, path):
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        os.chmod(self.path, 0o666)      # a tproxy that switched to nobody still sends

    def receive(self, timeout=10.0):
        """Return the next message as {key: value}; fail after TIMEOUT seconds."""
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(4096).decode()
        except socket.timeout:
            raise AssertionError("no sd_notify message within %.0f s" % timeout) from None
        return dict(line.split("=", 1) for line in data.splitlines() if "=" in line)

    def close(self):
        self.sock.close()


@pytest.fixture
def notify(open_tmp):
    """A NotifySocket in a directory every user can reach, closed afterwards."""
    sock = NotifySocket(open_tmp / "notify")
    yield sock
    sock.close()


def cow_lines(log):
    """Return the request lines the web server whose log is LOG has seen."""
    return [r["request_line"] for r in requests_seen(log)]


# ---------------------------------------------------------------------------
# inetd and xinetd
# ---------------------------------------------------------------------------

def test_inetd_conf_runs_under_openbsd_inetd(book):
    """Every line of contrib/inetd.conf serves, as nobody: raw v4, raw v6, HTTP translate."""
    if not have("inetd"):
        pytest.skip("openbsd-inetd is not installed (tools/install-deps installs it)")
    web80, web3128 = book.web(book.cow, 80), book.web(book.cow, 3128)
    conf = book.tmp / "inetd.conf"
    conf.write_text(shipped("inetd.conf", target=book.COW))
    for line in conf.read_text().splitlines():
        if line and not line.startswith("#"):
            assert line.split()[3:5] == ["nowait", "nobody"], line
    book.router.popen("inetd", "-d", str(conf), stdout=subprocess.DEVNULL,
                      stderr=subprocess.DEVNULL)
    book.router.wait_listening(12970)
    book.router.wait_listening(12971)
    book.redirect(80, 12970)
    book.redirect(8080, 12971)
    assert book.send(book.MOOSE, 80, GET).startswith(b"HTTP/1.1 200")
    assert book.send(book.ROUTER_IN6, 12970, GET).startswith(b"HTTP/1.1 200")    # the tcp6 line
    book.send(book.MOOSE, 8080, b"GET /inetd HTTP/1.1\r\nHost: moose.mancill.com:8080\r\n"
                                b"Connection: close\r\n\r\n")
    assert cow_lines(web80) == ["GET /index.html HTTP/1.1"] * 2
    assert cow_lines(web3128) == ["GET http://moose.mancill.com:8080/inetd HTTP/1.1"]
    assert {r["peer"] for r in requests_seen(web80) + requests_seen(web3128)} == {"203.0.113.1"}


@pytest.fixture(scope="session")
def xinetd():
    """The path of a runnable xinetd, unpacked (not installed) by tools/fetch-xinetd."""
    if os.geteuid() != 0:
        pytest.skip("fetching xinetd with apt-get needs root")
    cache = os.environ.get("TPROXY_TEST_CACHE", "/var/cache/tproxy-test")
    proc = subprocess.run(["sh", FETCH_XINETD, cache], capture_output=True, text=True,
                          timeout=300)
    if proc.returncode == 69:       # EX_UNAVAILABLE: apt-get download failed
        pytest.skip("tools/fetch-xinetd: apt-get download xinetd failed (no package "
                    "registry reachable?): %s" % proc.stderr.strip()[-300:])
    assert proc.returncode == 0, "tools/fetch-xinetd failed: %s" % proc.stderr
    return proc.stdout.split()[-1]


def test_xinetd_service_runs_tproxy(book, xinetd):
    """contrib/xinetd.d/tproxy under real xinetd: IPv4 (REDIRECTed) and IPv6 clients, one service."""
    web80 = book.web(book.cow, 80)
    confdir = book.tmp / "xinetd.d"
    confdir.mkdir()
    (confdir / "tproxy").write_text(shipped("xinetd.d/tproxy", target=book.COW))
    # The distribution's /etc/xinetd.conf is just this: empty defaults and the directory.
    main = book.tmp / "xinetd.conf"
    main.write_text("defaults\n{\n}\n\nincludedir %s\n" % confdir)
    log = book.tmp / "xinetd.log"
    book.router.popen(xinetd, "-dontfork", "-f", main, "-filelog", log,
                      "-pidfile", book.tmp / "xinetd.pid",
                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        book.router.wait_listening(12970)
    except LabError:
        raise AssertionError("xinetd did not listen: %s" % (log.read_text() if log.exists() else ""))
    book.redirect(80, 12970)
    assert book.send(book.MOOSE, 80, GET).startswith(b"HTTP/1.1 200"), log.read_text()
    assert book.send(book.ROUTER_IN6, 12970, GET).startswith(b"HTTP/1.1 200"), log.read_text()
    assert cow_lines(web80) == ["GET /index.html HTTP/1.1"] * 2
    assert {r["peer"] for r in requests_seen(web80)} == {"203.0.113.1"}


# ---------------------------------------------------------------------------
# systemd units
# ---------------------------------------------------------------------------

SYSTEMD_UNITS = ("tproxy.socket", "tproxy.service", "tproxy@.service")


def analyze(*args):
    """Run systemd-analyze ARGS quietly enough for warnings to mean something."""
    env = dict(os.environ, SYSTEMD_LOG_LEVEL="notice", SYSTEMD_LOG_COLOR="0")
    return subprocess.run(["systemd-analyze"] + [str(a) for a in args], capture_output=True,
                          text=True, timeout=60, env=env)


@pytest.fixture
def units(tmp_path):
    """The shipped systemd units copied to a directory, ExecStart pointing at the venv's tproxy."""
    if not have("systemd-analyze"):
        pytest.skip("systemd-analyze is not installed (Debian package systemd)")
    probe = tmp_path / "probe.service"
    probe.write_text("[Service]\nExecStart=/bin/true\n")
    ran = analyze("verify", "--man=no", probe)
    if ran.returncode != 0 or ran.stdout.strip() or ran.stderr.strip():
        pytest.skip("systemd-analyze verify cannot run here (a trivial unit fails): %s"
                    % (ran.stderr.strip() or ran.stdout.strip()))
    out = tmp_path / "units"
    out.mkdir()
    for name in SYSTEMD_UNITS:
        (out / name).write_text(shipped("systemd/" + name))
    return out


def test_systemd_units_verify_cleanly(units):
    """systemd-analyze verify says nothing about the three units (man pages aside: not installed)."""
    ran = analyze("verify", "--man=no", *[units / n for n in SYSTEMD_UNITS])
    assert (ran.returncode, ran.stdout + ran.stderr) == (0, "")


def test_announce_unit_verifies_next_to_the_tproxy_template(units):
    """contrib/scale-out's tproxy-announce@.service, bound to tproxy@.service, verifies cleanly."""
    with open(os.path.join(CONTRIB, "scale-out", "tproxy-announce@.service")) as f:
        text = f.read()
    program = "/usr/local/sbin/tproxy-announce"
    assert program in text
    (units / "tproxy-announce@.service").write_text(
        text.replace(program, os.path.join(CONTRIB, "scale-out", "tproxy-announce")))
    ran = analyze("verify", "--man=no", units / "tproxy-announce@80.service")
    assert (ran.returncode, ran.stdout + ran.stderr) == (0, "")


@pytest.mark.parametrize("unit", ["tproxy.service", "tproxy@.service"])
def test_systemd_services_are_hardened(units, unit):
    """Each service keeps systemd's offline exposure score at 3.0 or lower ("OK")."""
    ran = analyze("security", "--offline=yes", "--threshold=30", "--no-pager", units / unit)
    assert ran.returncode == 0, ran.stdout[-2000:] + ran.stderr


def uncommented_settings(text):
    """Return the [Service] settings of unit TEXT that no comment introduces.

    A comment introduces the run of setting lines right below it; a setting
    after a blank line (or first in the section) stands alone, unexplained.
    """
    body = text.split("[Service]", 1)[1].split("\n[", 1)[0].splitlines()
    alone, explained = [], False
    for line in body:
        if line.startswith("#"):
            explained = True
        elif not line.strip():
            explained = False
        elif not explained:
            alone.append(line)
    return alone


def test_systemd_units_carry_the_promised_settings():
    """One socket, Accept=no; notify, -d, the capability, the hardening, each with its reason."""
    sock = shipped("systemd/tproxy.socket")
    assert unit_settings(sock, "ListenStream") == ["12970"]
    assert unit_settings(sock, "Accept") == ["no"]
    service = shipped("systemd/tproxy.service")
    argv = exec_argv(service)
    assert "-d" in argv and "-s" not in argv and "-r" not in argv
    for key, value in (("Type", "notify"), ("DynamicUser", "yes"),
                       ("AmbientCapabilities", "CAP_NET_RAW"),
                       ("CapabilityBoundingSet", "CAP_NET_RAW"), ("NoNewPrivileges", "yes"),
                       ("ProtectSystem", "strict"), ("ProtectHome", "yes"),
                       ("PrivateTmp", "yes")):
        assert unit_settings(service, key) == [value], key
    [families] = unit_settings(service, "RestrictAddressFamilies")
    assert {"AF_INET", "AF_INET6", "AF_UNIX"} <= set(families.split())
    template = shipped("systemd/tproxy@.service")
    assert exec_argv(template, "8080")[1:6] == ["-d", "-s", "8080", "-r", "nobody"]
    assert unit_settings(template, "Type") == ["notify"]
    assert uncommented_settings(service) == [] and uncommented_settings(template) == []


@pytest.mark.every_mode
def test_socket_activation_with_shipped_service(book, notify):
    """tproxy.service's ExecStart under systemd-socket-activate: passed sockets used, READY=1."""
    if not have("systemd-socket-activate"):
        pytest.skip("systemd-socket-activate is not installed (Debian package systemd)")
    web80 = book.web(book.cow, 80)
    argv = exec_argv(shipped("systemd/tproxy.service", target=book.COW)) + list(book.serving)
    err = book.tmp / "activated.err"
    with open(err, "wb") as f:
        # Two sockets, as ListenStream=12970 would give on a dual-stack host
        # with BindIPv6Only=ipv6-only: tproxy must serve both and bind none.
        proc = book.router.popen(
            "systemd-socket-activate", "-l", "%s:12970" % book.ROUTER_IN,
            "-l", "[%s]:12970" % book.ROUTER_IN6, "-E", "NOTIFY_SOCKET=" + notify.path,
            *argv, stdout=f, stderr=f)
    book.router.wait_listening(12970)
    book.redirect(80, 12970)
    # systemd-socket-activate starts the service on the first connection.
    assert book.send(book.MOOSE, 80, GET).startswith(b"HTTP/1.1 200"), err.read_text()
    ready = notify.receive()
    assert ready.get("READY") == "1" and ready.get("MAINPID") == str(proc.pid), ready
    assert book.send(book.ROUTER_IN6, 12970, GET).startswith(b"HTTP/1.1 200"), err.read_text()
    assert cow_lines(web80) == ["GET /index.html HTTP/1.1"] * 2
    log = err.read_text()
    assert "listening on 192.0.2.1:12970, [2001:db8:1::1]:12970, raw mode" in log, log
    assert "(socket from systemd)" in log
    listeners = book.router.run("ss", "-Hltn", "sport", "= :12970").stdout.split("\n")
    assert len([l for l in listeners if l.strip()]) == 2, listeners    # nothing bound besides


def test_socket_activation_refuses_accept_yes(lab, open_tmp):
    """Under `systemd-socket-activate --accept` (Accept=yes) each child says why, in one line."""
    if not have("systemd-socket-activate"):
        pytest.skip("systemd-socket-activate is not installed (Debian package systemd)")
    host = lab.host("router")
    argv = exec_argv(shipped("systemd/tproxy.service", target="192.0.2.20"))
    err = open_tmp / "accept.err"
    with open(err, "wb") as f:
        host.popen("systemd-socket-activate", "--accept", "-l", "127.0.0.1:12970", *argv,
                   stdout=f, stderr=f)
    host.wait_listening(12970)
    assert host.run(PYTHON, PEERS, "send", "127.0.0.1", 12970, input="x", timeout=20,
                    check=False).stdout == ""
    line = wait_for(lambda: [l for l in err.read_text().splitlines() if l.startswith("tproxy:")],
                    what="tproxy's error line")
    assert line == ["tproxy: socket activation: fd 3 is not a listening TCP socket "
                    "(tproxy.socket needs ListenStream=PORT and Accept=no)"], err.read_text()
    assert "Traceback" not in err.read_text()




def udp_socket():
    """An unbound UDP socket: a socket, but not a listening TCP one."""
    return socket.socket(socket.AF_INET, socket.SOCK_DGRAM)


def dev_null():
    """A file that is no socket at all."""
    return open(os.devnull, "rb")


def tcp_listener():
    """A listening TCP socket on a kernel-chosen loopback port (never connected to)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(1)
    return sock


def mptcp_listener():
    """A listening MPTCP socket on loopback: a stream listener, but not TCP (SocketProtocol=mptcp)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, 262)     # IPPROTO_MPTCP
    sock.bind(("127.0.0.1", 0))
    sock.listen(1)
    return sock


@pytest.mark.parametrize("make_fd, env, status, message", [
    (udp_socket, {"LISTEN_FDS": "1", "LISTEN_PID": "self"}, EX_USAGE,
     "socket activation: fd 3 is a UDP socket (serve it with --udp; "
     "for TCP, tproxy.socket needs ListenStream=PORT and Accept=no)"),
    (dev_null, {"LISTEN_FDS": "1", "LISTEN_PID": "self"}, EX_USAGE,
     "socket activation: fd 3: Socket operation on non-socket"),
    (mptcp_listener, {"LISTEN_FDS": "1", "LISTEN_PID": "self"}, EX_USAGE,
     "socket activation: fd 3 is an MPTCP listener, not a TCP one "
     "(tproxy.socket needs no SocketProtocol=)"),
    # Not activated (bogus count, or another process's sockets): the service's
    # -d alone then is a usage error, whatever fd 3 is.
    (dev_null, {"LISTEN_FDS": "bogus", "LISTEN_PID": "self"}, EX_USAGE,
     "-d needs -s PORT (standalone mode)"),
    (tcp_listener, {"LISTEN_FDS": "1", "LISTEN_PID": "1"}, EX_USAGE,
     "-d needs -s PORT (standalone mode)"),
], ids=["udp-socket", "not-a-socket", "mptcp-listener", "bogus-count", "other-pid"])
def test_socket_activation_bad_environment(make_fd, env, status, message):
    """tproxy.service's command with unusable LISTEN_* and fd 3: one error line, a sysexits status."""
    argv = exec_argv(shipped("systemd/tproxy.service", target="192.0.2.20"))
    with make_fd() as thing:
        fd = thing.fileno()
        proc = subprocess.run([PYTHON, "-c", LAUNCH, str(fd)] + argv, pass_fds=(fd,),
                              env=dict(os.environ, **env), stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=30)
    assert (proc.returncode, proc.stderr) == (status, "tproxy: %s\n" % message)


def test_socket_activation_refuses_unix_listener(open_tmp):
    """A unix-domain listening socket from systemd (ListenStream=/path) is refused in one line, 64."""
    argv = exec_argv(shipped("systemd/tproxy.service", target="192.0.2.20"))
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(open_tmp / "listen.sock"))
        sock.listen(1)
        proc = subprocess.run([PYTHON, "-c", LAUNCH, str(sock.fileno())] + argv,
                              pass_fds=(sock.fileno(),),
                              env=dict(os.environ, LISTEN_FDS="1", LISTEN_PID="self"),
                              stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=30)
    assert proc.returncode == EX_USAGE, proc.stderr
    assert re.fullmatch(r"tproxy: socket activation: fd 3 [^\n]*\n", proc.stderr), proc.stderr


def test_template_service_binds_switches_user_and_notifies(book, notify):
    """tproxy@12970.service's ExecStart: binds as root, serves as nobody, READY=1 after that."""
    web80 = book.web(book.cow, 80)
    argv = exec_argv(shipped("systemd/tproxy@.service", target=book.COW), instance="12970")
    err = book.tmp / "template.err"
    with open(err, "wb") as f:
        proc = book.router.popen(*argv, stdout=f, stderr=f,
                                 env=dict(os.environ, NOTIFY_SOCKET=notify.path))
    ready = notify.receive()
    assert ready.get("READY") == "1" and ready.get("MAINPID") == str(proc.pid), err.read_text()
    assert process_uid(proc.pid) == 65534
    book.redirect(80, 12970)
    assert book.send(book.MOOSE, 80, GET).startswith(b"HTTP/1.1 200"), err.read_text()
    assert cow_lines(web80) == ["GET /index.html HTTP/1.1"]
    assert "(socket from systemd)" not in err.read_text()


# ---------------------------------------------------------------------------
# Firewall recipes: add twice = add once; del twice = del once = nothing left
# ---------------------------------------------------------------------------

DEFAULT_RULE_PRIORITIES = {"0:", "32766:", "32767:"}
NFT_STRUCTURE = ("table ", "chain ", "type ", "}", "#")    # nft lines that are not rules


def rule_state(host, tables):
    """Return every rule the recipes can touch in HOST, as sorted lines.

    iptables-save and ip6tables-save rules (-A lines), the nft tables the
    recipes make (named tproxy_*), non-default ip rules, and the routes of the
    policy routing TABLES, each line prefixed with where it came from.
    """
    lines = []
    for tool in ("iptables-save", "ip6tables-save"):
        lines += ["%s %s" % (tool, l) for l in host.run(tool).stdout.splitlines()
                  if l.startswith("-A ")]
    for l in host.run("nft", "list", "tables").stdout.splitlines():
        family, name = l.split()[1:3]
        if name.startswith("tproxy_"):
            body = host.run("nft", "list", "table", family, name).stdout
            lines += ["nft %s %s: %s" % (family, name, b.strip()) for b in body.splitlines()
                      if b.strip() and not b.strip().startswith(NFT_STRUCTURE)]
    for v in ("-4", "-6"):
        lines += ["rule%s %s" % (v, l) for l in host.run("ip", v, "rule", "show").stdout.splitlines()
                  if l.split()[0] not in DEFAULT_RULE_PRIORITIES]
        for table in tables:
            out = host.run("ip", v, "route", "show", "table", table, check=False).stdout
            lines += ["route%s table %s %s" % (v, table, l) for l in out.splitlines()]
    return sorted(lines)


def count(lines, *words):
    """Return how many LINES contain every one of WORDS.

    A word ending in a letter or digit must end there in the line too, so
    "lookup 100" does not count "lookup 1000".
    """
    patterns = [re.compile(re.escape(w) + (r"(?!\w)" if w[-1:].isalnum() else "")) for w in words]
    return sum(all(p.search(l) for p in patterns) for l in lines)


V4_VIA, V6_VIA = "198.51.100.1", "2001:db8:2::1"
V4_SERVER, V6_SERVER = "198.51.100.10", "2001:db8:2::10"

# (recipe, arguments, policy routing table, [(words of one expected line), ...])
RECIPE_CASES = {
    "proxy-return-path-iptables": ("proxy-return-path", [], 100, [
        ("iptables-save", "-A PREROUTING", "--transparent", "MARK --set-xmark 0x1/"),
        ("ip6tables-save", "-A PREROUTING", "--transparent", "MARK --set-xmark 0x1/"),
        ("rule-4", "fwmark 0x1 lookup 100"), ("rule-6", "fwmark 0x1 lookup 100"),
        ("route-4 table 100", "local default dev lo"), ("route-6 table 100", "local default dev lo")]),
    "proxy-return-path-nft": ("proxy-return-path", ["--nft"], 100, [
        ("nft inet tproxy_rp", "socket transparent 1 meta mark set 0x00000001"),
        ("rule-4", "fwmark 0x1 lookup 100"), ("rule-6", "fwmark 0x1 lookup 100"),
        ("route-4 table 100", "local default dev lo"), ("route-6 table 100", "local default dev lo")]),
    "proxy-return-path-both-iptables": ("proxy-return-path", ["--both"], 100, [
        ("iptables-save", "-A PREROUTING", "-p tcp", "--transparent", "MARK --set-xmark 0x1/"),
        ("iptables-save", "-A PREROUTING", "-p udp", "--transparent", "MARK --set-xmark 0x1/"),
        ("ip6tables-save", "-A PREROUTING", "-p tcp", "--transparent", "MARK --set-xmark 0x1/"),
        ("ip6tables-save", "-A PREROUTING", "-p udp", "--transparent", "MARK --set-xmark 0x1/"),
        ("rule-4", "fwmark 0x1 lookup 100"), ("rule-6", "fwmark 0x1 lookup 100"),
        ("route-4 table 100", "local default dev lo"), ("route-6 table 100", "local default dev lo")]),
    "proxy-return-path-udp-nft": ("proxy-return-path", ["--nft", "--udp"], 100, [
        ("nft inet tproxy_rp", "udp", "socket transparent 1 meta mark set 0x00000001"),
        ("rule-4", "fwmark 0x1 lookup 100"), ("rule-6", "fwmark 0x1 lookup 100"),
        ("route-4 table 100", "local default dev lo"), ("route-6 table 100", "local default dev lo")]),
    "tproxy-intercept-udp-iptables": ("tproxy-intercept",
                                      ["--port", "53", "--to", "5353", "--udp"], None, [
        ("iptables-save", "-p udp", "--dport 53", "-j TPROXY --on-port 5353", "0x1/0x1"),
        ("ip6tables-save", "-p udp", "--dport 53", "-j TPROXY --on-port 5353", "0x1/0x1")]),
    "tproxy-intercept-both-nft": ("tproxy-intercept",
                                  ["--port", "53", "--to", "5353", "--both", "--nft"], None, [
        ("nft inet tproxy_53", "th dport 53 tproxy to :5353", "tcp", "udp", "accept")]),
    "tproxy-intercept-iptables": ("tproxy-intercept",
                                  ["--port", "80", "--to", "12970", "--in", "veth0"], None, [
        ("iptables-save", "-i veth0", "--dport 80", "-j TPROXY --on-port 12970", "0x1/0x1"),
        ("ip6tables-save", "-i veth0", "--dport 80", "-j TPROXY --on-port 12970", "0x1/0x1")]),
    "tproxy-intercept-nft": ("tproxy-intercept",
                             ["--port", "80", "--to", "12970", "--in", "veth0", "--nft"], None, [
        ("nft inet tproxy_80", 'iifname "veth0"', "tcp dport 80 tproxy to :12970", "accept")]),
    "server-return-route-sport-iptables-4": ("server-return-route",
                                             ["--via", V4_VIA, "--sport", "80"], 102, [
        ("iptables-save", "-A OUTPUT", "--sport 80", "MARK --set-xmark 0x2/"),
        ("rule-4", "fwmark 0x2 lookup 102"), ("route-4 table 102", "default via " + V4_VIA)]),
    "server-return-route-sport-iptables-6": ("server-return-route",
                                             ["--via", V6_VIA, "--sport", "80"], 102, [
        ("ip6tables-save", "-A OUTPUT", "--sport 80", "MARK --set-xmark 0x2/"),
        ("rule-6", "fwmark 0x2 lookup 102"), ("route-6 table 102", "default via " + V6_VIA)]),
    "server-return-route-sport-nft-4": ("server-return-route",
                                        ["--via", V4_VIA, "--sport", "80", "--nft"], 102, [
        ("nft inet tproxy_srv_4", "ipv4 tcp sport 80 meta mark set 0x00000002"),
        ("rule-4", "fwmark 0x2 lookup 102"), ("route-4 table 102", "default via " + V4_VIA)]),
    "server-return-route-sport-nft-6": ("server-return-route",
                                        ["--via", V6_VIA, "--sport", "80", "--nft"], 102, [
        ("nft inet tproxy_srv_6", "ipv6 tcp sport 80 meta mark set 0x00000002"),
        ("rule-6", "fwmark 0x2 lookup 102"), ("route-6 table 102", "default via " + V6_VIA)]),
    "server-return-route-from-4": ("server-return-route",
                                   ["--via", V4_VIA, "--from", V4_SERVER], 102, [
        ("rule-4", "from %s lookup 102" % V4_SERVER), ("route-4 table 102", "default via " + V4_VIA)]),
    "server-return-route-from-6": ("server-return-route",
                                   ["--via", V6_VIA, "--from", V6_SERVER], 102, [
        ("rule-6", "from %s lookup 102" % V6_SERVER), ("route-6 table 102", "default via " + V6_VIA)]),
    "server-return-route-dport-4": ("server-return-route",
                                    ["--via", V4_VIA, "--dport", "40000-40999", "--table", 201], 201, [
        ("rule-4", "ipproto tcp dport 40000-40999 lookup 201"),
        ("route-4 table 201", "default via " + V4_VIA)]),
    "server-return-route-dport-6": ("server-return-route",
                                    ["--via", V6_VIA, "--dport", "40000-40999", "--table", 201], 201, [
        ("rule-6", "ipproto tcp dport 40000-40999 lookup 201"),
        ("route-6 table 201", "default via " + V6_VIA)]),
}


def firewall_host(lab):
    """A fresh namespace with a link to a neighbour (the --via gateway), nothing else."""
    host, neighbour = lab.host("fw"), lab.host("gw")
    lab.link(host, neighbour, [V4_SERVER + "/24", V6_SERVER + "/64"], [V4_VIA + "/24", V6_VIA + "/64"])
    return host


def run_recipe(host, name, action, args):
    """Run contrib/firewall/NAME ACTION ARGS in HOST; return the CompletedProcess (checked)."""
    return host.run("sh", os.path.join(RECIPES, name), action, *args)


def expected_counts(state, expected):
    """Return, for each expected line's words, how many lines of STATE hold them."""
    return [count(state, *words) for words in expected]


@pytest.mark.parametrize("case", sorted(RECIPE_CASES))
def test_firewall_recipe_is_idempotent(lab, case):
    """add twice leaves one copy of each rule and route; del twice leaves nothing, exit 0."""
    if not (have("iptables") and have("nft")):
        pytest.skip("iptables and nftables are needed (tools/install-deps installs them)")
    name, args, table, expected = RECIPE_CASES[case]
    host = firewall_host(lab)
    tables = [table] if table else []
    before = rule_state(host, tables)
    assert expected_counts(before, expected) == [0] * len(expected)
    run_recipe(host, name, "add", args)
    once = rule_state(host, tables)
    run_recipe(host, name, "add", args)
    assert rule_state(host, tables) == once
    assert expected_counts(once, expected) == [1] * len(expected), once
    assert len(once) - len(before) == len(expected), once    # nothing else was added
    run_recipe(host, name, "del", args)
    assert rule_state(host, tables) == before
    run_recipe(host, name, "del", args)     # checked: deleting what is absent exits 0
    assert rule_state(host, tables) == before


def test_dport_rules_of_two_proxies_coexist(lab):
    """One range and table per proxy: adding the second keeps the first; deleting one keeps the other."""
    host = firewall_host(lab)
    before = rule_state(host, [201, 202])
    first = ["--via", V4_VIA, "--dport", "40000-40999", "--table", 201]
    second = ["--via", "198.51.100.2", "--dport", "41000-41999", "--table", 202]
    run_recipe(host, "server-return-route", "add", first)
    run_recipe(host, "server-return-route", "add", second)
    state = rule_state(host, [201, 202])
    assert count(state, "rule-4", "dport 40000-40999 lookup 201") == 1, state
    assert count(state, "rule-4", "dport 41000-41999 lookup 202") == 1, state
    assert count(state, "route-4 table 202", "default via 198.51.100.2") == 1, state
    run_recipe(host, "server-return-route", "del", first)
    state = rule_state(host, [201, 202])
    assert count(state, "dport 40000-40999") == 0 and count(state, "table 201") == 0, state
    assert count(state, "rule-4", "dport 41000-41999 lookup 202") == 1, state
    run_recipe(host, "server-return-route", "del", second)
    assert rule_state(host, [201, 202]) == before


def test_server_return_route_takes_one_selector(lab):
    host = firewall_host(lab)
    proc = host.run("sh", os.path.join(RECIPES, "server-return-route"), "add", "--via", V4_VIA,
                    "--sport", "80", "--dport", "40000-40999", check=False)
    assert proc.returncode == EX_USAGE
    assert proc.stderr == "server-return-route: give one of --sport, --from and --dport\n"


def test_firewall_recipes_leave_neighbouring_rules_alone(lab):
    """Rules for a similar mark or table (0x10, 1000) neither hide ours from add nor go with del."""
    host = firewall_host(lab)
    for v in ("-4", "-6"):
        host.run("ip", v, "rule", "add", "fwmark", "1", "lookup", "1000")
        host.run("ip", v, "rule", "add", "fwmark", "2", "lookup", "1020")
    neighbours = rule_state(host, [])
    run_recipe(host, "proxy-return-path", "add", [])
    run_recipe(host, "server-return-route", "add", ["--via", V4_VIA, "--sport", "80"])
    state = rule_state(host, [])
    for v in ("-4", "-6"):
        assert count(state, "rule%s" % v, "fwmark 0x1 lookup 100") == 1, state
    assert count(state, "rule-4", "fwmark 0x2 lookup 102") == 1, state
    run_recipe(host, "proxy-return-path", "del", [])
    run_recipe(host, "server-return-route", "del", ["--via", V4_VIA, "--sport", "80"])
    assert rule_state(host, []) == neighbours
