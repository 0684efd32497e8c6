"""syslog: facility daemon, ident tproxy with the pid; under inetd nothing reaches the client."""
import os
import re
import subprocess

import pytest

from support import PRIVATE_DEV, PYTHON, REPO, TPROXY, have

PROBE = os.path.join(REPO, "tests", "syslog_inetd_probe.py")


@pytest.mark.skipif(os.geteuid() != 0 or not have("unshare"), reason="needs root and unshare(1)")
def test_inetd_mode_logs_to_syslog_daemon_facility():
    proc = subprocess.run(["unshare", "-m", "sh", "-c", PRIVATE_DEV, "sh",
                           PYTHON, PROBE, PYTHON, TPROXY], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    summary, connection, error = proc.stdout.splitlines()[:3]
    assert summary == "client got b'back', tproxy status 0, error status 64, leaked b''"
    # <30> = facility daemon (3) * 8 + priority info (6); <27> = daemon + err.
    assert re.match(r"<30>\w{3} [ \d]\d \d\d:\d\d:\d\d tproxy\[\d+\]: client=127\.0\.0\.1:\d+ "
                    r"orig=127\.0\.0\.1:\d+ target=127\.0\.0\.1:\d+ mode=raw up=14 down=4 "
                    r"time=[\d.]+ outcome=ok$", connection), connection
    assert re.match(r"<27>.* tproxy\[\d+\]: unknown option --bogus \(see tproxy --help\)$", error), error
