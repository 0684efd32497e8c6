"""Golden files: cases/NAME.ipchains next to NAME.iptables, NAME.iptables-restore,
NAME.nft and NAME.stderr (the diagnostics and the exit status).

Regenerate with ``UPDATE_GOLDEN=1 python3 -m pytest tests/translate/test_xlate_golden.py``
and review the diff.
"""
import os
import re

import pytest

import bashtrace
from xlate_helpers import CASES, FORMATS, case_args, case_names, translate_case

UPDATE = os.environ.get("UPDATE_GOLDEN") == "1"


def golden(path, actual):
    """Compare ACTUAL with the golden file PATH (or write it when updating)."""
    if UPDATE:
        with open(path, "w") as f:
            f.write(actual)
        return
    assert os.path.exists(path), "missing golden file %s (run with UPDATE_GOLDEN=1)" % path
    with open(path) as f:
        expected = f.read()
    assert actual == expected, "%s differs; regenerate with UPDATE_GOLDEN=1 and review" % path


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", case_names())
def test_golden(name, fmt):
    status, out, err = translate_case(name, fmt)
    assert "internal error" not in err
    golden(os.path.join(CASES, "%s.%s" % (name, fmt)), out)
    if fmt == "iptables-restore":
        golden(os.path.join(CASES, name + ".stderr"), err + "exit %d\n" % status)


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
    reported = set(re.findall(r"^%s\.ipchains:(\d+):" % re.escape(name), err, re.M))
    for line in out.split("\n"):
        code = line.split("#", 1)[0]
        if re.search(r"\b(ipchains|ipmasqadm)\s", code) or "$IPCHAINS" in code:
            assert reported, line
