"""Golden files: cases/NAME.ipchains next to NAME.iptables, NAME.iptables-restore,
NAME.nft and NAME.stderr (the diagnostics and the exit status).

The golden files are regression snapshots of our own output, so they prove
nothing about what is right: test_xlate_expectations.py checks them against
the hand-written Linux 2.2 table.  Regenerate with
``UPDATE_GOLDEN=1 python -m pytest tests/translate/test_xlate_golden.py``
and review the diff; every verdict a regeneration changes is printed (a
warning in the summary), and a mismatch shows the verdict diff first.
"""
import os
import re
import sys
import warnings

import pytest

import bashtrace
import verdicts
from xlate_helpers import CASES, FORMATS, case_args, case_names, run_tool, translate_case

UPDATE = os.environ.get("UPDATE_GOLDEN") == "1"


class VerdictChange(UserWarning):
    """A regenerated golden file changes what some rule does."""


def golden(path, actual, fmt=None):
    """Compare ACTUAL with the golden file PATH (or write it when updating).

    For a translation (FMT given), the verdicts that differ are named: in the
    failure message, or as a VerdictChange warning when updating.
    """
    old = None
    if os.path.exists(path):
        with open(path) as f:
            old = f.read()
    changed = verdicts.diff(old, actual, fmt) if fmt and old is not None else ""
    if UPDATE:
        if changed:
            warnings.warn(VerdictChange("%s: verdicts changed:\n%s" % (path, changed)))
        with open(path, "w") as f:
            f.write(actual)
        return
    assert old is not None, "missing golden file %s (run with UPDATE_GOLDEN=1)" % path
    assert actual == old, "%s differs; regenerate with UPDATE_GOLDEN=1 and review%s" % (
        path, "; verdicts changed:\n" + changed if changed else " (no verdict changed)")


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", case_names())
def test_golden(name, fmt):
    status, out, err = translate_case(name, fmt)
    assert "internal error" not in err
    golden(os.path.join(CASES, "%s.%s" % (name, fmt)), out, fmt)
    if fmt == "iptables-restore":
        golden(os.path.join(CASES, name + ".stderr"), err + "exit %d\n" % status)


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_changed_verdict_is_named(tmp_path, monkeypatch, fmt):
    """A golden file whose rule changes its verdict (REJECT became DENY) is
    reported with that rule's verdict line, on comparison and on regeneration;
    a change that keeps every verdict says so."""
    script = tmp_path / "v.sh"

    def translate(target):
        script.write_text("ipchains -A forward -s 192.0.2.9 -j %s\n" % target)
        status, out, err = run_tool(["--to=" + fmt, str(script)])
        assert status == 0, err
        return out

    rejecting, dropping = translate("REJECT"), translate("DENY")
    path = str(tmp_path / "v.golden")
    with open(path, "w") as f:
        f.write(rejecting)
    monkeypatch.setattr(sys.modules[__name__], "UPDATE", False)
    with pytest.raises(AssertionError) as failed:
        golden(path, dropping, fmt)
    # pytest indents the lines of a message.
    lines = [line.strip() for line in str(failed.value).split("\n")]
    assert any(re.fullmatch(r"-\S*fw-forward \S*v\.sh:1 -> .*host-unreachable", line)
               for line in lines), failed.value
    assert any(re.fullmatch(r"\+\S*fw-forward \S*v\.sh:1 -> (drop|-j DROP)", line)
               for line in lines), failed.value
    with pytest.raises(AssertionError) as failed:
        golden(path, rejecting.replace("192.0.2.9", "192.0.2.8"), fmt)
    assert "(no verdict changed)" in str(failed.value)
    monkeypatch.setattr(sys.modules[__name__], "UPDATE", True)
    with pytest.warns(VerdictChange, match="v.sh:1"):
        golden(path, dropping, fmt)
    with open(path) as f:
        assert f.read() == dropping


def test_every_case_has_all_golden_files():
    for name in case_names():
        for ext in FORMATS + ("stderr",):
            assert os.path.exists(os.path.join(CASES, "%s.%s" % (name, ext))), (name, ext)


def command_lines(name):
    """Return the line numbers of the ipchains/ipmasqadm commands in case NAME."""
    with open(os.path.join(CASES, name + ".ipchains")) as f:
        lines = f.read().split("\n")
    out = []
    for number, line in enumerate(lines, 1):
        code = line.split("#", 1)[0]
        if re.search(r"(ipchains|IPCHAINS\}?|ipmasqadm)\s", code) or re.match(r"\s*(:|-A )", line):
            out.append(number)
    return out


@pytest.mark.parametrize("fmt", ["iptables-restore", "nft"])
@pytest.mark.parametrize("name", case_names())
def test_every_command_is_accounted_for(name, fmt):
    """Each command shows up as an origin, an untranslated comment or a diagnostic."""
    status, out, err = translate_case(name, fmt)
    numbers = command_lines(name)
    assert numbers
    if "shell logic" in open(os.path.join(CASES, name + ".ipchains")).read(400).lower():
        # The flat formats follow the shell: only the lines bash runs count.
        if os.geteuid() != 0:
            pytest.skip("bashtrace needs root (a mount namespace with an overlay)")
        ran = bashtrace.run_lines(CASES, name + ".ipchains", case_args(name))
        numbers = [n for n in numbers if "%s.ipchains:%d" % (name, n) in ran]
    for number in numbers:
        origin = "%s.ipchains:%d" % (name, number)
        assert re.search(re.escape(origin) + r"\b", out + err), origin


@pytest.mark.parametrize("name", case_names())
def test_shell_format_replaces_every_command(name):
    """No ipchains command is left running in the script, unless reported."""
    status, out, err = translate_case(name, "iptables")
    reported = set(int(n) for n in
                   re.findall(r"^%s\.ipchains:(\d+):" % re.escape(name), err, re.M))
    for line in left_running(name, out):
        assert line in reported, "line %d runs ipchains and was not reported" % line


def left_running(name, out):
    """Return the input line numbers of the ipchains commands the script format left in place."""
    with open(os.path.join(CASES, name + ".ipchains")) as f:
        source = f.read().split("\n")
    kept = []
    for line in out.split("\n"):
        code = line.split("#", 1)[0]
        unquoted = re.sub(r"'[^']*'|\"[^\"]*\"", "''", code)    # comments of our own rules
        if re.search(r"\b(ipchains|ipmasqadm)\s", unquoted) or "$IPCHAINS" in unquoted:
            kept.append(code.strip())
    numbers = []
    for text in kept:
        found = [n for n, src in enumerate(source, 1) if src.split("#", 1)[0].strip() == text]
        assert found, "a command the script keeps is not in the input: %r" % text
        numbers.append(found[0])
    return numbers
