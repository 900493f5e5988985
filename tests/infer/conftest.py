import os

import pytest
import torch

# The runner's tests use tiny models: one thread is faster than two spinning on a shared machine.
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    """Tests marked slow (the Triton interpreter) run only with PGMOE_SLOW_TESTS=1."""
    if os.environ.get("PGMOE_SLOW_TESTS") == "1":
        return
    skip = pytest.mark.skip(reason="slow; set PGMOE_SLOW_TESTS=1")
    for item in items:
        if "slow" in item.keywords and "tests/infer" in str(item.fspath):
            item.add_marker(skip)
