"""exp4 packed expert rows: pack -> unpack is bitwise lossless, and the Triton unpack kernel (interpreter on CPU)
equals the plain-torch reference bitwise."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

import kernels.expert_pack as ep  # noqa: E402
from kernels.expert_pack import (  # noqa: E402
    G,
    PackError,
    layout,
    pack_rows,
    unpack_rows,
    unpack_rows_gather_reference,
    unpack_rows_reference,
)

# the kernel's device: the CPU, as tests/kernels/conftest.py runs Triton's interpreter on every machine
DEV = "cpu"


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16)


def _cnt(packed: torch.Tensor, lay) -> torch.Tensor:
    return packed[:, lay.off_cnt:lay.off_cnt + 4].contiguous().view(torch.int32).flatten()


def _special_rows(X: int, g: torch.Generator) -> torch.Tensor:
    """Rows of random values with zeros, subnormals, +-inf, nan and > 15 binades inside a group."""
    rows = []
    for scale in (1e-3, 1.0, 1e3):
        rows.append(torch.randn(X, generator=g) * scale)
    r = torch.randn(X, generator=g)
    r[torch.rand(X, generator=g) < 0.3] = 0.0
    r[0] = -0.0
    rows.append(r)
    r = torch.randn(X, generator=g) * 1e-39  # subnormal bf16 (smallest normal ~1.2e-38)
    r[::3] = torch.randn(len(r[::3]), generator=g)  # beside normals in the same groups
    rows.append(r)
    r = torch.randn(X, generator=g)
    r[0], r[X // 2], r[-1] = float("inf"), float("-inf"), float("nan")
    rows.append(r)
    r = torch.randn(X, generator=g) * 2.0 ** torch.randint(-60, 60, (X,), generator=g).float()  # many exceptions
    rows.append(r)
    out = torch.stack(rows).to(torch.bfloat16)
    # random bit patterns: every exponent, nan payloads, negative zero, subnormals
    rnd = torch.randint(-32768, 32768, (1, X), generator=g, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    return torch.cat([out, rnd])


@pytest.mark.parametrize("X", [G * 3, 300, 77, 1, 1025])
def test_pack_unpack_reference_lossless(X):
    g = torch.Generator().manual_seed(X)
    w = _special_rows(X, g).to(DEV)
    lay = layout(X, cap=max(64, X))
    packed = pack_rows(w, lay)
    assert packed.dtype == torch.uint8 and packed.shape == (w.shape[0], lay.nbytes) and packed.device == w.device
    got = unpack_rows_reference(packed, lay)
    assert got.dtype == torch.bfloat16 and got.shape == w.shape
    assert torch.equal(_bits(got), _bits(w))
    assert _cnt(packed, lay)[-2] > 0 or X < 16  # the row spanning many binades has exceptions
    # exception indices ascending, unused entries and the padding bytes zero
    cnt = _cnt(packed, lay)
    idx = packed[:, lay.off_idx:lay.off_idx + 4 * lay.cap].contiguous().view(torch.int32)
    for r in range(w.shape[0]):
        c = int(cnt[r])
        assert torch.all(idx[r, 1:c] > idx[r, :max(c - 1, 0)]) and not idx[r, c:].any()
    assert not packed[:, lay.off_val + 2 * lay.cap:].any()


def test_pack_exceptions_where_expected():
    # one group: a large value then small ones 14 and 15 binades below the group's largest exponent
    lay = layout(G, cap=G)
    w = torch.full((1, G), 1.0, dtype=torch.bfloat16)
    w[0, 0] = 2.0 ** 20
    w[0, 1] = 2.0 ** 6  # exponent emax - 14 = base: a code, no exception
    w[0, 2] = -(2.0 ** 5)  # below the base: an exception
    w[0, 3] = 0.0
    packed = pack_rows(w, lay)
    idx = packed[:, lay.off_idx:lay.off_idx + 4 * lay.cap].contiguous().view(torch.int32)
    assert int(_cnt(packed, lay)[0]) == G - 3  # all but [0], [1], [3]
    assert idx[0, :3].tolist() == [2, 4, 5]
    assert int(packed[0, lay.off_base]) == 127 + 20 - 14
    assert torch.equal(_bits(unpack_rows_reference(packed, lay)), _bits(w))


@pytest.mark.parametrize("X,chunk,progs", [(300, 256, 3), (1000, 256, 4), (G, None, 2), (301, 512, 2), (1025, 256, 3),
                                           (2 * G * 5, 256, 2), (5000, 1024, 3)])
@pytest.mark.parametrize("ahead,exc", [(True, None), (False, None), (False, 16)])
def test_unpack_rows_kernel_matches_reference(X, chunk, progs, ahead, exc):
    """The kernel bitwise the reference: one chunk and several, more programs than chunks, X not a multiple of G
    or of the chunk, exceptions in both halves of a chunk; the next chunk's loads issued ahead or not; the
    exceptions all loaded before the chunks (the default exc_chunk here) or 16 of them (the rest after)."""
    g = torch.Generator().manual_seed(X + (chunk or 0))
    w = _special_rows(X, g).to(DEV)
    E = w.shape[0]
    lay = layout(X, cap=max(64, X), chunk=chunk)
    src = pack_rows(w, lay)
    assert int(_cnt(src, lay).max()) > (16 if exc else 0)
    ids = torch.tensor([2, -1, E - 2, 0, 5, E - 1, 3], dtype=torch.int32, device=DEV)
    dst_rows = torch.tensor([4, 0, 1, -1, 7, 2, 3], dtype=torch.int64, device=DEV)
    sentinel = torch.full((9, X), -7.0, dtype=torch.bfloat16, device=DEV)
    want = unpack_rows_gather_reference(src, ids, sentinel.clone(), lay, dst_rows)
    got = unpack_rows(src, ids, sentinel.clone(), lay, dst_rows, num_programs=progs, ahead=ahead, exc_chunk=exc)
    assert torch.equal(_bits(got), _bits(want))
    for i, r in zip(ids.tolist(), dst_rows.tolist()):
        if i >= 0 and r >= 0:
            assert torch.equal(_bits(got[r]), _bits(w[i]))
    for r in (0, 5, 6, 8):  # untouched: no id for them, or a negative id / dst row
        assert torch.equal(_bits(got[r]), _bits(sentinel[r]))


def test_unpack_rows_identity_rows_and_fallback(monkeypatch):
    X = 200
    g = torch.Generator().manual_seed(1)
    w = _special_rows(X, g)
    lay = layout(X, cap=256)
    src = pack_rows(w, lay)
    ids = torch.tensor([6, 1, -1, 5], dtype=torch.int64)
    got = unpack_rows(src, ids, torch.zeros(4, X, dtype=torch.bfloat16), lay, num_programs=2)
    assert torch.equal(_bits(got[[0, 1, 3]]), _bits(w[[6, 1, 5]])) and not got[2].any()
    monkeypatch.setattr(ep, "_interpreting", lambda: False)  # CPU dst, no interpreter: the reference loop
    got2 = unpack_rows(src, ids, torch.zeros(4, X, dtype=torch.bfloat16), lay)
    assert torch.equal(_bits(got2), _bits(got))


def test_packed_size_and_layout_alignment():
    X = 2 * 96 * 64
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, X, generator=g).to(torch.bfloat16)
    lay = layout(X)
    assert lay.nbytes / (2 * X) < 0.8
    packed = pack_rows(w, lay)
    assert int(_cnt(packed, lay).max()) <= 16
    assert torch.equal(_bits(unpack_rows_reference(packed, lay)), _bits(w))
    for X_ in (1, 77, 128, 300, 1025, X, 4096 * 2048 + 5):
        for cap in (None, 0, 1, 63, 65, 1000):
            lo = layout(X_, cap)
            assert lo.Xg == lo.K * lo.T and lo.Xg >= X_ > lo.Xg - lo.T and lo.T % (2 * G) == 0
            assert lo.T == (4096 if X_ >= 4096 else max(2 * G, 1 << (X_ - 1).bit_length()))
            # chunks and rows 128-byte aligned (rows of 1 MiB or more page-aligned), the arrays after the chunks
            assert lo.CB == lo.T * 3 // 2 and lo.CB % 128 == 0 and lo.off_base == lo.K * lo.CB
            assert lo.off_cnt >= lo.off_base + lo.Xg // G and lo.off_cnt % 4 == 0 and lo.off_idx % 4 == 0
            assert lo.off_val % 2 == 0 and lo.nbytes % (4096 if lo.nbytes > 1 << 20 else 128) == 0
            assert lo.nbytes >= lo.off_val + 2 * lo.cap
    assert layout(1000).cap == 64 and layout(1024 * 65).cap == 128
    for bad in (128, 300, 0):
        with pytest.raises(ValueError, match="chunk must be a power of two >= 256"):
            layout(1000, chunk=bad)


def test_capacity_overflow_raises():
    X = 2 * G
    g = torch.Generator().manual_seed(3)
    w = torch.randn(3, X, generator=g)
    w[2] = torch.randn(X, generator=g) * 1e-30
    w[2, ::G] = 1e30  # every other element of the row's groups lies > 15 binades below: 2 * 127 exceptions
    w = w.to(torch.bfloat16)
    with pytest.raises(PackError, match=r"row 2 has 254 exceptions.*cap=64.*larger cap"):
        pack_rows(w, layout(X))
    lay = layout(X, cap=256)  # a larger cap packs it
    assert torch.equal(_bits(unpack_rows_reference(pack_rows(w, lay), lay)), _bits(w))


def test_bad_inputs_raise():
    lay = layout(300)
    w = torch.randn(2, 300)
    with pytest.raises(ValueError, match="bfloat16"):
        pack_rows(w, lay)
    with pytest.raises(ValueError, match=r"\[N, 300\]"):
        pack_rows(w[:, :299].to(torch.bfloat16), lay)
    src = pack_rows(w.to(torch.bfloat16), lay)
    ids = torch.tensor([0, 1])
    with pytest.raises(ValueError, match="dst bfloat16"):
        unpack_rows(src, ids, torch.zeros(2, 300), lay)
    with pytest.raises(ValueError, match="dst bfloat16"):
        unpack_rows(src, ids, torch.zeros(2, 299, dtype=torch.bfloat16), lay)
    with pytest.raises(ValueError, match="src"):
        unpack_rows(src[:, :-16].contiguous(), ids, torch.zeros(2, 300, dtype=torch.bfloat16), lay)
    with pytest.raises(ValueError, match="dst_row"):
        unpack_rows(src, ids, torch.zeros(2, 300, dtype=torch.bfloat16), lay, torch.tensor([0]))
    with pytest.raises(ValueError, match="exc_chunk must be a power of two"):
        unpack_rows(src, ids, torch.zeros(2, 300, dtype=torch.bfloat16), lay, exc_chunk=100)
    with pytest.raises(ValueError, match="uint8"):
        unpack_rows_reference(src.view(torch.int16), lay)


def test_probe_script_smoke_on_the_cpu():
    """scripts/probe_expert_pack.py on the CPU (interpreter): a small shape packs, every unpack path is bitwise the
    input, and the markdown lists it (no timings without a GPU)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "scripts" / "probe_expert_pack.py"
    spec = importlib.util.spec_from_file_location("probe_expert_pack_for_test", path)
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    rec = probe.probe("tiny", 32, 64, torch.device("cpu"), 3, 1)
    assert rec["ratio"] < 0.85 and all(rec["bitwise_equal"].values()) and len(rec["bitwise_equal"]) == 3
    # --compare: another implementation (here this one, loaded from its file) checked beside it
    other = probe.load_module(str(Path(__file__).resolve().parents[2] / "kernels" / "expert_pack.py"))
    rec2 = probe.probe("tiny", 32, 64, torch.device("cpu"), 3, 1, compare={"again": other})
    assert all(rec2["bitwise_equal"].values()) and "from pinned host memory (again)" in rec2["bitwise_equal"]
    # the timing and sweep code, its timers standing in for the CUDA ones (each call runs once, interpreted)
    calls = []

    def per_call(fns, reps):
        for fn in fns[:1]:
            fn()
        calls.append(len(fns))
        return 2.0

    rec3 = probe.probe("tiny", 32, 64, torch.device("cpu"), 3, 1, compare={"again": other}, sweep=True,
                       timers=(per_call, lambda src, dst, n, reps: 1.0))
    assert len(rec3["sweep_landed"]) == len(probe.SWEEP_LANDED) and len(rec3["sweep_pinned"]) == len(probe.SWEEP_PINNED)
    assert rec3["us_per_expert"]["unpack from the pinned store (copy kernel) (again)"] == 2.0 and calls
    md3 = probe.markdown({"device": "cpu", "date": "d", "command": "c", "torch": "t", "shapes": [rec3]})
    assert "the unpack kernel's settings, from the pinned store" in md3
    md = probe.markdown({"device": "cpu", "date": "d", "command": "c", "torch": "t", "shapes": [rec]})
    assert "| tiny | 0.01 | 0.01 |" in md and "| yes |" in md


def test_probe_script_checkpoint_packing(tmp_path):
    """--checkpoint: a checkpoint's experts packed, their size, exceptions and a bitwise check of every block."""
    import importlib.util
    from pathlib import Path

    from tests.infer.util import tiny_checkpoint

    path = Path(__file__).resolve().parents[2] / "scripts" / "probe_expert_pack.py"
    spec = importlib.util.spec_from_file_location("probe_expert_pack_for_test2", path)
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    ck = tiny_checkpoint(tmp_path / "ck", pregated=True)
    c = probe.checkpoint_packing(str(ck))
    assert c["bitwise_equal_unpacked"] and c["ratio"] < 0.85 and c["experts"] > 0
    md = probe.markdown({"device": "cpu", "date": "d", "command": "c", "torch": "t", "shapes": [], "checkpoints": [c]})
    assert "unpacked bitwise equal to the bf16 experts: yes." in md
