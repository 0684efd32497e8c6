"""Fixtures for the ipchains-translate tests: labs from tests/lab.py."""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from xlate_helpers import need_root  # noqa: E402


@pytest.fixture
def lab():
    """A Lab (tests/lab.py) closed after the test, whatever happens."""
    need_root()
    from lab import Lab
    with Lab("xlate") as the_lab:
        yield the_lab


@pytest.fixture(scope="module")
def netns_host():
    """One private namespace for loading rulesets (shared by a module's tests)."""
    need_root()
    from lab import Lab
    with Lab("kchk") as the_lab:
        yield the_lab.host("k")
