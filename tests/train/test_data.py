"""Data loaders on the embedded corpus and on fixture files written here (no network)."""

import json
import random
import sys
import types

import pytest

from train.data import Example, build_task, span_corrupt, split_of


def test_docsum_is_deterministic_disjoint_and_summarises():
    t1, t2 = (
        build_task({"name": "docsum", "kind": "docsum"}),
        build_task({"name": "docsum", "kind": "docsum"}),
    )
    splits = {s: t1.examples(s) for s in ("train", "validation", "test")}
    assert all(len(v) > 20 for v in splits.values())
    assert splits["train"] == t2.examples("train")
    inputs = [{e.input for e in v} for v in splits.values()]
    assert not (inputs[0] & inputs[1]) and not (inputs[0] & inputs[2]) and not (inputs[1] & inputs[2])
    for e in splits["train"][:50]:
        assert "\n" not in e.target and 8 <= len(e.target) <= 128 and len(e.input.encode()) <= 512


def test_split_by_module_is_stable():
    # sha256-based: the same on every machine and Python version
    assert [split_of(m) for m in ("json.decoder", "argparse", "pathlib", "zipfile")] == [
        split_of(m) for m in ("json.decoder", "argparse", "pathlib", "zipfile")
    ]
    counts = {s: 0 for s in ("train", "validation", "test")}
    for i in range(2000):
        counts[split_of(f"mod{i}")] += 1
    assert 1450 < counts["train"] < 1750 and counts["validation"] > 120 and counts["test"] > 120


def test_span_corruption_format():
    words = [f"w{i}" for i in range(100)]
    ex = span_corrupt(words, 0.15, 3.0, random.Random(0))
    n_inp = [w for w in ex.input.split() if not w.startswith("<extra_id_")]
    n_tgt = [w for w in ex.target.split() if not w.startswith("<extra_id_")]
    assert len(n_tgt) == 15 and len(n_inp) == 85
    assert (
        ex.target.startswith("<extra_id_0>")
        and ex.input.count("<extra_id_") == ex.target.count("<extra_id_") - 1
    )
    # reassembling the spans into the input gives back the text
    assert _rebuild(ex) == words


def _rebuild(ex):
    """The text of a span-corruption example: each sentinel of the input replaced by its span."""
    spans, cur = {}, None
    for w in ex.target.split():
        if w.startswith("<extra_id_"):
            cur = w
            spans[cur] = []
        else:
            spans[cur].append(w)
    return [x for w in ex.input.split() for x in (spans[w] if w in spans else [w])]


def test_span_remask_each_epoch_corrupts_the_same_text_afresh():
    conf = {"name": "span", "kind": "span", "metric": "loss", "max_examples": {"validation": 64}}
    fixed, remask = build_task(conf), build_task({**conf, "remask_each_epoch": True})
    assert not fixed.varies_by_epoch("train") and remask.varies_by_epoch("train")
    assert not remask.varies_by_epoch("validation")
    e0, e1, e2 = (remask.examples("train", e) for e in (0, 1, 2))
    assert e0 == fixed.examples("train") == fixed.examples("train", 5)  # epoch 0: the fixed corruption
    assert len(e0) == len(e1) == len(e2) > 1000
    assert e1 == build_task({**conf, "remask_each_epoch": True}).examples("train", 1)  # deterministic
    # the same chunks, masked differently: the texts agree, the inputs mostly do not
    same_text = sum(_rebuild(a) == _rebuild(b) for a, b in zip(e0, e1))
    assert same_text >= 0.97 * len(e0), same_text  # the rest: inputs cut at max_input_bytes * 2
    # (a chunk with one masked span always loses its tail, as in T5's mask: only the span count varies it)
    multi = [i for i, a in enumerate(e0) if a.target.count("<extra_id_") >= 3]  # two spans or more
    assert len(multi) > 0.5 * len(e0)
    for x, y in ((e0, e1), (e1, e2)):
        assert sum(x[i].input != y[i].input for i in multi) >= 0.95 * len(multi)
    assert remask.examples("validation", 3) == fixed.examples("validation")  # held-out splits never change
    with pytest.raises(ValueError, match="epoch=-1"):
        remask.examples("train", -1)


def test_span_task_encodes_sentinels():
    from models.tokenizer import ByteTokenizer

    t = build_task({"name": "span", "kind": "span", "metric": "loss", "max_examples": {"validation": 10}})
    ex = t.examples("validation")
    assert len(ex) == 10 and "<extra_id_0>" in ex[0].target
    tok = ByteTokenizer(384)
    assert tok.sentinel(0) in tok.encode(ex[0].target)


def test_jsonl(tmp_path):
    for split, n in (("train", 5), ("validation", 2), ("test", 3)):
        (tmp_path / f"{split}.jsonl").write_text(
            "".join(json.dumps({"input": f"{split} in {i}", "target": f"out {i}"}) + "\n" for i in range(n))
        )
    t = build_task({"name": "jsonl", "kind": "jsonl", "path": str(tmp_path)})
    assert [len(t.examples(s)) for s in ("train", "validation", "test")] == [5, 2, 3]
    assert t.examples("test")[1] == Example("test in 1", "out 1")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "train.jsonl").write_text('{"input": "x"}\n')
    with pytest.raises(ValueError, match="lacks 'input' or 'target'"):
        build_task({"name": "jsonl", "kind": "jsonl", "path": str(tmp_path / "bad")}).examples("train")


def _write(path, rows, fmt):
    if fmt == "jsonl":
        path.with_suffix(".jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == "json":
        path.with_suffix(".json").write_text(json.dumps(rows))
    else:
        pa = pytest.importorskip("pyarrow")
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path.with_suffix(".parquet"))


def _conf(name):
    from omegaconf import OmegaConf

    return OmegaConf.load(f"conf/data/{name}.yaml")


@pytest.mark.parametrize("fmt", ["jsonl", "json", "parquet"])
def test_xsum_schema(tmp_path, fmt):
    for split in ("train", "validation", "test"):
        rows = [
            {"document": f"Doc {split} {i}\nmore  text.", "summary": f"Sum {i}.", "id": str(i)}
            for i in range(4)
        ]
        _write(tmp_path / split, rows, fmt)
    c = _conf("xsum")
    c.path = str(tmp_path)
    t = build_task(c)
    assert t.metric == "rouge"
    assert t.examples("validation")[2] == Example("summarize: Doc validation 2 more text.", "Sum 2.")


def test_squad_schema_and_split_slices(tmp_path):
    rows = [
        {
            "id": str(i),
            "title": "T",
            "context": f"Context {i}.",
            "question": f"Q{i}?",
            "answers": {"text": [f"a{i}", f"b{i}"], "answer_start": [0, 3]},
        }
        for i in range(20)
    ]
    _write(tmp_path / "train", rows, "jsonl")
    _write(tmp_path / "validation", rows[:3], "jsonl")
    c = _conf("squad")
    c.path = str(tmp_path)
    t = build_task(c)
    tr, va, te = (t.examples(s) for s in ("train", "validation", "test"))
    assert (len(tr), len(va), len(te)) == (19, 1, 3)  # train[:95%], train[95%:], validation
    assert va[0] == Example("question: Q19? context: Context 19.", "a19", ("a19", "b19"))
    assert te[0].references == ["a0", "b0"] and t.metric == "em_f1"


def test_web_questions_schema(tmp_path):
    rows = [{"url": "u", "question": f"who is {i}?", "answers": [f"x{i}", f"y{i}"]} for i in range(10)]
    _write(tmp_path / "train", rows, "jsonl")
    _write(tmp_path / "test", rows[:2], "json")
    c = _conf("web_questions")
    c.path = str(tmp_path)
    t = build_task(c)
    assert len(t.examples("train")) == 9 and len(t.examples("validation")) == 1
    assert t.examples("test")[1] == Example("question: who is 1?", "x1", ("x1", "y1"))


def test_hub_path_goes_through_datasets(monkeypatch):
    calls = []

    def load_dataset(name, subset, split):
        calls.append((name, subset, split))
        return [{"question": "q?", "answers": ["a"]}] * 10

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    t = build_task(_conf("web_questions"))
    assert len(t.examples("validation")) == 1 and calls == [("Stanford/web_questions", None, "train")]


def test_missing_column_is_named(tmp_path):
    _write(tmp_path / "train", [{"document": "d"}], "jsonl")
    c = _conf("xsum")
    c.path = str(tmp_path)
    with pytest.raises(ValueError, match="missing column 'summary'"):
        build_task(c).examples("train")
