#!/usr/bin/env python3
"""UDP relay figures: tproxy --udp against socat, in one run, on loopback.

Usage: udp_bench.py [--seconds S] [--window W] [--idle-flows N]
                    [--pending-flows N] [--only pending] [--out DIR]

For each relay in front of the same UDP echo server on 127.0.0.1:
  rate   answered datagrams per second, 16-byte datagrams, with 1 and with 32
         flows (client ports), each keeping W datagrams in flight;
  memory Pss (all the relay's processes, /proc/PID/smaps_rollup) per idle
         flow: after N flows have each sent one datagram and had its answer,
         minus the Pss before, divided by N; and, as root, the kernel's
         socket memory per flow the same way (the slab caches a socket
         takes, /proc/slabinfo: machine-wide, so other work adds noise;
         a process's own kernel structures are not in it).
  pending Pss (and kernel socket memory) per pending flow: N clients each
         send one datagram through the relay to a server that receives but
         holds its answers; with all N exchanges in flight (the server has
         seen every datagram) the relay's figures minus its figures before,
         divided by N. Then the server answers all, and every client's
         answer is checked (its own payload back). This is what socat
         UDP-RECVFROM,fork does cost: a child per exchange in flight, which
         the idle figure (after the answers, when its children have exited)
         cannot see.
Relays: tproxy --udp (one worker, fixed target), socat UDP-RECVFROM:PORT,fork
(the form the issue names: a child per datagram) and socat UDP-LISTEN:PORT,fork
(a child per client). Everything listens on 127.0.0.1; every loop is bounded
in count and time; every process started here is stopped by pid.
With --only pending, only the pending measurement runs and the report goes
to DATE-udp-pending.md instead of DATE-udp.md.
"""
import argparse
import os
import select
import signal
import socket
import subprocess
import sys
import time

from rlimits import raise_nofile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
PAYLOAD = b"0123456789abcdef"
ECHO = """
import socket, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
s.bind(("127.0.0.1", %d))
s.settimeout(1.0)
end = time.monotonic() + %f
while time.monotonic() < end:
    try:
        data, peer = s.recvfrom(65536)
    except socket.timeout:
        continue
    s.sendto(data, peer)
"""

# A server that answers nothing until told: it keeps every datagram (and the
# peer it came from), answers "seen" on its control socket with the payloads
# held, and on "release" echoes each held datagram to its peer and forgets it.
HOLD = """
import socket, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
s.bind(("127.0.0.1", %d))
c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
c.bind(("127.0.0.1", %d))
c.setblocking(False)
s.settimeout(0.05)
held = []
end = time.monotonic() + %f
while time.monotonic() < end:
    try:
        held.append(s.recvfrom(65536))
    except socket.timeout:
        pass
    while True:
        try:
            order, peer = c.recvfrom(64)
        except BlockingIOError:
            break
        if order == b"count":
            c.sendto(b"%%d" %% len(held), peer)
        elif order == b"seen":
            c.sendto(b",".join(sorted(set(d for d, _ in held))), peer)
        elif order == b"release":
            for data, to in held:
                s.sendto(data, to)
            c.sendto(b"released %%d" %% len(held), peer)
            held = []
"""


def free_udp_port():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def relays(echo_port):
    """Return {name: argv(port, idle seconds, half-close seconds or None)} for the relays compared.

    socat UDP-RECVFROM,fork forks a child per datagram, which lives -T
    seconds: the rate phase gives it a short idle time so that the children
    stay a few hundred, the memory phase a long one, as tproxy's flows get.
    Its child has read its one datagram at once, so it then waits only -t
    seconds (0.5 unless given) for the answer: the pending phase gives a long
    -t too, or the children would be gone before the answers come.
    """
    tproxy = [sys.executable, os.path.join(REPO, "tproxy.py"), "-d", "--udp",
              "--max-conns=4096", "-b", "127.0.0.1", "-s"]

    def socat(idle, close):
        return ["socat", "-T", "%g" % idle] + ([] if close is None else ["-t", "%g" % close])
    return {
        "tproxy --udp": lambda port, idle, close=None: tproxy + [
            str(port), "--idle-timeout=%g" % idle, "127.0.0.1", str(echo_port)],
        "socat UDP-RECVFROM,fork": lambda port, idle, close=None: socat(idle, close) + [
            "UDP4-RECVFROM:%d,bind=127.0.0.1,fork" % port, "UDP4:127.0.0.1:%d" % echo_port],
        "socat UDP-LISTEN,fork": lambda port, idle, close=None: socat(idle, close) + [
            "UDP4-LISTEN:%d,bind=127.0.0.1,fork,reuseaddr" % port, "UDP4:127.0.0.1:%d" % echo_port],
    }


def tree(pid):
    """Return PID and all its descendants."""
    pids, i = [pid], 0
    while i < len(pids):
        try:
            with open("/proc/%d/task/%d/children" % (pids[i], pids[i])) as f:
                pids += [int(p) for p in f.read().split()]
        except OSError:
            pass
        i += 1
    return pids


def pss_kib(pid):
    total = 0
    for p in tree(pid):
        try:
            with open("/proc/%d/smaps_rollup" % p) as f:
                for line in f:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total


SOCKET_SLABS = ("UDP", "UDPv6", "sock_inode_cache", "filp", "dentry", "eventpoll_epi")


def slab_kib():
    """Return (KiB held in the slab caches a UDP socket takes, KiB of one client socket), or None (not root)."""
    try:
        with open("/proc/slabinfo") as f:
            lines = f.readlines()
    except OSError:
        return None
    total, sizes = 0, {}
    for line in lines:
        fields = line.split()
        if fields and fields[0] in SOCKET_SLABS:
            sizes[fields[0]] = int(fields[3])
            total += int(fields[1]) * int(fields[3])     # active objects x object size
    # The bench's own client sockets (IPv4, not in any epoll set) are counted too.
    client = sum(sizes.get(name, 0) for name in ("UDP", "sock_inode_cache", "filp", "dentry"))
    return total / 1024, client / 1024


def kernel_per_flow(before, after, flows):
    """Return the kernel socket KiB per flow between two slab_kib() readings, or None (not root).

    Each flow's client socket is the bench's own: its share is taken off.
    """
    if before is None or after is None:
        return None
    return (after[0] - before[0]) / flows - after[1]


def wait_answering(port, timeout=10.0):
    """Wait until a datagram to PORT is answered; raise RuntimeError if not."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(0.2)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            s.sendto(b"ping", ("127.0.0.1", port))
            try:
                s.recvfrom(64)
                return
            except OSError:
                time.sleep(0.05)
    raise RuntimeError("nothing answers on UDP port %d" % port)


def rate(port, flows, window, seconds):
    """Return answered datagrams per second with FLOWS client sockets, WINDOW in flight each."""
    socks = []
    ep = select.epoll()
    for _ in range(flows):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setblocking(False)
        s.connect(("127.0.0.1", port))
        socks.append(s)
        ep.register(s.fileno(), select.EPOLLIN)
    by_fd = {s.fileno(): s for s in socks}
    inflight = {s.fileno(): 0 for s in socks}

    def fill(s):
        while inflight[s.fileno()] < window:
            try:
                s.send(PAYLOAD)
            except OSError:
                return
            inflight[s.fileno()] += 1

    for s in socks:         # the first datagram makes the flow; then the window
        s.send(PAYLOAD)
    time.sleep(0.5)
    for s in socks:
        try:
            while s.recv(64):
                pass
        except OSError:
            pass
        inflight[s.fileno()] = 0
        fill(s)
    answered, start = 0, time.monotonic()
    end, refill = start + seconds, start + 0.2
    while True:
        now = time.monotonic()
        if now >= end:
            break
        if now >= refill:       # lost datagrams must not shrink the window for good
            for s in socks:
                inflight[s.fileno()] = 0
                fill(s)
            refill = now + 0.2
        for fd, _ in ep.poll(0.05):
            s = by_fd[fd]
            for _ in range(64):
                try:
                    s.recv(64)
                except OSError:
                    break
                answered += 1
                inflight[fd] = max(0, inflight[fd] - 1)
            fill(s)
    elapsed = time.monotonic() - start
    for s in socks:
        s.close()
    ep.close()
    return answered / elapsed


def idle_memory(pid, port, flows):
    """Return Pss KiB per idle flow after FLOWS flows each had one answered datagram."""
    time.sleep(0.5)
    before, slab_before = pss_kib(pid), slab_kib()
    socks = []
    for _ in range(flows):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.settimeout(2.0)
        s.connect(("127.0.0.1", port))
        for _ in range(5):
            s.send(PAYLOAD)
            try:
                s.recv(64)
                break
            except OSError:
                continue
        socks.append(s)
    time.sleep(1.0)
    after, slab_after = pss_kib(pid), slab_kib()
    processes = len(tree(pid))
    for s in socks:
        s.close()
    return (after - before) / flows, kernel_per_flow(slab_before, slab_after, flows), processes


def hold_order(control_port, order, timeout=5.0):
    """Send ORDER to the holding server's control port; return its answer (bytes) or raise RuntimeError."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(0.5)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            s.sendto(order, ("127.0.0.1", control_port))
            try:
                return s.recvfrom(65536)[0]
            except OSError:
                continue
    raise RuntimeError("holding server: no answer to %r" % order)


def held_payloads(control_port):
    answer = hold_order(control_port, b"seen")
    return set(answer.split(b",")) if answer else set()


def send_all_held(socks, payloads, control_port, timeout):
    """Send each client's payload through the relay, one at a time; return how many the holding server has seen.

    Each client sends once the server has seen the datagram before: socat
    UDP-LISTEN,fork forwards, from the child of one client, the datagrams
    of others that reach its socket before it is connected, and answers
    them to the wrong client. A datagram not seen within a second is sent
    again (socat UDP-RECVFROM may then fork a second child for it, which
    its figures would include).
    """
    deadline = time.monotonic() + timeout
    count = 0
    for s, p in zip(socks, payloads):
        resend = 0
        while count < len(socks) and time.monotonic() < deadline:
            if time.monotonic() >= resend:
                send_once(s, p)
                resend = time.monotonic() + 1.0
            time.sleep(0.002)
            if int(hold_order(control_port, b"count")) > count:
                count += 1
                break
    return len(held_payloads(control_port))


def send_once(sock, payload):
    """Send PAYLOAD on the connected SOCK; an ICMP port unreachable (socat
    UDP-LISTEN,fork between forking a child and binding its next socket)
    only costs the datagram, which the caller sends again."""
    try:
        sock.send(payload)
    except ConnectionRefusedError:
        pass


def collect_answers(socks, payloads, timeout):
    """Return how many clients got their own payload back, waiting up to TIMEOUT seconds."""
    ep = select.epoll()
    by_fd = {}
    for s, p in zip(socks, payloads):
        s.setblocking(False)
        ep.register(s.fileno(), select.EPOLLIN)
        by_fd[s.fileno()] = (s, p)
    verified = set()
    deadline = time.monotonic() + timeout
    try:
        while len(verified) < len(socks) and time.monotonic() < deadline:
            for fd, _ in ep.poll(0.2):
                s, p = by_fd[fd]
                try:
                    while True:
                        if s.recv(64) == p:
                            verified.add(fd)
                except OSError:
                    pass
    finally:
        ep.close()
    return len(verified)


def pending_memory(pid, port, control_port, flows):
    """Return the figures for FLOWS exchanges held pending behind the relay PID.

    {"pss_per_flow", "kernel_per_flow", "processes", "seen", "answered"}.
    """
    time.sleep(0.5)
    before, slab_before = pss_kib(pid), slab_kib()
    payloads = [b"pending-%06d" % i for i in range(flows)]
    socks = []
    try:
        for _ in range(flows):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.connect(("127.0.0.1", port))
            socks.append(s)
        seen = send_all_held(socks, payloads, control_port, timeout=60 + flows * 0.1)
        time.sleep(0.5)     # the last child forked may still be settling
        after, slab_after = pss_kib(pid), slab_kib()
        processes = len(tree(pid))
        hold_order(control_port, b"release")
        answered = collect_answers(socks, payloads, timeout=30)
    finally:
        for s in socks:
            s.close()
    return {"pss_per_flow": (after - before) / flows,
            "kernel_per_flow": kernel_per_flow(slab_before, slab_after, flows),
            "processes": processes, "seen": seen, "answered": answered}


def stop(proc):
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(5)
            return
        except subprocess.TimeoutExpired:
            continue


def measure(name, argv, args):
    """Start one relay twice (rates, then memory on a fresh one); return its figures."""
    figures = {}
    for phase in ("rate", "memory"):
        port = free_udp_port()
        idle = 0.5 if phase == "rate" else 60
        proc = subprocess.Popen(argv(port, idle), start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            time.sleep(0.3)
            if phase == "rate":
                wait_answering(port)
                for flows in (1, 32):
                    figures["rate_%d" % flows] = rate(port, flows, args.window, args.seconds)
            else:
                time.sleep(0.5)
                figures["pss_per_flow"], figures["kernel_per_flow"], figures["processes"] = \
                    idle_memory(proc.pid, port, args.idle_flows)
        finally:
            stop(proc)
    return figures


PENDING_IDLE = 300      # s: socat's -T and -t, tproxy's --idle-timeout, while exchanges are held


def measure_pending(argv, control_port, flows):
    """Start one relay in front of the holding server; return pending_memory's figures."""
    port = free_udp_port()
    proc = subprocess.Popen(argv(port, PENDING_IDLE, PENDING_IDLE), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_ready(proc, port)
        return pending_memory(proc.pid, port, control_port, flows)
    finally:
        stop(proc)


def wait_ready(proc, port, timeout=10.0):
    """Wait until PROC has bound UDP PORT on 127.0.0.1 (without sending it anything); raise RuntimeError if not."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("relay exited with status %d" % proc.returncode)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                return
        time.sleep(0.05)
    raise RuntimeError("nothing bound UDP port %d" % port)


def pending_lines(pending, flows):
    """Return the report's lines for the pending measurement."""
    lines = ["Pending flows: %d clients each sent one datagram through the relay to a "
             "server that held its answers; measured with all exchanges in flight, then "
             "the answers released (socat -T %d -t %d, tproxy --idle-timeout=%d, so that no "
             "relay times an exchange out while it is measured). The clients send one at a "
             "time, each once the server has seen the one before (socat UDP-LISTEN,fork "
             "mixes up clients that arrive while it forks)." % (
                 flows, PENDING_IDLE, PENDING_IDLE, PENDING_IDLE),
             "",
             "| relay | Pss KiB per pending flow | kernel socket KiB per pending flow | "
             "processes with %d pending | datagrams seen by the server | clients answered, verified |" % flows,
             "|---|---:|---:|---:|---:|---:|"]
    for name, f in pending.items():
        kernel = "n/a" if f["kernel_per_flow"] is None else "%.1f" % f["kernel_per_flow"]
        lines.append("| %s | %.1f | %s | %d | %d/%d | %d/%d |" % (
            name, f["pss_per_flow"], kernel, f["processes"], f["seen"], flows, f["answered"], flows))
    tp, base = pending["tproxy --udp"], pending["socat UDP-RECVFROM,fork"]
    other = pending["socat UDP-LISTEN,fork"]
    lines += ["", "Ratios per pending flow, tproxy --udp / socat UDP-RECVFROM,fork: Pss %s, "
              "Pss + kernel socket memory %s (target: memory <= 1.0x)." % (
                  pss_ratio(tp, base), ratio_total(tp, base)),
              "Against socat UDP-LISTEN,fork: Pss %s, Pss + kernel socket memory %s." % (
                  pss_ratio(tp, other), ratio_total(tp, other))]
    return lines


def pss_ratio(a, b):
    return "%.3fx" % (a["pss_per_flow"] / b["pss_per_flow"]) if b["pss_per_flow"] else "n/a"


def ratio_total(a, b):
    if a["kernel_per_flow"] is None or b["kernel_per_flow"] is None:
        return "n/a"
    if a["kernel_per_flow"] < 0 or b["kernel_per_flow"] < 0:
        return "n/a (a kernel figure below zero: other work freed slab meanwhile)"
    total_b = b["pss_per_flow"] + b["kernel_per_flow"]
    return "%.3fx" % ((a["pss_per_flow"] + a["kernel_per_flow"]) / total_b) if total_b else "n/a"


def run_pending(args):
    """Measure every relay in front of one holding server; return {name: pending figures}."""
    hold_port, control_port = free_udp_port(), free_udp_port()
    lifetime = 3 * (150 + args.pending_flows * 0.1)
    hold = subprocess.Popen([sys.executable, "-c", HOLD % (hold_port, control_port, lifetime)],
                            start_new_session=True)
    pending = {}
    try:
        hold_order(control_port, b"seen", timeout=10)
        for name, argv in relays(hold_port).items():
            pending[name] = measure_pending(argv, control_port, args.pending_flows)
            print(name, "pending", pending[name], flush=True)
    finally:
        stop(hold)
    return pending


def idle_and_rate_lines(args):
    """Run the rate and idle-memory measurements; return the report's lines for them."""
    echo_port = free_udp_port()
    lifetime = 60 + 12 * args.seconds
    echo = subprocess.Popen([sys.executable, "-c", ECHO % (echo_port, lifetime)],
                            start_new_session=True)
    results = {}
    try:
        wait_answering(echo_port)
        for name, argv in relays(echo_port).items():
            results[name] = measure(name, argv, args)
            print(name, results[name], flush=True)
    finally:
        stop(echo)
    base = results["socat UDP-RECVFROM,fork"]
    lines = ["| relay | datagrams/s, 1 flow | datagrams/s, 32 flows | Pss KiB per idle flow | "
             "kernel socket KiB per idle flow | processes with %d flows |" % args.idle_flows,
             "|---|---:|---:|---:|---:|---:|"]
    for name, f in results.items():
        kernel = "n/a" if f["kernel_per_flow"] is None else "%.1f" % f["kernel_per_flow"]
        lines.append("| %s | %.0f | %.0f | %.1f | %s | %d |" % (
            name, f["rate_1"], f["rate_32"], f["pss_per_flow"], kernel, f["processes"]))
    tp = results["tproxy --udp"]
    if base["processes"] > 1:
        memory = "memory per flow %.3fx" % (tp["pss_per_flow"] / base["pss_per_flow"])
    else:   # its children had all exited: nothing per flow to compare with
        memory = ("memory per flow: no ratio, socat UDP-RECVFROM keeps no flow (its child "
                  "per datagram had exited; %.1f KiB is noise)" % base["pss_per_flow"])
    lines += ["", "Ratios, tproxy --udp / socat UDP-RECVFROM,fork: rate 1 flow %.2fx, 32 flows %.2fx, "
              "%s (target: rate >= 1.0x, memory <= 1.0x)." % (
                  tp["rate_1"] / base["rate_1"], tp["rate_32"] / base["rate_32"], memory)]
    other = results["socat UDP-LISTEN,fork"]
    lines += ["Against socat UDP-LISTEN,fork: rate 1 flow %.2fx, 32 flows %.2fx, memory per flow %.3fx." % (
        tp["rate_1"] / other["rate_1"], tp["rate_32"] / other["rate_32"],
        tp["pss_per_flow"] / other["pss_per_flow"] if other["pss_per_flow"] else float("nan"))]
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--window", type=int, default=8)
    parser.add_argument("--idle-flows", type=int, default=200)
    parser.add_argument("--pending-flows", type=int, help="default: --idle-flows")
    parser.add_argument("--only", choices=("pending",),
                        help="measure pending flows only (report DATE-udp-pending.md)")
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    args = parser.parse_args()
    if args.pending_flows is None:
        args.pending_flows = args.idle_flows
    raise_nofile(args.pending_flows + args.idle_flows + 256)
    load = open("/proc/loadavg").read().split()[:3]
    command = "bench/udp_bench.py " + " ".join(sys.argv[1:])
    lines = ["# UDP relay: tproxy --udp against socat%s, %s" % (
                 ", pending flows" if args.only else "",
                 time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())),
             "",
             "%s; loopback, Python UDP servers; load average at start %s; %d CPUs shared "
             "with other work." % (command, " ".join(load), os.cpu_count()),
             ""]
    if not args.only:
        lines += idle_and_rate_lines(args) + [""]
    lines += pending_lines(run_pending(args), args.pending_flows)
    report = "\n".join(lines) + "\n"
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, time.strftime("%Y-%m-%d", time.gmtime()) +
                        ("-udp-pending.md" if args.only else "-udp.md"))
    with open(path, "w") as f:
        f.write(report)
    print(report)
    print("written to", path)


if __name__ == "__main__":
    main()
