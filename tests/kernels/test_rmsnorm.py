"""The one-kernel RMS norm equals the T5 reference (Triton interpreter on the CPU)."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from kernels.rmsnorm import rmsnorm, rmsnorm_reference  # noqa: E402


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2), (torch.float16, 2e-3)])
@pytest.mark.parametrize("shape", [(1, 1, 64), (3, 5, 77), (2, 768)])
def test_rmsnorm_matches_reference(dtype, tol, shape):
    g = torch.Generator().manual_seed(sum(shape))
    x = (torch.randn(shape, generator=g) * 3).to(dtype)
    w = (1 + 0.1 * torch.randn(shape[-1], generator=g)).to(dtype)
    ref = rmsnorm_reference(x.double(), w.double(), 1e-6)
    got = rmsnorm(x, w, 1e-6, force_triton=True)
    torch_own = rmsnorm_reference(x, w, 1e-6)
    assert got.dtype == torch_own.dtype and got.shape == x.shape
    err = ((got.double() - ref).norm() / ref.norm()).item()
    assert err <= max(tol, 2 * ((torch_own.double() - ref).norm() / ref.norm()).item()), err


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1, 64), (3, 5, 77), (2, 768)])
def test_add_rmsnorm_is_the_add_then_the_norm_bitwise(dtype, shape):
    """add_rmsnorm's sum is torch's h + y and its norm the one-kernel norm of that sum, bit for bit (what the decoder
    ran before the fusion), and both within the fp64 reference's tolerance."""
    from kernels.rmsnorm import add_rmsnorm, add_rmsnorm_supported

    g = torch.Generator().manual_seed(7 + sum(shape))
    h = (torch.randn(shape, generator=g) * 3).to(dtype)
    y = (torch.randn(shape, generator=g) * 2).to(dtype)
    w = (1 + 0.1 * torch.randn(shape[-1], generator=g)).to(dtype)
    assert add_rmsnorm_supported(h, y, force_triton=True)
    s, o = add_rmsnorm(h, y, w, 1e-6, force_triton=True)
    assert s.dtype == dtype and s.shape == h.shape and o.shape == h.shape
    assert torch.equal(s, h + y)
    assert torch.equal(o, rmsnorm(h + y, w, 1e-6, force_triton=True))
    ref = rmsnorm_reference((h + y).double(), w.double(), 1e-6)
    err = ((o.double() - ref).norm() / ref.norm()).item()
    assert err <= (1e-6 if dtype == torch.float32 else 1e-2), err


def test_add_rmsnorm_falls_back_where_the_kernel_does_not_apply():
    """fp16 (the model clamps its residual), a broadcast or mixed dtypes: torch's add and the norm, same results."""
    from kernels.rmsnorm import add_rmsnorm, add_rmsnorm_supported

    g = torch.Generator().manual_seed(3)
    w = 1 + 0.1 * torch.randn(32, generator=g)
    cases = [(torch.randn(2, 32, generator=g).half(), torch.randn(2, 32, generator=g).half(), w.half()),
             (torch.randn(2, 32, generator=g), torch.randn(1, 32, generator=g), w),
             (torch.randn(2, 32, generator=g), torch.randn(2, 32, generator=g).double(), w)]
    for h, y, wt in cases:
        assert not add_rmsnorm_supported(h, y, force_triton=True)
        s, o = add_rmsnorm(h, y, wt, 1e-6, force_triton=True)
        assert torch.equal(s, h + y)
        assert torch.equal(o, rmsnorm(h + y, wt, 1e-6, force_triton=True))
