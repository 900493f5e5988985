"""GPU probe: where do an offloaded policy's numbers first differ from gpu_only's?

Builds bench_e2e's random pre-gated model of a shape, takes a batch of prompts and a forced token table
(bench_e2e's batch sweep method: every policy decodes the same tokens), and runs gpu_only and each policy
named, twice each:
- as the benchmark does (decode step captured as a CUDA graph): every step's logits compared with
  gpu_only's (bitwise equal steps, largest absolute difference, rows whose argmax differs and gpu_only's
  top-2 margin there);
- eagerly, with hooks on every norm's input (the residual stream at each sub-layer boundary), on each
  MoE block's expert output and on each decoder cross-attention's inputs and SDPA output, in the encoder
  pass and in every decode step: the first place, in call order, whose tensor is not bitwise gpu_only's,
  and how far apart the two are there.
--blocking-copy-check also runs pregated once with a blocking copy of each step's logits to pageable host memory
made while the step is in flight (what Engine.run(keep_logits=True) did before it kept them on the device): whether
the dma copier's waits time out then (infer.offload.DMA_HOST_COPY_NOTE). --op-determinism runs each non-expert
operation of the step alone, repeatedly; --deterministic and --sdpa-backend change how every run computes.
Writes JSON with the command and the same as markdown beside it (--md-from: one markdown page from several).

    python3 scripts/probe_policy_equality.py --batch 32 --blocking-copy-check --out bench/results/probe-policy-equality-b32-h200.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_e2e import ForcedTokens, build_own, build_store, prediction_check, shape_config  # noqa: E402
from bench_kernels import graph_of  # noqa: E402

import infer.engine as engine_mod  # noqa: E402
from infer import report as rep  # noqa: E402
from infer.engine import Engine  # noqa: E402
from infer.offload import OffloadError, default_budget_bytes  # noqa: E402
from infer.policies import PolicySpec  # noqa: E402
from kernels.decode_attention import decode_attention, decode_attention_reference  # noqa: E402
from models.pregate import convert_to_pregated  # noqa: E402
from models.switch import RMSNorm  # noqa: E402


class Recorder:
    """Forward hooks on every RMSNorm (its input), a wrapper on each MoE block's `experts` (its routing and
    output) and on each decoder cross-attention's `attend` (q, k, v, bias on a block's first step, its o
    projection's input = the attention's output): records (name, tensor) in call order while `on`."""

    def __init__(self, model):
        self.on, self.calls = False, []
        self.handles = []
        names = {id(m): n for n, m in model.named_modules()}
        for n, mod in model.named_modules():
            if isinstance(mod, RMSNorm):
                self.handles.append(mod.register_forward_hook(self._hook(n)))
        self.wrapped = []
        for mlp in model.moes:
            orig = mlp.experts
            name = names[id(mlp)] + ".experts"

            def wrap(x, routing, _orig=orig, _name=name):
                y = _orig(x, routing)
                if self.on:
                    self.calls.append((_name + ".ids", routing.ids.detach().clone()))
                    self.calls.append((_name, y.detach().clone()))
                return y

            mlp.experts = wrap
            self.wrapped.append(mlp)
        # the decoder's cross-attention: its SDPA's inputs (keys and values once per block) and output
        self.attn = []
        for n, mod in model.named_modules():
            if n.startswith("decoder.") and n.endswith("cross_attn"):
                orig_attend = mod.attend

                def attend(q, k, v, bias, _orig=orig_attend, _name=n):
                    out = _orig(q, k, v, bias)
                    if self.on:
                        o_in = self.calls[-1][1]  # the o hook's record: this SDPA's output
                        self.calls.append((_name + ".q", q.detach().clone()))
                        if self.first_step(_name):
                            # SDPA again on the same tensors, twice: equal to what the step computed?
                            again = [_sdpa(q, k, v, bias) for _ in range(2)]
                            B, H, Q, dh = again[0].shape
                            again = [a.transpose(1, 2).reshape(B, Q, H * dh) for a in again]
                            entry = {"name": _name, "again_equal": bool(torch.equal(again[0], again[1])),
                                     "again_equal_step": bool(torch.equal(again[0], o_in))}
                            if self.backends_check:
                                entry["distinct_of_10_per_backend"] = sdpa_backends_distinct(q, k, v, bias, 10)
                            self.recompute.append(entry)
                            self.calls.append((_name + ".k", k.detach().clone()))
                            self.calls.append((_name + ".v", v.detach().clone()))
                            self.calls.append((_name + ".bias", bias.detach().clone()))
                        self.calls.append((_name + ".out", out.detach().clone()))
                    return out

                mod.attend = attend
                self.attn.append(mod)
                self.handles.append(mod.o.register_forward_hook(self._hook(n + ".o")))
        self._kv_seen: set = set()
        self.recompute: list = []
        self.backends_check = False  # SDPA per backend, 10 times on each first step's tensors

    def first_step(self, name: str) -> bool:
        if name in self._kv_seen:
            return False
        self._kv_seen.add(name)
        return True

    def reset(self):
        self.calls, self._kv_seen, self.recompute = [], set(), []

    def _hook(self, name):
        def hook(_mod, inputs, _out):
            if self.on:
                self.calls.append((name, inputs[0].detach().clone()))
        return hook

    def close(self):
        for h in self.handles:
            h.remove()
        for mlp in self.wrapped:
            del mlp.experts  # back to the class's method
        for mod in self.attn:
            del mod.attend


def sdpa_backends_distinct(q, k, v, bias, reps: int) -> dict:
    """SDPA through each backend alone (a context around each call), and the decode-attention kernel, reps calls on
    the same tensors: how many distinct results (bitwise), or why the backend does not run; and each one's relative
    error against float64."""
    from torch.nn.attention import SDPBackend

    out, err = {}, {}
    ref = decode_attention_reference(q.double(), k.double(), v.double(), bias.double(), 1.0)
    runs = {b.name.lower(): (lambda b=b: _sdpa(q, k, v, bias, b))
            for b in (SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION,
                      SDPBackend.MATH)}
    runs["triton_decode_attention"] = lambda: decode_attention(q, k, v, bias, scale=1.0)
    for name, fn in runs.items():
        try:
            res = [fn() for _ in range(reps)]
            out[name] = _distinct(res)
            err[name] = float((res[0].double() - ref).norm() / ref.norm())
        except Exception as e:  # noqa: BLE001 - a backend that does not take these inputs here: say so
            out[name] = f"not run: {(str(e).splitlines() or [type(e).__name__])[0][:80]}"
    out["rel_err_vs_float64"] = err
    return out


def _sdpa(q, k, v, bias, backend=None):
    from torch.nn.attention import sdpa_kernel

    if backend is None:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)
    with sdpa_kernel([backend]):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)


def compare_logits(ref: list[torch.Tensor], got: list[torch.Tensor]) -> dict:
    n = min(len(ref), len(got))
    equal_steps, max_abs, flips = 0, 0.0, []
    for t in range(n):
        a, b = ref[t].float(), got[t].float()
        if torch.equal(a, b):
            equal_steps += 1
        max_abs = max(max_abs, float((a - b).abs().max()))
        pa, pb = a.argmax(-1), b.argmax(-1)
        for r in (pa != pb).nonzero().flatten().tolist():
            top2 = a[r].topk(2).values
            flips.append({
                "step": t, "row": r, "gpu_only_argmax": int(pa[r]), "policy_argmax": int(pb[r]),
                "gpu_only_top2_margin": float(top2[0] - top2[1]),
                "policy_logit_gap_of_the_two": float(b[r, pb[r]] - b[r, pa[r]]),
                "row_max_abs_logit_diff": float((a[r] - b[r]).abs().max()),
            })
    return {"steps": n, "bitwise_equal_steps": equal_steps, "max_abs_logit_diff": max_abs,
            "argmax_flips": flips}


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bits (so that -0.0 and 0.0, or two NaNs, are told apart)."""
    by_size = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    return t.contiguous().view(by_size[t.element_size()]) if t.dtype != torch.bool else t


def _distinct(results: list[torch.Tensor]) -> int:
    """How many bitwise-distinct tensors among results."""
    uniq: list[torch.Tensor] = []
    for r in results:
        if not any(torch.equal(_bits(r), _bits(u)) for u in uniq):
            uniq.append(r)
    return len(uniq)


def compare_calls(ref: list, got: list) -> dict:
    if [n for n, _ in ref] != [n for n, _ in got]:
        return {"error": "different call sequences", "ref_calls": len(ref), "calls": len(got)}
    first, around = None, []
    n_diff = 0
    for i, ((name, a), (_, b)) in enumerate(zip(ref, got)):
        same = a.shape == b.shape and torch.equal(_bits(a), _bits(b))
        if not same:
            n_diff += 1
            if first is None:
                d = (a.float() - b.float()).abs()
                first = {"call": i, "name": name, "shape": list(a.shape), "max_abs_diff": float(d.max()),
                         "elements_differing": int((d > 0).sum()), "elements": a.numel(),
                         "ref_max_abs": float(a.float().abs().max())}
        if first is not None and i - first["call"] < 12:  # the calls right after it: equal or not
            around.append({"call": i, "name": name, "equal": same})
    return {"calls": len(ref), "calls_differing": n_diff, "first_difference": first, "after_first": around,
            "encoder_calls": sum(1 for n, _ in ref if n.startswith("encoder"))}


def op_determinism(cfg, dev, batch: int, enc_len: int, reps: int = 50) -> dict:
    """Each decode-step operation outside the experts, at the step's shapes, run `reps` times on the same inputs:
    how many distinct results. Attention per SDPA backend (the one the dispatcher picks first), with a padding
    bias as the cross-attention has and a position bias as the self-attention has."""
    from torch.nn.attention import SDPBackend

    g = torch.Generator(device=dev).manual_seed(0)
    H, dh, D = cfg.num_heads, cfg.d_kv, cfg.d_model
    dt = torch.bfloat16

    def rnd(*shape):
        return torch.randn(*shape, generator=g, device=dev).to(dt)

    def distinct(fn) -> int:
        return _distinct([fn() for _ in range(reps)])

    out: dict = {"reps": reps}
    q = rnd(batch, 1, H, dh).transpose(1, 2)  # a view, as Attention.heads makes it
    cases = {
        "cross": (rnd(batch, H, enc_len, dh), rnd(batch, H, enc_len, dh), torch.zeros(batch, 1, 1, enc_len, device=dev, dtype=dt)),
        "self": (rnd(batch, H, 64, dh), rnd(batch, H, 64, dh), rnd(1, H, 1, 64)),
    }
    for name, (k, v, bias) in cases.items():
        res = {}
        try:
            res["dispatcher_choice"] = str(SDPBackend(torch._fused_sdp_choice(q, k, v, bias, 0.0, False, scale=1.0)))
        except Exception as e:  # noqa: BLE001 - a private API: report, do not fail
            res["dispatcher_choice"] = f"unknown ({type(e).__name__})"
        res["default"] = distinct(lambda: _sdpa(q, k, v, bias))
        for b in (SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH):
            try:
                res[b.name.lower()] = distinct(lambda b=b: _sdpa(q, k, v, bias, b))
            except Exception as e:  # noqa: BLE001 - a backend that does not take these inputs
                res[b.name.lower()] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
        out["sdpa_" + name] = res
    x = rnd(batch, 1, D)
    w_qkv, w_o = rnd(3 * H * dh, D), rnd(D, H * dh)
    enc = rnd(batch, enc_len, D)
    w_kv = rnd(2 * H * dh, D)
    out["linear_qkv"] = distinct(lambda: torch.nn.functional.linear(x, w_qkv))
    out["linear_o"] = distinct(lambda: torch.nn.functional.linear(x, w_o))
    out["linear_cross_kv_prefill"] = distinct(lambda: torch.nn.functional.linear(enc, w_kv))
    return out


def sdpa_timing(cfg, dev, enc_len: int) -> dict:
    """us per SDPA call per backend, decode shapes (one query), batch 1 and 32, cross (enc_len keys, a [B, 1, 1, K]
    bias) and self (64 keys, a [1, H, 1, K] bias): 50 calls captured in a CUDA graph, replayed 20 times."""
    from torch.nn.attention import SDPBackend

    g = torch.Generator(device=dev).manual_seed(1)
    H, dh = cfg.num_heads, cfg.d_kv
    out = {}
    for B in (1, 32):
        for name, K, bias_shape in (("cross", enc_len, (B, 1, 1, enc_len)), ("self", 64, (1, H, 1, 64))):
            q = torch.randn(B, 1, H, dh, generator=g, device=dev).to(torch.bfloat16).transpose(1, 2)
            k, v = (torch.randn(B, H, K, dh, generator=g, device=dev).to(torch.bfloat16) for _ in range(2))
            bias = torch.randn(*bias_shape, generator=g, device=dev).to(torch.bfloat16)
            row = {}
            fns = {("default" if b is None else b.name.lower()): (lambda b=b: _sdpa(q, k, v, bias, b))
                   for b in (None, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH)}
            fns["triton (default config)"] = lambda: decode_attention(q, k, v, bias, scale=1.0)
            for bk, w in ((32, 2), (64, 4), (128, 4), (128, 8), (256, 4), (256, 8)):
                fns[f"triton K{bk} w{w}"] = (lambda bk=bk, w=w: decode_attention(
                    q, k, v, bias, scale=1.0, config={"BLOCK_K": bk, "num_warps": w}))
            for label, fn in fns.items():
                try:
                    replay = graph_of(*[fn] * 50)
                    replay()
                    torch.cuda.synchronize()
                    a, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    a.record()
                    for _ in range(20):
                        replay()
                    e.record()
                    torch.cuda.synchronize()
                    row[label] = round(1e3 * a.elapsed_time(e) / (50 * 20), 2)
                except RuntimeError as err:
                    row[label] = f"not run: {str(err).splitlines()[0][:60]}"
            out[f"B{B}-{name}"] = row
    return out


def blocking_copy_check(model, store, dev, ids, new_tokens: int) -> dict:
    """pregated (graph, dma where auto picks it) with each step's logits copied to pageable host memory right
    after the step is launched (a blocking copy while the step runs): the run's outcome."""
    orig = engine_mod.greedy

    def greedy_copying(model_, input_ids, attention_mask=None, max_new_tokens=32, eos_token_id=None, step=None,
                       state=None, on_token=None, select=None):
        inner = step or model_.decode_one_token

        def copying_step(st, tok):
            out = inner(st, tok)
            out.detach().clone().cpu()  # blocks until the step is done
            return out

        return orig(model_, input_ids, attention_mask, max_new_tokens, eos_token_id, step=copying_step,
                    state=state, on_token=on_token, select=select)

    engine_mod.greedy = greedy_copying
    t0 = time.perf_counter()
    try:
        res = Engine(model, store, dev).run(PolicySpec.parse("pregated"), ids, max_new_tokens=new_tokens)
        out = {"failed": False, "copy_mode": res.metrics.get("copy_mode"), "dma_api_used": res.metrics.get("dma_api_used")}
    except OffloadError as e:
        out = {"failed": True, "error": str(e)[:600]}
    finally:
        engine_mod.greedy = orig
    out["wall_s"] = time.perf_counter() - t0
    return out


def markdown(docs: list[tuple[str, dict]]) -> str:
    """The probe files as one markdown page: per file its command, then per mode and policy the logits'
    comparison with gpu_only's (and gpu_only's with itself), the first differing hook, SDPA recomputed, the
    blocking-copy check and the per-operation determinism."""
    lines = ["# Where offloaded policies' numbers differ from gpu_only's (scripts/probe_policy_equality.py)", ""]
    for path, r in docs:
        env = r["environment"]
        lines += [f"## `{path}`", "", f"`{env.get('command')}` ({env.get('compute_device')}, torch "
                  f"{env.get('torch')}, {env.get('date')}); batch {r['batch']}, {r['input_tokens']} input tokens, "
                  f"{r['new_tokens']} forced decoder inputs; deterministic algorithms: {r.get('deterministic')}; "
                  f"SDPA backend: {r.get('sdpa_backend') or 'default'}", "",
                  "| mode | run vs gpu_only | steps bitwise equal | max abs logit diff | argmax flips (step, row, "
                  "gpu_only's top-2 margin) | first differing hook (elements differing / max abs diff) |",
                  "|---|---|---|---|---|---|"]
        for mode, runs in r["modes"].items():
            for name, e in runs.items():
                lg, hk = e["logits"], e.get("hooks") or {}
                f = hk.get("first_difference")
                if f and f["elements_differing"] == 0:  # bits differ, values equal: -0.0 against 0.0
                    first = f"none in value ({f['name']}: equal values, different bits, e.g. -0.0 and 0.0)"
                else:
                    first = (f"{f['name']} ({f['elements_differing']} of {f['elements']} / {f['max_abs_diff']:.3g})"
                             if f else ("none" if hk else "-"))
                flips = ", ".join(f"({x['step']}, {x['row']}, {x['gpu_only_top2_margin']:.4g})"
                                  for x in lg["argmax_flips"]) or "none"
                lines.append(f"| {mode} | {'gpu_only (second run)' if name == 'gpu_only_repeat' else name} | "
                             f"{lg['bitwise_equal_steps']} / {lg['steps']} | {lg['max_abs_logit_diff']:.3g} | "
                             f"{flips} | {first} |")
                rec = e.get("sdpa_recomputed_first_step")
                if rec:
                    for run, items in rec.items():
                        bad = [x["name"] for x in items if not x["again_equal"]]
                        lines.append(f"|  | torch's SDPA (its default backend) called twice on the step's q/k/v/bias "
                                     f"(first step, {run}) | | | | the two differ at: {', '.join(bad) or 'none'} |")
                        per = [x["distinct_of_10_per_backend"] for x in items if "distinct_of_10_per_backend" in x]
                        if per:
                            errs = [d.get("rel_err_vs_float64", {}) for d in per]
                            tally = {b: sum(1 for d in per if isinstance(d[b], int) and d[b] > 1) for b in per[0]
                                     if b != "rel_err_vs_float64"}
                            lines.append(f"|  | each SDPA backend alone, 10 calls on each block's first-step tensors "
                                         f"({run}): blocks with more than one distinct result, of {len(per)} | | | | "
                                         + ", ".join(f"{b}: {n}" if all(isinstance(d[b], int) for d in per)
                                                     else f"{b}: {per[0][b]}" for b, n in tally.items()) + " |")
                            worst = {b: max(e.get(b, 0.0) for e in errs) for b in errs[0]}
                            lines.append(f"|  | largest relative error against float64 over those blocks ({run}) | | | | "
                                         + ", ".join(f"{b}: {x:.2e}" for b, x in worst.items()) + " |")
        if r.get("gpu_only_graph_vs_eager"):
            g = r["gpu_only_graph_vs_eager"]
            lines += ["", f"gpu_only graph vs eager: {g['bitwise_equal_steps']} of {g['steps']} steps bitwise equal, "
                      f"max abs logit diff {g['max_abs_logit_diff']:.3g}, {len(g['argmax_flips'])} argmax flips."]
        if r.get("sdpa_timing_us"):
            lines += ["", "SDPA, us per call (decode shapes, 50 calls in a CUDA graph replayed 20 times): " + "; ".join(
                f"{shape}: " + ", ".join(f"{b} {t}" for b, t in row.items()) for shape, row in r["sdpa_timing_us"].items())
                + "."]
        if r.get("blocking_copy_check"):
            b = r["blocking_copy_check"]
            lines += ["", "Blocking copy check (pregated, each step's logits copied to pageable host memory while "
                      f"the step runs): {'FAILED' if b['failed'] else 'ran'} in {b['wall_s']:.1f} s"
                      + (f": {b['error'][:160]}..." if b.get("error") else "") + "."]
        if r.get("op_determinism"):
            o = r["op_determinism"]
            lines += ["", f"Operations alone on random inputs of the step's shapes, {o['reps']} calls each, distinct "
                      f"results: SDPA cross {o['sdpa_cross']}, SDPA self {o['sdpa_self']}, linear q/k/v "
                      f"{o['linear_qkv']}, linear o {o['linear_o']}, cross k/v prefill {o['linear_cross_kv_prefill']}."]
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="switch-base-128")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--input-tokens", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--policies", default="on_demand,pregated")
    ap.add_argument("--modes", default="graph,eager")
    ap.add_argument("--blocking-copy-check", action="store_true")
    ap.add_argument("--op-determinism", action="store_true")
    ap.add_argument("--sdpa-timing", action="store_true", help="us per SDPA call per backend (CUDA graph)")
    ap.add_argument("--sdpa-backends-check", action="store_true",
                    help="eager mode: SDPA through each backend, 10 calls on each block's first-step tensors")
    ap.add_argument("--md-from", nargs="*", default=None, help="write --out as markdown from these probe JSONs")
    ap.add_argument("--deterministic", action="store_true",
                    help="torch.use_deterministic_algorithms(True) and CUBLAS_WORKSPACE_CONFIG=:4096:8 for every run")
    ap.add_argument("--sdpa-backend", default=None, choices=["efficient", "cudnn", "math"],
                    help="every run's attention through this SDPA backend only")
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "probe-policy-equality.json"))
    args = ap.parse_args()
    if args.md_from:
        docs = [(Path(f).name, json.loads(Path(f).read_text())) for f in args.md_from]
        Path(args.out).write_text(markdown(docs))
        print(f"[probe] wrote {args.out}")
        return
    if args.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before the first cuBLAS call
        torch.use_deterministic_algorithms(True, warn_only=True)
    if args.sdpa_backend:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        name = {"efficient": "EFFICIENT_ATTENTION", "cudnn": "CUDNN_ATTENTION", "math": "MATH"}[args.sdpa_backend]
        sdpa_kernel([getattr(SDPBackend, name)]).__enter__()  # for the whole process
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    cfg = shape_config(args.shape).replace(eos_token_id=-1)
    model = build_own(cfg, dev, dtype)
    store = build_store(cfg, model, dev, dtype, default_budget_bytes())
    if dev.type == "cuda":
        model.set_backend("triton")
    convert_to_pregated(model, 1)
    g = torch.Generator().manual_seed(4)  # bench_e2e's sweep seeds
    ids = torch.randint(3, cfg.vocab_size, (args.batch, args.input_tokens), generator=g)
    table = torch.randint(3, cfg.vocab_size, (args.batch, args.new_tokens), generator=torch.Generator().manual_seed(5))
    forcing = ForcedTokens(table)
    result = {"environment": {**rep.environment(dev), "command": " ".join(["python3"] + sys.argv),
                              "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")},
              "shape": args.shape, "batch": args.batch, "input_tokens": args.input_tokens,
              "new_tokens": args.new_tokens, "deterministic": args.deterministic, "sdpa_backend": args.sdpa_backend,
              "modes": {}}
    policies = [p for p in args.policies.split(",") if p]
    gpu_only_logits: dict[str, list[torch.Tensor]] = {}
    for mode in args.modes.split(","):
        eng = Engine(model, store, dev, cuda_graph=mode == "graph")
        rec = Recorder(model) if mode == "eager" else None
        if rec is not None:
            rec.backends_check = args.sdpa_backends_check
        runs = {}
        for name in ["gpu_only"] + policies:
            if rec is not None:
                rec.reset()
                rec.on = True
            with forcing.active():
                res = eng.run(PolicySpec.parse(name), ids, max_new_tokens=args.new_tokens, keep_logits=True)
            if rec is not None:
                rec.on = False
            runs[name] = {"logits": res.step_logits, "preds": forcing.predictions,
                          "calls": rec.calls if rec is not None else None, "notes": res.notes,
                          "recompute": list(rec.recompute) if rec is not None else None}
        if rec is not None:
            rec.close()
        ref = runs["gpu_only"]
        out = {}
        for name in policies:
            r = runs[name]
            entry = {"notes": r["notes"], "logits": compare_logits(ref["logits"], r["logits"])}
            entry["predictions_differing"] = prediction_check(ref["preds"], r["preds"], None)["disagreements"]
            if rec is not None:
                entry["hooks"] = compare_calls(ref["calls"], r["calls"])
            out[name] = entry
            fl = entry["logits"]
            print(f"[probe] {mode} {name}: {fl['bitwise_equal_steps']}/{fl['steps']} steps bitwise equal, max |dlogit| "
                  f"{fl['max_abs_logit_diff']:.3g}, {len(fl['argmax_flips'])} argmax flips "
                  f"{[(f['step'], f['row'], round(f['gpu_only_top2_margin'], 5)) for f in fl['argmax_flips']]}; "
                  f"hooks: {entry.get('hooks', {}).get('first_difference')}", flush=True)
        if mode == "eager" and "gpu_only" in runs:
            # gpu_only against itself, a second run: is gpu_only's own eager path repeatable?
            rec2 = Recorder(model)
            rec2.on = True
            with forcing.active():
                res2 = eng.run(PolicySpec.parse("gpu_only"), ids, max_new_tokens=args.new_tokens, keep_logits=True)
            rec2.on = False
            rec2.close()
            out["gpu_only_repeat"] = {"logits": compare_logits(ref["logits"], res2.step_logits),
                                      "hooks": compare_calls(ref["calls"], rec2.calls),
                                      "sdpa_recomputed_first_step": {"run1": ref["recompute"],
                                                                     "run2": rec2.recompute}}
            print(f"[probe] sdpa recomputed (first step): run 1 {ref['recompute'][:3]}; run 2 {rec2.recompute[:3]}",
                  flush=True)
            rh = out["gpu_only_repeat"]["hooks"]
            print(f"[probe] {mode} gpu_only repeat: {rh['first_difference']}; then "
                  f"{[(c['name'].rsplit('.', 2)[-2:], c['equal']) for c in rh.get('after_first', [])]}", flush=True)
        result["modes"][mode] = out
        gpu_only_logits[mode] = ref["logits"]  # graph against eager, below
        del runs
    if args.op_determinism:
        result["op_determinism"] = op_determinism(cfg, dev, args.batch, args.input_tokens)
        print(f"[probe] op determinism: {result['op_determinism']}", flush=True)
    if args.sdpa_timing and dev.type == "cuda":
        result["sdpa_timing_us"] = sdpa_timing(cfg, dev, args.input_tokens)
        print(f"[probe] sdpa us per call: {result['sdpa_timing_us']}", flush=True)
    if args.blocking_copy_check:
        result["blocking_copy_check"] = blocking_copy_check(model, store, dev, ids, args.new_tokens)
        print(f"[probe] blocking copy check: {result['blocking_copy_check']}", flush=True)
    if {"graph", "eager"} <= set(gpu_only_logits):
        result["gpu_only_graph_vs_eager"] = compare_logits(gpu_only_logits["graph"], gpu_only_logits["eager"])
        print(f"[probe] gpu_only graph vs eager: {result['gpu_only_graph_vs_eager']['bitwise_equal_steps']} "
              f"equal steps", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    Path(args.out).with_suffix(".md").write_text(markdown([(Path(args.out).name, result)]))
    print(f"[probe] wrote {args.out}")


if __name__ == "__main__":
    main()
