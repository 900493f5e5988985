"""The in-place reorder of the written cache positions (interpreter, CPU): rows r <- rows src[r] over the first
pos * unit elements of each slab, bitwise the gather's there, every other element untouched; any src (a
permutation with cycles, repeated sources, the identity, a row that moves to where another row moves from);
through DecodeState.reorder, a beam step's logits equal to the gather's."""

import os

import pytest
import torch

pytest.importorskip("triton")

from kernels import kv_reorder  # noqa: E402


@pytest.fixture
def forced(monkeypatch):
    monkeypatch.setenv("PGMOE_FORCE_TRITON", "1")


SRCS = [
    [1, 2, 3, 0],           # one cycle: every row reads a row another program-row writes
    [2, 2, 0, 3],           # a repeated source, a fixed row
    [0, 1, 2, 3],           # the identity: nothing moves
    [3, 3, 3, 3],
    [1, 0, 4, 4, 2],        # five rows (not a power of two)
]


@pytest.mark.parametrize("src", SRCS)
@pytest.mark.parametrize("pos", [0, 1, 5, 9])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reorder_written_against_the_gather(forced, src, pos, dtype):
    torch.manual_seed(len(src) * 10 + pos)
    S, H, T, Dh = 3, 2, 9, 8
    B = len(src)
    buf = torch.randn(S, B, H, T * Dh).to(dtype)
    src_t = torch.tensor(src)
    want = buf.clone()
    kv_reorder.reorder_reference(want, src_t)
    got = buf.clone()
    assert kv_reorder.supported(got)
    kv_reorder.reorder_written(got, src_t, torch.tensor([pos]), unit=Dh)
    n = pos * Dh
    assert torch.equal(got[..., :n], want[..., :n])
    assert torch.equal(got[..., n:], buf[..., n:])  # past the written positions: untouched


def test_reorder_written_tiles_a_long_slab(forced, monkeypatch):
    """More positions than one program's tile: every tile of the written prefix moves, the tile the prefix ends
    inside moves up to it."""
    monkeypatch.setattr(kv_reorder, "TILE", 64)
    torch.manual_seed(3)
    S, B, H, T, Dh = 2, 4, 1, 40, 4
    buf = torch.randn(S, B, H, T * Dh)
    src = torch.tensor([3, 0, 1, 1])
    want = buf.clone()
    kv_reorder.reorder_reference(want, src)
    got = buf.clone()
    kv_reorder.reorder_written(got, src, torch.tensor(37), unit=Dh)  # a 0-d position too
    assert torch.equal(got[..., :37 * Dh], want[..., :37 * Dh])
    assert torch.equal(got[..., 37 * Dh:], buf[..., 37 * Dh:])


def test_reorder_written_takes_an_expanded_src(forced):
    """An index with stride 0 (every row from row 0, as BeamSelect.reset makes for one prompt): read densely."""
    torch.manual_seed(4)
    buf = torch.randn(2, 4, 1, 24)
    src = torch.zeros(1, 1, dtype=torch.long).expand(1, 4).reshape(-1)
    assert src.stride() == (0,)
    want = buf.clone()
    kv_reorder.reorder_reference(want, src)
    kv_reorder.reorder_written(buf, src, torch.tensor([6]), unit=4)
    assert torch.equal(buf, want)


def test_reorder_written_rejects_a_mismatched_src():
    buf = torch.randn(2, 4, 1, 8)
    with pytest.raises(ValueError, match=r"src must be \[4\]"):
        kv_reorder.reorder_written(buf, torch.tensor([0, 1, 2]), torch.tensor([1]), unit=2)


def test_without_the_kernel_every_position_is_gathered(monkeypatch):
    monkeypatch.delenv("PGMOE_FORCE_TRITON", raising=False)
    buf = torch.randn(2, 3, 1, 8)
    src = torch.tensor([2, 0, 0])
    want = buf.clone()
    kv_reorder.reorder_reference(want, src)
    assert not kv_reorder.supported(buf)
    kv_reorder.reorder_written(buf, src, torch.tensor([1]), unit=2)
    assert torch.equal(buf, want)


@pytest.mark.parametrize("setting", ["1", "0"])
def test_beam_steps_after_the_reorder_equal_the_gathers(forced, monkeypatch, setting):
    """Switch's decode steps with the self caches reordered between them by the kernel (or, PGMOE_KV_REORDER=0, the
    gather): the logits of the next steps equal those after the gather of every position, bitwise; positions past
    the written ones do not count (the causal mask)."""
    from tests.tiny_decode import tiny_model_two_states

    monkeypatch.setenv("PGMOE_KV_REORDER", setting)
    model, tok, ref, got = tiny_model_two_states(max_len=6)
    with torch.no_grad():
        for st in (ref, got):
            st.self_kv.copy_(torch.randn_like(st.self_kv))  # stale values past the written positions: not zeros
            model.decode_one_token(st, tok)
            model.decode_one_token(st, tok.flip(0))
        for rows in ([2, 2, 0, 3], [1, 2, 3, 0]):
            index = torch.tensor(rows)
            got.reorder(index, cross=False)
            kv = ref.self_kv.flatten(0, 1).flatten(3)
            kv_reorder.reorder_reference(kv, index)
            want = model.decode_one_token(ref, tok)
            out = model.decode_one_token(got, tok)
            assert torch.equal(out, want)
    assert os.environ["PGMOE_KV_REORDER"] == setting
