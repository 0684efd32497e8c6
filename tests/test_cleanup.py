"""The test support stops every tproxy a test started, also when the test fails half-way.

A pytest run of its own runs real tests made to fail at their first wait
(after they started tproxy); afterwards none of its tproxies may be left.
"""
import glob
import os
import signal
import subprocess

import pytest

from lab import stop
from support import PYTHON, REPO, describe, is_tproxy, start_time, wait_for

# Loaded with -p into the run under test: records the pid of each process started
# with tproxy.py in its argv, and makes each test fail right after its first
# wait_for (its module's) has returned: with tproxy up, half-way through the test.
# With LEAK_HANG set, the test says so in that file and waits there instead (60 s at
# most) for the run to be stopped, as a run that hangs is by its time limit.
LEAK_PROBE = '''
import os, subprocess, time
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
        if os.environ.get("LEAK_HANG"):
            with open(os.environ["LEAK_HANG"], "w") as f:
                f.write("hanging")
            time.sleep(60)
        raise AssertionError("deliberate failure half-way (the leak probe)")
    item.module.wait_for = deliberately
'''

FORK_MODE = "tests/test_ops.py::test_sigusr1_fork_mode_parent_sums_its_children"
DAEMON = "tests/test_ops.py::test_without_syslog_the_background_server_says_so_and_logs_to_stderr"
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="the daemon test needs root and unshare(1)")


def now_in_ticks():
    """Return the time since boot in clock ticks (the unit of start_time)."""
    with open("/proc/uptime") as f:
        return int(float(f.read().split()[0]) * os.sysconf("SC_CLK_TCK"))


class ProbedRun:
    """A pytest run of TESTS with the leak probe in TMP; start() it, then ask what it left."""

    def __init__(self, tmp, tests, hang=False):
        (tmp / "leak_probe.py").write_text(LEAK_PROBE)
        self.record, self.basetemp, self.hanging = tmp / "started", tmp / "run", tmp / "hanging"
        self.record.write_text("")
        self.env = dict(os.environ, PYTHONPATH=str(tmp), LEAK_RECORD=str(self.record))
        if hang:
            self.env["LEAK_HANG"] = str(self.hanging)
        self.argv = [PYTHON, "-m", "pytest", "-p", "leak_probe", "-p", "no:cacheprovider", "-q",
                     "--basetemp", str(self.basetemp)] + tests
        self.output = tmp / "output"

    def start(self):
        """Start the run (stdout and stderr to self.output); return its Popen."""
        self.began = now_in_ticks()
        with open(self.output, "w") as out:
            return subprocess.Popen(self.argv, cwd=REPO, env=self.env, stdin=subprocess.DEVNULL,
                                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def left_running(self):
        """Return the tproxies the run started that still run (the daemons' by their pid files)."""
        started = [int(pid) for pid in self.record.read_text().split()]
        for path in glob.glob(str(self.basetemp / "**" / "*.pid"), recursive=True):
            with open(path) as f:
                started += [int(word) for word in f.read().split() if word.isdigit()]
        return [pid for pid in sorted(set(started))
                if (start_time(pid) or -1) >= self.began and is_tproxy(pid)]


def assert_none_left(run):
    """Assert that RUN left no tproxy running; stop (by pid) any it left, so this test leaks none."""
    leaked = run.left_running()
    try:
        assert leaked == [], [describe(pid) for pid in leaked]
    finally:
        for pid in leaked:      # each in a session of its own
            try:
                os.killpg(os.getpgid(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass


@needs_root
def test_tests_failing_half_way_leave_no_tproxy_running(tmp_path):
    run = ProbedRun(tmp_path, [FORK_MODE, DAEMON])
    proc = run.start()
    try:
        proc.wait(300)
    finally:
        stop(proc)
    output = run.output.read_text()
    try:
        assert output.count("deliberate failure half-way") >= 2 and "2 failed" in output, output
        assert run.record.read_text(), "the run recorded no tproxy: %s" % output
    finally:
        assert_none_left(run)


def test_a_run_stopped_by_sigterm_leaves_no_tproxy_running(tmp_path):
    """A run that hangs is stopped by its time limit (SIGTERM): the finalisers still run."""
    run = ProbedRun(tmp_path, [FORK_MODE], hang=True)
    proc = run.start()
    try:
        wait_for(run.hanging.exists, timeout=60, what="the probed test to hang")
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    finally:
        stop(proc)
        assert_none_left(run)
    assert run.record.read_text(), "the run recorded no tproxy: %s" % run.output.read_text()
