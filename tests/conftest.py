"""Support shared by tests/unit and tests/integration.

pytest imports this file with its folder, tests/, put on sys.path (the default "prepend" import mode, tests/
being no package), so test files in either folder import the support modules beside it by name, e.g.
`from clips import sliding_clip`. A child process that imports a test module needs tests/ on its path too.
"""

import pytest


@pytest.fixture
def one_thread():
    """One intra-op thread: on two shared cores under load, two OpenMP threads waiting on each other made the 10 x 3
    test of integration/test_eval_tools.py take 83 s instead of 1.4 s on 4 videos (the tool subprocesses run with
    OMP_NUM_THREADS=1 for this reason). A module takes it with pytest.mark.usefixtures("one_thread")."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
