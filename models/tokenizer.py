"""Tokenizers: a checkpoint's own (T5 SentencePiece, through transformers) when its directory has
tokenizer files, and a byte-level tokenizer (ByT5 style) for the models this project trains.

Byte ids: 0 pad, 1 eos, 2 unk, 3..258 the bytes 0..255, then sentinels (span corruption's
<extra_id_i>) from 259 up to vocab_size - 1.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

BYTE_TOKENIZER_FILE = "byte_tokenizer.json"
_SENTINEL_RE = re.compile(r"<extra_id_(\d+)>")
_HF_FILES = ("tokenizer.json", "spiece.model", "tokenizer_config.json")


class ByteTokenizer:
    pad_token_id, eos_token_id, unk_token_id = 0, 1, 2
    offset = 3

    def __init__(self, vocab_size: int = 384):
        if vocab_size < self.offset + 256 + 1:
            raise ValueError(f"a byte tokenizer needs vocab_size >= {self.offset + 257}, got {vocab_size}")
        self.vocab_size = vocab_size
        self.num_sentinels = vocab_size - (self.offset + 256)
        self._byte_ids = [b + self.offset for b in range(256)]  # byte -> id, a table lookup per byte

    def sentinel(self, i: int) -> int:
        if not 0 <= i < self.num_sentinels:
            raise ValueError(f"sentinel {i} out of range (this tokenizer has {self.num_sentinels})")
        return self.offset + 256 + i

    def encode(self, text: str, add_eos: bool = True, max_length: int | None = None) -> list[int]:
        """UTF-8 bytes; the text `<extra_id_N>` becomes sentinel N (as in T5's vocabulary)."""
        ids: list[int] = []
        for i, part in enumerate(_SENTINEL_RE.split(text)):
            if i % 2:
                ids.append(self.sentinel(int(part)))
            else:
                ids.extend(map(self._byte_ids.__getitem__, part.encode("utf-8")))
        if max_length is not None:
            ids = ids[: max_length - (1 if add_eos else 0)]
        return ids + [self.eos_token_id] if add_eos else ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        out, buf = [], bytearray()
        for i in ids:
            if i == self.eos_token_id and skip_special_tokens:
                break
            if self.offset <= i < self.offset + 256:
                buf.append(i - self.offset)
                continue
            if buf:
                out.append(buf.decode("utf-8", errors="replace"))
                buf = bytearray()
            if i >= self.offset + 256:
                out.append(f"<extra_id_{i - self.offset - 256}>")
            elif not skip_special_tokens:
                out.append({0: "<pad>", 1: "</s>", 2: "<unk>"}[i])
        if buf:
            out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out)

    def batch_decode(self, rows, skip_special_tokens: bool = True) -> list[str]:
        return [self.decode(r, skip_special_tokens) for r in rows]

    def __call__(self, texts: list[str], max_length: int | None = None) -> dict[str, torch.Tensor]:
        return pad_batch([self.encode(t, max_length=max_length) for t in texts], self.pad_token_id)

    def save(self, path: str | Path) -> None:
        Path(path, BYTE_TOKENIZER_FILE).write_text(json.dumps({"type": "byte", "vocab_size": self.vocab_size}) + "\n")


class HFTokenizer:
    """A checkpoint's own tokenizer (T5 SentencePiece) through transformers; same interface."""

    def __init__(self, path: str | Path):
        try:
            from transformers import AutoTokenizer
        except ImportError as e:  # pragma: no cover
            raise ImportError(f"{path} has tokenizer files; reading them needs `pip install transformers`") from e
        self.tok = AutoTokenizer.from_pretrained(str(path))
        self.pad_token_id = self.tok.pad_token_id
        self.eos_token_id = self.tok.eos_token_id
        self.vocab_size = len(self.tok)

    def encode(self, text: str, add_eos: bool = True, max_length: int | None = None) -> list[int]:
        ids = self.tok(text, add_special_tokens=add_eos, truncation=max_length is not None, max_length=max_length)
        return ids["input_ids"]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def batch_decode(self, rows, skip_special_tokens: bool = True) -> list[str]:
        return [self.decode(r, skip_special_tokens) for r in rows]

    def __call__(self, texts: list[str], max_length: int | None = None) -> dict[str, torch.Tensor]:
        return pad_batch([self.encode(t, max_length=max_length) for t in texts], self.pad_token_id)


def pad_batch(rows: list[list[int]], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Right-pad token lists -> input_ids and attention_mask [B, L]."""
    n = max(1, max(len(r) for r in rows))
    ids = torch.full((len(rows), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), n), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def load_tokenizer(path: str | Path | None = None, vocab_size: int = 384):
    """The tokenizer of a checkpoint directory; a byte tokenizer when it has no tokenizer files."""
    if path is not None:
        p = Path(path)
        if (p / BYTE_TOKENIZER_FILE).exists():
            return ByteTokenizer(json.loads((p / BYTE_TOKENIZER_FILE).read_text())["vocab_size"])
        if any((p / f).exists() for f in _HF_FILES):
            return HFTokenizer(p)
    return ByteTokenizer(vocab_size)
