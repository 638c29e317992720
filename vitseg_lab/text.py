"""Words for chapter 05 (ReSTR): tokenising expressions, a vocabulary with a padding mask, and
word vectors — learned at quick scale, GloVe 300-d at full scale.

ReSTR reads an expression as word vectors: GloVe 840B.300d, a plain text file whose every line is
a word followed by 300 numbers separated by spaces (``the 0.27204 -0.06203 ...``). Nothing
downloads offline, so the quick scale learns its own small table over ShapeScenes' ~20 words.
Expressions are padded or cut to ``max_len`` words (the paper: 20); the padding mask (True =
padding) travels with the ids so every attention can ignore the padded slots.

Shapes: B expressions · T words (after padding) · D word-vector size.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

__all__ = ["GLOVE_FILE", "PAD", "UNK", "GloVeError", "Vocabulary", "WordVectors", "read_glove",
           "tokenize"]

PAD, UNK = "<pad>", "<unk>"
#: The paper's word vectors (Common Crawl, 840B tokens, cased, 2.2M words, 300-d).
GLOVE_FILE = "glove.840B.300d.txt"
GLOVE_URL = "https://nlp.stanford.edu/data/glove.840B.300d.zip"

_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def tokenize(text: str) -> list[str]:
    """Lower-case words of ``text``: ``"The red circle, left!"`` -> ``["the", "red", "circle",
    "left"]`` (punctuation dropped, as RefCOCO's own ``tokens`` are)."""
    if not isinstance(text, str):
        raise TypeError(f"an expression is a str such as 'the red circle', not "
                        f"{type(text).__name__}.")
    return _WORD.findall(text.lower())


class Vocabulary:
    """Words -> ids, with ``<pad>`` = 0 and ``<unk>`` = 1 first.

    Args:
        words: the known words (duplicates and the two specials are dropped; order kept).
    """

    def __init__(self, words: Iterable[str]):
        self.words: list[str] = [PAD, UNK]
        for w in words:
            if w not in (PAD, UNK) and w not in self.words:
                self.words.append(w)
        self.index = {w: i for i, w in enumerate(self.words)}

    def __len__(self) -> int:
        return len(self.words)

    def __contains__(self, word: str) -> bool:
        return word in self.index

    def unknown(self, text: str) -> list[str]:
        """The words of ``text`` this vocabulary does not know (they would read as ``<unk>``)."""
        return [w for w in tokenize(text) if w not in self.index]

    def suggest(self, word: str, n: int = 3) -> list[str]:
        """The ``n`` known words spelled most like ``word`` (difflib ratio)."""
        known = [w for w in self.words if w not in (PAD, UNK)]
        return difflib.get_close_matches(word, known, n=n, cutoff=0.0)

    def explain_unknown(self, text: str) -> str | None:
        """One sentence naming the unknown words of ``text`` and the nearest known ones, or None."""
        bad = self.unknown(text)
        if not bad:
            return None
        hints = "; ".join(f"'{w}' -> try {', '.join(repr(s) for s in self.suggest(w))}"
                          for w in dict.fromkeys(bad))
        return (f"The model has never seen {', '.join(repr(w) for w in dict.fromkeys(bad))} "
                f"(it would read as {UNK}): {hints}.")

    def encode(self, texts: Sequence[str], max_len: int) -> tuple[Tensor, Tensor]:
        """Tokenise, map to ids, pad or cut to ``max_len`` words.

        -> (ids (B, T) int64, padding (B, T) bool, True = padding) with T = ``max_len``. An empty
        expression is all padding.
        """
        if isinstance(texts, str):
            texts = [texts]
        ids = torch.zeros(len(texts), max_len, dtype=torch.int64)
        for b, t in enumerate(texts):
            toks = [self.index.get(w, 1) for w in tokenize(t)][:max_len]
            ids[b, :len(toks)] = torch.tensor(toks, dtype=torch.int64)
        return ids, ids == 0


class GloVeError(ValueError):
    """A GloVe file that cannot be used (missing, truncated, wrong size)."""


def read_glove(path: str | os.PathLike, words: Iterable[str] | None = None,
               dim: int = 300) -> tuple[list[str], Tensor]:
    """Read word vectors from GloVe's official text format (``word v1 ... v_dim`` per line).

    Args:
        path: e.g. ``data/glove/glove.840B.300d.txt``.
        words: keep only these words (the training vocabulary; the 840B file has 2.2M words and
            5.6 GB); None keeps every word.
        dim: the vector size the file must have.
    Returns:
        (the words found, in file order; their vectors (N, dim) float32).
    Raises:
        GloVeError: the file is missing, empty, or a line does not hold a word and ``dim``
            numbers (a truncated download).
    """
    path = Path(path)
    if not path.is_file():
        raise GloVeError(f"GloVe file {path} is missing: download it with `wget {GLOVE_URL} && "
                         f"unzip glove.840B.300d.zip -d {path.parent}`.")
    want = None if words is None else set(words)
    found: list[str] = []
    rows: list[list[float]] = []
    n = 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, start=1):
            # Words may contain spaces in the 840B file ("at name@domain.com"): the vector is
            # always the last ``dim`` fields.
            parts = line.rstrip("\n").rstrip(" ").split(" ")
            if len(parts) < dim + 1:
                raise GloVeError(
                    f"GloVe file {path} is truncated or not {dim}-d at line {n} ({len(parts) - 1} "
                    f"numbers instead of {dim}): download it again with `wget {GLOVE_URL}`.")
            word = " ".join(parts[:-dim])
            if want is not None and word not in want:
                continue
            try:
                rows.append([float(v) for v in parts[-dim:]])
            except ValueError:
                raise GloVeError(f"GloVe file {path} has a non-number on line {n}; it is corrupt: "
                                 f"download it again with `wget {GLOVE_URL}`.") from None
            found.append(word)
    if n == 0:
        raise GloVeError(f"GloVe file {path} is empty: download it again with `wget {GLOVE_URL}`.")
    vectors = torch.tensor(rows, dtype=torch.float32).reshape(len(rows), dim)
    return found, vectors


class WordVectors(nn.Module):
    """The word-vector table: ids (B, T) -> (B, T, D).

    Learned (quick scale: ``D`` small, random init) or GloVe-initialised and frozen (full scale:
    the paper keeps GloVe fixed; ``<pad>`` is 0, words missing from GloVe share ``<unk>``, a small
    random vector).
    """

    def __init__(self, vocab_size: int, dim: int, *, frozen: bool = False):
        super().__init__()
        self.table = nn.Embedding(vocab_size, dim, padding_idx=0)
        nn.init.normal_(self.table.weight, std=1.0 if not frozen else 0.1)
        with torch.no_grad():
            self.table.weight[0].zero_()
        self.table.weight.requires_grad_(not frozen)

    @torch.no_grad()
    def load_glove(self, vocab: Vocabulary, path: str | os.PathLike) -> int:
        """Copy the GloVe vectors of ``vocab``'s words into the table -> how many were found."""
        dim = self.table.embedding_dim
        words, vectors = read_glove(path, vocab.words, dim=dim)
        for w, v in zip(words, vectors):
            self.table.weight[vocab.index[w]] = v
        return len(words)

    def forward(self, ids: Tensor) -> Tensor:
        return self.table(ids)
