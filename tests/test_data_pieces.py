"""Text encoded a piece at a time (`fabricq.data.tokenize_stream`): the same tokens, id for id, as
encoding the whole text at once, on real text with real tokenizers; no tokenizer call ever sees
more than a piece; and where pieces disagree about their overlap, the whole text is encoded."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fabricq import data
from fabricq.textfiles import load_documents, read_text
from tests.conftest import require_shared


def whole_text_ids(tokenizer, docs: list[str]) -> torch.Tensor:
    """The encoding the pieces must reproduce: the whole text, in one call."""
    return torch.tensor(tokenizer("\n\n".join(docs), add_special_tokens=False).input_ids)


class CountingTokenizer:
    """Wraps a tokenizer and records the length of every text it is asked to encode."""

    def __init__(self, tokenizer):
        self.inner, self.lengths = tokenizer, []
        self.is_fast = tokenizer.is_fast

    def __call__(self, text, **kwargs):
        self.lengths.append(len(text))
        return self.inner(text, **kwargs)


@pytest.fixture(scope="module")
def real_docs():
    """About 100 KB of C4 documents and of WikiText-2, as the CLI reads them (more C4 for
    training a tokenizer and for pieces of the default size)."""
    c4 = load_documents(str(require_shared("data", "c4-train-sample.jsonl")), "text")
    wiki = read_text(Path(require_shared("data", "wikitext-2-raw-test.txt")))[:100_000]
    return {"c4": c4[:45], "wikitext": [wiki], "c4 more": c4[:150]}


@pytest.fixture(scope="module")
def byte_level_bpe(real_docs):
    """A GPT-2 style tokenizer (byte-level BPE, regex pre-tokenizer) trained here on the C4 part."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=800, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(real_docs["c4 more"], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok)


@pytest.fixture(scope="module")
def sentencepiece_llama():
    """stories260k's Llama tokenizer: Metaspace, BPE over the whole text, byte fallback."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(require_shared("models", "stories260k"))


@pytest.mark.parametrize("kind", ["sentencepiece_llama", "byte_level_bpe"])
@pytest.mark.parametrize("text", ["c4", "wikitext"])
def test_pieces_give_the_whole_text_encoding(kind, text, real_docs, request, monkeypatch):
    tokenizer = request.getfixturevalue(kind)
    docs = real_docs[text]
    monkeypatch.setattr(data, "PIECE_CHARS", 4096)  # dozens of switches between pieces
    counting = CountingTokenizer(tokenizer)
    ids = data.tokenize_stream(counting, docs)
    expected = whole_text_ids(tokenizer, docs)
    assert ids.dtype == torch.long
    assert torch.equal(ids, expected)
    assert len(counting.lengths) > 15  # really encoded in pieces...
    assert max(counting.lengths) <= 4096  # ...none longer than a piece


def test_default_piece_size(byte_level_bpe, real_docs):
    docs = real_docs["c4 more"]
    counting = CountingTokenizer(byte_level_bpe)
    ids = data.tokenize_stream(counting, docs)
    assert len(counting.lengths) > 3 and max(counting.lengths) == data.PIECE_CHARS
    assert torch.equal(ids, whole_text_ids(byte_level_bpe, docs))


def test_short_text_is_encoded_in_one_call(sentencepiece_llama):
    counting = CountingTokenizer(sentencepiece_llama)
    ids = data.tokenize_stream(counting, ["One short document.", "And another."])
    assert counting.lengths == [len("One short document.\n\nAnd another.")]
    assert torch.equal(ids, whole_text_ids(sentencepiece_llama, ["One short document.", "And another."]))


class ParityTokenizer:
    """A character tokenizer that is not local: a character's id depends on how many 'x' come
    before it in the text it is given, so pieces encode their shared text differently."""

    is_fast = True

    def __call__(self, text, add_special_tokens=False, return_offsets_mapping=False):
        ids, xs = [], 0
        for ch in text:
            ids.append(2 * ord(ch) + xs % 2)
            xs += ch == "x"
        out = type("Encoding", (), {})()
        out.input_ids = ids
        out.offset_mapping = [(i, i + 1) for i in range(len(text))]
        return out


def test_pieces_that_disagree_fall_back_to_the_whole_text(monkeypatch):
    monkeypatch.setattr(data, "PIECE_CHARS", 4096)
    docs = ["ab x " + "cd " * 2000, "y" * 3000]  # the first piece sees the x, the second does not
    tokenizer = ParityTokenizer()
    text = "\n\n".join(docs)
    expected = torch.tensor(tokenizer(text).input_ids)
    assert data._encode_in_pieces(tokenizer, text) is None
    assert torch.equal(data.tokenize_stream(tokenizer, docs), expected)


def test_a_local_tokenizer_switches_pieces_where_they_agree(monkeypatch):
    """The same character tokenizer without the 'x' dependence is local: pieces are used and
    their concatenation is exact (no character twice, none left out)."""
    monkeypatch.setattr(data, "PIECE_CHARS", 4096)
    docs = ["ab cd " * 500, "y" * 9000]
    tokenizer = ParityTokenizer()
    text = "\n\n".join(docs)
    ids = data._encode_in_pieces(tokenizer, text)
    assert ids is not None
    assert torch.equal(ids, torch.tensor([2 * ord(ch) for ch in text]))


def test_documents_are_encoded_a_group_at_a_time(sentencepiece_llama, real_docs):
    docs = real_docs["c4 more"]
    counting = CountingTokenizer(sentencepiece_llama)  # records the number of documents per call
    assert data.encode_documents(counting, docs) == sentencepiece_llama(docs, add_special_tokens=False).input_ids
    assert counting.lengths == [64, 64, 22]
