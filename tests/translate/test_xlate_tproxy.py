"""--redirect=tproxy is the kernel's whole TPROXY recipe: with tproxy -t
--source=client behind it and nothing added by hand, a client's connection
reaches the server from the client's own address (the servers' replies come
back to the proxy through the socket-match rule, not forwarded past it).
The same for a UDP redirect with tproxy --udp --source=client behind it.

Lab (tests/support.py BookLab): client 192.0.2.10 -- router -- moose 198.51.100.10.
"""
import socket
import subprocess

import pytest

from support import PEERS, PYTHON
from xlate_helpers import FORMATS, needed_commands, run_tool

SCRIPT = "ipchains -A input -p tcp -s 192.0.2.0/24 -d 198.51.100.10 80 -j REDIRECT 12970\n"


def load(host, fmt, path, text):
    if fmt == "nft":
        host.run("nft", "-f", path)
    elif fmt == "iptables-restore":
        host.sh("iptables-restore --noflush < %s" % path)
    else:
        host.run("sh", "-e", path)
    if fmt != "iptables":
        # nft and iptables-restore cannot hold policy routing: the translation
        # names it, and those are the only commands run besides loading it.
        for command in needed_commands(text):
            host.sh(command)


def translate_and_load(book, tmp_path, fmt, script):
    """Translate SCRIPT with --redirect=tproxy to FMT and load it on the router alone."""
    src = tmp_path / "fw"
    src.write_text(script)
    status, text, err = run_tool(["--to=" + fmt, "--redirect=tproxy", str(src)])
    assert status == 0, err
    path = tmp_path / "out"
    path.write_text(text)
    load(book.router, fmt, str(path), text)


@pytest.mark.parametrize("fmt", FORMATS)
def test_tproxy_redirect_works_on_its_own(book, tmp_path, fmt):
    translate_and_load(book, tmp_path, fmt, SCRIPT)
    book.moose.popen(PYTHON, PEERS, "who", 80, "--lifetime", 60)
    book.moose.wait_listening(80)
    _, log = book.tproxy("-t", "--source=client", "-r", "nobody")
    proc = subprocess.run(book.client.cmd(PYTHON, PEERS, "ask", book.MOOSE, 80), input=b"",
                          capture_output=True, timeout=30)
    words = proc.stdout.decode().split()
    assert words[:1] == [book.CLIENT] and words[2:4] == [book.MOOSE, "80"], \
        (words, open(log).read())


@pytest.mark.parametrize("fmt", FORMATS)
def test_tproxy_policy_routing_can_be_loaded_again(book, tmp_path, fmt):
    # A firewall is reloaded: "ip rule add" would add one more rule each time,
    # and "ip route add" fails once the route is there.
    translate_and_load(book, tmp_path, fmt, SCRIPT)
    translate_and_load(book, tmp_path, fmt, SCRIPT)
    rules = book.router.run("ip", "rule", "show").stdout
    assert rules.count("fwmark 0x1/0x1 lookup 100") == 1, rules
    routes = book.router.run("ip", "route", "show", "table", "100").stdout
    assert routes.split()[:4] == ["local", "default", "dev", "lo"], routes


UDP_SCRIPT = "ipchains -A input -p udp -s 192.0.2.0/24 -d 198.51.100.10 53 -j REDIRECT 5300\n"


@pytest.mark.parametrize("fmt", FORMATS)
def test_udp_tproxy_redirect_works_on_its_own(book, tmp_path, fmt):
    # Without the UDP socket-match rule the server's answers, addressed to the
    # client's own address, never reach the proxy's flow: no answer at all.
    from test_udp_lab import ask
    translate_and_load(book, tmp_path, fmt, UDP_SCRIPT)
    book.moose.popen(PYTHON, PEERS, "udp-who", 53, book.MOOSE, "--lifetime", 60)
    book.moose.wait_listening(53, proto="udp")
    _, log = book.tproxy("--udp", "--source=client", "-r", "nobody", port=5300, wait=False)
    book.router.wait_listening(5300, proto="udp")
    sock = book.client.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with sock:
        sock.bind((book.CLIENT, 0))
        try:
            seen, source = ask(sock, (book.MOOSE, 53), b"who-is-asking")
        except AssertionError as exc:
            raise AssertionError("%s; tproxy: %s" % (exc, open(log).read()))
        assert source == (book.MOOSE, 53)
        # The server saw the client's own address (--source=client; the port
        # is the proxy's), at its own address.
        assert seen[0] == book.CLIENT and seen[2:] == (book.MOOSE, 53)
