"""scripts/probe_dma_wait.py on the CPU (its smoke-test mode): every wait that cannot be satisfied counts one
timeout, a satisfied one none, and more polls take longer."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))

import probe_dma_wait as pdw  # noqa: E402


def test_probe_dma_wait_runs_on_the_cpu(tmp_path):
    out = tmp_path / "w.json"
    res = pdw.main(["--out", str(out), "--polls", "20,400", "--reps", "2"])
    few, many = res["rows"]
    assert few["polls"] == 20 and many["polls"] == 400
    assert few["timeouts_counted"] == many["timeouts_counted"] == 2 and many["timed_out_every_rep"]
    assert many["ms_median"] > few["ms_median"] > 0
    assert res["satisfied_wait"]["timeouts_counted"] == 0
    assert res["default_budget_s"] > 0
    assert json.loads(out.read_text())["meta"]["command"].startswith("python3 scripts/probe_dma_wait.py")
    assert "| 400 |" in out.with_suffix(".md").read_text()
