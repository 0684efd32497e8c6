"""tproxy's command line: bad input gives one line, a documented status, no traceback."""
import os
import socket
import subprocess

import pytest

from support import tproxy_cmd
import tproxy


def run(*args, stdin=subprocess.DEVNULL, env=None):
    proc = subprocess.run(tproxy_cmd(*args), capture_output=True, text=True, timeout=30,
                          stdin=stdin, env=env)
    return proc.returncode, proc.stdout, proc.stderr


@pytest.mark.parametrize("args, status, message", [
    (["-x", "-t"], 64, "tproxy: unknown option -x (see tproxy --help)"),
    (["--bogus", "-t"], 64, "tproxy: unknown option --bogus (see tproxy --help)"),
    (["-s", "70000", "-t"], 64, "tproxy: -s: port 70000 is out of range (1-65535)"),
    (["-s", "0", "-t"], 64, "tproxy: -s: port 0 is out of range (1-65535)"),
    (["-s", "nosuchservice", "-t"], 64, "tproxy: -s: unknown port or service 'nosuchservice'"),
    (["-s", "8080", "-r", "nosuchuser", "-t"], 67, "tproxy: -r: unknown user 'nosuchuser'"),
    (["-s", "8080", "host.invalid", "80"], 68, "tproxy: cannot resolve host host.invalid"),
    (["-s", "8080"], 64, "tproxy: PROXYHOST PROXYPORT are needed unless -t is given"),
    (["-s", "8080", "192.0.2.1"], 64, "tproxy: PROXYHOST 192.0.2.1 needs a PROXYPORT after it"),
    (["-d", "-t"], 64, "tproxy: -d needs -s PORT (standalone mode)"),
    (["-r", "nobody", "-t"], 64, "tproxy: -r needs -s PORT (standalone mode)"),
    (["-t", "--connect", "192.0.2.1", "80"], 64, "tproxy: -t and --connect exclude each other"),
    (["-t", "-p"], 64, "tproxy: -p applies to HTTP translate mode only"),
    (["--connect", "-p", "192.0.2.1", "3128"], 64, "tproxy: -p applies to HTTP translate mode only"),
    (["-t", "--proxy-auth-file=/dev/null"], 64, "tproxy: --proxy-auth-file applies to --connect only"),
    (["-t", "-f", "http://x/"], 64, "tproxy: -f applies to HTTP translate mode only"),
    (["-t", "--idle-timeout=soon"], 64, "tproxy: --idle-timeout: 'soon' is not a number of seconds"),
    (["-t", "--max-conns=0"], 64, "tproxy: --max-conns: '0' is not a positive whole number"),
    (["-t", "--send-proxy=v3"], 64, "tproxy: --send-proxy takes v1 or v2, not 'v3'"),
    (["--send-proxy=v1", "192.0.2.1", "80"], 64, "tproxy: --send-proxy needs -t or --connect"),
    (["-t", "--source=elsewhere"], 64, "tproxy: --source: 'elsewhere' is not client, client-port or an IP address"),
    (["-t", "-a", "192.0.2.0/33"], 64, "tproxy: -a: '192.0.2.0/33' does not appear to be an IPv4 or IPv6 network"),
    (["-t", "-a", "no.such.host.invalid"], 68, "tproxy: cannot resolve host no.such.host.invalid"),
    (["-t", "-s"], 64, "tproxy: -s requires argument (see tproxy --help)"),
    (["-t"], 64, "tproxy: standard input is not a socket; use -s PORT for standalone mode"),
    # Digits that str.isdigit() takes but int() or a port cannot.
    (["-s", "\u00b2", "-t"], 64, "tproxy: -s: unknown port or service '\u00b2'"),
    (["--prefork=\u2460", "-s", "80", "-t"], 64, "tproxy: --prefork: '\u2460' is not a positive whole number"),
    (["--prefork=8:2", "-s", "80", "-t"], 64, "tproxy: --prefork: MAX 2 is below N 8"),
    (["--prefork=2", "--workers=2", "-s", "80", "-t"], 64, "tproxy: --prefork and --workers exclude each other"),
    (["--prefork=2:8", "-t"], 64, "tproxy: --prefork needs -s PORT (standalone mode)"),
    # An empty N is an error, not the option left out (it ran fork mode); a count past
    # PID_MAX_LIMIT ended in "internal error" (70) once the pool sized its shared memory.
    (["--prefork=", "-s", "80", "-t"], 64, "tproxy: --prefork: '' is not a positive whole number"),
    (["--workers=", "-s", "80", "-t"], 64, "tproxy: --workers: '' is not a positive whole number"),
    (["--prefork=1:", "-s", "80", "-t"], 64, "tproxy: --prefork: '' is not a positive whole number"),
    (["--prefork=9" + "9" * 19, "-s", "80", "-t"], 64, "tproxy: --prefork: 99999999999999999999 is more than 4194304"),
    (["--prefork=1:" + "9" * 5000, "-s", "80", "-t"], 64, "tproxy: --prefork: 99999999999999999999... is more than 4194304"),
    (["--workers=4194305", "-s", "80", "-t"], 64, "tproxy: --workers: 4194305 is more than 4194304"),
    (["-t", "--max-conns=" + "9" * 20], 64, "tproxy: --max-conns: 99999999999999999999 is more than 4194304"),
    (["--prefork=1:" + "0" * 40, "-s", "80", "-t"], 64, "tproxy: --prefork: '" + "0" * 40 + "' is not a positive"),
    (["-t", "--max-conns=\u0661\u0662"], 64, "tproxy: --max-conns: '\u0661\u0662' is not a positive whole number"),
    (["-t", "--idle-timeout=\u0661\u0662"], 64, "tproxy: --idle-timeout: '\u0661\u0662' is not a number of seconds"),
    (["-s", "8080", "-r", "#4294967296", "-t"], 67, "tproxy: -r: unknown user '#4294967296'"),
    (["-s", "8080", "-r", "#4294967295", "-t"], 67, "tproxy: -r: unknown user '#4294967295'"),
    (["-d", "-s", "8080", "-b", "a" * 64 + ".example", "-t"], 68, "tproxy: -b: cannot resolve " + "a" * 64),
    # Bytes that are not UTF-8 (Python hands them over as lone surrogates).
    (["-s", os.fsdecode(b"\xff"), "-t"], 64, "tproxy: -s: unknown port or service '\\udcff'"),
    (["-s", "8080", "-r", os.fsdecode(b"\xff"), "-t"], 67, "tproxy: -r: unknown user '\\udcff'"),
    (["-t", "--grace=-1"], 64, "tproxy: --grace: '-1' is not a number of seconds"),
    # Ports of more digits than int() takes (4,300) ended in "internal error" (70).
    (["-s", "9" * 5000, "-t"], 64, "tproxy: -s: port 99999999999999999999... is out of range (1-65535)"),
    (["-s", "8080", "192.0.2.1", "9" * 5000], 64,
     "tproxy: PROXYPORT: port 99999999999999999999... is out of range (1-65535)"),
    (["-s", "0" * 30 + "8", "192.0.2.1", "0"], 64, "tproxy: PROXYPORT: port 0 is out of range (1-65535)"),
])
def test_bad_input_is_one_line_and_a_status(args, status, message):
    code, out, err = run(*args)
    assert code == status, err
    assert err.startswith(message), err
    assert err.count("\n") == 1 and "Traceback" not in err and out == ""


def test_address_already_in_use():
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        port = holder.getsockname()[1]
        code, _, err = run("-d", "-t", "-s", port, "-b", "127.0.0.1", "192.0.2.1", 80)
    assert code == 71
    assert err == "tproxy: cannot listen on 127.0.0.1 port %d: Address already in use\n" % port


def test_target_is_itself():
    code, _, err = run("-d", "-t", "-s", 18999, "-b", "127.0.0.1", "127.0.0.1", 18999)
    assert code == 64 and "is this proxy itself" in err


def test_option_order_does_not_matter():
    a = tproxy.parse_args(["-t", "-s", "12970", "-r", "nobody", "192.0.2.1", "80"])
    b = tproxy.parse_args(["192.0.2.1", "80", "-r", "nobody", "-s", "12970", "-t"])
    assert vars(a) == vars(b) and a.port == 12970 and a.user[0] == "nobody"


@pytest.mark.parametrize("argv, workers, max_conns", [
    (["--prefork=8:1100"], 8, 1100),            # the pool's MAX capped connections at once
    (["--prefork=8"], 8, 512),                  # no MAX: --max-conns keeps its default
    (["--prefork=2:8", "--max-conns=9"], 2, 9),     # --max-conns given wins over MAX
    (["--max-conns=512", "--prefork=2:8"], 2, 512),
])
def test_prefork_is_workers_with_max_as_max_conns(argv, workers, max_conns):
    """--prefork N[:MAX] (tproxy 1.0's pool) runs --workers N; MAX is --max-conns unless given."""
    cfg = tproxy.parse_args(argv + ["-s", "12970", "-t"])
    assert (cfg.workers, cfg.max_conns) == (workers, max_conns)


def test_help_and_version():
    code, out, _ = run("--help")
    assert code == 0 and out.startswith("tproxy - transparent proxy redirector")
    code, out, _ = run("--version")
    assert code == 0 and out.strip() == "tproxy %s" % tproxy.__version__


@pytest.mark.parametrize("text, network", [
    ("192.168.1.0", "192.168.1.0/24"),        # class C written with its host part zero
    ("172.16.0.0", "172.16.0.0/16"),          # class B
    ("10.0.0.0", "10.0.0.0/8"),               # class A
    ("10.1.0.0", "10.1.0.0/32"),              # host part not zero: a host
    ("192.0.2.7", "192.0.2.7/32"),
    ("198.51.100.0/25", "198.51.100.0/25"),
    ("2001:db8::/32", "2001:db8::/32"),
    ("2001:db8::1", "2001:db8::1/128"),
])
def test_acl_forms(text, network):
    assert str(tproxy.parse_acl(text)) == network


def test_acl_matches_mapped_clients():
    acl = (tproxy.parse_acl("192.0.2.0"),)
    assert tproxy.acl_allows(acl, ("::ffff:192.0.2.9", 1, 0, 0))
    assert not tproxy.acl_allows(acl, ("198.51.100.9", 1))
    assert tproxy.acl_allows((), ("198.51.100.9", 1))


def test_user_by_uid():
    assert tproxy.lookup_user("#65534")[1:] == (65534, 65534)
    assert tproxy.lookup_user("#54321") == ("#54321", 54321, 54321)


def test_cache_that_is_this_proxy_is_refused():
    code, _, err = run("-d", "-s", 18998, "-b", "127.0.0.1", "127.0.0.1", 18998)
    assert code == 64 and err == "tproxy: target 127.0.0.1:18998 is this proxy itself\n"


QUICK_CASES = [
    ["-t", "192.0.2.1", "80"],
    ["-s", "12970", "-r", "nobody", "cow.example", "80"],
    ["-s12970", "-t", "-d", "-b", "127.0.0.1"],
    ["192.0.2.1", "80", "-a", "192.0.2.0", "-a", "10.0.0.0/8", "-s", "80"],
    ["--idle-timeout=5", "--connect-timeout", "3", "-t"],
    ["--connect", "--send-proxy=v2", "--source", "client", "192.0.2.1", "3128"],
    ["-p", "-f", "http://portal/", "-l", "/tmp/x.log", "-v", "192.0.2.1", "3128"],
    ["--prefork", "2:8", "-s", "80", "-t", "--max-conns=9", "-P", "/run/t.pid"],
    # Not plain: docopt decides (the quick parser must step aside).
    ["--help"], ["--version"], ["-t", "-t"], ["--idle", "5", "-t"], ["-td"], ["192.0.2.1"],
    ["-x"], ["-s"], ["--", "-t"], ["-t", "--connect=yes"], ["-t", "-s=80"],
]


@pytest.mark.parametrize("argv", QUICK_CASES, ids=" ".join)
def test_quick_parse_agrees_with_docopt(argv):
    """The docopt-free fast path (inetd start-up) gives docopt's answer or stands aside."""
    quick = tproxy.quick_parse(argv)
    try:
        reference = tproxy.docopt_parse(argv)
    except tproxy.Fatal:
        reference = None
    except SystemExit:      # --help and --version print and exit inside docopt
        reference = None
    if quick is not None:
        assert quick == dict(reference)
    assert quick is not None or argv in QUICK_CASES[8:]


def test_acl_host_name_is_resolved():
    """-a HOSTNAME: its one address, or a request to list several one by one; never a crash."""
    try:
        net = tproxy.parse_acl("localhost")
    except tproxy.Fatal as exc:
        assert exc.status == 64 and "list them one by one" in str(exc)
    else:
        assert str(net) in ("127.0.0.1/32", "::1/128")


def test_undecodable_proxy_credentials_in_the_environment():
    env = dict(os.environb)
    env[b"TPROXY_PROXY_AUTH"] = b"user:\xff\xfe"
    code, _, err = run("--connect", "192.0.2.1", "3128", env=env)
    assert code == 64 and err.startswith("tproxy: standard input is not a socket"), err


VALUE_OPTIONS = ["-s", "-r", "--connect-timeout", "--grace", "--idle-timeout", "--max-conns",
                 "--prefork", "--send-proxy", "--source"]
ODD_VALUES = ["", "0", "-1", "1e999", "nan", "inf", "0x10", "1_0", " 1", "\u00b2", "\u2460",
              "\uff11", os.fsdecode(b"\xff"), "#4294967296", "#-1", "9" * 40, ":", "1:", ":1"]


@pytest.mark.parametrize("option", VALUE_OPTIONS)
def test_no_odd_value_is_an_internal_error(option):
    """Every value of every option ends in Fatal (a documented status) or a Config, never a crash."""
    for value in ODD_VALUES:
        argv = [option, value, "-t", "-s", "8080"] if option != "-s" else [option, value, "-t"]
        try:
            tproxy.parse_args(argv)
        except tproxy.Fatal as exc:
            assert exc.status in (64, 67, 68), (argv, exc)


@pytest.mark.parametrize("fds, status, message", [
    ("\u00b2", 64, "tproxy: standard input is not a socket"),      # not systemd's: ignored
    ("1", 64, "tproxy: socket activation: fd 3: Bad file descriptor"),
    ("9" * 5000, 64, "tproxy: socket activation: fd 3: Bad file descriptor"),   # int() refuses it
])
def test_odd_socket_activation_variables(fds, status, message):
    """LISTEN_FDS comes from the environment: an odd value is an error or ignored, never a crash."""
    proc = subprocess.run(["sh", "-c", 'export LISTEN_PID=$$ LISTEN_FDS="$0"; exec "$@"', fds,
                           *tproxy_cmd("-t", "192.0.2.1", "80")], capture_output=True, text=True,
                          timeout=30, stdin=subprocess.DEVNULL)
    assert proc.returncode == status and proc.stderr.startswith(message), proc.stderr
