"""gather_rows: the device-driven expert copy equals its reference (Triton interpreter on CPU)."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from kernels.expert_copy import gather_rows, gather_rows_reference  # noqa: E402


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("C,block,progs", [(1000, 128, 3), (4096, 4096, 1), (77, 64, 4)])
def test_gather_rows_matches_reference(dtype, C, block, progs):
    g = torch.Generator().manual_seed(C)
    src = torch.randn(9, C, generator=g).to(dtype)
    ids = torch.tensor([4, 0, 8, 4, -1], dtype=torch.int32)
    dst_rows = torch.tensor([2, 0, 5, 1, 3], dtype=torch.int32)
    want = torch.randn(6, C, generator=g).to(dtype)
    got = want.clone()
    gather_rows_reference(src, ids, want, dst_rows)
    gather_rows(src, ids, got, dst_rows, num_programs=progs, block=block)
    assert torch.equal(got, want)
    assert torch.equal(got[5], src[8]) and torch.equal(got[1], src[4])


def test_gather_rows_identity_rows_and_errors():
    src = torch.randn(5, 300)
    dst = torch.randn(3, 300)
    gather_rows(src, torch.tensor([3, 1, 4]), dst, block=128)
    assert torch.equal(dst, src[[3, 1, 4]])
    with pytest.raises(ValueError, match="row size and dtype"):
        gather_rows(src, torch.tensor([0]), torch.zeros(1, 299))


@pytest.mark.parametrize("cols,block,progs", [(1, 64, 2), (257, 128, 3), (1000, 4096, 1)])
def test_gather_rows_copies_a_prefix(cols, block, progs):
    """cols: each row's first cols elements (expv's used prefix); the rest of the destination row is left alone."""
    g = torch.Generator().manual_seed(cols)
    src = torch.randn(4, 1000, generator=g)
    ids = torch.tensor([3, -1, 0], dtype=torch.int64)
    got = torch.full((3, 1000), -5.0)
    want = gather_rows_reference(src, ids, got.clone(), cols=cols)
    gather_rows(src, ids, got, num_programs=progs, block=block, cols=cols)
    assert torch.equal(got, want)
    assert torch.equal(got[0, :cols], src[3, :cols]) and bool((got[0, cols:] == -5.0).all())
    assert bool((got[1] == -5.0).all())
    for bad in (0, 1001):
        with pytest.raises(ValueError, match="cols must be in 1..1000"):
            gather_rows(src, ids, got, cols=bad)
