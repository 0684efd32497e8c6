"""The Debian package: built from the tree with dpkg-buildpackage, checked, run.

The package is built once per session (module fixture) from a copy of the tree,
with a clean PATH as on a fresh Debian 12 (no pyenv, no venv). Its programs
run in a private mount namespace in which the unpacked package is overlaid on
the host's /usr, so nothing is installed on the host.
"""
import os
import re
import shutil
import subprocess

import pytest

from support import REPO
from lab import have

VERSION = "1.1.0"
DEB = "tproxy_%s_all.deb" % VERSION
CLEAN_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8",
             "SYSTEMD_LOG_LEVEL": "notice", "SYSTEMD_LOG_COLOR": "0"}
# Not copied into the build tree: local state that a fresh clone does not have.
LOCAL_STATE = (".git", ".venv", "__pycache__", ".pytest_cache", "*.egg-info", "build", ".pybuild")
BUILD_TOOLS = ("dpkg-buildpackage", "dh", "dh_python3", "lintian", "unshare")

# What the package must hold (directories aside), exactly.
EXPECTED_FILES = {
    "/usr/bin/tproxy", "/usr/bin/ipchains-translate",
    "/usr/share/man/man8/tproxy.8.gz", "/usr/share/man/man8/ipchains-translate.8.gz",
    "/lib/systemd/system/tproxy.service", "/lib/systemd/system/tproxy.socket",
    "/lib/systemd/system/tproxy@.service",
    "/usr/share/doc/tproxy/README.md.gz", "/usr/share/doc/tproxy/changelog.gz",
    "/usr/share/doc/tproxy/copyright",
    "/usr/share/doc/tproxy/examples/README", "/usr/share/doc/tproxy/examples/inetd.conf",
    "/usr/share/doc/tproxy/examples/xinetd.d/tproxy",
    "/usr/share/tproxy/firewall/proxy-return-path", "/usr/share/tproxy/firewall/server-return-route",
    "/usr/share/tproxy/firewall/tproxy-intercept",
    "/usr/lib/python3/dist-packages/tproxy.py",
}
PYTHON_PACKAGE = "/usr/lib/python3/dist-packages/ipchains_translate/"
DIST_INFO = re.compile(r"/usr/lib/python3/dist-packages/tproxy-%s\.dist-info/[\w.]+$" % re.escape(VERSION))


def run(argv, **kw):
    """Run ARGV with the clean environment; return the CompletedProcess (text)."""
    return subprocess.run(argv, capture_output=True, text=True, env=CLEAN_ENV, timeout=300, **kw)


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    """Build the package from a copy of the tree; return the directory holding the .deb."""
    missing = [t for t in BUILD_TOOLS if not shutil.which(t, path=CLEAN_ENV["PATH"])]
    if missing:
        pytest.skip("package build tools missing (tools/install-deps installs them): %s"
                    % " ".join(missing))
    out = tmp_path_factory.mktemp("deb")
    src = out / "tproxy"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(*LOCAL_STATE))
    built = run(["dpkg-buildpackage", "-us", "-uc", "-b"], cwd=src)
    assert built.returncode == 0, (built.stdout + built.stderr)[-3000:]
    return out


@pytest.fixture(scope="module")
def unpacked(package):
    """The package's files under a directory shaped as /usr (lib/systemd merged in)."""
    root = package / "root"
    subprocess.run(["dpkg-deb", "-x", package / DEB, root], check=True)
    usr = package / "usr"
    shutil.copytree(root / "usr", usr)
    shutil.copytree(root / "lib", usr / "lib", dirs_exist_ok=True)    # /lib is /usr/lib here
    return usr


def in_package_namespace(usr, script):
    """Run SCRIPT (sh) in a private mount namespace whose /usr has the package overlaid."""
    if os.geteuid() != 0:
        pytest.skip("needs root for a private mount namespace (unshare --mount)")
    if not os.path.islink("/lib"):
        pytest.skip("this host's /lib is not merged into /usr: the overlay would miss the units")
    mount = "mount -t overlay tproxy-pkg -o lowerdir=%s:/usr /usr" % usr
    return run(["unshare", "--mount", "--propagation", "private", "sh", "-ec",
                mount + "\n" + script])


def package_files(deb):
    """Return the set of regular files and symlinks in DEB, as absolute paths."""
    listing = run(["dpkg-deb", "-c", deb]).stdout.splitlines()
    return {line.split(None, 5)[5].split(" -> ")[0].lstrip(".")
            for line in listing if not line.startswith("d")}


def test_package_holds_the_programs_pages_units_and_examples(package):
    """Exactly the expected files, the translator as ipchains_translate, nothing named translate."""
    files = package_files(package / DEB)
    python = {f for f in files if f.startswith(PYTHON_PACKAGE)}
    dist_info = {f for f in files if DIST_INFO.match(f)}
    assert files - python - dist_info == EXPECTED_FILES
    assert PYTHON_PACKAGE + "cli.py" in python and PYTHON_PACKAGE + "__init__.py" in python


def test_package_firewall_recipes_are_executable(package):
    """The recipes keep their mode: an admin runs them from /usr/share/tproxy/firewall."""
    listing = run(["dpkg-deb", "-c", package / DEB]).stdout.splitlines()
    modes = {line.split(None, 5)[5].lstrip("."): line.split()[0] for line in listing}
    for name in ("proxy-return-path", "server-return-route", "tproxy-intercept"):
        assert modes["/usr/share/tproxy/firewall/" + name] == "-rwxr-xr-x"


def test_package_depends_on_debian_12_libraries(package):
    """Depends names Debian's python3-docopt (0.6.2 suffices) and python3-daemon, nothing from pip."""
    depends = run(["dpkg-deb", "-f", package / DEB, "Depends"]).stdout.strip()
    names = {d.split()[0] for d in depends.split(", ")}
    assert names == {"python3-docopt", "python3-daemon", "python3:any"}, depends
    assert "python3-docopt (>= 0.6.2)" in depends


def test_package_maintainer_scripts_enable_and_start_nothing(package):
    """postinst re-enables a unit only if the admin had enabled it, and starts none."""
    ctl = package / "control"
    subprocess.run(["dpkg-deb", "-e", package / DEB, ctl], check=True)
    postinst = (ctl / "postinst").read_text()
    assert "deb-systemd-invoke" not in postinst and "systemctl" not in postinst
    for line in postinst.splitlines():
        if "deb-systemd-helper enable" in line:
            assert "was-enabled" in postinst.split(line)[0].splitlines()[-2], line


def test_package_lintian_is_quiet(package):
    """lintian reports no error and no warning (overrides carry their reasons in debian/)."""
    changes = package / ("tproxy_%s_amd64.changes" % VERSION)
    if not changes.exists():
        changes = next(package.glob("tproxy_%s_*.changes" % VERSION))
    ran = run(["lintian", "--fail-on", "error,warning", changes])
    tags = [line for line in ran.stdout.splitlines() if re.match(r"[EW]: ", line)]
    assert (ran.returncode, tags) == (0, []), ran.stdout + ran.stderr


def test_package_programs_run_as_installed(unpacked):
    """/usr/bin/tproxy (--version and -V) and ipchains-translate print one version; man finds the pages."""
    ran = in_package_namespace(unpacked, "/usr/bin/tproxy --version\n"
                                         "/usr/bin/tproxy -V\n"
                                         "/usr/bin/ipchains-translate --version\n"
                                         "man -w tproxy\nman -w ipchains-translate\n")
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.splitlines() == [
        "tproxy " + VERSION, "tproxy " + VERSION, "ipchains-translate " + VERSION,
        "/usr/share/man/man8/tproxy.8.gz", "/usr/share/man/man8/ipchains-translate.8.gz"]


def test_package_tproxy_usage_errors_with_debian_docopt(unpacked):
    """With Debian's docopt 0.6.2, a bad command line is one hinted line and status 64."""
    ran = in_package_namespace(unpacked, "for a in '-Z' '--bogus' '-s 1 -s 2 host 80' 'a b c'; do\n"
                                         "  /usr/bin/tproxy $a 2>&1 && echo unexpected || echo status=$?\n"
                                         "done\n")
    lines = ran.stdout.splitlines()
    assert len(lines) == 8, ran.stdout + ran.stderr
    for message, status in zip(lines[::2], lines[1::2]):
        assert status == "status=64"
        assert message.startswith("tproxy: ") and message.endswith("(see tproxy --help)"), message


def test_package_installs_beside_translate_toolkit(unpacked, package):
    """Debian's python3-translate and this package share no file and both import."""
    if run(["dpkg-query", "-W", "python3-translate"]).returncode != 0:
        pytest.skip("python3-translate is not installed (tools/install-deps installs it)")
    theirs = set(run(["dpkg-query", "-L", "python3-translate"]).stdout.splitlines())
    ours = package_files(package / DEB)
    assert ours & theirs == set()
    ran = in_package_namespace(unpacked, "cd / && python3 -c 'import translate.storage, "
                                         "ipchains_translate.cli, tproxy; print(translate.__file__)'")
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.strip() == "/usr/lib/python3/dist-packages/translate/__init__.py"


def test_package_systemd_units_verify_against_installed_paths(unpacked):
    """systemd-analyze verify is silent about the units as installed (/usr/bin/tproxy exists)."""
    if not have("systemd-analyze"):
        pytest.skip("systemd-analyze is not installed (Debian package systemd)")
    ran = in_package_namespace(unpacked, "cd /lib/systemd/system\n"
                                         "systemd-analyze verify tproxy.socket tproxy.service\n"
                                         "systemd-analyze verify tproxy@12970.service\n")
    assert (ran.returncode, ran.stdout + ran.stderr) == (0, "")


# ---------------------------------------------------------------------------
# The README's other route: pip into a venv under /opt, readable by nobody
# ---------------------------------------------------------------------------

VENV_ROUTE = """
mount -t tmpfs tproxy-opt /opt
cd /
umask 022
/usr/bin/python3 -m venv /opt/tproxy
/opt/tproxy/bin/pip install -q --disable-pip-version-check "$1" >/tmp/pip.log 2>&1 || {
    cat /tmp/pip.log >&2; exit 3; }
for p in tproxy ipchains-translate; do
    setpriv --reuid=nobody --regid=nogroup --clear-groups /opt/tproxy/bin/$p --version
done
setpriv --reuid=nobody --regid=nogroup --clear-groups /opt/tproxy/bin/python -c \
    'import ipchains_translate.cli, tproxy; print(tproxy.__file__)'
"""
NO_INDEX = ("NewConnectionError", "No matching distribution", "Could not find a version",
            "Temporary failure in name resolution")


def test_venv_under_opt_is_usable_by_nobody(tmp_path):
    """The README's pip route: both programs run as nobody from /opt/tproxy (a private /opt)."""
    if os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("setpriv"):
        pytest.skip("needs root, unshare(1) and setpriv(1)")
    src = tmp_path / "tproxy"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(*LOCAL_STATE))
    ran = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-ec", VENV_ROUTE,
                          "sh", str(src)], capture_output=True, text=True, timeout=300,
                         env=dict(CLEAN_ENV, HOME=str(tmp_path)))
    if ran.returncode == 3 and any(word in ran.stderr for word in NO_INDEX):
        pytest.skip("pip cannot reach the package index: %s" % ran.stderr.strip()[-300:])
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.splitlines() == ["tproxy " + VERSION, "ipchains-translate " + VERSION,
                                       "/opt/tproxy/lib/python3.11/site-packages/tproxy.py"]
