"""Routing and grouping: the Triton kernels (interpreter, CPU) against the references, and the reference
against a naive per-token loop. Tolerances: fp32 logits, so probabilities agree to 1e-4 relative (they
agree to ~1e-7); ids must be equal except where two probabilities are within 1e-6 (a near-tie that
accumulation order may break either way)."""

import pytest
import torch

pytest.importorskip("triton")

from kernels import routing  # noqa: E402
from kernels.routing import (  # noqa: E402
    group_by_slot,
    group_by_slot_reference,
    max_tiles,
    route,
    route_reference,
    route_triton,
)

D = 40  # not a multiple of any BLOCK_D


def _naive_route(x, w_ED, k, renormalize):
    """One token at a time in float64, sorted by (-p, index): the definition, slowly."""
    ids, wts = [], []
    for t in range(x.shape[0]):
        p = torch.softmax(w_ED.double() @ x[t].double(), dim=0).tolist()
        top = sorted(range(len(p)), key=lambda e: (-p[e], e))[:k]
        s = sum(p[e] for e in top) if renormalize else 1.0
        ids.append(top)
        wts.append([p[e] / s for e in top])
    return torch.tensor(ids, dtype=torch.int32), torch.tensor(wts, dtype=torch.float64)


def _check(ids, wts, ref_ids, ref_wts, probs_TE):
    assert ids.dtype == torch.int32 and wts.dtype == torch.float32 and ids.shape == ref_ids.shape
    diff = ids != ref_ids
    if diff.any():  # only near-ties may differ
        gap = probs_TE.gather(-1, ids.long()) - probs_TE.gather(-1, ref_ids.long())
        assert gap[diff].abs().max() <= 1e-6, f"{diff.sum()} ids differ beyond a near-tie"
    rel = (wts.double() - ref_wts.double()).norm() / ref_wts.double().norm()
    assert rel <= 1e-4, rel


@pytest.mark.parametrize(
    "E,k,renormalize", [(1, 1, False), (7, 2, True), (7, 3, False), (128, 1, False), (128, 2, True)]
)
def test_reference_matches_naive_loop(E, k, renormalize):
    g = torch.Generator().manual_seed(E * 10 + k)
    x, w = torch.randn(9, D, generator=g), torch.randn(E, D, generator=g)
    ids, wts = route_reference(x, w, k=k, renormalize=renormalize)
    n_ids, n_wts = _naive_route(x, w, k, renormalize)
    probs = torch.softmax(x.double() @ w.double().t(), -1)
    _check(ids, wts, n_ids, n_wts, probs)


GRID = [(T, E, k) for T in (1, 3, 64, 257) for E in (1, 7, 8, 128) for k in (1, 2) if k <= E]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T,E,k", GRID)
def test_route_triton_matches_reference(T, E, k, dtype):
    g = torch.Generator().manual_seed(T * 1000 + E * 10 + k)
    x = torch.randn(T, D, generator=g).to(dtype)
    w = (torch.randn(E, D, generator=g) * 0.3).to(dtype)
    renormalize = (T + k) % 2 == 1  # both settings over the grid, half the runs
    ids, wts = route_triton(x, w, k=k, renormalize=renormalize)
    ref_ids, ref_wts = route_reference(x, w, k=k, renormalize=renormalize)
    _check(ids, wts, ref_ids, ref_wts, torch.softmax(x.double() @ w.double().t(), -1))


@pytest.mark.parametrize("config", [None, {"BLOCK_T": 32, "BLOCK_D": 16, "num_warps": 4, "num_stages": 2}])
def test_stacked_gates_and_strided_x(config):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(70, 2 * D, generator=g)[:, ::2]  # non-contiguous rows
    w = torch.randn(2, 8, D, generator=g)  # [G, E, d]: a block's own gate and its pre-gate
    ids, wts = route_triton(x, w, k=2, renormalize=True, config=config)
    assert ids.shape == (2, 70, 2)
    for gi in range(2):
        ref_ids, ref_wts = route_reference(x, w[gi], k=2, renormalize=True)
        _check(ids[gi], wts[gi], ref_ids, ref_wts, torch.softmax(x.double() @ w[gi].double().t(), -1))


@pytest.mark.parametrize("k", [1, 2])
def test_ties_go_to_lower_index(k):
    # Small-integer data: every logit is exact in fp32 whatever the summation order, so ties are exact.
    g = torch.Generator().manual_seed(k)
    signs = torch.randint(0, 2, (20, D), generator=g) * 2 - 1
    x = (torch.randint(1, 4, (20, D), generator=g) * signs).float()
    w = torch.randint(-2, 3, (8, D), generator=g).float() / 8
    w[2] = w[5] = w[6] = torch.sign(x[0])  # experts 2, 5, 6 tie everywhere and win token 0
    ids, _ = route_triton(x, w, k=k)
    ref_ids, _ = route_reference(x, w, k=k)
    n_ids, _ = _naive_route(x, w, k, False)
    assert torch.equal(ids, ref_ids) and torch.equal(ref_ids, n_ids)
    assert ids[0, 0] == 2 and (k == 1 or ids[0, 1] == 5)


def test_route_dispatch(monkeypatch):
    x, w = torch.randn(4, D), torch.randn(7, D)
    monkeypatch.delenv("PGMOE_FORCE_TRITON", raising=False)
    assert not routing.use_triton(x, w)  # CPU without the switch: the reference
    monkeypatch.setenv("PGMOE_FORCE_TRITON", "1")
    assert routing.use_triton(x, w)
    ids, wts = route(x, w, k=2)
    ref_ids, ref_wts = route_reference(x, w, k=2)
    _check(ids, wts, ref_ids, ref_wts, torch.softmax(x.double() @ w.double().t(), -1))
    assert not routing.use_triton(x, w.requires_grad_())  # autograd needs the reference
    with pytest.raises(ValueError):
        route_triton(x, w.detach(), k=8)


@pytest.mark.parametrize(
    "T,k,S,block_m,case",
    [(1, 1, 8, 16, "random"), (3, 2, 7, 16, "random"), (257, 2, 128, 16, "random"), (257, 1, 8, 64, "random"),
     (64, 2, 8, 16, "two-experts"), (257, 1, 7, 16, "one-expert"), (40, 2, 10, 32, "slot-map")],
)
def test_group_by_slot_matches_reference(T, k, S, block_m, case):
    g = torch.Generator().manual_seed(T + S)
    slot_map = None
    if case == "random":
        ids = torch.randint(0, S, (T, k), generator=g, dtype=torch.int32)
    elif case == "two-experts":  # every other slot empty
        ids = torch.tensor([2, 5], dtype=torch.int32)[torch.randint(0, 2, (T, k), generator=g)]
    elif case == "one-expert":
        ids = torch.full((T, k), 3, dtype=torch.int32)
    else:  # 7 experts placed in 10 slots, in no order
        slot_map = torch.randperm(S, generator=g)[:7].to(torch.int32)
        ids = torch.randint(0, 7, (T, k), generator=g, dtype=torch.int32)
    got = group_by_slot(ids, S, block_m, slot_map)
    want = group_by_slot_reference(ids, S, block_m, slot_map)
    n = max_tiles(T * k, S, block_m)
    assert got.sorted_ids.shape == (n * block_m,) and got.tile_slot.shape == (n,)
    for name in ("sorted_ids", "tile_slot", "counts", "offsets"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    # What the GEMMs rely on: each token slot exactly once, in a tile of its own weight slot.
    slots = (slot_map.long()[ids.reshape(-1).long()] if slot_map is not None else ids.reshape(-1).long())
    pos = got.sorted_ids.long()
    valid = pos < T * k
    assert torch.equal(pos[valid].sort().values, torch.arange(T * k))
    tile_of_pos = torch.arange(pos.numel()) // block_m
    assert torch.equal(got.tile_slot.long()[tile_of_pos[valid]], slots[pos[valid]])


@pytest.mark.parametrize("T,E,k", [(1, 40, 1), (16, 7, 2)])
def test_route_split_gate(T, E, k):
    # Gate read split over E tiles and d chunks, last-arriving program does softmax/top-k (small T).
    g = torch.Generator().manual_seed(T + E)
    x = torch.randn(T, D, generator=g)
    w = torch.randn(2, E, D, generator=g) * 0.3
    cfg = {"BLOCK_T": 16, "BLOCK_D": 16, "TILE_E": 16, "SPLIT_D": 2, "num_warps": 4, "num_stages": 2}
    for _ in range(2):  # the second call relies on the counters having been reset
        ids, wts = route_triton(x, w, k=k, renormalize=k > 1, config=cfg)
        for gi in range(2):
            ref_ids, ref_wts = route_reference(x, w[gi], k=k, renormalize=k > 1)
            _check(ids[gi], wts[gi], ref_ids, ref_wts, torch.softmax(x.double() @ w[gi].double().t(), -1))
