"""vitseg_lab.text: tokenising, the vocabulary and its padding mask, the GloVe reader's format and
its one-sentence errors, the word-vector table."""

from __future__ import annotations

import pytest
import torch

from vitseg_lab import text
from vitseg_lab.text import GloVeError, Vocabulary, WordVectors, read_glove, tokenize


def test_tokenize_lowercases_and_drops_punctuation():
    assert tokenize("The RED circle, on the left!") == ["the", "red", "circle", "on", "the", "left"]
    assert tokenize("guy's hat") == ["guy's", "hat"]
    assert tokenize("  ") == []
    with pytest.raises(TypeError, match="expression is a str"):
        tokenize(3)


def test_vocabulary_ids_padding_and_cut():
    v = Vocabulary(["the", "red", "circle", "red", text.PAD])
    assert v.words == [text.PAD, text.UNK, "the", "red", "circle"] and len(v) == 5
    ids, pad = v.encode(["the red circle", "red ball", ""], max_len=4)
    assert ids.shape == pad.shape == (3, 4) and ids.dtype == torch.int64 and pad.dtype == torch.bool
    assert ids[0].tolist() == [2, 3, 4, 0] and pad[0].tolist() == [False, False, False, True]
    assert ids[1].tolist() == [3, 1, 0, 0]            # "ball" is <unk>, not padding
    assert pad[2].all()                               # an empty expression is all padding
    cut, cut_pad = v.encode(["the red circle the red"], max_len=3)
    assert cut.tolist() == [[2, 3, 4]] and not cut_pad.any()


def test_unknown_words_get_one_sentence_with_suggestions():
    v = Vocabulary(["the", "red", "green", "circle", "square"])
    assert v.explain_unknown("the red circle") is None
    msg = v.explain_unknown("the rde circel")
    assert msg.count(".") == 1 and "'rde'" in msg and "'red'" in msg and "'circle'" in msg
    assert v.suggest("sqare", n=1) == ["square"]


def _write_glove(path, rows, dim, newline_at_end=True):
    body = "\n".join(f"{w} " + " ".join(f"{x:.4f}" for x in vec) for w, vec in rows)
    path.write_text(body + ("\n" if newline_at_end else ""), encoding="utf-8")


def test_read_glove_official_format_and_filtering(tmp_path):
    rows = [("the", [0.1, 0.2, 0.3]), ("red", [1.0, -1.0, 0.5]), ("at name@x.com", [0, 0, 1])]
    p = tmp_path / "g.txt"
    _write_glove(p, rows, 3)
    words, vecs = read_glove(p, dim=3)
    assert words == ["the", "red", "at name@x.com"]    # 840B has words with spaces
    torch.testing.assert_close(vecs, torch.tensor([r[1] for r in rows], dtype=torch.float32))
    words, vecs = read_glove(p, words=["red", "blue"], dim=3)
    assert words == ["red"] and vecs.shape == (1, 3)
    _write_glove(p, rows, 3, newline_at_end=False)     # no final newline: still complete
    assert read_glove(p, dim=3)[0] == ["the", "red", "at name@x.com"]


def test_read_glove_missing_truncated_wrong_dim_and_empty(tmp_path):
    with pytest.raises(GloVeError, match=r"missing: download it with `wget .*glove\.840B"):
        read_glove(tmp_path / "nope.txt")
    p = tmp_path / "g.txt"
    p.write_text("the 0.1 0.2 0.3\nred 1.0 -1.0", encoding="utf-8")   # cut mid-line
    with pytest.raises(GloVeError, match="truncated or not 3-d at line 2"):
        read_glove(p, dim=3)
    p.write_text("the 0.1 0.2 0.3\n", encoding="utf-8")
    with pytest.raises(GloVeError, match="not 300-d at line 1"):
        read_glove(p)
    p.write_text("", encoding="utf-8")
    with pytest.raises(GloVeError, match="is empty"):
        read_glove(p, dim=3)
    p.write_text("the 0.1 abc 0.3\n", encoding="utf-8")
    with pytest.raises(GloVeError, match="non-number on line 1"):
        read_glove(p, dim=3)


def test_word_vectors_table_and_glove_loading(tmp_path):
    v = Vocabulary(["the", "red", "mauve"])
    wv = WordVectors(len(v), 3, frozen=True)
    assert not wv.table.weight.requires_grad and wv.table.weight[0].abs().sum() == 0
    p = tmp_path / "g.txt"
    _write_glove(p, [("red", [1.0, 2.0, 3.0]), ("the", [0.5, 0.5, 0.5]), ("blue", [9, 9, 9])], 3)
    assert wv.load_glove(v, p) == 2
    ids, _ = v.encode(["red the mauve"], 3)
    out = wv(ids)
    assert out.shape == (1, 3, 3)
    torch.testing.assert_close(out[0, 0], torch.tensor([1.0, 2.0, 3.0]))
    learned = WordVectors(len(v), 4)
    assert learned.table.weight.requires_grad
