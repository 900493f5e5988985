"""kernels/beam_topk.py against float64: each prompt's best k of log_softmax(logits) + scores over beams x vocab."""

import pytest
import torch

pytest.importorskip("triton")

from kernels.beam_topk import beam_topk, beam_topk_reference  # noqa: E402


def _float64_best(logits, scores, nb, k):
    """(values, flat indices) by value descending, index ascending, in float64."""
    R, V = logits.shape
    cand = (torch.log_softmax(logits.double(), dim=-1) + scores.double().reshape(-1, 1)).view(R // nb, nb * V)
    idx = torch.arange(nb * V).expand_as(cand)
    out_s, out_i = [], []
    for row, ids in zip(cand, idx):
        order = sorted(range(len(row)), key=lambda j: (-row[j].item(), ids[j].item()))[:k]
        out_s.append(row[order])
        out_i.append(ids[order])
    return torch.stack(out_s), torch.stack(out_i)


@pytest.mark.parametrize("B,nb,V,tile", [
    (1, 4, 1000, 256),    # V not a multiple of the tile
    (2, 4, 3000, 1024),
    (3, 2, 777, 128),
    (2, 3, 100, 1024),    # one partial tile; nb not a power of two
    (1, 1, 5000, 512),    # one beam (k = 2)
])
def test_beam_topk_matches_float64(B, nb, V, tile):
    g = torch.Generator().manual_seed(B * 100 + V)
    logits = torch.randn(B * nb, V, generator=g) * 3
    scores = torch.randn(B * nb, generator=g) * 2
    k = 2 * nb
    s, i = beam_topk(logits, scores, nb, k, tile=tile)
    want_s, want_i = _float64_best(logits, scores, nb, k)
    assert s.dtype == torch.float32 and i.dtype == torch.int64 and s.shape == i.shape == (B, k)
    assert torch.equal(i, want_i)
    assert torch.allclose(s.double(), want_s, rtol=0, atol=2e-6)
    ref_s, ref_i = beam_topk_reference(logits, scores, nb, k)  # the tensor form: same picks here (no near-ties)
    assert torch.equal(i, ref_i) and torch.allclose(s, ref_s, rtol=0, atol=2e-6)


def test_beam_topk_ties_go_to_the_lower_flat_index():
    """Equal logits in a row give equal values: the lower index (beam * V + token) first; a row whose log-sum-exp is
    larger ranks below; the running beams' -1e9 (not yet live) keep their rows out."""
    x = torch.zeros(4, 300)
    x[:, 5] = x[:, 7] = 2.0
    x[2, 9] = 2.0  # row 2: a larger log-sum-exp, so its 2.0 entries score lower than the other rows'
    s, i = beam_topk(x, torch.zeros(4), 4, 8, tile=128)
    assert i.tolist() == [[5, 7, 305, 307, 905, 907, 605, 607]]
    assert s[0, 0] == s[0, 5] and s[0, 6] < s[0, 5]
    scores = torch.tensor([0.0, -1e9, -1e9, -1e9])  # the first step: only beam 0 is live
    _, i = beam_topk(torch.randn(4, 300), scores, 4, 8, tile=64)
    assert (i < 300).all()


def test_beam_topk_writes_given_buffers_and_refuses_bad_shapes():
    logits, scores = torch.randn(8, 200), torch.randn(8)
    out = (torch.empty(2, 8), torch.empty(2, 8, dtype=torch.int64))
    s, i = beam_topk(logits, scores, 4, 8, out=out, tile=64)
    assert s.data_ptr() == out[0].data_ptr() and i.data_ptr() == out[1].data_ptr()
    assert torch.equal(i, _float64_best(logits, scores, 4, 8)[1])
    with pytest.raises(ValueError, match="for 3 beams"):
        beam_topk(logits, scores, 3, 6)
    with pytest.raises(ValueError, match="tile must be a power of two >= k"):
        beam_topk(logits, scores, 4, 8, tile=4)
