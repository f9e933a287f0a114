import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors gain nothing from a second thread, and on a busy machine a 2-thread OpenMP team can stall
    for seconds whenever one thread is descheduled. Opt in with pytestmark = pytest.mark.usefixtures("one_thread")."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def pytest_collection_finish(session):
    """The export builds start now, in the background, when a selected test needs them (tests/prebuild.py)."""
    if any("cli_builds" in getattr(item, "fixturenames", ()) for item in session.items):
        import prebuild
        prebuild.start()


def pytest_sessionfinish(session, exitstatus):
    if "prebuild" in sys.modules:
        sys.modules["prebuild"].stop()
