"""A minimal offline BERT WordPiece tokenizer (uncased), read from a ``vocab.txt``.

Reproduces what Hugging Face's ``BertTokenizer`` / ``tokenizers``' ``BertNormalizer`` +
``BertPreTokenizer`` + ``WordPiece`` do for the uncased all-MiniLM-L6-v2 vocabulary:

1. clean: drop NUL, U+FFFD and control characters, map every whitespace to a space;
2. put spaces around CJK ideographs (each becomes its own word);
3. lowercase, then strip accents (NFD, drop combining marks) — uncased BERT does both;
4. split on whitespace, then make every punctuation character its own word (ASCII
   symbols ``!"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~`` count as punctuation, like BERT);
5. WordPiece each word greedily, longest match first, continuation pieces prefixed with
   ``##``; a word with no segmentation (or longer than 100 characters) is ``[UNK]``;
6. ``[CLS] ... [SEP]``, truncated to ``max_len`` tokens, padded with ``[PAD]`` (id 0).

No downloads, no dependencies beyond numpy.
"""

from __future__ import annotations

import dataclasses
import os
import unicodedata
from typing import Sequence

import numpy as np

_MAX_WORD_CHARS = 100


def _is_whitespace(ch: str) -> bool:
  if ch in (" ", "\t", "\n", "\r"):
    return True
  return unicodedata.category(ch) == "Zs"


def _is_control(ch: str) -> bool:
  if ch in ("\t", "\n", "\r"):
    return False
  return unicodedata.category(ch).startswith("C")


def _is_punctuation(ch: str) -> bool:
  cp = ord(ch)
  if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
    return True
  return unicodedata.category(ch).startswith("P")


def _is_cjk(cp: int) -> bool:
  return (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF
          or 0x2A700 <= cp <= 0x2B73F or 0x2B740 <= cp <= 0x2B81F or 0x2B820 <= cp <= 0x2CEAF
          or 0xF900 <= cp <= 0xFAFF or 0x2F800 <= cp <= 0x2FA1F)


def normalize(text: str, *, lowercase: bool = True, strip_accents: bool = True) -> str:
  """Steps 1-3: cleaned, CJK-spaced, lowercased and accent-stripped text."""
  out = []
  for ch in text:
    cp = ord(ch)
    if cp == 0 or cp == 0xFFFD or _is_control(ch):
      continue
    if _is_whitespace(ch):
      out.append(" ")
    elif _is_cjk(cp):
      out.append(f" {ch} ")
    else:
      out.append(ch)
  text = "".join(out)
  if lowercase:
    text = text.lower()
  if strip_accents:
    text = "".join(c for c in unicodedata.normalize("NFD", text)
                   if unicodedata.category(c) != "Mn")
  return text


def pre_tokenize(text: str) -> list[str]:
  """Step 4: whitespace split, then every punctuation character is its own word."""
  words = []
  for chunk in text.split():
    cur = []
    for ch in chunk:
      if _is_punctuation(ch):
        if cur:
          words.append("".join(cur))
          cur = []
        words.append(ch)
      else:
        cur.append(ch)
    if cur:
      words.append("".join(cur))
  return words


def load_vocab(path: str | os.PathLike) -> dict[str, int]:
  """``token -> id`` from a ``vocab.txt`` (one token per line, id = line number)."""
  with open(path, encoding="utf-8") as f:
    return {line.rstrip("\n"): i for i, line in enumerate(f)}


@dataclasses.dataclass(frozen=True, eq=False)
class WordPieceTokenizer:
  """Uncased BERT WordPiece tokenizer.

  Attributes:
    vocab: ``token -> id``; must contain ``[PAD] [UNK] [CLS] [SEP]``.
    lowercase: lowercase the text (uncased models).
    strip_accents: strip combining marks after NFD (defaults to ``lowercase``, like BERT).
  """

  vocab: dict[str, int]
  lowercase: bool = True
  strip_accents: bool | None = None

  def __post_init__(self):
    missing = [t for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]") if t not in self.vocab]
    if missing:
      raise ValueError(f"vocab lacks the special token(s) {missing}")
    if self.strip_accents is None:
      object.__setattr__(self, "strip_accents", self.lowercase)

  @classmethod
  def from_file(cls, path: str | os.PathLike, **kwargs) -> "WordPieceTokenizer":
    return cls(load_vocab(path), **kwargs)

  @property
  def pad_id(self) -> int:
    return self.vocab["[PAD]"]

  def wordpiece(self, word: str) -> list[str]:
    """Step 5: greedy longest-match-first segmentation of one word."""
    if len(word) > _MAX_WORD_CHARS:
      return ["[UNK]"]
    pieces, start = [], 0
    while start < len(word):
      end, piece = len(word), None
      while start < end:
        sub = word[start:end] if start == 0 else "##" + word[start:end]
        if sub in self.vocab:
          piece = sub
          break
        end -= 1
      if piece is None:
        return ["[UNK]"]
      pieces.append(piece)
      start = end
    return pieces

  def tokenize(self, text: str) -> list[str]:
    """Word pieces of ``text`` (no special tokens)."""
    text = normalize(text, lowercase=self.lowercase, strip_accents=bool(self.strip_accents))
    return [p for w in pre_tokenize(text) for p in self.wordpiece(w)]

  def encode(self, text: str, max_len: int | None = None) -> list[int]:
    """``[CLS] pieces [SEP]`` ids, the pieces truncated so the total is ``<= max_len``."""
    if max_len is not None and max_len < 2:
      raise ValueError(f"max_len={max_len} must leave room for [CLS] and [SEP]")
    ids = [self.vocab[t] for t in self.tokenize(text)]
    if max_len is not None:
      ids = ids[:max_len - 2]
    return [self.vocab["[CLS]"]] + ids + [self.vocab["[SEP]"]]

  def batch_encode(self, texts: Sequence[str], max_len: int,
                   pad_to: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Padded ``(ids, mask)``, both int32 ``(len(texts), L)``.

    ``L`` is ``pad_to`` if given, else the longest encoding (at most ``max_len``).
    """
    enc = [self.encode(t, max_len) for t in texts]
    length = pad_to if pad_to is not None else max((len(e) for e in enc), default=2)
    if any(len(e) > length for e in enc):
      raise ValueError(f"pad_to={pad_to} is shorter than an encoding (max_len={max_len})")
    ids = np.full((len(enc), length), self.pad_id, np.int32)
    mask = np.zeros((len(enc), length), np.int32)
    for i, e in enumerate(enc):
      ids[i, :len(e)] = e
      mask[i, :len(e)] = 1
    return ids, mask
