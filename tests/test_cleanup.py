"""The test support stops every tproxy a test started, also when the test fails half-way.

A pytest run of its own runs real tests made to fail at their first wait
(after they started tproxy); afterwards none of its tproxies may be left.
"""
import glob
import os
import signal
import subprocess

import pytest

from support import PYTHON, REPO, describe, is_tproxy, start_time

# Loaded with -p into the run under test: records the pid of each process started
# with tproxy.py in its argv, and makes each test fail right after its first
# wait_for (its module's) has returned: with tproxy up, half-way through the test.
LEAK_PROBE = '''
import os, subprocess
import pytest

started = subprocess.Popen.__init__


def recording(self, args, *more, **kw):
    started(self, args, *more, **kw)
    if any(str(arg).endswith("tproxy.py") for arg in args):
        with open(os.environ["LEAK_RECORD"], "a") as f:
            f.write("%d\\n" % self.pid)


subprocess.Popen.__init__ = recording


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_call(item):
    wait_for = item.module.wait_for

    def deliberately(*args, **kw):
        wait_for(*args, **kw)
        raise AssertionError("deliberate failure half-way (the leak probe)")
    item.module.wait_for = deliberately
'''

FAILING = ["tests/test_ops.py::test_sigusr1_fork_mode_parent_sums_its_children",
           "tests/test_ops.py::test_without_syslog_the_background_server_says_so_and_logs_to_stderr"]


def now_in_ticks():
    """Return the time since boot in clock ticks (the unit of start_time)."""
    with open("/proc/uptime") as f:
        return int(float(f.read().split()[0]) * os.sysconf("SC_CLK_TCK"))


@pytest.mark.skipif(os.geteuid() != 0, reason="the daemon test needs root and unshare(1)")
def test_tests_failing_half_way_leave_no_tproxy_running(tmp_path):
    (tmp_path / "leak_probe.py").write_text(LEAK_PROBE)
    record, basetemp = tmp_path / "started", tmp_path / "run"
    record.write_text("")
    env = dict(os.environ, PYTHONPATH=str(tmp_path), LEAK_RECORD=str(record))
    began = now_in_ticks()
    run = subprocess.run([PYTHON, "-m", "pytest", "-p", "leak_probe", "-p", "no:cacheprovider",
                          "-q", "--basetemp", str(basetemp)] + FAILING,
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    started = [int(pid) for pid in record.read_text().split()]
    for path in glob.glob(str(basetemp / "**" / "*.pid"), recursive=True):   # the daemons'
        with open(path) as f:
            started += [int(word) for word in f.read().split() if word.isdigit()]
    leaked = [pid for pid in sorted(set(started)) if (start_time(pid) or -1) >= began and is_tproxy(pid)]
    try:
        assert run.stdout.count("deliberate failure half-way") >= len(FAILING), run.stdout
        assert "%d failed" % len(FAILING) in run.stdout, run.stdout
        assert started, "the run recorded no tproxy: %s" % run.stdout
        assert leaked == [], [describe(pid) for pid in leaked]
    finally:
        for pid in leaked:      # what the run left is stopped here, by pid (its own session)
            try:
                os.killpg(os.getpgid(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
