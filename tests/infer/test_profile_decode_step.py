"""scripts/profile_decode_step.py's trace reading: steps told apart by the launch their kernels belong to,
the copies inside a step's window, the tail after its last copy and the head before its first."""

import importlib.util
from pathlib import Path


def _script():
    path = Path(__file__).resolve().parents[2] / "scripts" / "profile_decode_step.py"
    spec = importlib.util.spec_from_file_location("profile_decode_step_for_test", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _kernel(name, ts, dur, corr):
    return {"ph": "X", "cat": "kernel", "name": name, "ts": ts, "dur": dur, "args": {"correlation": corr}}


def test_steps_copies_head_and_tail():
    p = _script()
    events = []
    for step, t0 in ((7, 1000.0), (9, 3000.0)):  # two replays of a 25-kernel graph, 4 us apart per kernel
        events += [_kernel(f"k{i}", t0 + 4 * i, 3.0, step) for i in range(25)]
    events += [_kernel("eager", 500.0, 1.0, 3)]  # an eager launch: not a step
    events += [{"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy HtoD (Pinned -> Device)", "ts": 1010.0, "dur": 60.0,
                "args": {"bytes": 6_000_000}},
               {"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy DtoH (Device -> Pinned)", "ts": 1090.0, "dur": 1.0,
                "args": {"bytes": 1}}]
    steps, copies = p.steps_of({"traceEvents": events})
    assert [len(s) for s in steps] == [25, 25] and steps[0][0]["ts"] == 1000.0
    assert len(copies) == 1  # host -> GPU only
    d = p.describe(steps[0], copies, steps[1][0]["ts"])
    assert d["span_us"] == 99.0 and d["kernels_n"] == 25 and d["kernel_busy_us"] == 75.0
    assert d["kernels"][1]["gap_us"] == 1.0 and d["kernels"][1]["start_us"] == 4.0
    assert d["copies"] == [{"start_us": 10.0, "dur_us": 60.0, "GBps": 100.0}]
    assert d["head"] == {"first_copy_start_us": 10.0}
    # the copy ends at 1070: kernels ending after it (k17 ends at 1071) are the tail, 29 us to the step's end
    assert d["tail"]["after_last_copy_us"] == 29.0 and d["tail"]["kernels_n"] == 8
    d2 = p.describe(steps[1], copies, None)
    assert d2["copies"] == [] and "tail" not in d2
