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


def pytest_collection_modifyitems(items):
    """The test that waits for Inductor's kernels (tests/prebuild.py) runs last, so they build meanwhile; before it
    tests/test_ddp.py, whose ranks then have both cores, the builds having ended."""
    items.sort(key=lambda item: ("inductor_cache" in getattr(item, "fixturenames", ()),
                                 item.path.name == "test_ddp.py"))  # stable: the rest in order


def pytest_collection_finish(session):
    """The export builds and Inductor's kernels are queued now, in the background, when a selected test needs them
    (tests/prebuild.py)."""
    wanted = {f: any(f in getattr(item, "fixturenames", ()) for item in session.items)
              for f in ("cli_builds", "inductor_cache")}
    if any(wanted.values()) and not session.config.option.collectonly:
        import prebuild
        prebuild.start(exports=wanted["cli_builds"], inductor=wanted["inductor_cache"])


def pytest_sessionfinish(session, exitstatus):
    if "prebuild" in sys.modules:
        sys.modules["prebuild"].stop()
