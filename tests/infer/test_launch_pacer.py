"""infer.engine.launch_pacer: off unless PGMOE_LAUNCH_PACE=1 with the native dma copier on CUDA; its wait ends when
the copier handles another plan, or runs out after PACE_TIMEOUT_S."""

import threading
import time
from types import SimpleNamespace

from infer import engine
from infer.policies import OffloadRunner


class _Dma:
    def __init__(self, api="native", cuda=True):
        self.api, self.cuda, self.issued = api, cuda, 0


def _runner(dma):
    r = object.__new__(OffloadRunner)  # only .pool.dma is read
    r.pool = SimpleNamespace(dma=dma)
    return r


def test_off_by_default_and_where_it_cannot_run(monkeypatch):
    monkeypatch.delenv("PGMOE_LAUNCH_PACE", raising=False)
    assert engine.launch_pacer(_runner(_Dma())) is None
    monkeypatch.setenv("PGMOE_LAUNCH_PACE", "1")
    assert engine.launch_pacer(None) is None
    assert engine.launch_pacer(_runner(None)) is None
    assert engine.launch_pacer(_runner(_Dma(api="driver"))) is None  # a Python copier needs the GIL
    assert engine.launch_pacer(_runner(_Dma(cuda=False))) is None


def test_waits_for_the_next_plan_or_runs_out(monkeypatch):
    monkeypatch.setenv("PGMOE_LAUNCH_PACE", "1")
    monkeypatch.setattr(engine, "PACE_TIMEOUT_S", 0.5)
    dma = _Dma()
    pace = engine.launch_pacer(_runner(dma))
    assert pace is not None

    def handle():
        time.sleep(0.05)
        dma.issued += 1

    t = threading.Thread(target=handle)
    t0 = time.perf_counter()
    t.start()
    assert pace() is False  # the plan came
    t.join()
    assert 0.04 <= time.perf_counter() - t0 < 0.5
    monkeypatch.setattr(engine, "PACE_TIMEOUT_S", 0.02)
    t0 = time.perf_counter()
    assert pace() is True  # no plan: runs out
    assert time.perf_counter() - t0 >= 0.02
