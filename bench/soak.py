#!/usr/bin/env python3
"""Soak tproxy: many connections mixing modes and faults; report what went wrong.

Usage: soak.py [--connections N] [--concurrency C] [--seed S]

Starts, on 127.0.0.1 only, an echo target and three tproxy servers in the
foreground: fork per connection (-t), event-driven workers (-t --workers=2),
and one whose target is down. N client connections (default 100,000) are
spread over them with these kinds:

  echo        send 1-8 KiB, half-close, read it all back        (must succeed)
  keepopen    send, read the echo back, then close             (must succeed)
  slowreader  send 256 KiB, half-close, read it back slowly    (must succeed)
  clientreset send a little, then reset the connection         (injected fault)
  serverreset ask the target to reset its side                 (injected fault: must end)
  down        connect through the server whose target is down  (injected fault: must end)

It reports failures beyond the injected faults (wrong data, errors,
timeouts, injected faults that hang), zombies left under each server, the
servers' descriptor counts and RSS before and after, and the time taken.
Not a test: nothing here asserts; the numbers go to the report.
"""
import argparse
import asyncio
import os
import random
import socket
import struct
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
TPROXY = os.path.join(os.path.dirname(HERE), "tproxy.py")
KINDS = [("echo", 60), ("keepopen", 20), ("slowreader", 1), ("clientreset", 8),
         ("serverreset", 6), ("down", 5)]
MUST_SUCCEED = {"echo", "keepopen", "slowreader"}
DEADLINE = 30.0         # seconds one connection may take before it counts as hung


# ---------------------------------------------------------------------------
# The target: echo, or reset on request (runs in a child process)
# ---------------------------------------------------------------------------

async def target_client(reader, writer):
    try:
        first = await reader.read(65536)
        if first.startswith(b"RESET"):
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
            return
        data = first
        while data:
            writer.write(data)
            await writer.drain()
            data = await reader.read(65536)
        writer.close()
    except (ConnectionError, OSError):
        writer.transport.abort()


def run_target(port):
    async def main():
        server = await asyncio.start_server(target_client, "127.0.0.1", port, backlog=1024)
        async with server:
            await server.serve_forever()
    asyncio.run(main())


# ---------------------------------------------------------------------------
# Clients
# ---------------------------------------------------------------------------

async def one(kind, port, rng):
    """Run one client of KIND against PORT; return None on the expected end, else a reason."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    sock = writer.get_extra_info("socket")
    try:
        if kind in ("echo", "slowreader"):
            size = 256 * 1024 if kind == "slowreader" else rng.randint(1024, 8192)
            data = rng.randbytes(size)
            writer.write(data)
            await writer.drain()
            writer.write_eof()
            got = bytearray()
            while True:
                chunk = await reader.read(4096 if kind == "slowreader" else 65536)
                if not chunk:
                    break
                got += chunk
                if kind == "slowreader":
                    await asyncio.sleep(0.002)
            return None if bytes(got) == data else "%s: %d of %d bytes back" % (kind, len(got), size)
        if kind == "keepopen":
            data = rng.randbytes(rng.randint(16, 2048))
            writer.write(data)
            await writer.drain()
            got = await reader.readexactly(len(data))
            return None if got == data else "keepopen: wrong bytes back"
        if kind == "clientreset":
            writer.write(b"x" * rng.randint(1, 4096))
            await writer.drain()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
            return None
        if kind in ("serverreset", "down"):
            if kind == "serverreset":
                writer.write(b"RESET\n")
                await writer.drain()
            try:
                while await reader.read(65536):
                    pass
            except ConnectionError:
                pass
            return None
    finally:
        writer.transport.abort() if kind == "clientreset" else writer.close()
    return "unknown kind"


async def drive(total, concurrency, ports, seed):
    rng = random.Random(seed)
    names = [k for k, _ in KINDS]
    weights = [w for _, w in KINDS]
    plan = [rng.choices(names, weights)[0] for _ in range(total)]
    results = {k: [0, 0] for k in names}    # kind -> [done, failed]
    failures = {}
    queue = iter(enumerate(plan))

    async def worker(wid):
        wrng = random.Random(seed * 1000 + wid)
        for i, kind in queue:
            port = ports["down"] if kind == "down" else ports["fork" if i % 2 else "workers"]
            try:
                reason = await asyncio.wait_for(one(kind, port, wrng), DEADLINE)
            except asyncio.TimeoutError:
                reason = "%s: hung for %ds" % (kind, DEADLINE)
            except (ConnectionError, OSError, asyncio.IncompleteReadError) as exc:
                reason = None if kind not in MUST_SUCCEED else "%s: %s" % (kind, exc)
            results[kind][0] += 1
            if reason:
                results[kind][1] += 1
                failures[reason.split(":")[0] + ":" + reason.split(":", 1)[1][:60]] = \
                    failures.get(reason, 0) + 1
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    return results, failures


# ---------------------------------------------------------------------------
# Servers and their health
# ---------------------------------------------------------------------------

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def health(pid):
    """Return (descriptors, RSS KiB, zombie children) of process PID."""
    fds = len(os.listdir("/proc/%d/fd" % pid))
    rss = 0
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
    zombies = 0
    try:
        with open("/proc/%d/task/%d/children" % (pid, pid)) as f:
            kids = f.read().split()
    except OSError:
        kids = []
    for kid in kids:
        try:
            with open("/proc/%s/stat" % kid) as f:
                zombies += f.read().rsplit(")", 1)[1].split()[0] == "Z"
        except OSError:
            pass
    return fds, rss, zombies


def children_count(pid):
    try:
        with open("/proc/%d/task/%d/children" % (pid, pid)) as f:
            return len(f.read().split())
    except OSError:
        return 0


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--connections", type=int, default=100000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()

    procs = []
    target = free_port()
    procs.append(subprocess.Popen([sys.executable, "-c", "import sys; sys.path.insert(0, %r); "
                                   "import soak; soak.run_target(%d)" % (HERE, target)]))
    ports = {"fork": free_port(), "workers": free_port(), "down": free_port()}
    dead_target = free_port()        # nothing listens there
    common = [sys.executable, TPROXY, "-d", "-b", "127.0.0.1", "--max-conns=256", "-t"]
    servers = {
        "fork": common + ["-s", str(ports["fork"]), "127.0.0.1", str(target)],
        "workers": common + ["-s", str(ports["workers"]), "--workers=2", "127.0.0.1",
                             str(target)],
        "down": common + ["-s", str(ports["down"]), "--connect-timeout=2", "127.0.0.1",
                          str(dead_target)],
    }
    pids = {}
    try:
        for name, argv in servers.items():
            proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            procs.append(proc)
            pids[name] = proc.pid
        for port in list(ports.values()) + [target]:
            for _ in range(200):
                try:
                    socket.create_connection(("127.0.0.1", port), 1).close()
                    break
                except OSError:
                    time.sleep(0.05)
        time.sleep(0.5)         # let the probe connections' children finish before measuring
        before = {name: health(pid) for name, pid in pids.items()}
        started = time.monotonic()
        results, failures = asyncio.run(drive(args.connections, args.concurrency, ports,
                                              args.seed))
        took = time.monotonic() - started
        # Children finish after the client has its answer: wait (bounded) for them to go.
        for _ in range(200):
            if all(children_count(pids[n]) <= (2 if n == "workers" else 0) for n in pids):
                break
            time.sleep(0.05)
        after = {name: health(pid) for name, pid in pids.items()}
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()

    total_failed = sum(f for _, f in results.values())
    print("soak: %d connections, concurrency %d, %.1f s (%.0f connections/s)"
          % (args.connections, args.concurrency, took, args.connections / took))
    for kind, (done, failed) in results.items():
        print("  %-12s %7d done  %5d failed%s" % (kind, done, failed,
                                                  "" if kind in MUST_SUCCEED else " (injected)"))
    print("failures beyond the injected faults: %d" % total_failed)
    for reason, count in sorted(failures.items(), key=lambda kv: -kv[1])[:10]:
        print("  %6d  %s" % (count, reason))
    for name in pids:
        (fd0, rss0, _), (fd1, rss1, zombies) = before[name], after[name]
        print("  %-8s server: fds %d -> %d, RSS %d -> %d KiB (%+d), zombies %d"
              % (name, fd0, fd1, rss0, rss1, rss1 - rss0, zombies))
    return 1 if total_failed else 0


if __name__ == "__main__":
    sys.exit(main())
