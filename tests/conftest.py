"""Fixtures shared by the test modules (helpers live in support.py)."""
import os
import signal

import pytest

from lab import Lab
from support import BookLab, ECHO_SERVER, GRACE, PORT, PYTHON, TARGET, Tproxies, tproxy_cmd, wait_ready


def pytest_collection_modifyitems(config, items):
    """Network tests need root (namespaces); say so once instead of failing each."""
    if os.geteuid() != 0:
        skip = pytest.mark.skip(reason="network-namespace tests need root")
        for item in items:
            if "lab" in getattr(item, "fixturenames", ()):
                item.add_marker(skip)


SERVING_MODES = {"fork": (), "workers": ("--workers=2",)}


def pytest_configure(config):
    config.addinivalue_line("markers", "every_mode: run the test once per serving mode "
                            "(fork per connection, --workers); book and box start tproxy so")
    signal.signal(signal.SIGTERM, interrupted)


def interrupted(*_):
    """SIGTERM (a CI job's time limit) ends the run as Ctrl-C does: fixture finalisers
    still run and stop what the tests started (Tproxies, Lab); by default it ends at once."""
    raise KeyboardInterrupt("SIGTERM")


def pytest_generate_tests(metafunc):
    if metafunc.definition.get_closest_marker("every_mode") and \
            "serving" in metafunc.fixturenames:
        metafunc.parametrize("serving", list(SERVING_MODES), indirect=True)


@pytest.fixture
def serving(request):
    """The serving mode's options for a standalone tproxy (none: fork per connection)."""
    return SERVING_MODES[getattr(request, "param", "fork")]


@pytest.fixture
def lab():
    """A fresh Lab, closed (processes stopped, namespaces deleted) afterwards."""
    with Lab("t") as the_lab:
        yield the_lab


@pytest.fixture
def tproxies():
    """The owner of every tproxy the test starts outside a lab (support.Tproxies), closed afterwards."""
    owner = Tproxies()
    yield owner
    owner.close()


@pytest.fixture
def open_tmp():
    """A temporary directory that every user can reach (tproxy runs as nobody)."""
    import pathlib, shutil, tempfile
    path = tempfile.mkdtemp(prefix="tproxy-test-")
    os.chmod(path, 0o755)
    yield pathlib.Path(path)
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def book(lab, open_tmp, serving):
    """The book's lab (see BookLab), torn down afterwards."""
    book = BookLab(lab, open_tmp)
    book.serving = serving
    return book


@pytest.fixture
def box(lab, open_tmp, serving):
    """One namespace with an echo target; returns a helper to start tproxy there."""
    host = lab.host("box")
    host.popen(PYTHON, "-c", ECHO_SERVER, TARGET)
    host.wait_listening(TARGET)

    def start(*args, port=PORT, user="nobody", wrapper=(), target=("-t", "127.0.0.1", TARGET),
              grace=GRACE):
        """Start tproxy in the foreground here with ARGS; return (Popen, stderr path)."""
        err = open_tmp / ("tproxy-%d.err" % len(lab.processes))
        with open(str(err), "wb") as f:
            proc = host.popen(*wrapper, *tproxy_cmd("-d", "-s", port, "-b", "127.0.0.1",
                                                    "-r", user, "--grace=%g" % grace, *serving,
                                                    *args, *target),
                              stdout=f, stderr=f)
        wait_ready(proc, err)
        return proc, err
    host.start = start
    return host
