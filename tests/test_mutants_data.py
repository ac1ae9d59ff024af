"""Which tokens calibration gets, checked where test_data.py left mutants alive (see
benchmarks/results/2026-11-28-mutation-testing.md): the held-out split is a function of data.seed alone, and
data.bos decides whether calibration windows start with BOS. Both change the written checkpoint
and the resume identity (the calibration tokens' hash)."""

from __future__ import annotations

import torch
from test_data import all_words, data_cfg, eval_cfg, word_tokenizer, write_docs

from fabricq.data import prepare_text, split_documents


def test_the_held_out_split_depends_on_the_seed_only():
    docs = [f"doc {i}" for i in range(40)]
    first = split_documents(docs, 0.25, seed=3)
    torch.manual_seed(123)  # the global generator must play no part
    assert split_documents(docs, 0.25, seed=3) == first
    # An independent reference: the same seeded permutation, its first quarter held out.
    order = torch.randperm(40, generator=torch.Generator().manual_seed(3)).tolist()
    assert first[1] == [d for i, d in enumerate(docs) if i in set(order[:10])]
    assert split_documents(docs, 0.25, seed=4) != first


def test_data_bos_false_keeps_bos_out_of_calibration(tmp_path):
    lengths = [30] * 8
    tok = word_tokenizer(all_words(lengths), adds_bos=True)  # id 1 is <s>
    path = write_docs(tmp_path, lengths)
    with_bos = prepare_text(tok, data_cfg(path, num_samples=4, seq_len=8), eval_cfg(enabled=False)).calibration
    without = prepare_text(tok, data_cfg(path, num_samples=4, seq_len=8, bos=False),
                           eval_cfg(enabled=False)).calibration
    assert (with_bos[:, 0] == 1).all()
    assert not (without == 1).any()


def test_a_window_of_only_bos_is_refused_naming_seq_len(tmp_path):
    import pytest

    from fabricq.errors import FabricqError

    lengths = [30] * 8
    tok = word_tokenizer(all_words(lengths), adds_bos=True)
    for sampling in ("stream", "documents"):
        with pytest.raises(FabricqError, match=r"^data.seq_len=1 leaves no room for text after the BOS token"):
            prepare_text(tok, data_cfg(write_docs(tmp_path, lengths), sampling=sampling, seq_len=1),
                         eval_cfg(enabled=False))
