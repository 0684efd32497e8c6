#!/usr/bin/env python3
"""tproxy's benchmark: every mode against its peers, measured in one run, as ratios.

Usage: bench.py [--quick] [--relaybench PATH] [--skip-relaybench] [--out DIR]

1. relaybench (../shared/bench/relaybench.py): bulk, connection rate, idle
   memory for tproxy -t (fork per connection) and tproxy -t --workers 2,
   next to direct, socat, haproxy and haproxy with splice, started together
   (--prefork runs --workers since its pool was retired).
2. inetd start: time from exec to the first byte relayed, tproxy in inetd
   mode (fd 0 is the client, as inetd gives it) against a bare
   `python3 -c pass` on the same interpreter.
3. HTTP translate: connection rate for one short request per connection,
   tproxy in its default mode against tproxy -t, fork per connection and
   --workers 2, all in front of the same HAProxy that answers every request
   itself.
4. ipchains-translate: bench/translate_bench.py (10,000 and 100,000 rules).

Everything listens on 127.0.0.1 only, every loop is bounded in count and
time, and every process started here is stopped by pid.
"""
import argparse
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
    subprocess.run(cmd, check=True, timeout=900, stdout=subprocess.DEVNULL)
    return md


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
        if not args.skip_relaybench:
            if os.path.exists(args.relaybench):
                md = run_relaybench(args.relaybench, args.quick, out, tp)
                lines += ["## relaybench (same run)", "", open(md).read()]
            else:
                lines += ["relaybench not found at %s: pass --relaybench PATH" % args.relaybench]
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
