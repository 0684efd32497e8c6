"""Helpers for the ipchains-translate tests: cases, running the tool, root checks."""
import io
import os
import shlex
import sys
from contextlib import redirect_stderr, redirect_stdout

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
CASES = os.path.join(HERE, "cases")
ROOT = os.path.dirname(os.path.dirname(HERE))
FORMATS = ("iptables", "iptables-restore", "nft")
sys.path.insert(0, os.path.dirname(HERE))      # tests/, for lab.py

from translate import cli  # noqa: E402


def case_names():
    """Return the names of the golden cases (cases/NAME.ipchains)."""
    return sorted(f[:-len(".ipchains")] for f in os.listdir(CASES) if f.endswith(".ipchains"))


def case_args(name):
    """Return the extra options a case asks for in its '# args:' line."""
    with open(os.path.join(CASES, name + ".ipchains")) as f:
        for line in f.read().split("\n")[:5]:
            if line.startswith("# args:"):
                return shlex.split(line[len("# args:"):])
    return []


def run_tool(argv, stdin=""):
    """Run ipchains-translate's main(ARGV) in process; return (status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    old_stdin = sys.stdin
    sys.stdin = io.StringIO(stdin)
    try:
        with redirect_stdout(out), redirect_stderr(err):
            status = cli.main(list(argv))
    finally:
        sys.stdin = old_stdin
    return status, out.getvalue(), err.getvalue()


def translate_case(name, fmt, extra=()):
    """Translate case NAME to FMT from inside cases/ (so origins read NAME.ipchains:N)."""
    cwd = os.getcwd()
    os.chdir(CASES)
    try:
        return run_tool(["--to=" + fmt] + case_args(name) + list(extra) + [name + ".ipchains"])
    finally:
        os.chdir(cwd)


def marked_lines(text, marker):
    """Return the lines of TEXT that start with MARKER, without it."""
    return [line[len(marker):] for line in text.split("\n") if line.startswith(marker)]


def needed_commands(text):
    """Return the shell commands a flat translation says are needed as well."""
    return marked_lines(text, "# needed as well: ")


def missing(reason):
    """Skip for REASON, but fail in CI (CI=true), where make test installed every tool."""
    if os.environ.get("CI") == "true":
        pytest.fail("%s (CI installs it: see tools/install-deps)" % reason)
    pytest.skip(reason)


def need_root():
    """Skip unless root with ip netns (the kernel checks need namespaces)."""
    from lab import have
    if os.geteuid() != 0:
        pytest.skip("kernel checks need root (network namespaces)")
    for tool in ("ip", "iptables-restore", "nft"):
        if not have(tool):
            missing("%s is not installed" % tool)
