"""Fine-tuning data in T5 text-to-text form: every task is a list of (input, target) strings per split.

Sources (the `data` config group, conf/data/*.yaml, checked against `DataConf`):

- `docsum`, `span` (kind=docsum|span): an embedded corpus that needs no network and no files, the
  Python standard library's own documentation (`pydoc_data.topics` and the docstrings of a fixed
  list of pure-Python stdlib modules). `docsum` is a real seq2seq task: a docstring's body ->
  its first-line summary. `span` is T5 span corruption (15% noise, mean span 3) over chunks of it.
  Splits are by module (by topic for pydoc topics), through a stable hash of the name, so no text
  leaks across splits and the split of a module is the same on every machine; the texts
  themselves follow the running Python's standard library.
- `jsonl` (kind=jsonl): local files of {"input": ..., "target": ...} lines.
- `xsum`, `squad`, `web_questions` (kind=hf): the paper's tasks. `data.path` reads local files in
  the Hugging Face schema (a directory of <split>.jsonl / .json / .parquet files, as the tests
  write); without it, `datasets.load_dataset(data.dataset)` fetches them by name (network, and
  the optional `datasets` package). Both go through the same row -> Example converters.

Span-corruption texts carry T5's `<extra_id_N>` markers, which the tokenizers encode as sentinels.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import random
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SPLITS = ("train", "validation", "test")


@dataclass
class Example:
    input: str
    target: str
    # Every acceptable answer (QA tasks with several gold answers); empty: just `target`.
    answers: tuple[str, ...] = ()

    @property
    def references(self) -> list[str]:
        return list(self.answers) if self.answers else [self.target]


@dataclass
class DataConf:
    """The `data` config node. One schema for all kinds; each kind reads the fields it needs."""

    name: str = "docsum"
    kind: str = "docsum"  # docsum | span | jsonl | hf
    metric: str = "rouge"  # rouge | em_f1 | loss
    # embedded corpus (docsum, span)
    max_input_bytes: int = 512  # longer docstring bodies are cut at a word boundary
    max_target_bytes: int = 128  # longer summaries are dropped
    min_input_bytes: int = 48
    noise_density: float = 0.15  # span: fraction of words masked
    mean_span_length: float = 3.0  # span: mean masked span, in whitespace words
    chunk_words: int = 64  # span: words per example
    # span: a fresh corruption of every training chunk each pass over the data (T5 corrupts on the fly),
    # seeded by (seed, chunk, epoch), so the training order stays a pure function of (seed, step). Off:
    # one fixed corruption per chunk. Epoch 0 is the fixed corruption either way; other splits never change.
    remask_each_epoch: bool = False
    split_percent: list[int] = field(
        default_factory=lambda: [80, 10, 10]
    )  # train/validation/test by module hash
    # local files (jsonl, hf): a directory of <split>.<ext> files, or a pattern with `{split}`
    path: str | None = None
    # Hugging Face datasets (hf)
    dataset: str | None = None  # name for datasets.load_dataset when `path` is unset
    subset: str | None = None
    schema: str = "xsum"  # row converter: xsum | squad | web_questions
    # our split -> source split, optionally sliced by percent: "train[:95%]", "train[95%:]"
    splits: dict[str, str] = field(default_factory=lambda: {s: s for s in SPLITS})
    # every kind
    input_prefix: str = ""  # prepended to every input (T5 task prefixes: "summarize: ")
    max_examples: dict[str, int] = field(
        default_factory=dict
    )  # cap per split (first N after a seeded shuffle)
    seed: int = 0


class Task:
    """A text-to-text task built from a `data` config node; examples(split, epoch) is deterministic."""

    def __init__(self, conf: DataConf):
        self.conf = conf
        self.name = conf.name
        self.metric = conf.metric
        if self.metric not in ("rouge", "em_f1", "loss"):
            raise ValueError(f"data.metric={self.metric!r}; expected rouge, em_f1 or loss")
        self._cache: dict[str, list[Example]] = {}

    def varies_by_epoch(self, split: str) -> bool:
        """Whether examples(split, epoch) differ between epochs (span's training split, remasked)."""
        return False

    def examples(self, split: str, epoch: int = 0) -> list[Example]:
        """The split's examples; for a split that varies by epoch, those of pass `epoch` over the data
        (the same count and order every epoch). Epoch 0 is cached; a later epoch is made on each call
        (the training loop keeps what it encoded)."""
        if split not in SPLITS:
            raise ValueError(f"split={split!r}; expected one of {SPLITS}")
        if epoch < 0:
            raise ValueError(f"epoch={epoch}; expected >= 0")
        epoch = epoch if self.varies_by_epoch(split) else 0
        if epoch:
            return self._finish(split, self._load(split, epoch))
        if split not in self._cache:
            self._cache[split] = self._finish(split, self._load(split, 0))
        return self._cache[split]

    def _finish(self, split: str, exs: list[Example]) -> list[Example]:
        """The input prefix and the per-split cap (the same examples kept every epoch)."""
        if self.conf.input_prefix:
            exs = [Example(self.conf.input_prefix + e.input, e.target, e.answers) for e in exs]
        cap = self.conf.max_examples.get(split)
        if cap is not None and len(exs) > cap:
            order = list(range(len(exs)))
            random.Random(_stable_int(f"{self.conf.seed}/{split}/cap")).shuffle(order)
            exs = [exs[i] for i in sorted(order[:cap])]
        return exs

    def _load(self, split: str, epoch: int = 0) -> list[Example]:  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, metric={self.metric!r})"


def build_task(data_conf: Any) -> Task:
    """A Task from a `data` config node (OmegaConf node or dict from conf/data/<name>.yaml)."""
    conf = _as_dataconf(data_conf)
    kinds = {"docsum": DocSumTask, "span": SpanTask, "jsonl": JsonlTask, "hf": HFTask}
    if conf.kind not in kinds:
        raise ValueError(f"data.kind={conf.kind!r}; expected one of {sorted(kinds)}")
    return kinds[conf.kind](conf)


def _as_dataconf(c: Any) -> DataConf:
    if isinstance(c, DataConf):
        return c
    try:
        from omegaconf import OmegaConf

        if OmegaConf.is_config(c):
            c = OmegaConf.to_container(c, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    c = dict(c)
    known = set(DataConf.__dataclass_fields__)
    bad = sorted(set(c) - known)
    if bad:
        raise ValueError(f"unknown data config key(s) {bad}; known: {sorted(known)}")
    return DataConf(**c)


def _stable_int(s: str) -> int:
    """A hash that is the same on every machine and Python version (unlike hash())."""
    return int.from_bytes(hashlib.sha256(s.encode("utf-8")).digest()[:8], "big")


def split_of(name: str, percent: list[int] | tuple[int, ...] = (80, 10, 10)) -> str:
    """Deterministic split of a module or topic name."""
    r = _stable_int(name) % sum(percent)
    if r < percent[0]:
        return "train"
    return "validation" if r < percent[0] + percent[1] else "test"


# -- the embedded corpus: the standard library's documentation -------------------------------
# Pure-Python modules that import quickly and exist in CPython 3.10-3.13 on Linux (none of the
# ones removed by PEP 594, nothing that needs a GUI or a network).
STDLIB_MODULES = (
    "abc",
    "argparse",
    "ast",
    "asyncio.events",
    "asyncio.locks",
    "asyncio.queues",
    "asyncio.streams",
    "asyncio.tasks",
    "base64",
    "bdb",
    "bisect",
    "calendar",
    "cmd",
    "code",
    "codecs",
    "codeop",
    "collections",
    "colorsys",
    "concurrent.futures._base",
    "configparser",
    "contextlib",
    "copy",
    "cProfile",
    "csv",
    "dataclasses",
    "datetime",
    "decimal",
    "difflib",
    "dis",
    "doctest",
    "email.message",
    "email.utils",
    "enum",
    "filecmp",
    "fnmatch",
    "fractions",
    "ftplib",
    "functools",
    "getopt",
    "gettext",
    "glob",
    "graphlib",
    "gzip",
    "heapq",
    "hmac",
    "html.parser",
    "http.client",
    "http.cookiejar",
    "http.cookies",
    "http.server",
    "imaplib",
    "importlib.metadata",
    "inspect",
    "ipaddress",
    "json.decoder",
    "json.encoder",
    "locale",
    "logging",
    "logging.handlers",
    "lzma",
    "mailbox",
    "mimetypes",
    "multiprocessing.pool",
    "netrc",
    "numbers",
    "operator",
    "optparse",
    "os",
    "pathlib",
    "pdb",
    "pickle",
    "pickletools",
    "pkgutil",
    "platform",
    "plistlib",
    "poplib",
    "pprint",
    "profile",
    "pstats",
    "pydoc",
    "queue",
    "quopri",
    "random",
    "reprlib",
    "sched",
    "secrets",
    "selectors",
    "shelve",
    "shlex",
    "shutil",
    "smtplib",
    "socketserver",
    "sqlite3.dbapi2",
    "statistics",
    "string",
    "subprocess",
    "sysconfig",
    "tarfile",
    "tempfile",
    "textwrap",
    "threading",
    "timeit",
    "tokenize",
    "trace",
    "traceback",
    "typing",
    "unittest.case",
    "unittest.mock",
    "urllib.parse",
    "urllib.request",
    "uuid",
    "wave",
    "weakref",
    "wsgiref.handlers",
    "xml.dom.minidom",
    "xml.etree.ElementTree",
    "xmlrpc.client",
    "zipfile",
    "zoneinfo._zoneinfo",
)


@dataclass(frozen=True)
class Doc:
    module: str  # split key: the module, or "pydoc_topic:<topic>"
    name: str  # qualified name of the documented object
    text: str


_DOCS: list[Doc] | None = None


def stdlib_docs() -> list[Doc]:
    """Every docstring of the listed modules (module, classes, functions, methods defined there),
    plus the pydoc help topics; deduplicated (first occurrence in module order wins)."""
    global _DOCS
    if _DOCS is not None:
        return _DOCS
    docs: list[Doc] = []
    seen: set[str] = set()

    def add(module: str, name: str, text: str | None) -> None:
        if not text:
            return
        text = text.strip()
        if len(text) < 20 or text in seen:
            return
        seen.add(text)
        docs.append(Doc(module, name, text))

    for modname in sorted(STDLIB_MODULES):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                mod = importlib.import_module(modname)
        except Exception:  # an optional C extension may be missing on some builds
            continue
        add(modname, modname, inspect.getdoc(mod))
        for attr, obj in sorted(vars(mod).items()):
            if attr.startswith("_") or getattr(obj, "__module__", None) != mod.__name__:
                continue
            if inspect.isclass(obj):
                add(modname, f"{modname}.{attr}", inspect.getdoc(obj) if obj.__doc__ else None)
                for mname, meth in sorted(vars(obj).items()):
                    if mname.startswith("_") and mname != "__init__":
                        continue
                    fn = getattr(meth, "__func__", meth)
                    if inspect.isfunction(fn) and fn.__doc__:
                        add(modname, f"{modname}.{attr}.{mname}", inspect.cleandoc(fn.__doc__))
            elif inspect.isfunction(obj) and obj.__doc__:
                add(modname, f"{modname}.{attr}", inspect.cleandoc(obj.__doc__))
    try:
        from pydoc_data.topics import topics
    except ImportError:  # pragma: no cover - some distributions strip it
        topics = {}
    for topic in sorted(topics):
        add(f"pydoc_topic:{topic}", topic, topics[topic])
    _DOCS = docs
    return docs


def _cut(text: str, limit: int) -> str:
    """At most `limit` UTF-8 bytes, cut at a word boundary."""
    b = text.encode("utf-8")
    if len(b) <= limit:
        return text
    cut = b[:limit].decode("utf-8", errors="ignore")
    return cut.rsplit(" ", 1)[0] if " " in cut else cut


def _squash(text: str) -> str:
    return " ".join(text.split())


class DocSumTask(Task):
    """Docstring body -> its first-line summary (docstrings whose first paragraph is one line).
    A body that occurs twice (an overriding method's copy) is kept once, in its first module."""

    def _load(self, split: str, epoch: int = 0) -> list[Example]:
        c = self.conf
        out, seen = [], set()
        for d in stdlib_docs():
            if d.module.startswith("pydoc_topic:"):
                continue
            head, sep, body = d.text.partition("\n\n")
            if not sep or "\n" in head.strip():
                continue
            target = head.strip()
            body = _squash(body)
            if len(target.encode()) > c.max_target_bytes or len(target) < 8:
                continue
            if len(body.encode()) < c.min_input_bytes:
                continue
            inp = _cut(body, c.max_input_bytes)
            if inp in seen:
                continue
            seen.add(inp)
            if split_of(d.module, c.split_percent) == split:
                out.append(Example(inp, target))
        return out


def random_spans_noise_mask(
    length: int, noise_density: float, mean_span: float, rng: random.Random
) -> list[bool]:
    """T5's span-corruption mask: about noise_density * length positions in spans of mean length
    `mean_span`, alternating with non-noise spans, the text starting with a non-noise span."""
    num_noise = max(1, min(length - 1, round(length * noise_density)))
    num_spans = max(1, round(num_noise / mean_span))
    num_keep = length - num_noise

    def segments(total: int, n: int) -> list[int]:
        # a random partition of `total` into n positive parts
        cuts = sorted(rng.sample(range(1, total), n - 1)) if n > 1 else []
        edges = [0, *cuts, total]
        return [b - a for a, b in zip(edges, edges[1:])]

    num_spans = min(num_spans, num_noise, num_keep)
    noise, keep = segments(num_noise, num_spans), segments(num_keep, num_spans)
    mask: list[bool] = []
    for k, n in zip(keep, noise):
        mask += [False] * k + [True] * n
    return mask


def span_corrupt(
    words: list[str], noise_density: float, mean_span: float, rng: random.Random, max_sentinels: int = 100
) -> Example:
    """(input with each masked span replaced by <extra_id_i>, target listing the spans), T5 style;
    tokens are whitespace-separated words."""
    mask = random_spans_noise_mask(len(words), noise_density, mean_span, rng)
    inp: list[str] = []
    tgt: list[str] = []
    sid = 0
    for i, (w, m) in enumerate(zip(words, mask)):
        if m and (i == 0 or not mask[i - 1]):
            if sid >= max_sentinels:  # out of sentinels: keep the rest of the text
                mask[i:] = [False] * (len(mask) - i)
                m = False
            else:
                inp.append(f"<extra_id_{sid}>")
                tgt.append(f"<extra_id_{sid}>")
                sid += 1
        (tgt if m else inp).append(w)
    tgt.append(f"<extra_id_{sid}>")
    return Example(" ".join(inp), " ".join(tgt))


class SpanTask(Task):
    """T5 span corruption over `chunk_words`-word chunks of the embedded corpus; with
    `remask_each_epoch`, the training chunks get a fresh corruption on every pass over the data."""

    def varies_by_epoch(self, split: str) -> bool:
        return split == "train" and self.conf.remask_each_epoch

    def _load(self, split: str, epoch: int = 0) -> list[Example]:
        c = self.conf
        out = []
        for d in stdlib_docs():
            if split_of(d.module, c.split_percent) != split:
                continue
            words = d.text.split()
            for j in range(0, len(words), c.chunk_words):
                chunk = words[j : j + c.chunk_words]
                if len(chunk) < 8:
                    continue
                key = f"{c.seed}/{d.name}/{j}" + (f"/epoch{epoch}" if epoch else "")
                ex = span_corrupt(chunk, c.noise_density, c.mean_span_length, random.Random(_stable_int(key)))
                ex = Example(_cut(ex.input, c.max_input_bytes * 2), ex.target)
                out.append(ex)
        return out


# -- local files and Hugging Face datasets ----------------------------------------------------
_SLICE = re.compile(r"^(?P<name>[\w.-]+)(\[(?P<a>\d*)%?:(?P<b>\d*)%?\])?$")


def _parse_split(spec: str) -> tuple[str, float, float]:
    m = _SLICE.match(spec.strip())
    if not m:
        raise ValueError(f"split spec {spec!r}; expected NAME or NAME[a%:b%]")
    a = float(m["a"]) / 100 if m["a"] else 0.0
    b = float(m["b"]) / 100 if m["b"] else 1.0
    return m["name"], a, b


def _read_rows(path: Path) -> list[dict[str, Any]]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        with path.open(encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    if suffix == ".json":
        d = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(d, dict) and "data" in d:
            d = d["data"]
        if isinstance(d, dict):  # columnar {"col": [..], ...}
            cols = list(d)
            return [dict(zip(cols, vals)) for vals in zip(*(d[c] for c in cols))]
        return list(d)
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as e:
            raise ImportError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from e
        return pq.read_table(path).to_pylist()
    raise ValueError(f"{path}: unsupported file type {suffix!r}; use .jsonl, .json or .parquet")


def _local_file(base: str, split: str) -> Path:
    if "{split}" in base:
        p = Path(base.format(split=split))
        if not p.exists():
            raise FileNotFoundError(f"data.path={base!r}: {p} does not exist")
        return p
    d = Path(base)
    if not d.is_dir():
        raise FileNotFoundError(f"data.path={base!r} is not a directory (or a pattern with {{split}})")
    for ext in (".jsonl", ".json", ".parquet"):
        p = d / f"{split}{ext}"
        if p.exists():
            return p
    raise FileNotFoundError(f"data.path={base!r}: no {split}.jsonl, {split}.json or {split}.parquet in {d}")


def _source_rows(conf: DataConf, split: str) -> list[dict[str, Any]]:
    spec = conf.splits.get(split, split)
    name, a, b = _parse_split(spec)
    if conf.path:
        rows = _read_rows(_local_file(conf.path, name))
    else:
        if not conf.dataset:
            raise ValueError(f"data={conf.name}: set data.path (local files) or data.dataset (a hub name)")
        try:
            import datasets
        except ImportError as e:
            raise ImportError(
                f"data={conf.name} loads {conf.dataset!r} through Hugging Face datasets: "
                "pip install datasets (or point data.path at local files in the same schema)"
            ) from e
        rows = list(datasets.load_dataset(conf.dataset, conf.subset, split=name))
    n = len(rows)
    return rows[round(a * n) : round(b * n)]


def _answers(v: Any) -> list[str]:
    if isinstance(v, dict):  # squad: {"text": [...], "answer_start": [...]}
        v = v.get("text", [])
    if isinstance(v, str):
        return [v]
    return [str(x) for x in v]


def _row_xsum(r: dict[str, Any]) -> Example:
    return Example("summarize: " + _squash(r["document"]), _squash(r["summary"]))


def _row_squad(r: dict[str, Any]) -> Example:
    ans = _answers(r["answers"])
    return Example(
        f"question: {_squash(r['question'])} context: {_squash(r['context'])}",
        ans[0] if ans else "",
        tuple(ans),
    )


def _row_web_questions(r: dict[str, Any]) -> Example:
    # closed-book: the question alone
    ans = _answers(r["answers"])
    return Example(f"question: {_squash(r['question'])}", ans[0] if ans else "", tuple(ans))


ROW_CONVERTERS = {"xsum": _row_xsum, "squad": _row_squad, "web_questions": _row_web_questions}


class HFTask(Task):
    def _load(self, split: str, epoch: int = 0) -> list[Example]:
        if self.conf.schema not in ROW_CONVERTERS:
            raise ValueError(f"data.schema={self.conf.schema!r}; expected one of {sorted(ROW_CONVERTERS)}")
        conv = ROW_CONVERTERS[self.conf.schema]
        out = []
        for i, r in enumerate(_source_rows(self.conf, split)):
            try:
                out.append(conv(r))
            except KeyError as e:
                raise ValueError(
                    f"data={self.conf.name} ({self.conf.schema} schema), {split} row {i}: missing column {e}"
                ) from e
        return out


class JsonlTask(Task):
    def _load(self, split: str, epoch: int = 0) -> list[Example]:
        if not self.conf.path:
            raise ValueError(
                "data=jsonl needs data.path (a directory of <split>.jsonl files or a {split} pattern)"
            )
        out = []
        for i, r in enumerate(_source_rows(self.conf, split)):
            if "input" not in r or "target" not in r:
                raise ValueError(
                    f"data.path={self.conf.path}: {split} line {i + 1} lacks 'input' or 'target'"
                )
            out.append(Example(str(r["input"]), str(r["target"])))
        return out
