#!/usr/bin/env python3
"""tproxy's main job: the book's REDIR rule and tproxy command, rebuilt in network namespaces.

Usage (as root, from the source tree): `make demo`, or `.venv/bin/python tools/demo.py`.

Contract: builds a lab of four namespaces on documentation addresses,
translates and loads the book's ipchains rule, runs tproxy on the router
plainly and then with --source=client, and prints each step. Exits 0 when
cow saw the router's address in the plain step and the client's address in
the transparent step; otherwise prints one line "demo: failed: ..." on
stderr and exits 1. Always removes what it made (processes, namespaces,
/etc/netns/NAME, its work directory), also on SIGINT, SIGTERM or error; the
host's own namespace (firewall, routes, sysctls) is never touched.
"""
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))

from lab import Lab, LabError, have, stop  # noqa: E402  (tests/ is the lab's home)

PYTHON = sys.executable
BIN = os.path.dirname(PYTHON)           # the venv's console scripts live next to its python
PEERS = os.path.join(REPO, "tests", "peers.py")
RECIPES = os.path.join(REPO, "contrib", "firewall")
NETNS_ETC = "/etc/netns"

CLIENT, ROUTER_IN, ROUTER_MOOSE, ROUTER_COW = "192.0.2.10", "192.0.2.1", "198.51.100.1", "203.0.113.1"
MOOSE, COW = "198.51.100.10", "203.0.113.20"
TOPOLOGY = """\
client 192.0.2.10 -- 192.0.2.1 router 198.51.100.1 -- 198.51.100.10 moose (old server, down)
                               router 203.0.113.1  -- 203.0.113.20  cow   (new server, web on :80)
"""
HOSTS_FILE = ("127.0.0.1\tlocalhost\n"
              "%s\tmoose.mancill.com moose\n"
              "%s\tcow.mancill.com cow\n" % (MOOSE, COW))
BOOK_RULE = "ipchains -A input -p tcp -j REDIR 12970 -s 192.0.2.0/24 -d moose.mancill.com/32 80"
BOOK_TPROXY = ["tproxy", "-s", "12970", "-r", "nobody", "cow.mancill.com", "80"]
PORT = 12970
ORIGIN = "<stdin>:1"                     # the translator's comment on rules made from line 1 of stdin
VERDICT = re.compile(r" (redirect|accept|reject|drop|jump|goto) ")


class DemoError(Exception):
    """A step did not show what it should; the message is the one-line reason."""


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived; BaseException so that no step swallows it."""


# ---------------------------------------------------------------------------
# Output: step headings, commands as typed, indented output
# ---------------------------------------------------------------------------

def heading(text):
    """Print a step heading."""
    print("\n== %s ==" % text, flush=True)


def say(text=""):
    """Print one explanatory line."""
    print(text, flush=True)


def show_cmd(where, words, redirect=""):
    """Print WORDS as a user would type them on host WHERE (with an optional '> file')."""
    line = " ".join(shlex.quote(w) for w in words)
    print("%s# %s%s" % (where, line, " " + redirect if redirect else ""), flush=True)


def show_text(text, indent="    "):
    """Print TEXT indented, without blank lines, so that it reads as program output."""
    for line in text.rstrip("\n").splitlines():
        if line.strip():
            print(indent + line.expandtabs(4), flush=True)


# ---------------------------------------------------------------------------
# The lab: namespaces, links, hosts files
# ---------------------------------------------------------------------------

class Demo:
    """The lab and everything made for it; `close()` removes all of it."""

    def __init__(self):
        self.lab = Lab("demo")
        self.work = tempfile.mkdtemp(prefix="tproxy-demo-")
        os.chmod(self.work, 0o755)       # tproxy runs as nobody; its log is opened by us
        self.netns_dirs = []
        self.made_netns_etc = False
        self.tproxy = None

    def build(self):
        """Create client, router, moose and cow, linked and routed as in the book."""
        lab = self.lab
        self.client = lab.host("client")
        self.router = lab.host("router", forwarding=True)
        self.moose = lab.host("moose")
        self.cow = lab.host("cow")
        self.router_if, _ = lab.link(self.router, self.client, [ROUTER_IN + "/24"], [CLIENT + "/24"])
        lab.link(self.router, self.moose, [ROUTER_MOOSE + "/24"], [MOOSE + "/24"])
        lab.link(self.router, self.cow, [ROUTER_COW + "/24"], [COW + "/24"])
        for host, gateway in ((self.client, ROUTER_IN), (self.moose, ROUTER_MOOSE),
                              (self.cow, ROUTER_COW)):
            host.run("ip", "route", "add", "default", "via", gateway)
        for host in (self.router, self.client):
            self.write_hosts(host)

    def write_hosts(self, host):
        """Give HOST its own /etc/hosts: `ip netns exec` bind-mounts /etc/netns/NAME/hosts."""
        if not os.path.isdir(NETNS_ETC):
            os.mkdir(NETNS_ETC, 0o755)
            self.made_netns_etc = True
        path = os.path.join(NETNS_ETC, host.netns)
        self.netns_dirs.append(path)    # first, so that an interrupted mkdir is still removed
        os.mkdir(path, 0o755)
        with open(os.path.join(path, "hosts"), "w") as f:
            f.write(HOSTS_FILE)

    def path(self, name):
        """Return the path of NAME in the demo's work directory."""
        return os.path.join(self.work, name)

    def close(self):
        """Stop every process, delete the namespaces, /etc/netns entries and work directory."""
        try:
            self.lab.close()
            sweep_namespaces(self.lab.prefix)
        finally:
            for path in self.netns_dirs:
                shutil.rmtree(path, ignore_errors=True)
            self.netns_dirs.clear()
            if self.made_netns_etc:
                try:
                    os.rmdir(NETNS_ETC)     # only if empty: another user may have added entries
                except OSError:
                    pass
                self.made_netns_etc = False
            shutil.rmtree(self.work, ignore_errors=True)


def sweep_namespaces(prefix):
    """Delete namespaces named PREFIX-*: one an interrupted `ip netns add` made but Lab never saw."""
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
    for name in names[:100]:
        if name.startswith(prefix + "-"):
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


# ---------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------

def poll(predicate, timeout, what):
    """Return PREDICATE's first true value, polling for at most TIMEOUT s; raise DemoError."""
    for _ in range(int(timeout / 0.1) + 1):
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise DemoError("timed out after %g s waiting for %s" % (timeout, what))


def read_lines(path):
    """Return the lines of PATH, or [] if it does not exist yet."""
    try:
        with open(path) as f:
            return f.read().splitlines()
    except FileNotFoundError:
        return []


def cow_saw(demo):
    """Return the requests cow's web server recorded (one dict per request)."""
    return [json.loads(line) for line in read_lines(demo.cow_log) if line.strip()]


def connection_lines(log_path):
    """Return tproxy's per-connection summary lines from its -d log."""
    return [line for line in read_lines(log_path) if " client=" in line]


# ---------------------------------------------------------------------------
# Steps
# ---------------------------------------------------------------------------

def step_lab(demo):
    """Build the lab and start cow's web server; print the topology."""
    heading("Step 0: the lab (network namespaces, documentation addresses)")
    demo.build()
    demo.cow_log = demo.path("cow-requests.jsonl")
    demo.cow.popen(PYTHON, PEERS, "web", 80, demo.cow_log, "--lifetime", 120,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    demo.cow.wait_listening(80)
    show_text(TOPOLOGY, indent="")
    say("namespaces: %s-{client,router,moose,cow}" % demo.lab.prefix)
    say("names: /etc/netns/<ns>/hosts for router and client (ip netns exec mounts it on /etc/hosts):")
    show_text(HOSTS_FILE.replace("127.0.0.1\tlocalhost\n", ""))


def step_translate(demo):
    """Translate the book's rule on the router, load it, and add counters to its rules."""
    heading("Step 1: translate the book's ipchains rule and load it on the router")
    say("Linux 2.2, Linux Routers: %s" % BOOK_RULE)
    # The rule is a whole (one-line) firewall here: -e alone would print a
    # snippet for a translation loaded before.
    words = ["ipchains-translate", "--to=nft", "--redirect=nat", "--hosts", "/etc/hosts"]
    show_cmd("router", ["echo", BOOK_RULE], "| %s > redir.nft" % " ".join(words))
    proc = demo.router.run(os.path.join(BIN, words[0]), *words[1:], check=False,
                           input=BOOK_RULE + "\n")
    if proc.returncode != 0:
        raise DemoError("ipchains-translate exited %d: %s" % (proc.returncode, proc.stderr.strip()))
    with open(demo.path("redir.nft"), "w") as f:
        f.write(proc.stdout)
    show_text(proc.stderr, indent="    (stderr) ")
    show_text(proc.stdout)
    show_cmd("router", ["nft", "-f", "redir.nft"])
    demo.router.run("nft", "-f", demo.path("redir.nft"))
    count_rules(demo)
    say("The rules from %s (the translator's FILE:LINE comment), now in the kernel:" % ORIGIN)
    show_cmd("router", ["nft", "list", "ruleset"], "| grep -- '%s'" % ORIGIN)
    show_text("\n".join(origin_rules(demo)))


def count_rules(demo):
    """Add nft's `counter` to every rule the translator made from the book's rule.

    The translator emits no counters; replacing each rule (by handle) with the
    same rule plus `counter` lets step 2 show which of them packets matched.
    """
    listing = demo.router.run("nft", "-a", "list", "table", "ip", "ipchains").stdout
    chain, script = None, []
    for line in listing.splitlines():
        start = re.match(r"\s*chain (\S+) \{", line)
        if start:
            chain = start.group(1)
        rule = re.match(r"\s*(.*comment \"%s\") # handle (\d+)$" % re.escape(ORIGIN), line)
        if rule and chain and VERDICT.search(rule.group(1)):
            counted = VERDICT.sub(r" counter \1 ", rule.group(1), count=1)
            script.append("replace rule ip ipchains %s handle %s %s" % (chain, rule.group(2), counted))
    if not script:
        raise DemoError("no rule with comment %s found in the loaded ruleset" % ORIGIN)
    demo.router.run("nft", "-f", "-", input="\n".join(script) + "\n")
    say("(the demo added nft's `counter` to these rules, so that step 2 can show which matched)")


def origin_rules(demo):
    """Return the loaded rules made from the book's rule, each prefixed with its chain."""
    listing = demo.router.run("nft", "list", "table", "ip", "ipchains").stdout
    chain, rules = None, []
    for line in listing.splitlines():
        start = re.match(r"\s*chain (\S+) \{", line)
        if start:
            chain = start.group(1)
        elif ORIGIN in line:
            rules.append("chain %-9s %s" % (chain, line.strip()))
    return rules


def explain_matches(rules):
    """Print which of RULES counted packets; raise DemoError if the redirect did not."""
    counted = {}
    for rule in rules:
        found = re.match(r"chain (\S+) .* counter packets (\d+) bytes \d+ (\w+)", rule)
        if found:
            counted[found.group(1)] = (int(found.group(2)), found.group(3))
    if counted.get("pre-input", (0,))[0] == 0:
        raise DemoError("the redirect rule (chain pre-input) counted no packets")
    for chain, why in (("pre-input", "nat PREROUTING: the first packet of each connection"),
                       ("rd-input", "filter INPUT: the redirected packets, judged by their "
                                    "original destination as ipchains did")):
        packets, verdict = counted.get(chain, (0, "?"))
        say("  %-9s %-8s %3d packets  (%s)" % (chain, verdict, packets, why))
    meaning = {"in-input": "packets for the router's own addresses",
               "fi-input": "forwarded packets; every connection was redirected instead"}
    for chain in sorted(c for c, (packets, _) in counted.items() if packets == 0):
        say("  %-9s no packets      (%s)" % (chain, meaning.get(chain, "not reached")))


def start_tproxy(demo, extra, name):
    """Start the book's tproxy command (plus -d and EXTRA) on the router; return its log path."""
    words = BOOK_TPROXY[:1] + ["-d"] + BOOK_TPROXY[1:5] + extra + BOOK_TPROXY[5:]
    log = demo.path(name)
    show_cmd("router", words, "2> %s &" % name)
    with open(log, "wb") as f:
        demo.tproxy = demo.router.popen(os.path.join(BIN, "tproxy"), *words[1:], stdout=f, stderr=f)
    try:
        demo.router.wait_listening(PORT, timeout=10)
    except LabError:
        raise DemoError("tproxy did not start: %s" % " | ".join(read_lines(log))[-300:]) from None
    return log


def stop_tproxy(demo):
    """Stop the running tproxy (by its pid, the lab's way: TERM its group, then KILL)."""
    if demo.tproxy is not None:
        stop(demo.tproxy)
        demo.tproxy = None


def request(demo, path):
    """Fetch http://moose.mancill.com/PATH from the client; print the command and the reply."""
    url = "http://moose.mancill.com/%s" % path
    if have("curl"):
        words = ["curl", "-sS", "-m", "10", url]
    else:       # curl comes with install-deps; Python's urllib does the same job without it
        words = ["python3", "-c", "import urllib.request,sys; "
                 "print(urllib.request.urlopen(sys.argv[1], timeout=10).read().decode(), end='')", url]
    show_cmd("client", words)
    argv = [PYTHON if words[0] == "python3" else words[0]] + words[1:]
    proc = demo.client.run(*argv, check=False, timeout=20)
    if proc.returncode != 0:
        raise DemoError("request to %s failed: %s" % (url, proc.stderr.strip() or proc.returncode))
    show_text(proc.stdout)


def make_requests(demo, paths, log):
    """Make one request per PATH; wait until tproxy logged them all; return cow's new records."""
    seen = len(cow_saw(demo))
    before = len(connection_lines(log))
    for path in paths:
        request(demo, path)
    poll(lambda: len(connection_lines(log)) >= before + len(paths), 10,
         "tproxy's connection lines")
    return cow_saw(demo)[seen:]


def report(demo, log, records):
    """Print what tproxy logged and what cow saw."""
    say("What tproxy logged (%s):" % os.path.basename(log))
    show_text("\n".join(read_lines(log)))
    say("What cow saw (request line, client address):")
    show_text("\n".join("%-45s from %s" % (r["request_line"], r["peer"]) for r in records))


def expect_peer(records, want, step):
    """Raise DemoError unless cow saw at least one request and every one came from WANT."""
    peers = sorted({r["peer"] for r in records})
    if not records or peers != [want]:
        raise DemoError("%s: cow saw client address(es) %s, expected %s" % (
            step, ", ".join(peers) or "none", want))


def step_plain(demo):
    """Run the book's tproxy command and show the redirect, the log and what cow saw."""
    heading("Step 2: the book's tproxy command; the client asks moose, cow answers")
    say("(the book's tproxy goes to the background; -d keeps it in the foreground and")
    say(" logs to stderr, so that we can show its log)")
    log = start_tproxy(demo, [], "tproxy-plain.log")
    records = make_requests(demo, ["one", "two"], log)
    say("Which rule matched:")
    rules = origin_rules(demo)
    show_cmd("router", ["nft", "list", "ruleset"], "| grep -- '%s'" % ORIGIN)
    show_text("\n".join(rules))
    explain_matches(rules)
    report(demo, log, records)
    expect_peer(records, ROUTER_COW, "plain step")
    say("cow sees the router (%s): tproxy made a new connection from its own address." % ROUTER_COW)
    stop_tproxy(demo)


def step_transparent(demo):
    """Run tproxy with --source=client after adding the return path; show cow sees the client."""
    heading("Step 3: the same with --source=client: cow sees the real client")
    say("Replies from cow go to %s, an address the router does not own. The recipe marks" % CLIENT)
    say("packets for tproxy's transparent sockets and routes them to the local stack:")
    words = ["contrib/firewall/proxy-return-path", "add", "--nft"]
    show_cmd("router", words)
    demo.router.run("sh", os.path.join(REPO, words[0]), *words[1:])
    say("No server-side rule is needed: cow's default route already is the router")
    say("(%s), so its replies pass through it. Otherwise, on cow:" % ROUTER_COW)
    say("  contrib/firewall/server-return-route add --via %s --sport 80" % ROUTER_COW)
    log = start_tproxy(demo, ["--source=client"], "tproxy-transparent.log")
    records = make_requests(demo, ["three", "four"], log)
    report(demo, log, records)
    expect_peer(records, CLIENT, "transparent step")
    say("cow sees the client (%s) itself, not the router." % CLIENT)
    stop_tproxy(demo)


def step_teardown(demo):
    """Remove everything and say so."""
    heading("Step 4: tear down")
    demo.close()
    say("stopped tproxy and the web server, deleted namespaces %s-*, removed /etc/netns/%s-*"
        % (demo.lab.prefix, demo.lab.prefix))
    say("the host's own namespace was not touched.")


# ---------------------------------------------------------------------------
# Main: signals, teardown on every path, exit status
# ---------------------------------------------------------------------------

def on_signal(signum, _frame):
    """Turn SIGINT/SIGTERM into Interrupted, so that the finally clause tears down."""
    raise Interrupted(signal.Signals(signum).name)


def preflight():
    """Raise DemoError unless this can run: root, and the tools the lab needs."""
    if os.geteuid() != 0:
        raise DemoError("must run as root (network namespaces); try: sudo make demo")
    missing = [t for t in ("ip", "nft", "ss") if not have(t)]
    missing += [p for p in ("ipchains-translate", "tproxy") if not os.path.exists(os.path.join(BIN, p))]
    if missing:
        raise DemoError("missing %s; run `make demo` (installs them)" % ", ".join(missing))


def main():
    """Run the steps; return the exit status."""
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    demo = None
    try:
        preflight()
        demo = Demo()
        step_lab(demo)
        step_translate(demo)
        step_plain(demo)
        step_transparent(demo)
        step_teardown(demo)
        say("\ndemo: ok")
        return 0
    except (DemoError, LabError, subprocess.SubprocessError, OSError) as exc:
        print("demo: failed: %s" % str(exc).replace("\n", " "), file=sys.stderr)
        return 1
    except Interrupted as exc:
        print("demo: interrupted (%s); tearing down" % exc, file=sys.stderr)
        return 130
    finally:
        # A second Ctrl-C must not cut the teardown short.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if demo is not None:
            demo.close()


if __name__ == "__main__":
    sys.exit(main())
