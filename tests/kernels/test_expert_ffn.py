"""Expert FFN: both Triton paths (interpreter, CPU) against the reference, and the reference against a
naive per-token loop.

Tolerances, against the reference in float64 on the same (rounded) inputs: fp32 relative error <= 1e-4;
bf16 at most 2x the relative error of PyTorch's own bf16 computation (the reference run in bf16).
Shapes are small and d, F are not multiples of the block sizes, so partial tiles are always exercised.
"""

import pytest
import torch
import torch.nn.functional as Fn

pytest.importorskip("triton")

from kernels import expert_ffn as ffn  # noqa: E402
from kernels.expert_ffn import ACTIVATIONS, expert_ffn, expert_ffn_reference, expert_ffn_triton  # noqa: E402

D, F = 40, 56
# Small blocks: several k-steps and a partial last tile in every dimension.
DECODE = {"path": "decode", "in": {"BLOCK_F": 16, "BLOCK_D": 16, "num_warps": 4},
          "out": {"BLOCK_D": 16, "BLOCK_F": 32, "num_warps": 4}}
GEMM = {"BLOCK_N": 32, "BLOCK_K": 16, "num_warps": 4, "num_stages": 2}
PREFILL = {"path": "prefill", "BLOCK_M": 16, "in": GEMM, "out": GEMM}
CONFIGS = {"decode": DECODE, "prefill": PREFILL, "auto": None}


def _problem(T, E, k, activation="relu", dtype=torch.float32, S=None, seed=0, ids=None):
    g = torch.Generator().manual_seed(seed)
    S = S or E
    f_in = 2 * F if activation in ("geglu", "swiglu") else F
    x = torch.randn(T, D, generator=g).to(dtype)
    w_in = (torch.randn(S, f_in, D, generator=g) / D**0.5).to(dtype)
    w_out = (torch.randn(S, D, F, generator=g) / F**0.5).to(dtype)
    if ids is None:  # k distinct experts per token, as top-k gives
        ids = torch.rand(T, E, generator=g).argsort(dim=1)[:, :k].to(torch.int32)
    weights = torch.rand(T, k, generator=g) + 0.1
    return x, w_in, w_out, ids, weights


def _rel(y, ref):
    return ((y.double() - ref).norm() / ref.norm()).item()


def _naive(x, w_in, w_out, ids, weights, slot_of_expert, activation):
    """Token by token, expert by expert, in float64."""
    y = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            s = int(slot_of_expert[e]) if slot_of_expert is not None else e
            h = w_in[s].double() @ x[t].double()
            if activation in ("geglu", "swiglu"):
                gate, up = h[:F], h[F:]
                h = (Fn.gelu(gate) if activation == "geglu" else Fn.silu(gate)) * up
            else:
                h = {"relu": Fn.relu, "gelu": Fn.gelu, "silu": Fn.silu}[activation](h)
            y[t] += float(weights[t, j]) * (w_out[s].double() @ h)
    return y


def _check(x, w_in, w_out, ids, weights, slot_of_expert, activation, config):
    """Kernel vs float64 reference; bf16 also vs PyTorch's own bf16 error."""
    y = expert_ffn_triton(x, w_in, w_out, ids, weights, slot_of_expert, activation, config=config)
    assert y.dtype == x.dtype and y.shape == x.shape
    ref = expert_ffn_reference(x.double(), w_in.double(), w_out.double(), ids, weights.double(),
                               slot_of_expert, activation)
    err = _rel(y, ref)
    if x.dtype == torch.float32:
        assert err <= 1e-4, err
    else:
        torch_err = _rel(expert_ffn_reference(x, w_in, w_out, ids, weights, slot_of_expert, activation), ref)
        assert err <= 2 * torch_err, (err, torch_err)
    return y


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_reference_matches_naive_loop(activation):
    x, w_in, w_out, ids, weights = _problem(6, 7, 2, activation, S=9, seed=1)
    slot_of_expert = torch.tensor([8, 0, 3, 1, 7, 2, 5], dtype=torch.int32)
    ref = expert_ffn_reference(x.double(), w_in.double(), w_out.double(), ids, weights.double(),
                               slot_of_expert, activation)
    naive = _naive(x, w_in, w_out, ids, weights, slot_of_expert, activation)
    assert _rel(ref, naive) <= 1e-12
    assert _rel(expert_ffn_reference(x, w_in, w_out, ids, weights, slot_of_expert, activation), naive) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("path", ["decode", "prefill"])
def test_each_path_and_activation(path, activation, dtype):
    x, w_in, w_out, ids, weights = _problem(3, 7, 2, activation, dtype, seed=hash(activation) % 1000)
    _check(x, w_in, w_out, ids, weights, None, activation, CONFIGS[path])


# Default configs pick the path by token count (decode for T = 1, 3; prefill for T = 64, 257).
@pytest.mark.parametrize("T,E", [(T, E) for T in (1, 3, 64, 257) for E in (1, 7, 8, 128)])
def test_shapes_default_config(T, E):
    k = 1 if E == 1 or (T + E) % 2 == 0 else 2
    activation = "gelu" if T % 2 else "swiglu"
    _check(*_problem(T, E, k, activation, seed=T * 7 + E), None, activation, None)


@pytest.mark.parametrize("path", ["decode", "prefill"])
def test_empty_experts_and_one_expert(path):
    T = 5 if path == "decode" else 257
    g = torch.Generator().manual_seed(3)
    two = torch.tensor([2, 5], dtype=torch.int32)[torch.randint(0, 2, (T, 1), generator=g)]
    x, w_in, w_out, ids, weights = _problem(T, 8, 1, ids=two, seed=4)  # 6 of 8 experts get nothing
    _check(x, w_in, w_out, ids, weights, None, "relu", CONFIGS[path])
    one = torch.full((T, 2), 6, dtype=torch.int32)  # everything to one expert (prefill: 33 tiles of it)
    one[:, 1] = 1
    x, w_in, w_out, ids, weights = _problem(T, 8, 2, ids=one, seed=5)
    _check(x, w_in, w_out, ids, weights, None, "relu", CONFIGS[path])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("path", ["decode", "prefill"])
def test_slot_table(path, dtype):
    T = 3 if path == "decode" else 64
    x, w_in, w_out, ids, weights = _problem(T, 7, 2, "silu", dtype, S=10, seed=6)
    slot_of_expert = torch.tensor([9, 0, 4, 2, 7, 3, 5], dtype=torch.int32)  # slots 1, 6, 8 unused
    y = _check(x, w_in, w_out, ids, weights, slot_of_expert, "silu", CONFIGS[path])
    # Moving the experts' weights to other slots and updating the table gives the same output.
    perm = torch.tensor([4, 8, 1, 0, 9, 2, 6, 3, 5, 7])  # new slot of old slot s
    w_in2, w_out2 = torch.empty_like(w_in), torch.empty_like(w_out)
    w_in2[perm], w_out2[perm] = w_in, w_out
    moved = perm[slot_of_expert.long()].to(torch.int32)
    y2 = expert_ffn_triton(x, w_in2, w_out2, ids, weights, moved, "silu", config=CONFIGS[path])
    assert torch.equal(y, y2)


def test_decode_matches_prefill_and_int64_ids():
    x, w_in, w_out, ids, weights = _problem(4, 8, 2, "geglu", torch.bfloat16, seed=8)
    a = expert_ffn_triton(x, w_in, w_out, ids, weights, None, "geglu", config=DECODE)
    b = expert_ffn_triton(x, w_in, w_out, ids.long(), weights, None, "geglu", config=PREFILL)
    assert _rel(a, b.double()) <= 1e-2  # same roundings (h in bf16), different summation order


def test_dispatch_and_autograd(monkeypatch):
    x, w_in, w_out, ids, weights = _problem(3, 7, 2, "relu", seed=9)
    monkeypatch.delenv("PGMOE_FORCE_TRITON", raising=False)
    want = expert_ffn_reference(x, w_in, w_out, ids, weights)
    assert torch.equal(expert_ffn(x, w_in, w_out, ids, weights), want)
    monkeypatch.setenv("PGMOE_FORCE_TRITON", "1")
    called = []
    spy = lambda *a, **kw: called.append(1) or expert_ffn_triton(*a, **kw)
    monkeypatch.setattr(ffn, "expert_ffn_triton", spy)
    y = expert_ffn(x, w_in, w_out, ids, weights)
    assert called and _rel(y, expert_ffn_reference(x.double(), w_in.double(), w_out.double(), ids,
                                                    weights.double())) <= 1e-4
    # Inputs that need a gradient take the differentiable reference even with the switch on.
    w_in.requires_grad_()
    called.clear()
    expert_ffn(x, w_in, w_out, ids, weights).square().sum().backward()
    assert not called and w_in.grad is not None and w_in.grad.abs().sum() > 0


def test_bad_arguments():
    x, w_in, w_out, ids, weights = _problem(2, 4, 1, "relu")
    with pytest.raises(ValueError, match="activation"):
        expert_ffn_triton(x, w_in, w_out, ids, weights, activation="tanh")
    with pytest.raises(ValueError, match="shapes"):
        expert_ffn_triton(x, w_in, w_out, ids, weights, activation="swiglu")  # w_in needs 2F rows


# The fused decode kernel: several W_out chunks (BLOCK_DO < D), a multi-step fixed-order reduce (BLOCK_N 2).
def _fused():
    return {"path": "fused", "BLOCK_F": 16, "BLOCK_D": 16, "BLOCK_DO": 16, "num_warps": 4,
            "red": {"BLOCK_N": 2, "BLOCK_D": 16, "num_warps": 4}}


@pytest.mark.parametrize("activation,dtype", [("relu", torch.float32), ("swiglu", torch.bfloat16)])
def test_fused_decode(activation, dtype):
    x, w_in, w_out, ids, weights = _problem(3, 7, 2, activation, dtype, S=9, seed=11)
    slot_of_expert = torch.tensor([8, 0, 3, 1, 7, 2, 5], dtype=torch.int32)
    y = _check(x, w_in, w_out, ids, weights, slot_of_expert, activation, _fused())
    y2 = expert_ffn_triton(x, w_in, w_out, ids, weights, slot_of_expert, activation, config=_fused())
    assert torch.equal(y, y2)  # fixed-order reduction: bitwise reproducible


# The one-launch grid-barrier decode kernel. Under the interpreter it runs as its two phases (no barrier:
# programs run one after another there); the barrier itself is checked on the GPU by scripts/bench_kernels.py.
# Small tiles: several phase-1 tiles per program are not reachable here (the interpreter gives every tile its
# own program), but partial F and D tiles, k = 2 (a second W_out tile per row block), gated activations and
# a slot table are.
@pytest.mark.parametrize("T,k,activation,dtype", [(1, 1, "relu", torch.float32), (3, 2, "swiglu", torch.bfloat16),
                                                  (2, 1, "gelu", torch.bfloat16), (4, 2, "geglu", torch.float32)])
def test_gridsync_decode(T, k, activation, dtype):
    x, w_in, w_out, ids, weights = _problem(T, 7, k, activation, dtype, S=9, seed=13 + T)
    slot_of_expert = torch.tensor([8, 0, 3, 1, 7, 2, 5], dtype=torch.int32)
    cfg = {"path": "gridsync", "BLOCK_F": 16, "BLOCK_D": 16, "BLOCK_DO": 16, "num_warps": 4}
    y = _check(x, w_in, w_out, ids, weights, slot_of_expert, activation, cfg)
    assert torch.equal(y, expert_ffn_triton(x, w_in, w_out, ids, weights, slot_of_expert, activation, config=cfg))
    # a token's output does not depend on the other tokens of the call (what makes offload policies
    # give gpu_only's outputs bitwise)
    y0 = expert_ffn_triton(x[:1], w_in, w_out, ids[:1], weights[:1], slot_of_expert, activation, config=cfg)
    assert torch.equal(y0, y[:1])


# The two-kernel decode path with the first slot's W_out tile loaded into registers before the wait (whole rows):
# k = 1 and 2 (the second slot's tile is read in the loop), a slot table, int8 weights (the scale after the sum).
@pytest.mark.parametrize("T,k,activation,dtype", [(1, 1, "relu", torch.float32), (3, 2, "swiglu", torch.bfloat16)])
def test_decode_preload(T, k, activation, dtype):
    x, w_in, w_out, ids, weights = _problem(T, 7, k, activation, dtype, S=9, seed=23 + T)
    slot_of_expert = torch.tensor([8, 0, 3, 1, 7, 2, 5], dtype=torch.int32)
    cfg = ffn._decode_config(16, 16, 4, 16, 64, 4, preload=True)
    assert cfg["out"]["preload"] and cfg["out"]["BLOCK_F"] >= F
    y = _check(x, w_in, w_out, ids, weights, slot_of_expert, activation, cfg)
    plain = ffn._decode_config(16, 16, 4, 16, 64, 4)
    assert torch.equal(y, expert_ffn_triton(x, w_in, w_out, ids, weights, slot_of_expert, activation, config=plain))
    qi, qo = ffn.quantize_experts(w_in), ffn.quantize_experts(w_out)
    assert torch.equal(expert_ffn_triton(x, qi, qo, ids, weights, slot_of_expert, activation, config=cfg),
                       expert_ffn_triton(x, qi, qo, ids, weights, slot_of_expert, activation, config=plain))


def test_gridsync_candidates_fit_the_h200():
    """Every benchmark candidate keeps T = 1 within 132 resident programs (one per multiprocessor)."""
    for d, f in ((768, 3072), (1024, 4096)):
        for cfg in ffn.gridsync_candidates(d, f):
            n_d = -(-d // cfg["BLOCK_DO"])
            assert n_d <= 132, cfg


# int8 expert weights (symmetric per row, Int8Weights): both paths against the reference in float64 on the
# dequantized weights, with the tolerances above (the kernels apply each row's scale after the row sum).
@pytest.mark.parametrize("path", ["decode", "prefill", "auto"])
@pytest.mark.parametrize("T,k,activation,dtype", [(3, 2, "relu", torch.float32), (5, 1, "swiglu", torch.bfloat16),
                                                  (64, 2, "gelu", torch.bfloat16), (1, 1, "geglu", torch.float32)])
def test_int8_weights(path, T, k, activation, dtype):
    x, w_in, w_out, ids, weights = _problem(T, 7, k, activation, dtype, S=9, seed=17 + T)
    slot_of_expert = torch.tensor([8, 0, 3, 1, 7, 2, 5], dtype=torch.int32)
    qi, qo = ffn.quantize_experts(w_in), ffn.quantize_experts(w_out)
    assert qi.q.dtype == torch.int8 and qi.scale.shape == w_in.shape[:2]
    # the dequantized weights are close to the originals (the quantization itself)
    assert _rel(qi.dequantize(3, torch.float64), w_in[3].double()) < 0.02
    y = expert_ffn_triton(x, qi, qo, ids, weights, slot_of_expert, activation, config=CONFIGS[path])
    deq_in = torch.stack([qi.dequantize(s, torch.float64) for s in range(9)])
    deq_out = torch.stack([qo.dequantize(s, torch.float64) for s in range(9)])
    ref = expert_ffn_reference(x.double(), deq_in, deq_out, ids, weights.double(), slot_of_expert, activation)
    err = _rel(y, ref)
    assert y.dtype == dtype
    if dtype == torch.float32:
        assert err <= 1e-4, err
    else:
        torch_err = _rel(expert_ffn_reference(x, qi, qo, ids, weights, slot_of_expert, activation), ref)
        assert err <= 2 * torch_err, (err, torch_err)
    # the reference takes Int8Weights too (dequantized per slot in x's dtype)
    ref_q = expert_ffn_reference(x.double(), ffn.Int8Weights(qi.q, qi.scale.double()),
                                 ffn.Int8Weights(qo.q, qo.scale.double()), ids, weights.double(), slot_of_expert,
                                 activation)
    assert _rel(ref_q, ref) < 1e-12


def test_int8_weights_errors():
    x, w_in, w_out, ids, weights = _problem(2, 4, 1)
    qi, qo = ffn.quantize_experts(w_in), ffn.quantize_experts(w_out)
    with pytest.raises(ValueError, match="both"):
        expert_ffn_triton(x, qi, w_out, ids, weights)
    with pytest.raises(ValueError, match="int8 \\[S, R, C\\]"):
        expert_ffn_triton(x, ffn.Int8Weights(w_in, qi.scale), qo, ids, weights)
    with pytest.raises(ValueError, match="fused path"):
        expert_ffn_triton(x, qi, qo, ids, weights, config=_fused())


@pytest.mark.parametrize("path", ["decode", "prefill", "fused", "gridsync"])
def test_any_weight_storage_order_gives_the_same_output(path):
    """The kernels read w_in / w_out through their strides: weights stored transposed (w_out as [S, F, D] in
    memory, viewed as [S, D, F]; w_in likewise) give bitwise the contiguous layout's output, on every path."""
    cfg = {"decode": DECODE, "prefill": PREFILL, "fused": _fused(),
           "gridsync": {"path": "gridsync", "BLOCK_F": 16, "BLOCK_D": 16, "BLOCK_DO": 16, "num_warps": 4}}[path]
    x, w_in, w_out, ids, weights = _problem(3, 7, 2, "gelu", torch.bfloat16, seed=11)
    y = expert_ffn_triton(x, w_in, w_out, ids, weights, None, "gelu", config=cfg)
    w_out_t = w_out.transpose(1, 2).contiguous().transpose(1, 2)  # same values, d the fastest dimension
    w_in_t = w_in.transpose(1, 2).contiguous().transpose(1, 2)
    assert w_out_t.stride(1) == 1 and torch.equal(w_out_t, w_out)
    for wi, wo in ((w_in, w_out_t), (w_in_t, w_out), (w_in_t, w_out_t)):
        assert torch.equal(expert_ffn_triton(x, wi, wo, ids, weights, None, "gelu", config=cfg), y)


def test_bench_layout_candidates_with_transposed_w_out():
    """The fused configs scripts/bench_kernels.py --sweep-layout times with W_out stored transposed run
    correctly on that storage (interpreter, bf16, against the float64 reference)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "scripts" / "bench_kernels.py"
    spec = importlib.util.spec_from_file_location("bench_kernels_for_test", path)
    bk = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bk)
    x, w_in, w_out, ids, weights = _problem(1, 8, 1, "relu", torch.bfloat16, seed=5)
    w_out_t = w_out.transpose(1, 2).contiguous().transpose(1, 2)
    for cfg in bk.layout_candidates(D):
        _check(x, w_in, w_out_t, ids, weights, None, "relu", cfg)


def test_bench_read_floor_kernels_read_the_expert_named_by_its_id():
    """scripts/bench_kernels.py --read-floor's bare reads 'via id' sum the bytes of the expert whose id they
    load (a stacked buffer, both halves as the two-kernel read splits them), and its markdown lists them."""
    import importlib.util
    from pathlib import Path

    import triton

    path = Path(__file__).resolve().parents[2] / "scripts" / "bench_kernels.py"
    spec = importlib.util.spec_from_file_location("bench_kernels_for_test", path)
    bk = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bk)
    first, second = bk._read_kernel_pair()
    n, block = 1000, 256  # n not a multiple of the block
    g = torch.Generator().manual_seed(3)
    stack = torch.randn(4, 2 * n, generator=g).to(torch.bfloat16)
    ids = torch.tensor([2], dtype=torch.int32)
    sink = torch.full((2 * n,), float("nan"))
    nb = triton.cdiv(n, block)
    first[(nb,)](stack, sink, n, ids, stack.stride(0), BLOCK=block, USE_PDL=False, IDS=True)
    second[(nb,)](stack[..., n:], sink[n:], n, ids, stack.stride(0), BLOCK=block, USE_PDL=False, IDS=True)
    ref = stack[2].double()
    for half in (0, 1):
        want = torch.stack([ref[half * n + i * block:half * n + min((i + 1) * block, n)].sum() for i in range(nb)])
        torch.testing.assert_close(sink[half * n:half * n + nb].double(), want, rtol=1e-5, atol=1e-4)
    # without IDS the same kernel reads the buffer it is given (expert 2 passed directly)
    sink2 = torch.full((2 * n,), float("nan"))
    first[(nb,)](stack[2], sink2, n, ids, 0, BLOCK=block, USE_PDL=False, IDS=False)
    torch.testing.assert_close(sink2[:nb], sink[:nb])
    rec = {"shape": "switch-base", "expert_bytes": 9_437_184, "one_kernel_us": 3.6, "two_kernels_us": 4.6,
           "one_kernel_via_id_us": 3.9, "two_kernels_via_id_us": 5.0}
    md = bk.markdown({"gpu": "x", "date": "d", "command": "c", "torch": "t", "triton": "t", "cuda": "c"},
                     {"hbm_GBps": 4250.0, "bf16_TFLOPs": 800.0}, [], [], [], [rec])
    row = next(line for line in md.splitlines() if line.startswith("| switch-base | 9.44"))
    assert row.split(" | ")[-2:] == ["5.00", "2.25 |"]
