"""-P and -l as root: a link or file planted by the run-as user never steers root's open."""
import os
import socket
import subprocess

import pytest

from lab import free_port
from support import tproxy_cmd, wait_for

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (tproxy starts as root)")

NOBODY = 65534
AS_NOBODY = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]


def start(*args):
    """Run a foreground tproxy on loopback that should refuse at start; return (status, stderr)."""
    proc = subprocess.run(tproxy_cmd("-d", "-s", free_port(), "-b", "127.0.0.1", "-r", "nobody",
                                     *args, "-t", "127.0.0.1", 9),
                          capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    return proc.returncode, proc.stderr


def victim(tmp):
    """A root-only file the attacker wants root to overwrite; return (path, its stat, text)."""
    path = tmp / "victim"
    path.write_text("root's secret\n")
    os.chmod(str(path), 0o600)
    st = os.stat(str(path))
    return path, (st.st_mode, st.st_uid, st.st_size, st.st_mtime_ns), path.read_text()


def unchanged(path, before):
    st = os.stat(str(path))
    return (st.st_mode, st.st_uid, st.st_size, st.st_mtime_ns) == before[1] and \
        path.read_text() == before[2]


@pytest.fixture(params=["owned-by-nobody", "sticky-world-writable"])
def attackable_dir(request, open_tmp):
    """A directory where nobody may create names: its own (the old advice) or a /tmp-like one."""
    path = open_tmp / "run"
    path.mkdir()
    if request.param == "owned-by-nobody":
        os.chown(str(path), NOBODY, NOBODY)
    else:
        os.chmod(str(path), 0o1777)
    return path


@pytest.mark.parametrize("option, name", [("-P", "tproxy.pid"), ("-l", "conn.log")])
def test_symlink_planted_by_the_user_is_refused(open_tmp, attackable_dir, option, name):
    target = victim(open_tmp)
    planted = attackable_dir / name
    subprocess.run(AS_NOBODY + ["ln", "-s", str(target[0]), str(planted)], check=True)
    status, err = start(option, planted)
    assert status == 73, err
    assert err.startswith("tproxy: %s %s: " % (option, planted)) and err.count("\n") == 1, err
    assert unchanged(target[0], target)
    assert os.path.islink(str(planted))


def test_hard_link_is_refused(open_tmp):
    target = victim(open_tmp)
    link = open_tmp / "conn.log"
    os.link(str(target[0]), str(link))
    status, err = start("-l", link)
    assert (status, err) == (73, "tproxy: -l %s: has 2 hard links; refusing it\n" % link)
    assert unchanged(target[0], target)


def test_pid_file_where_the_user_could_replace_it_is_refused(attackable_dir):
    pidfile = attackable_dir / "tproxy.pid"
    status, err = start("-P", pidfile)
    assert status == 73 and "is writable by nobody, who could replace the pid file" in err, err
    assert not pidfile.exists()


def test_world_writable_directory_without_sticky_bit_is_refused(open_tmp):
    path = open_tmp / "open"
    path.mkdir()
    os.chmod(str(path), 0o777)
    status, err = start("-l", path / "conn.log")
    assert status == 73 and err.endswith("is writable by every user; refusing it\n"), err


def test_file_of_a_third_user_is_refused(open_tmp):
    log = open_tmp / "conn.log"
    log.write_text("")
    os.chown(str(log), 1234, 1234)
    status, err = start("-l", log)
    assert (status, err) == (73, "tproxy: -l %s: is owned by uid 1234, not by 0 or %d\n"
                             % (log, NOBODY))


def test_log_in_a_directory_of_the_user_is_the_users_own(open_tmp):
    """Opened with nobody's rights there: created as nobody's file, which it may reopen."""
    path = open_tmp / "logs"
    path.mkdir()
    os.chown(str(path), NOBODY, NOBODY)
    log = path / "conn.log"
    with socket.socket() as holder:     # the port is taken: tproxy stops after opening -l
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        proc = subprocess.run(tproxy_cmd("-d", "-s", holder.getsockname()[1], "-b", "127.0.0.1",
                                         "-r", "nobody", "-l", log, "-t", "127.0.0.1", 9),
                              capture_output=True, text=True, timeout=30)
    assert proc.returncode == 71 and "Address already in use" in proc.stderr, proc.stderr
    assert os.stat(str(log)).st_uid == NOBODY


def test_pid_file_left_to_the_user_by_an_older_tproxy_is_taken_back(tproxies, open_tmp):
    """Older versions gave the pid file to USER, who could then write any pid in it for root."""
    piddir = open_tmp / "root-only"
    piddir.mkdir(mode=0o755)
    pidfile = piddir / "tproxy.pid"
    pidfile.write_text("1\n")
    os.chown(str(pidfile), NOBODY, NOBODY)
    proc = tproxies.popen(tproxy_cmd("-d", "-s", free_port(), "-b", "127.0.0.1", "-r", "nobody",
                                     "-P", pidfile, "-t", "127.0.0.1", 9),
                          stderr=subprocess.DEVNULL)
    wait_for(lambda: pidfile.read_text().strip() == str(proc.pid), what="the pid written")
    assert os.stat(str(pidfile)).st_uid == 0
