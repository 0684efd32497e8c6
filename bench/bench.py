#!/usr/bin/env python3
"""tproxy's benchmark: every mode against its peers, measured in one run, as ratios.

Usage: bench.py [--quick] [--relaybench PATH] [--skip-relaybench] [--skip-held] [--out DIR]

1. relaybench (../shared/bench/relaybench.py): bulk, connection rate, idle
   memory for tproxy -t (fork per connection) and tproxy -t --workers 2,
   next to direct, socat, haproxy and haproxy with splice, started together
   (--prefork runs --workers since its pool was retired), all in one fresh
   network namespace (as root), made and deleted here.
2. inetd start: time from exec to the first byte relayed, tproxy in inetd
   mode (fd 0 is the client, as inetd gives it) against a bare
   `python3 -c pass` on the same interpreter.
3. HTTP translate: connection rate for one short request per connection,
   tproxy in its default mode against tproxy -t, fork per connection and
   --workers 2, all in front of the same HAProxy that answers every request
   itself.
4. ipchains-translate: bench/translate_bench.py (10,000 and 100,000 rules).
5. Held connections: relaybench's idle test alone (bulk and integrity
   shrunk to 1 MiB, no conn-rate), 10,000 connections (1,000 with --quick)
   each verified by an echo, tproxy -t --workers 2 next to haproxy and
   haproxy with splice, their limits raised to hold them all. Each run is
   in a fresh network namespace (as root), made and deleted here. When the
   hard RLIMIT_NOFILE cannot hold two sockets per connection in one HAProxy
   process, the peers run at what it allows and tproxy alone at the full
   count in a second run.

Everything listens on 127.0.0.1 only, every loop is bounded in count and
time, and every process started here is stopped by pid.
"""
import argparse
import contextlib
import json
import os
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time

from rlimits import raise_nofile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
SYSTEM_PYTHON = "/usr/bin/python3"


def installed_copy(tmp):
    """Return a PYTHONPATH directory holding tproxy as an install would: module plus bytecode."""
    lib = os.path.join(tmp, "lib")
    os.makedirs(lib)
    shutil.copy(os.path.join(REPO, "tproxy.py"), lib)
    subprocess.run([SYSTEM_PYTHON, "-m", "compileall", "-q", lib], check=True)
    return lib


def installed_command(tmp, lib):
    """Return the words (argv) that run tproxy as installed: the console script pip writes.

    The development venv is not used to run tproxy: its editable-install hook
    makes every start import pathlib and re, which an installed tproxy does
    not. The venv's site-packages stays on the path (without its .pth hooks)
    for docopt and python-daemon.
    """
    script = os.path.join(tmp, "tproxy")
    with open(script, "w") as f:
        f.write("import sys\nfrom tproxy import main\nif __name__ == '__main__':\n"
                "    sys.exit(main())\n")
    path = os.pathsep.join([lib, sysconfig.get_paths()["purelib"]])
    return ["env", "PYTHONPATH=" + path, SYSTEM_PYTHON, script]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_relaybench(path, quick, out, tp):
    """Run relaybench with tproxy's modes (argv TP runs tproxy) added; return its report path."""
    tp = shlex.join(tp)
    relays = {
        # Limits above relaybench's 1,000 held idle connections, so all of them are served.
        "tproxy-fork": tp + " -d -t --max-conns 1100 --max-per-client 1100 -s {listen_port} -b 127.0.0.1 "
                            "{target_host} {target_port}",
        "tproxy-workers": tp + " -d -t --workers 2 --max-conns 2200 --max-per-client 2200 -s {listen_port} "
                               "-b 127.0.0.1 {target_host} {target_port}",
    }
    md = os.path.join(out, "relaybench.md")
    cmd = [sys.executable, path, "--md", md, "--json", os.path.join(out, "relaybench.json"),
           "--only", ",".join(["socat", "haproxy", "haproxy-splice"] + list(relays))]
    if quick:
        cmd.append("--quick")
    for name, template in relays.items():
        cmd += ["--relay", "%s=%s" % (name, template)]
    # Every relay of the run in one fresh namespace, as the held part: no other process's
    # sockets, no TIME_WAIT left by earlier runs, the same wide port range for all.
    with fresh_netns("tproxy-rate-%d" % os.getpid()) as prefix:
        subprocess.run(prefix + cmd, check=True, timeout=900, stdout=subprocess.DEVNULL)
    return md


HELD_CONNS = 10_000
HELD_CONNS_QUICK = 1_000
HELD_PSS_BOUND_MIB = 64             # issue 12's target for --workers 2 at 10,000 held


def haproxy_held_config(extra, maxconn, nofile):
    """Return relaybench's HAProxy config (its `config` template) with maxconn set to MAXCONN.

    relaybench's own config caps haproxy at maxconn 4096, which would leave
    the rest of 10,000 connections waiting in the listen queue unanswered.
    HAProxy refuses to start when its maxsock (two per connection, two per
    spare splice pipe, maxconn/4 pipes by default) exceeds RLIMIT_NOFILE
    NOFILE, so the pipe pool gets what the connections leave.
    """
    maxpipes = max(16, min(maxconn // 4, (nofile - 2 * maxconn - 100) // 2))
    return ("global\n    maxconn %d\n    maxpipes %d\ndefaults\n    mode tcp\n"
            "    timeout connect 5s\n    timeout client 120s\n    timeout server 120s\n%s\nfrontend fe\n"
            "    bind 127.0.0.1:{listen_port}\n    maxconn %d\n    default_backend be\n"
            "backend be\n    server s1 {target_host}:{target_port}\n" % (maxconn, maxpipes, extra, maxconn))


def held_relays(tp, conns, nofile):
    """Return relaybench specs of tproxy -t --workers 2, haproxy and haproxy-splice, each serving CONNS connections."""
    limit, maxconn = conns + 1000, conns + 16
    return [
        {"name": "tproxy-workers", "cmd": shlex.join(tp) + " -d -t --workers 2 --max-conns %d "
         "--max-per-client %d -s {listen_port} -b 127.0.0.1 {target_host} {target_port}" % (limit, limit),
         "note": "tproxy -t --workers 2, --max-conns and --max-per-client %d" % limit},
        {"name": "haproxy", "needs": ["haproxy"], "cmd": "haproxy -db -f {config}",
         "config": haproxy_held_config("", maxconn, nofile),
         "note": "mode tcp, default nbthread, no splice, maxconn %d" % maxconn},
        {"name": "haproxy-splice", "needs": ["haproxy"], "cmd": "haproxy -db -f {config}",
         "config": haproxy_held_config("    option splice-request\n    option splice-response", maxconn, nofile),
         "note": "mode tcp, splice-request + splice-response, maxconn %d" % maxconn},
    ]


def relaybench_idle(path, out, tag, relays, conns):
    """Run relaybench's idle test alone (bulk and integrity 1 MiB, no conn-rate) on RELAYS; return its results."""
    spec = os.path.join(out, "held-%s-relays.json" % tag)
    with open(spec, "w") as f:
        json.dump(relays, f)
    result = os.path.join(out, "held-%s.json" % tag)
    cmd = [sys.executable, path, "--relays-file", spec, "--only", ",".join(r["name"] for r in relays),
           "--no-anchors", "--conc", "", "--bulk-bytes", "1M", "--bulk-repeats", "1",
           "--integrity-bytes", "1M", "--data-file-bytes", "1M", "--idle-conns", str(conns),
           "--idle-timeout", "150", "--time-budget", "400", "--json", result,
           "--md", os.path.join(out, "held-%s.md" % tag)]
    with fresh_netns("tproxy-held-%d-%s" % (os.getpid(), tag)) as prefix:
        subprocess.run(prefix + cmd, check=False, timeout=700, stdout=subprocess.DEVNULL)
    with open(result) as f:
        return json.load(f)["results"]


@contextlib.contextmanager
def fresh_netns(name):
    """Yield the argv prefix that runs a command in a new network namespace NAME, deleted afterwards.

    Each relay's closed connections leave thousands of sockets in TIME_WAIT
    on the sink's port, and the next relay's connects then search a crowded
    ephemeral range: the namespace starts empty and gets the wide port range
    (a per-namespace sysctl; the initial namespace is left alone). Without
    root or ip(8) the command runs where we are (prefix []).
    """
    if os.geteuid() != 0 or not shutil.which("ip"):
        yield []
        return
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        subprocess.run(["ip", "netns", "exec", name, "sysctl", "-q", "-w",
                        "net.ipv4.ip_local_port_range=10240 65535"], check=True)
        yield ["ip", "netns", "exec", name]
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False)


def run_held(path, quick, out, tp):
    """Hold many connections through --workers 2 and its peers; return (runs, nofile).

    runs is a list of (connections, results). One HAProxy process holds two
    sockets per connection, so when RLIMIT_NOFILE cannot reach that (its hard
    limit is 20,000 here), the peers are measured at the most it allows, with
    tproxy in the same run for the ratio, and tproxy alone at the full count
    in a second run (its two workers share the connections).
    """
    conns = HELD_CONNS_QUICK if quick else HELD_CONNS
    nofile = raise_nofile()
    peer_conns = min(conns, (nofile - 256) // 2 // 100 * 100)
    runs = [(peer_conns, relaybench_idle(path, out, "peers", held_relays(tp, peer_conns, nofile), peer_conns))]
    if peer_conns < conns:
        runs.append((conns, relaybench_idle(path, out, "tproxy", held_relays(tp, conns, nofile)[:1], conns)))
    return runs, nofile


def held_lines(runs, nofile):
    """Return the report's lines for the held-connections runs."""
    lines = ["## Held connections (relaybench idle test, each verified by an echo)", "",
             "RLIMIT_NOFILE %d (the hard limit) for relaybench and the relays; each run in a fresh "
             "network namespace with ip_local_port_range 10240-65535 (as root)." % nofile, "",
             "| relay | asked | held, echo-verified | total Pss MiB | KiB per held conn | ÷ haproxy-splice "
             "| s to open all |", "|---|---:|---:|---:|---:|---:|---:|"]
    for conns, results in runs:
        ref = (results.get("haproxy-splice", {}).get("idle") or {}).get("pss_kib_per_conn")
        for name in ("tproxy-workers", "haproxy", "haproxy-splice"):
            if name not in results:
                continue
            idle = results[name].get("idle")
            if not idle:
                why = results[name].get("start_error") or results[name].get("died") or "not run"
                lines.append("| %s | %d | %s | – | – | – | – |" % (name, conns, why.split(" | ")[-1][:80]))
                continue
            per = idle.get("pss_kib_per_conn")
            ratio = "%.2f×" % (per / ref) if per is not None and ref else "–"
            lines.append("| %s | %d | %d | %.1f | %s | %s | %.1f |" % (
                name, idle["target"], idle["held"], idle["pss_kib"] / 1024,
                "%.1f" % per if per is not None else "–", ratio, idle["open_secs"]))
    conns, results = runs[-1]
    idle = results.get("tproxy-workers", {}).get("idle")
    if idle:
        mib = idle["pss_kib"] / 1024
        lines += ["", "| ratio | value | target |", "|---|---:|---:|",
                  "| %s held connections, --workers 2, total Pss (%d of %d held, verified by echo) "
                  "| %.1f MiB | ≤ %d MiB at 10,000 |" % (format(conns, ","), idle["held"], idle["target"], mib,
                                              HELD_PSS_BOUND_MIB)]
        if not idle["all_ok"] or mib > HELD_PSS_BOUND_MIB:
            lines += ["", "**Target missed**: %d of %d held, %.1f MiB, errors %s." % (
                idle["held"], idle["target"], mib, idle.get("errors") or "none")]
    return lines + [""]


def best(result, test, key):
    """Return the best of a relaybench result's runs of TEST (conn/s or Gbit/s KEY); None if none."""
    runs = [run.get(key) for run in (result.get(test) or {}).get("runs", []) if run.get("ok", True)]
    runs = [value for value in runs if value]
    return max(runs) if runs else None


def ratio(value, ref, fmt="%.2f"):
    return fmt % (value / ref) if value and ref else "–"


def target_lines(results, rates, held):
    """Return issue 12's targets as one table: each ratio from this run's figures.

    RESULTS: relaybench's JSON results; RATES: http_rate's; HELD: run_held's
    runs. Bulk and connection rate are relaybench's best rounds (as its table).
    """
    workers, fork = results.get("tproxy-workers", {}), results.get("tproxy-fork", {})
    splice, socat = results.get("haproxy-splice", {}), results.get("socat", {})

    def pair(relay, peer, tests, key):
        return " / ".join(ratio(best(relay, t, key), best(peer, t, key)) for t in tests)

    def per_held(result):
        return (result.get("idle") or {}).get("pss_kib_per_conn")

    lines = ["## Targets (issue 12), from the figures above", "",
             "| ratio | value | target |", "|---|---:|---:|",
             "| bulk, --workers 2 ÷ haproxy forced splice (up / down) | %s | ≥ 1.0 |"
             % pair(workers, splice, ("bulk_up", "bulk_down"), "gbps"),
             "| connection rate, --workers 2 ÷ haproxy forced splice (c=1 / c=32) | %s | ≥ 1.0 |"
             % pair(workers, splice, ("conn_c1", "conn_c32"), "rate"),
             "| memory per held connection, --workers 2 ÷ haproxy forced splice (1,000 held) | %s | ≤ 1.0 |"
             % ratio(per_held(workers), per_held(splice))]
    if held:
        conns, last = held[-1]
        idle = (last.get("tproxy-workers") or {}).get("idle")
        if idle:
            lines.append("| %s held, --workers 2, total Pss (%d held, verified by echo) | %.1f MiB | ≤ %d MiB |"
                         % (format(conns, ","), idle["held"], idle["pss_kib"] / 1024, HELD_PSS_BOUND_MIB))
    if rates:
        lines.append("| HTTP translate ÷ raw, --workers 2 | %s | ≥ 0.8 |"
                     % ratio(rates["http-translate-workers"], rates["raw-workers"]))
    lines += ["| connection rate, fork mode ÷ socat (c=1 / c=32) | %s | ≥ 0.6 |"
              % pair(fork, socat, ("conn_c1", "conn_c32"), "rate"),
              "| memory per held connection, fork mode ÷ socat | %s | ≤ 8 |"
              % ratio(per_held(fork), per_held(socat), "%.1f"), ""]
    return lines


def inetd_start(lib, rounds):
    """Return (median tproxy exec-to-first-byte, median bare start) in seconds."""
    target = socket.socket()
    target.bind(("127.0.0.1", 0))
    target.listen(64)
    target.settimeout(10)
    front = socket.socket()
    front.bind(("127.0.0.1", 0))
    front.listen(64)
    env = dict(os.environ, PYTHONPATH=lib)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    argv = [SYSTEM_PYTHON, "-c", "import sys, tproxy; sys.exit(tproxy.main())",
            "-t", "127.0.0.1", str(target.getsockname()[1])]
    tproxy_times, bare_times = [], []
    for _ in range(rounds):
        client = socket.create_connection(front.getsockname(), timeout=10)
        conn, _ = front.accept()
        client.sendall(b"x")            # waiting in the socket before tproxy even starts
        started = time.perf_counter()
        proc = subprocess.Popen(argv, stdin=conn, env=env)
        conn.close()
        served, _ = target.accept()
        served.recv(1)
        tproxy_times.append(time.perf_counter() - started)
        client.close()
        served.close()
        proc.wait(10)
        started = time.perf_counter()
        subprocess.run([SYSTEM_PYTHON, "-c", "pass"], env=env, check=True)
        bare_times.append(time.perf_counter() - started)
    target.close()
    front.close()
    return statistics.median(tproxy_times), statistics.median(bare_times)


def http_rate(tmp, tp, seconds, rounds):
    """Return {mode: median conn/s} for one short request per connection, c=1."""
    if not shutil.which("haproxy"):
        return {}
    origin = free_port()
    cfg = os.path.join(tmp, "haproxy-origin.cfg")
    with open(cfg, "w") as f:
        f.write("global\n    maxconn 2000\ndefaults\n    mode http\n    timeout connect 5s\n"
                "    timeout client 10s\n    timeout server 10s\nfrontend fe\n"
                "    bind 127.0.0.1:%d\n    http-request return status 200 "
                "content-type text/plain string ok\n" % origin)
    procs = [subprocess.Popen(["haproxy", "-db", "-f", cfg], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)]
    modes = {"http-translate": [], "raw": ["-t"], "http-translate-workers": ["--workers", "2"],
             "raw-workers": ["-t", "--workers", "2"]}
    ports = {mode: free_port() for mode in modes}
    tp = tp + ["-d", "-b", "127.0.0.1"]
    for mode, extra in modes.items():
        procs.append(subprocess.Popen(tp + extra + ["-s", str(ports[mode]), "127.0.0.1", str(origin)],
                                      stderr=subprocess.DEVNULL))
    request = b"GET /x HTTP/1.1\r\nHost: bench.example\r\nConnection: close\r\n\r\n"
    try:
        time.sleep(1.0)
        results = {mode: [] for mode in ports}
        for _ in range(rounds):
            for mode, port in ports.items():        # interleaved: both see the same machine
                done, deadline = 0, time.monotonic() + seconds
                while time.monotonic() < deadline and done < 1_000_000:
                    s = socket.create_connection(("127.0.0.1", port), timeout=10)
                    s.sendall(request)
                    reply = b""
                    while True:
                        data = s.recv(4096)
                        if not data:
                            break
                        reply += data
                    s.close()
                    if not reply.startswith(b"HTTP/1.1 200"):
                        raise SystemExit("bench: %s mode answered %r" % (mode, reply[:60]))
                    done += 1
                results[mode].append(done / seconds)
        return {mode: statistics.median(v) for mode, v in results.items()}
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(10)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="shorter runs (a smoke test)")
    parser.add_argument("--relaybench", default=os.path.join(REPO, "..", "shared", "bench",
                                                             "relaybench.py"))
    parser.add_argument("--skip-relaybench", action="store_true")
    parser.add_argument("--skip-held", action="store_true", help="skip the held-connections run")
    parser.add_argument("--out", default=None, help="directory for the reports")
    args = parser.parse_args()
    out = args.out or tempfile.mkdtemp(prefix="tproxy-bench-")
    os.makedirs(out, exist_ok=True)
    lines = ["# tproxy benchmark", "",
             "- host: %s, %d CPU, Python %s" % (os.uname().release, os.cpu_count(),
                                                sys.version.split()[0]), ""]
    with tempfile.TemporaryDirectory() as tmp:
        lib = installed_copy(tmp)
        tp = installed_command(tmp, lib)
        started, bare = inetd_start(lib, 15 if args.quick else 60)
        lines += ["## inetd start (exec to first byte relayed, median)", "",
                  "| tproxy inetd | python3 -c pass | ratio |", "|---:|---:|---:|",
                  "| %.1f ms | %.1f ms | %.2f× |" % (started * 1000, bare * 1000, started / bare), ""]
        rates = http_rate(tmp, tp, 1.0 if args.quick else 3.0, 2 if args.quick else 5)
        if rates:
            lines += ["## HTTP translate, one short request per connection (c=1, median conn/s)", "",
                      "| serving | http translate | raw -t | ratio |", "|---|---:|---:|---:|"]
            for name, suffix in (("fork per connection", ""), ("--workers 2", "-workers")):
                http, raw = rates["http-translate" + suffix], rates["raw" + suffix]
                lines.append("| %s | %.0f | %.0f | %.2f× |" % (name, http, raw, http / raw))
            lines.append("")
        results, held = {}, []
        if not args.skip_relaybench:
            if os.path.exists(args.relaybench):
                md = run_relaybench(args.relaybench, args.quick, out, tp)
                lines += ["## relaybench (same run)", "", open(md).read()]
                with open(os.path.join(out, "relaybench.json")) as f:
                    results = json.load(f)["results"]
            else:
                lines += ["relaybench not found at %s: pass --relaybench PATH" % args.relaybench]
        if not args.skip_held and os.path.exists(args.relaybench):
            held, nofile = run_held(args.relaybench, args.quick, out, tp)
            lines += held_lines(held, nofile)
        if results:
            lines += target_lines(results, rates, held)
    translate = os.path.join(HERE, "translate_bench.py")
    if os.path.exists(translate):
        proc = subprocess.run([sys.executable, translate] + (["10000"] if args.quick else []),
                              capture_output=True, text=True, timeout=600, cwd=REPO)
        lines += ["## ipchains-translate", "", "```", proc.stdout.strip() or proc.stderr.strip(),
                  "```", ""]
    report = "\n".join(lines)
    with open(os.path.join(out, "bench.md"), "w") as f:
        f.write(report)
    print(report)
    print("\n(reports in %s)" % out)


if __name__ == "__main__":
    main()
