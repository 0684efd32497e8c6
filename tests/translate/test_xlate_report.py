"""ipchains-translate's own stderr lines: the summary, the progress line, what --check loads."""
import io
import os
import pty
import re
import shutil
import subprocess
import sys

import pytest

from xlate_helpers import ROOT, run_tool
from translate.report import Progress

RULES = ["-A input -p tcp -s 192.0.2.0/24 -d 198.51.100.10/32 80 -j REDIR 12970",
         "-A input -p udp -j DENY", "-P forward DENY", "-A forward -j BOGUS"]
SUMMARY = re.compile(r"ipchains-translate: (\d+) commands read, (\d+) rules written, (\d+) notes, "
                     r"(\d+) warnings, (\d+) errors, \d+\.\d\d s$")


def run_script(argv, rules=RULES):
    """Run the tool with ARGV on a script of RULES read from stdin (a full translation;
    -e alone would print a snippet)."""
    return run_tool(argv + ["-"], stdin="".join("ipchains %s\n" % rule for rule in rules))


def summary_of(err):
    """Return the summary line's numbers from stderr ERR (it must be the last line)."""
    found = SUMMARY.match(err.splitlines()[-1])
    assert found, err
    return [int(n) for n in found.groups()]


def test_verbose_ends_with_one_summary_line_counting_what_was_printed():
    """-v: the last stderr line counts the commands given and the diagnostics printed above it."""
    status, out, err = run_script(["-v", "--to=nft"])
    commands, rules, notes, warnings, errors = summary_of(err)
    above = err.splitlines()[:-1]
    assert status == 1 and commands == len(RULES) and rules > 0
    assert [notes, warnings, errors] == [sum(": %s: " % level in line for line in above)
                                         for level in ("note", "warning", "error")]
    assert errors == 1 and notes >= 1


def test_rules_written_agree_across_the_flat_emitters():
    """The nft and iptables-restore outputs hold the same number of rules, but
    for iptables-restore's hook rules (one per built-in chain, jumping to its
    own ipchains-INPUT...; nft has a table of its own).

    (The iptables script counts its -A/-I commands, which a later -F or -D in
    the script may take back.)
    """
    runs = {fmt: run_script(["-v", "--to=" + fmt]) for fmt in ("nft", "iptables-restore")}
    counts = {fmt: summary_of(err)[1] for fmt, (_, _, err) in runs.items()}
    hooks = re.findall(r"^-A ([A-Z]+) .*-j ipchains-\1$", runs["iptables-restore"][1], re.M)
    assert hooks and counts["nft"] == counts["iptables-restore"] - len(hooks), (counts, hooks)


# The script format counts the -A/-I it runs, so its rules here take none back (-P does).
@pytest.mark.parametrize("fmt, loader, rules", [
    ("iptables-restore", "iptables-restore", RULES[:-1]), ("iptables", "sh -e", RULES[:2])])
def test_rules_written_is_what_the_kernel_holds(fmt, loader, rules):
    """The count equals the rules iptables-save lists after loading the output in a
    namespace (the script format: its commands and its iptables-restore batches)."""
    if os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("iptables-save"):
        pytest.skip("needs root, unshare(1) and iptables")
    status, out, err = run_script(["-v", "--to=" + fmt], rules)
    assert status == 0, err
    loaded = subprocess.run(["unshare", "--net", "sh", "-ec", "%s; iptables-save" % loader],
                            input=out, capture_output=True, text=True, timeout=60)
    assert loaded.returncode == 0, loaded.stderr
    in_kernel = sum(line.startswith("-A ") for line in loaded.stdout.splitlines())
    assert summary_of(err)[1] == in_kernel


@pytest.mark.parametrize("fmt", ["iptables", "iptables-restore", "nft"])
def test_snippet_rules_are_counted(fmt):
    """-e alone prints a snippet: an input rule is two rules (in-input, fi-input) in every format."""
    status, out, err = run_tool(["-v", "--to=" + fmt, "-e", RULES[1]])
    assert status == 0, err
    assert summary_of(err)[1] == 2, out


def test_quiet_drops_the_summary_and_plain_runs_off_a_terminal_have_none():
    """-q wins over -v; without -v, stderr that is no terminal gets no summary (golden files)."""
    for argv in (["-q", "-v"], []):
        _, _, err = run_tool(argv + ["--to=nft", "-e", RULES[0]])
        assert "commands read" not in err, (argv, err)


def run_on_terminal(argv):
    """Run ipchains-translate ARGV with stderr on a pseudo-terminal; return what it showed."""
    master, slave = pty.openpty()
    try:
        proc = subprocess.run([sys.executable, "-m", "translate"] + argv, cwd=ROOT,
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=slave,
                              timeout=60)
        os.close(slave)
        shown = drain_terminal(master)
    finally:
        os.close(master)
    return proc.returncode, shown.replace("\r\n", "\n")


def drain_terminal(master):
    """Return all a pseudo-terminal's closed other side wrote, read from MASTER."""
    shown = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:             # EIO: the other side is closed and all is read
            break
        if not chunk:
            break
        shown += chunk
    return shown.decode()


def test_a_terminal_gets_the_summary_without_minus_v():
    status, shown = run_on_terminal(["--to=nft", "-e", RULES[0]])
    assert status == 0
    assert summary_of(shown)[:1] == [1]


def test_progress_line_is_drawn_after_a_second_and_erased():
    """On a terminal, a stage still running after DELAY is shown with its time, then erased."""
    master, slave = pty.openpty()
    stream = io.TextIOWrapper(os.fdopen(slave, "wb", buffering=0), write_through=True)
    progress = Progress(stream)
    progress.stage("translating 1 input(s)")
    for _ in range(100):            # bounded: at most 10 s on a loaded machine
        if progress.shown:
            break
        progress.done.wait(0.1)
    progress.close()
    stream.close()
    shown = drain_terminal(master)
    os.close(master)
    assert progress.shown
    assert re.match(r"\ripchains-translate: translating 1 input\(s\)\.\.\. \d+ s\x1b\[K", shown), shown
    assert shown.endswith("\r\x1b[K")


def test_progress_stays_silent_off_a_terminal():
    stream = io.StringIO()
    progress = Progress(stream)
    progress.close()
    assert progress.thread is None and stream.getvalue() == ""


@pytest.mark.parametrize("fmt, tool", [("nft", "nft -c -f, then nft -f twice"),
                                       ("iptables-restore", "iptables-restore --test")])
def test_check_says_what_it_loads_where(fmt, tool):
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("--check needs root and unshare(1)")
    status, _, err = run_script(["-v", "--to=" + fmt, "--check"], RULES[:1])
    assert status == 0, err
    rules = summary_of(err)[1]
    assert ("ipchains-translate: check: loading %d rules with %s" % (rules, tool)) in err
    assert "in a private network namespace (unshare --net); nothing outside it changes" in err
