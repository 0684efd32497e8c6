"""A corpus shaped like published ipchains firewalls (init scripts with case
and if, guards, loops, functions, a sourced configuration, an ip-up hook
with positional parameters, an ipchains-save dump restored at boot,
ipmasqadm port-forward loops), translated in both flat formats.

For each: the FILE:LINE cited by the output and the diagnostics are exactly
the lines bash runs with the given values (bashtrace.py computes those with
the real bash, apart from the translator), and the kernel loads the output
in a private namespace.
"""
import os
import re
import shlex

import pytest

import bashtrace
from xlate_helpers import HERE, run_tool

CORPUS = os.path.join(HERE, "corpus")
CITED = re.compile(r"(?<![\w./-])([\w./-]+\.(?:sh|rules)):(\d+)\b")


def corpus():
    return sorted(f for f in os.listdir(CORPUS) if f.endswith(".sh"))


def args_of(name):
    with open(os.path.join(CORPUS, name)) as f:
        for line in f.read().split("\n")[:3]:
            if line.startswith("# args:"):
                return shlex.split(line[len("# args:"):])
    return []


def translate(name, fmt):
    cwd = os.getcwd()
    os.chdir(CORPUS)
    try:
        return run_tool(["--to=" + fmt] + args_of(name) + [name])
    finally:
        os.chdir(cwd)


def cited(text):
    return {"%s:%s" % (os.path.normpath(f), n) for f, n in CITED.findall(text)}


@pytest.fixture(scope="module")
def ran():
    """{script: the FILE:LINE bash runs} for the whole corpus."""
    if os.geteuid() != 0:
        pytest.skip("bashtrace needs root (a mount namespace with an overlay)")
    return {name: bashtrace.run_lines(CORPUS, name, args_of(name)) for name in corpus()}


@pytest.mark.parametrize("fmt", ["iptables-restore", "nft"])
@pytest.mark.parametrize("name", corpus())
def test_cites_exactly_the_lines_bash_runs(ran, name, fmt):
    status, out, err = translate(name, fmt)
    assert status == 0, err
    assert ran[name], "bash ran no ipchains command in %s" % name
    assert cited(out + err) == ran[name]


@pytest.mark.parametrize("fmt", ["iptables-restore", "nft"])
@pytest.mark.parametrize("name", corpus())
def test_kernel_loads_corpus(netns_host, tmp_path, name, fmt):
    status, out, err = translate(name, fmt)
    path = tmp_path / "out"
    path.write_text(out)
    netns_host.run("nft", "flush", "ruleset")
    if fmt == "nft":
        netns_host.run("nft", "-c", "-f", str(path))
        netns_host.run("nft", "-f", str(path))
    else:
        netns_host.sh("iptables-restore --noflush --test < %s" % path)
        netns_host.sh("iptables-restore --noflush < %s" % path)
    netns_host.run("nft", "flush", "ruleset")
