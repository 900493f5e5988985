"""scripts/bench_e2e.py's arithmetic (crossover, copy efficiency, floors, the pre-gated memory bound, the
uniform-routing expectation), its plots, and scripts/summarize_e2e.py, on hand-made numbers; the batch sweep's
forced decoder inputs on the tiny model (CPU); the lookahead lever (--lookaheads: family policies, the rebuilt
weights, a --tiny --lookaheads 1,2 run, the summary's lookahead table). The CPU smoke run of the whole script
(with its batch sweep) is tests/infer/test_app.py::test_bench_script_tiny."""

import argparse
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

import bench_e2e as bench  # noqa: E402
import summarize_e2e as summ  # noqa: E402


def _point(B, **ms):
    return {"batch": B, "runs": {p: {"metrics": {"ms_per_token_median": v}} for p, v in ms.items()}}


# ----------------------------------------------------------------------------------------------- crossover
def test_crossover_is_the_first_batch_where_pregated_is_no_faster():
    pts = [  # unsorted on purpose; on_demand catches up at 8
        _point(16, on_demand=30.0, pregated=33.0),
        _point(1, on_demand=2.7, pregated=1.8),
        _point(4, on_demand=6.0, pregated=4.0),
        _point(8, on_demand=10.0, pregated=10.0),
        _point(2, on_demand=4.0, pregated=2.5),
    ]
    c = bench.crossover(pts)
    assert c["crossover_batch"] == 8
    assert list(c["on_demand_over_pregated"]) == ["1", "2", "4", "8", "16"]
    assert c["on_demand_over_pregated"]["1"] == pytest.approx(1.5)
    assert c["on_demand_over_pregated"]["8"] == pytest.approx(1.0)
    assert c["on_demand_over_pregated"]["16"] == pytest.approx(30 / 33)


def test_crossover_none_and_missing_runs():
    pts = [_point(1, on_demand=3.0, pregated=2.0), _point(2, on_demand=5.0, pregated=4.9)]
    assert bench.crossover(pts)["crossover_batch"] is None
    # a batch whose pregated run was skipped (budget) or failed is no crossover
    pts += [{"batch": 4, "runs": {"on_demand": {"metrics": {"ms_per_token_median": 1.0}},
                                  "pregated": {"skipped": "time budget"}}},
            _point(8, on_demand=4.0, pregated=6.0)]
    c = bench.crossover(pts)
    assert c["crossover_batch"] == 8 and "4" not in c["on_demand_over_pregated"]


# ----------------------------------------------------------------------------------------------- copies
def test_timed_bytes_leaves_out_a_step_run_past_the_output():
    # 10 tokens: 9 timed steps after the first; 100 bytes per step after a 1,000-byte first step
    assert bench.timed_bytes(1_000 + 9 * 100, 1_000, 9, 10) == 1_900  # no extra step
    assert bench.timed_bytes(1_000 + 10 * 100, 1_000, 9, 11) == 1_900  # one step past the output ran
    assert bench.timed_bytes(1_000 + 9 * 100, 1_000, 9, None) == 1_900  # records without the count


def test_copy_figures():
    m = {"stall_ms_per_token": 0.5, "ms_per_token_median": 2.0, "peak_allocated_bytes": 1}
    # 255 timed steps of 2 ms, 6 experts of 9.4 MB each per step, 50 GB/s peak
    per_step = 6 * 9_437_184
    c = bench.copy_figures(1_000_000 + 255 * per_step, 1_000_000, 255, 255 * 2.0, m, 50.0)
    assert c["decode_bytes"] == 255 * per_step and c["decode_bytes_per_step"] == per_step
    assert c["achieved_GBps_lower_bound"] == pytest.approx(per_step / 2e-3 / 1e9)
    assert c["copy_efficiency"] == pytest.approx(per_step / 2e-3 / 1e9 / 50.0)
    assert c["copy_floor_ms_per_step"] == pytest.approx(per_step / 50e9 * 1e3)
    assert c["copy_on_critical_path"] is True
    m["stall_ms_per_token"] = 0.05  # 2.5% of the step: off the critical path
    assert bench.copy_figures(2, 1, 1, 1.0, m, 50.0)["copy_on_critical_path"] is False
    cpu = bench.copy_figures(2, 1, 1, 1.0, {"ms_per_token_median": 1.0, "peak_allocated_bytes": None}, None)
    assert cpu["copy_efficiency"] is None and cpu["achieved_GBps_lower_bound"] is None


def test_floors_computed_for_greedy_measured_for_beams():
    eb, link = 10_000_000, 50.0
    runs = [
        {"policy": "gpu_only", "family": "pregated", "decoding": "greedy", "metrics": {"ms_per_token_median": 0.9}},
        {"policy": "pregated", "family": "pregated", "decoding": "greedy", "metrics": {}},
        {"policy": "pregated", "family": "pregated", "decoding": "beam4", "metrics": {},
         "copy": {"decode_bytes_per_step": 3 * 6 * eb}},
    ]
    out = {"config": {"moe_blocks": 12, "decoder_moe_blocks": 6}, "expert_bytes": eb, "runs": runs}
    f = bench.floors(out, link)
    assert f["greedy"]["copy_floor_ms"] == pytest.approx(6 * eb / 50e9 * 1e3)
    assert f["greedy"]["gpu_only_ms"] == 0.9
    assert f["beam4"]["copy_floor_ms"] == pytest.approx(18 * eb / 50e9 * 1e3)
    assert f["beam4"]["copy_bytes_source"].startswith("measured")
    assert bench.floors(out, None)["greedy"]["copy_floor_ms"] is None


# ----------------------------------------------------------------------------------------------- memory
@pytest.mark.parametrize(
    "E,rows,S,slots", [(8, 1, 16, 16), (8, 4, 16, 16), (8, 8, 16, 16), (32, 1, 64, 16), (32, 2, 64, 5), (32, 3, 64, 1)]
)
def test_pool_experts_match_the_runner(E, rows, S, slots):
    """bench_e2e's count of pregated's expert slots is the pool OffloadRunner allocates."""
    from infer.offload import ExpertStore
    from infer.policies import OffloadRunner, PolicySpec
    from models.config import preset
    from models.pregate import convert_to_pregated
    from models.switch import Switch

    torch.manual_seed(0)
    model = Switch(preset("tiny", num_experts=E))
    model.init_weights()
    convert_to_pregated(model, 1)
    store = ExpertStore.from_model(model)
    r = OffloadRunner(model, store, PolicySpec("pregated"), "cpu", n_enc=rows * S, n_dec=rows, prefill_slots=slots)
    two, stream = bench.pregated_pool_experts(E, rows, S, slots)
    assert (two, stream) == (r.pool.R * r.pool.n, r.pool.n_prefill)
    assert r.pool.nbytes() == max(two, stream) * store.expert_bytes  # staging and streaming share slots


def test_memory_bound():
    GB, eb, E = 10**9, 10**7, 128
    store = 12 * E * eb  # 15.36 GB
    ref = {"peak_allocated_bytes": 1 * GB + store + 200 * 10**6, "baseline_allocated_bytes": 1 * GB}
    two, stream = bench.pregated_pool_experts(E, 1, 256, 16)
    assert (two, stream) == (2, 16)
    exact = 1 * GB + max(two, stream) * eb + 200 * 10**6 + (64 << 20)
    pg = {"peak_allocated_bytes": exact, "baseline_allocated_bytes": 1 * GB, "pool_bytes": 16 * eb}
    c = bench.memory_bound(ref, pg, E, eb, store, 1, 256, 16)
    assert c["ok"] and c["bound"] == exact and c["activations_from_gpu_only"] == 200 * 10**6
    assert c["pool_bytes_expected"] == c["pool_bytes_reported"]
    assert c["peak_vs_gpu_only_pct"] == pytest.approx(100 * exact / ref["peak_allocated_bytes"])
    assert c["bound_all_experts_of_two_blocks"] > c["bound"]
    pg["peak_allocated_bytes"] = exact + 1  # one byte over: fails
    assert not bench.memory_bound(ref, pg, E, eb, store, 1, 256, 16)["ok"]
    assert bench.memory_bound({"peak_allocated_bytes": None}, pg, E, eb, store, 1, 256, 16) is None
    # a landing in its own memory (expv: a packed row per slot) counts; one in the pool's spare rows does not
    pg.update(peak_allocated_bytes=exact + 16 * 7 * 10**6, landing_bytes=16 * 7 * 10**6, landing_in_pool=False)
    c = bench.memory_bound(ref, pg, E, eb, store, 1, 256, 16)
    assert c["ok"] and c["landing_bytes_own"] == 16 * 7 * 10**6 and c["bound"] == exact + 16 * 7 * 10**6
    pg["landing_in_pool"] = True
    assert not bench.memory_bound(ref, pg, E, eb, store, 1, 256, 16)["ok"]


# ----------------------------------------------------------------------------------------------- plots, summary
def _doc():
    eb, link = 10**7, 50.0

    def run(policy, mode, ms, peak):
        return {"label": f"pregated/{mode}/{policy}", "policy": policy, "family": "pregated", "decoding": mode,
                "metrics": {"ms_per_token_median": ms, "peak_allocated_bytes": peak}}

    runs = [run("gpu_only", m, 1.0, 16e9) for m in ("greedy", "beam4")]
    runs += [run("on_demand", m, 2.7, 3e9) for m in ("greedy", "beam4")]
    runs += [run("pregated", m, 1.8, 3e9) for m in ("greedy", "beam4")]
    runs[-2]["copy"] = bench.copy_figures(10**9 + 255 * 6 * eb, 10**9, 255, 255 * 1.8, runs[-2]["metrics"] | {
        "stall_ms_per_token": 0.8}, link)
    runs[-2]["copy"]["while_copying"] = {"GBps": 45.0, "efficiency": 45.0 / link}
    pts = [_point(B, gpu_only=1.0 + B / 8, on_demand=2.7 + B, pregated=1.8 + 1.3 * B, prefetch_all=150.0)
           for B in (1, 2, 4, 8, 16, 32)]
    for p in pts:
        p["copy_floor_ms_per_step"] = 1.2 * p["batch"] ** 0.5
        p["uniform_routing_expectation"] = bench.expected_distinct_experts(128, p["batch"])
        p["experts_per_decoder_block_per_step"] = {"on_demand": 0.9 * p["uniform_routing_expectation"],
                                                   "pregated": 0.9 * p["uniform_routing_expectation"]}
        p["distinct_tokens_per_step"] = float(p["batch"])
    sw = {"batches": [1, 2, 4, 8, 16, 32], "policies": list(bench.SWEEP_POLICIES), "input_tokens": 256,
          "new_tokens": 64, "prefetch_all_tokens": 8, "points": pts, "inputs": "forced", "num_experts": 128,
          "decoder_moe_blocks": 6, "expert_bytes": eb}
    sw.update(bench.crossover(pts))
    shape = {"config": {"num_experts": 128, "moe_blocks": 12, "decoder_moe_blocks": 6}, "expert_bytes": eb,
             "runs": runs, "anchors": [], "batch_sweep": sw}
    shape["floors"] = bench.floors(shape, link)
    return {
        "environment": {"compute_device": "test GPU", "torch": "x", "pinned_peak_GBps": link},
        "settings": {"input_tokens": 256, "new_tokens": 256},
        "shapes": {"switch-base-128": shape, "switch-large-128": {"skipped": "time budget (400 s) spent"}},
        "failures": [],
    }


def test_plots_are_written(tmp_path):
    doc = _doc()
    assert doc["shapes"]["switch-base-128"]["batch_sweep"]["crossover_batch"] == 4  # 1.8 + 5.2 >= 2.7 + 4
    bench.plot(tmp_path / "e2e.png", doc)
    bench.plot_batch(tmp_path / "e2e-batch.png", doc)
    assert (tmp_path / "e2e.png").stat().st_size > 10_000
    assert (tmp_path / "e2e-batch.png").stat().st_size > 10_000


def test_summary_has_sweep_copy_efficiency_and_floors():
    text = summ.summarize(_doc(), "x.json")
    assert "Batch 1, " in text and "ms/token is the median" in text and "The batch sweep alone" not in text
    assert "Crossover (smallest B where pregated is no faster than on_demand): **4**" in text
    sweep = [ln for ln in text.splitlines() if ln.startswith("| 8 |")]
    assert sweep and "| 1.50 |" not in sweep[0] and f"| {(2.7 + 8) / (1.8 + 10.4):.2f} |" in sweep[0]
    eff = 6 * 10**7 / 1.8e-3 / 1e9 / 50.0
    assert (f"| switch-base-128 | greedy | pregated | 60.0 | {50 * eff:.1f} | {100 * eff:.1f} | - | - | 45.0 | 90 | "
            "0.800 | yes |") in text
    doc = _doc()  # with the pinned peak measured again after the run: the lower bound as % of that too
    doc["shapes"]["switch-base-128"]["runs"][-2]["pinned_peak_after_GBps"] = 40.0
    assert (f"| {100 * eff:.1f} | 40.0 | {100 * 50 * eff / 40:.1f} | 45.0 | 90 | 0.800 | yes |"
            in summ.summarize(doc, "x.json"))
    floor = 6 * 10**7 / 50e9 * 1e3
    assert f"| {floor:.2f} |" in text  # the copy floor column of the main table
    assert "switch-large-128: time budget (400 s) spent" in text
    # routing diversity: measured experts per decoder block per step, the uniform expectation, distinct tokens
    u8 = 128 * (1 - (1 - 1 / 128) ** 8)
    assert sweep[0].endswith(f"| {0.9 * u8:.2f} / {0.9 * u8:.2f} | {u8:.2f} | 8.00 |")
    assert "decoder inputs forced" in text


def test_summary_sweep_experts_from_bytes_of_older_jsons():
    """JSONs from before the routing-diversity fields: experts per block from the decode bytes, inputs greedy."""
    doc = _doc()
    sw = doc["shapes"]["switch-base-128"]["batch_sweep"]
    for k in ("inputs", "num_experts", "decoder_moe_blocks", "expert_bytes"):
        del sw[k]
    for p in sw["points"]:
        del p["uniform_routing_expectation"], p["experts_per_decoder_block_per_step"], p["distinct_tokens_per_step"]
        p["runs"]["pregated"]["copy"] = {"decode_bytes_per_step": 3 * 6 * 10**7}
    text = summ.summarize(doc, "x.json")
    row = next(ln for ln in text.splitlines() if ln.startswith("| 8 |"))
    assert row.endswith(f"| - / 3.00 | {128 * (1 - (1 - 1 / 128) ** 8):.2f} | - |")
    assert "decoder inputs greedy" in text


# ----------------------------------------------------------------------------------------------- sweep inputs
def test_expected_distinct_experts():
    assert bench.expected_distinct_experts(128, 1) == pytest.approx(1.0)
    assert bench.expected_distinct_experts(128, 2) == pytest.approx(2 - 1 / 128)  # two rows collide w.p. 1/E
    assert bench.expected_distinct_experts(128, 8) == pytest.approx(7.78, abs=0.01)
    assert bench.expected_distinct_experts(128, 32) == pytest.approx(28.41, abs=0.01)
    assert bench.expected_distinct_experts(1, 5) == pytest.approx(1.0)
    for E, B in ((8, 3), (128, 16), (64, 1000)):
        v = bench.expected_distinct_experts(E, B)
        assert v <= min(E, B) and v == pytest.approx(summ.expected_distinct_experts(E, B))
    # Monte Carlo: B rows, each routed uniformly to one of E experts
    g = torch.Generator().manual_seed(0)
    draws = torch.randint(0, 16, (20000, 6), generator=g)
    mc = sum(len(set(r)) for r in draws.tolist()) / len(draws)
    assert mc == pytest.approx(bench.expected_distinct_experts(16, 6), rel=0.01)


def test_parse_table_runs():
    assert bench.parse_table_runs(None) is None
    assert bench.parse_table_runs("beam4:gpu_only,on_demand,pregated") == {
        "modes": ["beam4"], "policies": ["gpu_only", "on_demand", "pregated"]}
    assert bench.parse_table_runs("greedy,beam4:pregated@lru32,on_demand+cpu_auto")["modes"] == ["greedy", "beam4"]
    assert bench.parse_table_runs("greedy:pregated#hi#p64#b4096#w8,on_demand#torchplan")["policies"] == [
        "pregated#hi#p64#b4096#w8", "on_demand#torchplan"]
    # gpu_only (the memory check's reference) runs first whatever the given order
    assert bench.parse_table_runs("greedy:pregated,on_demand,gpu_only")["policies"] == [
        "gpu_only", "pregated", "on_demand"]
    assert bench.parse_variant("torchplan#hi#p64") == ("reference", {"priority": "high", "programs": 64}, None)
    assert bench.parse_variant("") == (None, {}, None)
    assert bench.parse_variant("dma") == (None, {}, "dma")
    assert bench.parse_variant("noguess#dma") == (None, {}, "dma")
    assert bench.parse_variant("driver#dma") == (None, {"dma_api": "driver"}, "dma")
    assert bench.parse_variant("native") == (None, {"dma_api": "native"}, None)
    assert bench.parse_variant("torchcopy") == (None, {"dma_api": "torch"}, None)
    assert bench.variant_guess("noguess#dma") == "off" and bench.variant_guess("guesskeep") == "keep"
    assert bench.variant_guess("dma") is None
    assert bench.parse_variant("guessindex#signaldone#r2") == (None, {}, None)
    assert bench.variant_env("guessindex#signaldone#dma") == {"PGMOE_GUESS_LOOKUP": "0", "PGMOE_DMA_DIRECT_LAST": "0"}
    assert bench.variant_env("hi") == {}
    assert bench.parse_variant("addops#kvwrites#densemm") == (None, {}, None)
    assert bench.variant_env("addops#kvwrites#densemm#r2") == {
        "PGMOE_ADD_NORM": "0", "PGMOE_KV_ONE_WRITE": "0", "PGMOE_DENSE_KERNEL": "0"}
    assert bench.parse_variant("topkops") == (None, {}, None)
    assert bench.variant_env("topkops#r3") == {"PGMOE_BEAM_TOPK": "0"}
    assert bench.variant_env("nodefer#headops#flagcopy#kvgather#normops") == {
        "PGMOE_BEAM_DEFER": "0", "PGMOE_GREEDY_HEAD": "0", "PGMOE_ENDED_COPY": "1", "PGMOE_KV_REORDER": "0",
        "PGMOE_HEAD_NORM": "0"}
    with pytest.raises(SystemExit):
        bench.parse_variant("prefetch50")
    with pytest.raises(SystemExit, match="noguess"):
        bench.parse_variant("nogues")
    for bad in ("beam4", "beam8:gpu_only", "beam4:", "beam4:no_such_policy", "greedy:pregated#fast",
                "greedy:pregated#p0", "greedy:pregated#b1000", "greedy:pregated#w3"):
        with pytest.raises((SystemExit, ValueError)):
            bench.parse_table_runs(bad)


def _tiny_engine():
    from infer.engine import Engine
    from models.config import preset
    from models.pregate import convert_to_pregated

    cfg = preset("tiny").replace(eos_token_id=-1)
    dev = torch.device("cpu")
    model = bench.build_own(cfg, dev, torch.float32)
    store = bench.build_store(cfg, model, dev, torch.float32, None)
    convert_to_pregated(model, 1)
    return cfg, Engine(model, store, dev, cuda_graph=False, measure_stall=True)


def _sweep(cfg, eng, inputs, batches):
    args = argparse.Namespace(batch_sweep=batches, input_tokens=16, sweep_new_tokens=5, sweep_prefetch_all_tokens=3,
                              budget_s=1e9, copy_mode="auto", sweep_inputs=inputs)
    result = {"environment": {"pinned_peak_GBps": None}, "shapes": {}, "failures": []}
    out: dict = {}
    sw = bench.bench_sweep("tiny", cfg, eng, args, lambda: False, result, out, lambda final=True: None)
    return sw, result


def test_forced_tokens_are_the_table_under_every_policy():
    """ForcedTokens: every policy decodes exactly the table's tokens; the rows differ; the model's own
    predictions under the forced inputs agree across policies; greedy is restored afterwards."""
    import infer.engine as engine_mod
    from infer.policies import PolicySpec

    cfg, eng = _tiny_engine()
    B, n = 3, 5
    ids = torch.randint(3, cfg.vocab_size, (B, 16), generator=torch.Generator().manual_seed(0))
    table = torch.randint(3, cfg.vocab_size, (B, n), generator=torch.Generator().manual_seed(1))
    forcing = bench.ForcedTokens(table)
    orig = engine_mod.greedy
    toks, preds = {}, {}
    for name in ("gpu_only", "on_demand", "pregated"):
        forcing.record_margins = name == "gpu_only"
        with forcing.active():
            r = eng.run(PolicySpec.parse(name), ids, max_new_tokens=n, warmup=True)
        toks[name], preds[name] = r.tokens, forcing.predictions
        assert engine_mod.greedy is orig
        if name == "gpu_only":  # the top-2 margin of each prediction: [B][n], >= 0
            assert len(forcing.margins) == B and all(len(row) == n and min(row) >= 0 for row in forcing.margins)
        else:
            assert forcing.margins is None
    assert all(t == table.tolist() for t in toks.values())
    assert len({tuple(row) for row in toks["gpu_only"]}) == B  # the rows' tokens differ
    assert preds["on_demand"] == preds["gpu_only"] == preds["pregated"]
    assert len(preds["gpu_only"]) == B and all(len(row) == n for row in preds["gpu_only"])
    with pytest.raises(ValueError), forcing.active():  # a table shorter than the run: refused
        eng.run(PolicySpec.parse("gpu_only"), ids, max_new_tokens=n + 1)
    assert engine_mod.greedy is orig


def test_sweep_forced_inputs_tiny():
    """The tiny sweep with forced inputs (the default): identical tokens and predictions across policies,
    every row a different token per step, experts per decoder block per step recorded with the
    uniform-routing expectation (the first-block guess off: its missed guesses are copies too)."""
    cfg, eng = _tiny_engine()
    eng.first_block_guess = "off"
    sw, result = _sweep(cfg, eng, "forced", [1, 2, 4])
    assert not result["failures"], result["failures"]
    assert sw["inputs"] == "forced" and "teacher forcing" in sw["inputs_method"]
    for p in sw["points"]:
        B = p["batch"]
        assert p["distinct_tokens_per_step"] == B  # diverse rows: B different decoder inputs every step
        for name in ("on_demand", "prefetch_all", "pregated"):
            r = p["runs"][name]
            assert r["same_tokens_as_gpu_only"] and r["same_predictions_as_gpu_only"], name
            assert r["predictions_matching_gpu_only"] == 1.0
            chk = r["prediction_check"]
            assert chk["disagreements"] == 0 and chk["compared"] == B * (3 if name == "prefetch_all" else 5)
        # gpu_only run twice (the check's scale): on the CPU it repeats exactly
        assert p["gpu_only_self_check"]["compared"] == B * 5 and p["gpu_only_self_check"]["disagreements"] == 0
        assert p["uniform_routing_expectation"] == pytest.approx(bench.expected_distinct_experts(8, B))
        ex = p["experts_per_decoder_block_per_step"]
        assert ex["pregated"] is not None and 1.0 <= ex["pregated"] <= min(8, B)
        by = p["runs"]["pregated"]["copy"]["decode_bytes_per_step"]
        assert ex["pregated"] == pytest.approx(by / eng.store.expert_bytes / len(eng.model.decoder.moes))
    assert sw["points"][0]["experts_per_decoder_block_per_step"]["pregated"] == pytest.approx(1.0)
    assert sw["points"][-1]["experts_per_decoder_block_per_step"]["on_demand"] > 1.5  # 4 diverse rows, E = 8


# ----------------------------------------------------------------------------------------------- lookahead lever
def test_parse_lookaheads():
    assert bench.parse_lookaheads(None) == [1]
    assert bench.parse_lookaheads("1") == [1]
    assert bench.parse_lookaheads("2,1,2") == [1, 2]
    assert bench.parse_lookaheads("3") == [1, 3]  # lookahead 1 (the main table) always runs
    for bad in ("0,1", "1,x", "-1"):
        with pytest.raises(SystemExit):
            bench.parse_lookaheads(bad)


def test_family_policies_map_the_pregated_policy_to_the_lookahead():
    names = ["gpu_only", "speculative", "on_demand", "on_demand@lru32", "prefetch_all", "pregated",
             "pregated@lru32", "pregated+cpu_auto", "pregated#torchplan", "lookahead"]
    assert bench.family_policies(names, 1) == [
        "gpu_only", "speculative", "on_demand", "on_demand@lru32", "prefetch_all", "pregated", "pregated@lru32",
        "pregated+cpu_auto", "pregated#torchplan"]  # `lookahead` is the lookahead-1 model's `pregated`
    assert bench.family_policies(names, 2) == [
        "gpu_only", "on_demand", "on_demand@lru32", "lookahead", "lookahead@lru32", "lookahead+cpu_auto",
        "lookahead#torchplan"]
    assert bench.family_policies(bench.LOOKAHEAD_FAMILY_POLICIES, 3) == ["gpu_only", "on_demand", "lookahead"]
    assert bench.family_policies(["lookahead"], 1) == ["pregated"]


def test_tiny_config_has_moe_blocks_for_the_lookahead():
    from models.config import preset

    assert bench.shape_config("tiny") == preset("tiny")
    assert bench.shape_config("tiny", [1]) == preset("tiny")
    assert bench.shape_config("switch-base-128", [1, 2]) == preset("switch-base-128")
    for Ls, n in (([1, 2], 4), ([1, 3], 4), ([1, 5], 6)):
        cfg = bench.shape_config("tiny", Ls)
        assert len(cfg.sparse_layers(False)) == len(cfg.sparse_layers(True)) == n


def test_rebuilt_model_has_the_same_nonexpert_weights():
    """build_own with the same config gives the same non-expert weights: a model converted with lookahead 2 is
    the lookahead-1 model's weights (the pre-gates aside, which differ with the lookahead)."""
    from models.pregate import convert_to_pregated

    cfg = bench.shape_config("tiny", [1, 2])
    dev = torch.device("cpu")
    a, b = bench.build_own(cfg, dev, torch.float32), bench.build_own(cfg, dev, torch.float32)
    convert_to_pregated(a, 1)
    convert_to_pregated(b, 2)
    assert bench.same_nonexpert_weights(a, b)
    with torch.no_grad():
        b.moes[3].router.weight[0, 0] += 1.0
    assert not bench.same_nonexpert_weights(a, b)


def _bench_tiny(tmp_path, *args: str) -> dict:
    """scripts/bench_e2e.py --tiny --no-anchors with `args` in a subprocess (one thread): its JSON, checked
    for a zero exit and no failed checks."""
    import json
    import os
    import subprocess

    env = {**os.environ, "BENCH_THREADS": "1", "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "scripts/bench_e2e.py", "--tiny", "--no-anchors", "--out", str(tmp_path), *args],
        cwd=ROOT, capture_output=True, text=True, timeout=120, env=env,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads((tmp_path / "e2e-cpu-tiny.json").read_text())
    assert not res["failures"], res["failures"]
    return res


def test_bench_tiny_lookaheads_1_2(tmp_path):
    """--tiny --lookaheads 1,2: the pregated-L2 family runs gpu_only, on_demand and `lookahead` on the same
    weights converted with lookahead 2, each with its own gpu_only's tokens; the summary's lookahead table."""
    res = _bench_tiny(tmp_path, "--lookaheads", "1,2", "--table-runs", "greedy:gpu_only,on_demand,pregated",
                      "--sweep-new-tokens", "2")
    tiny = res["shapes"]["tiny"]
    # --compress auto (the default) is none with --tiny (fp32 on the CPU), exp4 on a GPU
    assert res["settings"]["compress"] is None and res["settings"]["compress_setting"] == "auto"
    assert tiny["compress"] is None
    assert tiny["config"]["moe_blocks"] == 8  # 4 + 4 MoE blocks: lookahead 2 leaves pre-gates in each stack
    runs = {r["label"]: r for r in tiny["runs"]}
    assert set(runs) == {f"{fam}/greedy/{pol}" for fam, pols in (("pregated", ("gpu_only", "on_demand", "pregated")),
                         ("pregated-L2", ("gpu_only", "on_demand", "lookahead"))) for pol in pols}
    fam = tiny["lookahead_families"]["pregated-L2"]
    assert fam["model_lookahead"] == 2 and fam["same_nonexpert_weights_as_lookahead_1"]
    for fam_name, L, pg in (("pregated", 1, "pregated"), ("pregated-L2", 2, "lookahead")):
        ref = runs[f"{fam_name}/greedy/gpu_only"]
        assert len(ref["tokens"][0]) == 6
        for pol in ("gpu_only", "on_demand", pg):
            r = runs[f"{fam_name}/greedy/{pol}"]
            assert r["lookahead"] == L and r["family"] == fam_name and "metrics" in r, r.get("error")
            assert r["tokens"] == ref["tokens"] and r["same_tokens_as_gpu_only"]
        # greedy batch 1: one expert per decoder MoE block per step, prefetched or fetched on demand, and one
        # more in a first-block guess's block where the guess missed (L blocks are guessed: no pre-gate routes
        # them)
        r = runs[f"{fam_name}/greedy/{pg}"]
        c, g = r["copy"], r["metrics"]["first_block_guess"]
        n_dec, eb = tiny["config"]["decoder_moe_blocks"], tiny["expert_bytes"]
        # 6 steps, batch 1, a guess at each step's start
        assert g["mode"] == "run" and len(g["blocks"]) == L and g["rows"] == 6 * L
        assert n_dec * eb <= c["decode_bytes_per_step"] <= (n_dec + L) * eb
    text = summ.summarize(res, "x.json")
    assert "| tiny | greedy | 1 |" in text and "| tiny | greedy | 2 |" in text
    row2 = next(ln for ln in text.splitlines() if ln.startswith("| tiny | greedy | 2 |"))
    assert row2.endswith("| yes |")


def _la_run(fam, L, pol, ms, stall=None, eff=None, same=True):
    r = {"label": f"{fam}/greedy/{pol}", "policy": pol, "family": fam, "decoding": "greedy", "lookahead": L,
         "metrics": {"ms_per_token_median": ms, "stall_ms_per_token": stall}, "same_tokens_as_gpu_only": same}
    if eff is not None:
        r["copy"] = {"copy_efficiency": eff, "stall_ms_per_token": stall}
    return r


def test_summary_lookahead_table():
    doc = _doc()
    s = doc["shapes"]["switch-base-128"]
    assert "Lookahead lever" not in summ.summarize(doc, "x.json")  # lookahead 1 only: no table
    for r in s["runs"]:
        r.pop("lookahead", None)  # older JSONs: the lookahead from the family
    s["runs"] += [
        _la_run("pregated-L2", 2, "gpu_only", 0.91),
        _la_run("pregated-L2", 2, "on_demand", 2.70, 1.2, 0.39),
        _la_run("pregated-L2", 2, "lookahead", 1.30, 0.05, 0.78),
        _la_run("unconverted", 0, "gpu_only", 0.9),
    ]
    text = summ.summarize(doc, "x.json")
    assert "Lookahead lever" in text
    assert "| switch-base-128 | greedy | 1 | 1.00 | 2.70 | 1.80 | 0.800 | " in text  # from the L = 1 family
    assert "| switch-base-128 | greedy | 2 | 0.91 | 2.70 | 1.30 | 0.050 | 78 | 1.43 | 2.08 | yes |" in text
    assert "| switch-base-128 | beam4 | 1 |" in text and "| switch-base-128 | beam4 | 2 |" not in text
    assert "| switch-base-128 | greedy | 0 |" not in text
    s["runs"][-2]["same_tokens_as_gpu_only"] = False
    assert "| 2.08 | no |" in summ.summarize(doc, "x.json")


def test_bench_tiny_int8_family(tmp_path):
    """--tiny --int8: the same model with an int8 store (pregated-int8): gpu_only, on_demand and pregated, each
    with its own (int8) gpu_only's tokens; greedy copies one int8 expert per decoder MoE block per step (about a
    quarter of the fp32 one on the CPU); the summary's int8 table; the lookahead table keeps lookahead 1's
    float rows."""
    res = _bench_tiny(tmp_path, "--int8", "--lookaheads", "1,2", "--table-runs", "greedy:gpu_only,on_demand,pregated",
                      "--sweep-new-tokens", "2")
    tiny = res["shapes"]["tiny"]
    fam = tiny["int8_family"]
    cfg = tiny["config"]
    assert fam["expert_bytes"] == 2 * cfg["d_ff"] * cfg["d_model"] + 4 * (cfg["d_ff"] + cfg["d_model"])
    assert fam["expert_bytes"] < tiny["expert_bytes"] / 3  # fp32 on the CPU: 8 * F * D bytes
    runs = {r["label"]: r for r in tiny["runs"]}
    ref = runs["pregated-int8/greedy/gpu_only"]
    for pol in ("on_demand", "pregated"):
        r = runs[f"pregated-int8/greedy/{pol}"]
        assert r["tokens"] == ref["tokens"] and r["same_tokens_as_gpu_only"]
    c = runs["pregated-int8/greedy/pregated"]["copy"]  # + a missed first-block guess's copy
    assert (cfg["decoder_moe_blocks"] * fam["expert_bytes"] <= c["decode_bytes_per_step"]
            <= (cfg["decoder_moe_blocks"] + 1) * fam["expert_bytes"])
    assert fam["gpu_only_tokens_matching_bf16"]["greedy"]["of"] == 6
    text = summ.summarize(res, "x.json")
    assert "| tiny | greedy | int8 |" in text and "| tiny | greedy | float |" in text
    # the int8 row's peak column: its own gpu_only's and pregated's peak allocations in GB ("-" on the CPU)
    def int8_row(t):
        return next(ln for ln in t.splitlines() if ln.startswith("| tiny | greedy | int8 |"))
    assert "| - / - |" in int8_row(text)
    runs["pregated-int8/greedy/gpu_only"]["metrics"]["peak_allocated_bytes"] = 27_097_913_344
    runs["pregated-int8/greedy/pregated"]["metrics"]["peak_allocated_bytes"] = 1_416_794_624
    assert "| 27.10 / 1.42 |" in int8_row(summ.summarize(res, "x.json"))
    la = [ln for ln in text.splitlines() if ln.startswith("| tiny | greedy | 1 |")]
    assert len(la) == 1 and la[0].endswith("| yes |")


def test_bench_tiny_copy_variants(tmp_path):
    """Runs named <policy>#<variant> (copy stream priority, copy kernel grid) run beside their base policy with
    its tokens, record their copy settings and copy accounting, and get the summary's variant table."""
    res = _bench_tiny(tmp_path, "--table-runs", "greedy:gpu_only,pregated,pregated#hi#p8#b1024#w2", "--batch-sweep",
                      "1", "--sweep-new-tokens", "2")
    runs = {r["label"]: r for r in res["shapes"]["tiny"]["runs"]}
    base, var = runs["pregated/greedy/pregated"], runs["pregated/greedy/pregated#hi#p8#b1024#w2"]
    assert var["same_tokens_as_gpu_only"] and var["tokens"] == base["tokens"]
    assert var["metrics"]["copy_settings"] == {"priority": "high", "programs": 8, "block": 1024, "warps": 2,
                                                 "dma_api": "native"}
    assert base["metrics"]["copy_settings"] == {"priority": "normal", "programs": 32, "block": 8192, "warps": 4,
                                                  "dma_api": "native"}
    assert var["copy"]["decode_bytes_per_step"] == base["copy"]["decode_bytes_per_step"] > 0
    text = summ.summarize(res, "x.json")
    mode = var["metrics"]["copy_mode"]
    assert f"| tiny | greedy | pregated#hi#p8#b1024#w2 | auto | {mode} | high, 8 x 1024, 2 warps |" in text
    assert f"| tiny | greedy | pregated | auto | {base['metrics']['copy_mode']} | normal, 32 x 8192, 4 warps |" in text


def test_bench_tiny_beam_kernel_variant(tmp_path):
    """#beamkernel: beam search's update by kernels/beam_select.py (interpreted here) for that run only, with
    gpu_only's tokens (checked as any policy's: a mismatch would be a failure)."""
    res = _bench_tiny(tmp_path, "--table-runs",
                      "beam4:gpu_only,pregated,pregated#beamkernel,gpu_only#beamkernel,pregated#beamops,"
                      "pregated#nodefer,pregated#kvgather")
    runs = {r["label"]: r for r in res["shapes"]["tiny"]["runs"]}
    for label in ("pregated/beam4/pregated#beamkernel", "pregated/beam4/gpu_only#beamkernel",
                  "pregated/beam4/pregated#beamops"):
        assert runs[label]["metrics"]["beam_update"] == ("tensor ops" if "beamops" in label else "kernel")
        assert runs[label]["same_tokens_as_gpu_only"]
        assert runs[label]["tokens"] == runs["pregated/beam4/gpu_only"]["tokens"]
    for label in ("pregated/beam4/pregated", "pregated/beam4/gpu_only"):  # the CPU's default
        assert runs[label]["metrics"]["beam_update"] == "tensor ops"
    # #nodefer: the caches' reorder at the choosing step's end, the same tokens
    assert runs["pregated/beam4/pregated#nodefer"]["tokens"] == runs["pregated/beam4/gpu_only"]["tokens"]
    assert runs["pregated/beam4/pregated#nodefer"]["metrics"]["beam_reorder"] == "end of step"
    assert runs["pregated/beam4/pregated"]["metrics"]["beam_reorder"] == "next step's start"
    # #kvgather: the caches' reorder as the gather of every position (the CPU's form anyway), the same tokens
    assert runs["pregated/beam4/pregated#kvgather"]["tokens"] == runs["pregated/beam4/gpu_only"]["tokens"]
    assert runs["pregated/beam4/pregated#kvgather"]["metrics"]["kv_reorder"] == "gather"
    assert os.environ.get("PGMOE_BEAM_DEFER") is None and os.environ.get("PGMOE_KV_REORDER") is None  # restored
    with pytest.raises(SystemExit, match="beamkernel"):
        bench.parse_variant("beamkernels")
    assert [bench.beam_variant(v) for v in ("", "beamkernel", "dma#beamops")] == [None, "1", "0"]
    with pytest.raises(SystemExit, match="together"):
        bench.beam_variant("beamkernel#beamops")


def test_summary_variant_table_dma_columns():
    """The variant table names the dma copier's API and shows the GPU's step time in the decode loop beside the
    replayed step's ('-' where a run did not record them)."""
    def run(policy, api, loop, replay):
        return {"policy": policy, "family": "pregated", "decoding": "greedy",
                "metrics": {"ms_per_token_median": loop + 0.01, "copy_mode": "dma", "gpu_step_ms_median": loop,
                            "step_ms_median_with_copies": replay,
                            "copy_settings": {"priority": "normal", "programs": 32, "block": 8192, "warps": 4,
                                              "dma_api": api}}}

    shape = {"runs": [run("pregated", "driver", 1.155, 1.119), run("pregated#torchcopy", "torch", 1.233, None)]}
    rows = [ln for ln in summ.variant_table({"s": shape}) if ln.startswith("| s |")]
    assert rows[0].endswith("| normal, 32 x 8192, 4 warps; dma by driver | - | 1.17 | - | - | 1.155 / 1.119 |")
    assert rows[1].endswith("| normal, 32 x 8192, 4 warps; dma by torch | - | 1.24 | - | - | 1.233 / - |")


def test_summary_dma_timeline_table():
    """The dma timeline of a run (engine.dma_timeline) becomes one row: plans per step, first start, median copy
    time per plan and idle gap, and the bandwidth while copying (one expert per plan: greedy, batch 1)."""
    tl = {"blocks": [3, 5, 7], "copy_start_ms": [0.3, 0.5, 0.71], "copy_end_ms": [0.48, 0.7, 0.9],
          "idle_before_ms": [0.3, 0.02, 0.01], "step_ms": 1.0, "steps": 4}
    shape = {"expert_bytes": 9_000_000,
             "runs": [{"policy": "pregated", "family": "pregated", "decoding": "greedy",
                       "metrics": {"batch_size": 1, "dma_timeline": tl}}]}
    rows = [ln for ln in summ.dma_timeline_table({"s": shape}, 50.0) if ln.startswith("| s |")]
    # copy times 0.18, 0.2, 0.19 -> median 0.19 ms: 9 MB / 0.19 ms = 47.4 GB/s, 95% of 50
    assert rows == ["| s | greedy | pregated | - | 3 | 0.300 | 0.190 | 0.015 | 0.900 | 1.000 | 47.4 | 95 |"]
    # with the experts each plan copied: the median over the plans that copied (prefetch_all's plans are many)
    tl["experts_per_plan"] = [2, 0, 4]  # 18 MB / 0.18 ms = 100 GB/s, 36 MB / 0.19 ms = 189.5: median 144.7
    shape["runs"][0]["policy"] = "prefetch_all"
    rows = [ln for ln in summ.dma_timeline_table({"s": shape}, 50.0) if ln.startswith("| s |")]
    assert rows == ["| s | greedy | prefetch_all | - | 3 | 0.300 | 0.190 | 0.015 | 0.900 | 1.000 | 144.7 | 289 |"]
    del tl["experts_per_plan"]  # older results: no rate for prefetch_all, whose plans are not one expert each
    rows = [ln for ln in summ.dma_timeline_table({"s": shape}, 50.0) if ln.startswith("| s |")]
    assert rows == ["| s | greedy | prefetch_all | - | 3 | 0.300 | 0.190 | 0.015 | 0.900 | 1.000 | - | - |"]
    tl["early_copy_start_ms"], tl["early_copy_end_ms"] = -0.002, 0.128  # the early guess copy, its own column
    rows = [ln for ln in summ.dma_timeline_table({"s": shape}, 50.0) if ln.startswith("| s |")]
    assert rows == ["| s | greedy | prefetch_all | -0.002 - 0.128 | 3 | 0.300 | 0.190 | 0.015 | 0.900 | 1.000 | - "
                    "| - |"]
    shape["runs"][0]["metrics"]["dma_timeline"] = {"error": "plans per step vary"}
    assert summ.dma_timeline_table({"s": shape}, 50.0) == []


def test_summary_copier_table():
    """One row per offloaded run that timed its copier's calls or whose dma try failed: the copy mode used, the
    slowest driver call, the failed try's error; nothing for older results (neither)."""
    err = ("copy_mode=auto failed: OffloadError: copy_mode=dma: the native copier failed: ring entry of plan 120 "
           "reads as plan 152; its slowest driver call: cuMemcpyHtoDAsync for plan 89, 6824.1 ms")
    shape = {"runs": [
        {"label": "pregated/beam4/gpu_only", "decoding": "beam4", "metrics": {"copy_mode": None}, "notes": []},
        {"label": "pregated/beam4/prefetch_all", "decoding": "beam4", "notes": ["graph note", err],
         "metrics": {"copy_mode": "host", "dma_slowest_call": None}},
        {"label": "pregated/beam4/pregated", "decoding": "beam4", "notes": [],
         "metrics": {"copy_mode": "dma", "dma_slowest_call": {"ms": 0.0812, "plan": 181, "call": "cuMemcpyHtoDAsync"}}},
    ]}
    rows = [ln for ln in summ.copier_table({"s": shape}) if ln.startswith("| s |")]
    assert rows[0].startswith("| s | beam4 | prefetch_all | host | - | OffloadError: copy_mode=dma: the native")
    assert "cuMemcpyHtoDAsync for plan 89, 6824.1 ms |" in rows[0]
    assert rows[1] == "| s | beam4 | pregated | dma | cuMemcpyHtoDAsync, plan 181, 0.081 ms | - |"
    assert len(rows) == 2
    older = {"runs": [{"label": "x/greedy/pregated", "decoding": "greedy", "notes": [],
                       "metrics": {"copy_mode": "dma"}}]}
    assert summ.copier_table({"s": older}) == []


def test_sweep_policies_with_a_guess_variant(tmp_path):
    """--sweep-policies: the sweep runs the policies named, a first-block guess variant among them (its tokens
    checked against gpu_only's), records each run's guess, and the summary lists them; bad lists are refused."""
    res = _bench_tiny(tmp_path, "--sweep-only", "--batch-sweep", "1", "--sweep-policies",
                      "gpu_only,on_demand,pregated,pregated#noguess")
    sw = res["shapes"]["tiny"]["batch_sweep"]
    assert sw["policies"] == ["gpu_only", "on_demand", "pregated", "pregated#noguess"]
    runs = sw["points"][0]["runs"]
    assert set(runs) == set(sw["policies"])
    assert runs["pregated#noguess"]["same_tokens_as_gpu_only"] and runs["pregated"]["same_tokens_as_gpu_only"]
    assert runs["pregated#noguess"]["metrics"]["first_block_guess"]["blocks"] == []
    g = runs["pregated"]["metrics"]["first_block_guess"]
    assert g["blocks"] and g["rows"] > 0
    text = summ.summarize(res, "x.json")
    assert "| 1 | pregated#noguess | off |" in text and f"| 1 | pregated | run: {g['hits']}/{g['lookups']} |" in text
    # the preamble speaks of the sweep, not of a batch-1 table the run did not make
    assert "The batch sweep alone (no table runs)" in text and "ms/token is the median" not in text
    for bad in ("on_demand,pregated", "gpu_only,pregated#dma", "gpu_only,pregated@lru2", "gpu_only,nope"):
        with pytest.raises(SystemExit):
            bench.parse_sweep_policies(bad)


def test_prediction_check_tells_near_ties_from_disagreements():
    """A disagreement with gpu_only where gpu_only's own top-2 margin is within PRED_TIE_TOL is a near-tie (not a
    failed check); beyond it, or with no margins kept, it counts against the policy."""
    ref, got = [[1, 2, 3], [4, 5, 6]], [[1, 9, 3], [4, 5, 7]]
    tol = bench.PRED_TIE_TOL
    c = bench.prediction_check(ref, got, [[1.0, tol / 2, 1.0], [1.0, 1.0, 2 * tol]])
    assert (c["compared"], c["disagreements"], c["near_ties"], c["beyond_tolerance"]) == (6, 2, 1, 1)
    assert c["at"] == [[0, 1], [1, 2]] and c["margins"] == [tol / 2, 2 * tol]
    c = bench.prediction_check(ref, got, None)
    assert (c["disagreements"], c["near_ties"], c["beyond_tolerance"]) == (2, 0, 2)
    assert bench.prediction_check(ref, ref, None)["disagreements"] == 0


def test_plot_draws_a_row_per_decoding_measured(tmp_path):
    """A greedy-only run's plot has one row of panels (no empty beam-search row); with beam runs, two. The
    summary script draws the same plot again from the JSON (--plots)."""
    import json
    import subprocess

    from PIL import Image

    def run(mode):
        return {"label": f"pregated/{mode}/gpu_only", "policy": "gpu_only", "decoding": mode,
                "metrics": {"ms_per_token_median": 1.0, "peak_allocated_bytes": 2e9}}

    def doc(modes):
        return {"shapes": {"tiny": {"runs": [run(m) for m in modes], "anchors": [],
                                    "floors": {"greedy": {"copy_floor_ms": 0.5, "gpu_only_ms": 1.0}}}},
                "environment": {"compute_device": "cpu", "torch": torch.__version__, "pinned_peak_GBps": None},
                "settings": {"input_tokens": 16, "new_tokens": 4}, "failures": []}

    heights = {}
    for modes in (["greedy"], ["greedy", "beam4"]):
        path = tmp_path / f"{len(modes)}.png"
        bench.plot(path, doc(modes))
        heights[len(modes)] = Image.open(path).size[1]
    assert heights[2] == 2 * heights[1]
    src = tmp_path / "run.json"
    src.write_text(json.dumps(doc(["greedy"])))
    subprocess.run([sys.executable, str(ROOT / "scripts" / "summarize_e2e.py"), str(src), "--plots"], check=True,
                   capture_output=True, timeout=120)
    assert Image.open(tmp_path / "run.png").size[1] == heights[1]


def test_bench_tiny_compressed(tmp_path):
    """--tiny --compress exp4 (bf16 on the CPU): the same random weights packed; every policy gives gpu_only's
    tokens, the copies count the packed bytes (under 80% of the bf16 slot row), the summary says so."""
    res = _bench_tiny(tmp_path, "--compress", "exp4", "--table-runs", "greedy:gpu_only,on_demand,pregated",
                      "--batch-sweep", "1", "--sweep-new-tokens", "2")
    tiny = res["shapes"]["tiny"]
    assert tiny["compress"] == "exp4" and tiny["expert_bytes"] < 0.8 * tiny["slot_bytes"]
    assert res["settings"]["compress"] == res["settings"]["compress_setting"] == "exp4"
    cfg = tiny["config"]
    assert tiny["slot_bytes"] == 2 * 2 * cfg["d_ff"] * cfg["d_model"]
    runs = {r["label"]: r for r in tiny["runs"]}
    for pol in ("on_demand", "pregated"):
        assert runs[f"pregated/greedy/{pol}"]["same_tokens_as_gpu_only"], pol
    c = runs["pregated/greedy/pregated"]["copy"]  # + a missed first-block guess's copy
    assert (cfg["decoder_moe_blocks"] * tiny["expert_bytes"] <= c["decode_bytes_per_step"]
            <= (cfg["decoder_moe_blocks"] + 1) * tiny["expert_bytes"])
    text = summ.summarize(res, "x.json")
    assert "packed losslessly (offload.compress=tiny exp4: " in text


def test_bench_tiny_expv_beside_exp4(tmp_path):
    """--tiny --compress expv --compress-family exp4: the table's runs copy expv's prefix (fewer bytes than exp4's
    row), the family pregated-exp4 runs gpu_only, on_demand and pregated on the same weights, every policy gives
    its format's gpu_only tokens (the same tokens in both), and the summary sets the two side by side."""
    res = _bench_tiny(tmp_path, "--compress", "expv", "--compress-family", "exp4", "--table-runs",
                      "greedy:gpu_only,on_demand,pregated", "--batch-sweep", "1", "--sweep-new-tokens", "2")
    tiny = res["shapes"]["tiny"]
    fam = tiny["codec_family"]
    assert tiny["compress"] == "expv" and fam["compress"] == "exp4" and fam["expert_bytes"] > tiny["expert_bytes"]
    runs = {r["label"]: r for r in tiny["runs"]}
    for family in ("pregated", "pregated-exp4"):
        for pol in ("on_demand", "pregated"):
            assert runs[f"{family}/greedy/{pol}"]["same_tokens_as_gpu_only"], (family, pol)
    assert runs["pregated/greedy/gpu_only"]["tokens"] == runs["pregated-exp4/greedy/gpu_only"]["tokens"]
    text = summ.summarize(res, "x.json")
    assert "Expert formats side by side" in text and "| tiny | greedy | exp4 |" in text
    assert "| tiny | greedy | expv |" in text


@pytest.mark.parametrize("experts_on", ["gpu", "cpu"])
def test_anchor_model_of_a_compressed_store_has_the_same_experts(experts_on):
    """The transformers anchor built from a compressed store (--compress) holds the same expert weights, bitwise, as
    the one built from the uncompressed store of the same random weights (the CPU stands in for the GPU here)."""
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from models.config import preset

    cfg = preset("tiny")
    dev = torch.device("cpu")
    model = bench.build_own(cfg, dev, torch.bfloat16)
    plain = bench.build_store(cfg, model, dev, torch.bfloat16, None)
    a = dict(bench.hf_model(cfg, plain, dev, torch.bfloat16, experts_on).named_parameters())
    experts = [n for n in a if ".expert_" in n]
    for codec in ("exp4", "expv"):
        packed = bench.build_store(cfg, model, dev, torch.bfloat16, None, compress=codec)
        assert packed.compress == codec and packed.expert_bytes < plain.expert_bytes
        b = dict(bench.hf_model(cfg, packed, dev, torch.bfloat16, experts_on).named_parameters())
        assert experts and all(torch.equal(a[n].view(torch.int16), b[n].view(torch.int16)) for n in experts)
