"""The spin-wait kernel of scripts/probe_host_dma.py (under TRITON_INTERPRET=1 on the CPU): a set flag
is consumed (cleared) without a timeout; an unset flag times out after MAX_ITERS polls, counts the
timeout and still clears the flag (the GPU never hangs on a missing copy)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def probe():
    spec = importlib.util.spec_from_file_location("probe_host_dma", ROOT / "scripts" / "probe_host_dma.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    if mod.triton is None:
        pytest.skip("triton missing")
    return mod


def test_set_flag_is_consumed(probe):
    flag = torch.tensor([1], dtype=torch.int32)
    err = torch.zeros(1, dtype=torch.int32)
    probe.wait_flag(flag, err, max_iters=5)
    assert flag.item() == 0 and err.item() == 0


def test_unset_flag_times_out_and_counts(probe):
    flag = torch.tensor([0], dtype=torch.int32)
    err = torch.zeros(1, dtype=torch.int32)
    probe.wait_flag(flag, err, max_iters=3)
    probe.wait_flag(flag, err, max_iters=3)
    assert flag.item() == 0 and err.item() == 2
