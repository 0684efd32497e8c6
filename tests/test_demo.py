"""The main job (`make demo`): tools/demo.py runs twice in a row and leaves nothing behind."""
import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(REPO, "tools", "demo.py")
# The demo's namespaces are named by tests/lab.py's Lab("demo"): tp<pid>demo<n>-<host>.
DEMO_NETNS = re.compile(r"^tp\d+demo\d+-")

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the demo needs root (namespaces)")


def venv_python():
    """Return the venv's python (the demo finds tproxy and ipchains-translate beside it)."""
    here = os.path.dirname(sys.executable)
    if os.path.exists(os.path.join(here, "ipchains-translate")):
        return sys.executable
    return os.path.join(REPO, ".venv", "bin", "python")


def netns_names():
    """Return the set of namespace names `ip netns list` shows."""
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def run_demo():
    """Run the demo once; return its CompletedProcess (text)."""
    return subprocess.run([venv_python(), DEMO], capture_output=True, text=True, timeout=120)


def check_run(proc):
    """Assert one run succeeded and showed the plain and transparent client addresses."""
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr
    plain, _, transparent = proc.stdout.partition("== Step 3")
    assert transparent, proc.stdout
    plain = plain.partition("== Step 2")[2]
    assert re.search(r"^\s+GET \S+ HTTP/1\.1\s+from 203\.0\.113\.1$", plain, re.M), plain
    seen = re.findall(r"^\s+GET \S+ HTTP/1\.1\s+from (\S+)$", transparent, re.M)
    assert seen and all(re.fullmatch(r"192\.0\.2\.\d+", peer) for peer in seen), transparent
    prefix = re.search(r"^namespaces: (\S+)-\{", proc.stdout, re.M).group(1)
    return prefix


def test_demo_runs_twice_and_leaves_nothing():
    before = netns_names()
    prefixes = [check_run(run_demo()) for _ in range(2)]
    after = netns_names()
    # Other labs may come and go meanwhile; none of the demo's may remain.
    assert not {n for n in after - before if DEMO_NETNS.match(n)}, after - before
    for prefix in prefixes:
        assert not [n for n in after if n.startswith(prefix + "-")]
        if os.path.isdir("/etc/netns"):
            assert not [n for n in os.listdir("/etc/netns") if n.startswith(prefix + "-")]
