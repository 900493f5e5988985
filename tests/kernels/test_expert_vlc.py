"""expv packed expert rows (kernels/expert_vlc.py): pack -> unpack is bitwise lossless, every level of the code is
exercised (a group whose 16 elements all reach level 4 among them), the Triton unpack kernel (interpreter on CPU)
equals the plain-torch reference bitwise, and the copied prefix is smaller than exp4's row on normal weights."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

import kernels.expert_vlc as ev  # noqa: E402
from kernels import expert_pack  # noqa: E402
from kernels.expert_pack import G, PackError  # noqa: E402
from kernels.expert_vlc import (  # noqa: E402
    LEVELS,
    decode_codes_reference,
    layout,
    pack_rows,
    unpack_rows,
    unpack_rows_gather_reference,
    unpack_rows_reference,
)
from tests.kernels.test_expert_pack import _special_rows  # noqa: E402

DEV = "cpu"


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16)


def _skewed_rows(X: int, g: torch.Generator, n: int = 3) -> torch.Tensor:
    """Rows whose exponents lie 0..14 binades below a largest present in every group of G, with a geometric skew (as
    trained and random weights have), random signs and mantissas; in row 0, the 16 elements of tile 0's group 3 (the
    kernel's lane 3: elements 3, 3 + T/16, ..) and a few more take the row's rarest exponents, so that they all reach
    level 4."""
    d = torch.distributions.Geometric(probs=torch.tensor(0.45)).sample((n, X)).long().clamp(max=14)
    d[:, ::G] = 0  # the group's largest exponent: 2^0
    d[0, 1] = 14
    T = layout(X).T
    lane = 3 + (T // 16) * torch.arange(16)
    lane = lane[lane < X]
    lane = lane[lane % G != 0]
    d[0, lane] = 14 - torch.arange(lane.numel()) % 5  # 10..14: the rarest
    sign = torch.randint(0, 2, (n, X), generator=g) << 15
    mant = torch.randint(0, 128, (n, X), generator=g)
    bits = sign | ((127 - d) << 7) | mant
    return torch.where(bits >= 32768, bits - 65536, bits).to(torch.int16).view(torch.bfloat16)


def _ranks(packed: torch.Tensor, lay) -> torch.Tensor:
    """The rank of each element's code in its row's frequency order (from the decoded codes and the row's table)."""
    codes = decode_codes_reference(packed, lay)
    out = torch.empty_like(codes)
    for r in range(packed.shape[0]):
        perm = int(packed[r, lay.off_perm:lay.off_perm + 8].contiguous().view(torch.int64)) & ((1 << 64) - 1)
        rank_of = {(perm >> (4 * k)) & 15: k for k in range(16)}
        out[r] = torch.tensor([rank_of[c] for c in range(16)])[codes[r]]
    return out


@pytest.mark.parametrize("X", [G, 300, 77, 1, 1025, 4096 + 3])
def test_pack_unpack_reference_lossless(X):
    g = torch.Generator().manual_seed(X)
    w = _special_rows(X, g).to(DEV)
    lay = layout(X, cap=max(64, X), stream_bits=8.0)  # random bit patterns need more than 4 bits of codes
    packed, used = pack_rows(w, lay)
    assert packed.dtype == torch.uint8 and packed.shape == (w.shape[0], lay.nbytes)
    assert used.shape == (w.shape[0],) and bool((used <= lay.nbytes).all()) and bool((used > lay.off_stream).all())
    got = unpack_rows_reference(packed, lay)
    assert got.dtype == torch.bfloat16 and got.shape == w.shape
    assert torch.equal(_bits(got), _bits(w))
    # only each row's used prefix matters: the bytes past it are zero
    for r in range(w.shape[0]):
        assert not packed[r, int(used[r]):].any()


def test_every_level_and_full_windows():
    """Skewed exponents: every level of the code is used, a lane's group has all 16 of its elements at level 4
    (its level-2 and level-3 windows full), and the kernel and the reference give the weights back bitwise."""
    X = 3 * 4096 + 40
    g = torch.Generator().manual_seed(7)
    w = _skewed_rows(X, g)
    lay = layout(X)
    packed, used = pack_rows(w, lay)
    ranks = _ranks(packed, lay)
    for first, _ in LEVELS:
        assert int((ranks >= first).sum()) > 0, first
    T = lay.T
    lane3 = 3 + (T // 16) * torch.arange(16)
    assert int((ranks[0, lane3] >= 9).sum()) >= 15  # (one of them may be its group's largest)
    assert torch.equal(_bits(unpack_rows_reference(packed, lay)), _bits(w))
    out = torch.full_like(w, -3.0)
    unpack_rows(packed, torch.arange(w.shape[0]), out, lay, num_programs=2)
    assert torch.equal(_bits(out), _bits(w))


@pytest.mark.parametrize("X,tile,progs", [(300, 128, 3), (1000, 256, 4), (G, None, 2), (5000, 1024, 3),
                                          (2 * 4096 + 7, None, 1), (2 * 4096 + 7, None, 5)])
def test_unpack_rows_kernel_matches_reference(X, tile, progs):
    """The kernel bitwise the reference: one tile and several, more programs than tiles, X not a multiple of G or
    of the tile, exceptions, negative ids and destination rows left alone."""
    g = torch.Generator().manual_seed(X + (tile or 0))
    w = torch.cat([_special_rows(X, g), _skewed_rows(X, g)]).to(DEV)
    E = w.shape[0]
    lay = layout(X, cap=max(64, X), tile=tile, stream_bits=8.0)
    src, _ = pack_rows(w, lay)
    ids = torch.tensor([2, -1, E - 2, 0, 5, E - 1, 3], dtype=torch.int32, device=DEV)
    dst_rows = torch.tensor([4, 0, 1, -1, 7, 2, 3], dtype=torch.int64, device=DEV)
    sentinel = torch.full((9, X), -7.0, dtype=torch.bfloat16, device=DEV)
    want = unpack_rows_gather_reference(src, ids, sentinel.clone(), lay, dst_rows)
    got = unpack_rows(src, ids, sentinel.clone(), lay, dst_rows, num_programs=progs, exc_chunk=16)
    assert torch.equal(_bits(got), _bits(want))
    for i, r in zip(ids.tolist(), dst_rows.tolist()):
        if i >= 0 and r >= 0:
            assert torch.equal(_bits(got[r]), _bits(w[i]))
    for r in (0, 5, 6, 8):  # untouched: no id for them, or a negative id / dst row
        assert torch.equal(_bits(got[r]), _bits(sentinel[r]))


def test_fewer_bytes_than_exp4_on_normal_weights():
    """Normal weights (as the benchmark draws them): the copied prefix under 0.91 of exp4's row, within 2% of the
    bound the code's lengths give (level fields' bits per weight, counted from the ranks)."""
    X = 4 * 4096
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(2, X, generator=g) * 0.03).to(torch.bfloat16)
    lay = layout(X)
    packed, used = pack_rows(w, lay)
    assert int(used.max()) < 0.91 * expert_pack.layout(X).nbytes
    counts = torch.bincount(_ranks(packed, lay)[0], minlength=16)
    bits = ev.code_bits(counts)
    assert 2.4 < bits / X < 2.8
    assert int(used[0]) <= lay.off_stream + bits / 8 * 1.02 + 4 * (lay.K + 2) + 128
    assert torch.equal(_bits(unpack_rows_reference(packed, lay)), _bits(w))


def test_layout_alignment():
    for X in (1, 77, 128, 300, 1025, 4096, 4096 * 2048 + 5):
        for cap in (None, 0, 65):
            lo = layout(X, cap)
            assert lo.Xg == lo.K * lo.T and lo.Xg >= X > lo.Xg - lo.T and lo.T % G == 0
            assert lo.T == (4096 if X >= 4096 else max(G, 1 << (X - 1).bit_length()))
            assert lo.off_perm % 8 == 0 and lo.off_tile % 4 == 0 and lo.off_cnt % 4 == 0 and lo.off_stream % 128 == 0
            assert lo.off_perm >= lo.off_base + lo.Xg // G and lo.off_val + 2 * lo.cap <= lo.off_stream
            assert lo.nbytes % (4096 if lo.nbytes >= 1 << 20 else 128) == 0
            assert lo.words * 4 == lo.nbytes - lo.off_stream >= lo.Xg * ev.STREAM_BITS / 8
    for bad in (64, 300, 0):
        with pytest.raises(ValueError, match="tile must be a power of two >= 128"):
            layout(1000, tile=bad)


def test_capacity_overflow_raises():
    X = 4 * G
    g = torch.Generator().manual_seed(3)
    w = _special_rows(X, g)
    with pytest.raises(PackError, match=r"row \d+ needs \d+ bits of exponent codes .*stream_bits.*or use exp4"):
        pack_rows(w, layout(X, cap=X, stream_bits=1.0))
    w2 = torch.randn(2, X, generator=g)
    w2[1] = torch.randn(X, generator=g) * 1e-30
    w2[1, ::G] = 1e30
    with pytest.raises(PackError, match=r"row 1 has \d+ exceptions.*cap=64"):
        pack_rows(w2.to(torch.bfloat16), layout(X))


def test_bad_inputs_raise():
    lay = layout(300)
    w = torch.randn(2, 300)
    with pytest.raises(ValueError, match="bfloat16"):
        pack_rows(w, lay)
    with pytest.raises(ValueError, match=r"\[N, 300\]"):
        pack_rows(w[:, :299].to(torch.bfloat16), lay)
    src, _ = pack_rows(w.to(torch.bfloat16), lay)
    ids = torch.tensor([0, 1])
    with pytest.raises(ValueError, match="dst bfloat16"):
        unpack_rows(src, ids, torch.zeros(2, 300), lay)
    with pytest.raises(ValueError, match="src"):
        unpack_rows(src[:, :-16].contiguous(), ids, torch.zeros(2, 300, dtype=torch.bfloat16), lay)
    with pytest.raises(ValueError, match="dst_row"):
        unpack_rows(src, ids, torch.zeros(2, 300, dtype=torch.bfloat16), lay, torch.tensor([0]))
    with pytest.raises(ValueError, match="num_programs must be >= 1"):
        unpack_rows(src, ids, torch.zeros(2, 300, dtype=torch.bfloat16), lay, num_programs=0)
    with pytest.raises(ValueError, match="uint8"):
        unpack_rows_reference(src.view(torch.int16), lay)


def test_probe_script_smoke_on_the_cpu(tmp_path):
    """scripts/probe_expert_vlc.py on the CPU (interpreter): a small shape packs, every check is bitwise, and the
    markdown lists it (no timings without a GPU)."""
    from scripts import probe_expert_vlc

    doc = probe_expert_vlc.main(["--out", str(tmp_path / "p.json")])
    (rec,) = doc["shapes"]
    assert rec["shape"] == "tiny" and all(rec["bitwise_equal"].values()) and len(rec["bitwise_equal"]) == 2
    assert rec["expv_used_bytes_max"] < rec["exp4_bytes"]
    assert "| tiny |" in (tmp_path / "p.md").read_text()
