"""Calibration and evaluation text: BOS per window as the tokenizer does it, documents vs stream
sampling, chat templates, sliding evaluation windows, and one clear error for every bad data file
(naming the file and the row), before any model is loaded."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from fabricq.data import (
    check_text_path,
    evaluation_windows,
    load_conversations,
    load_documents,
    prepare_text,
    resolve_bos,
)
from fabricq.errors import FabricqError

# --- tiny word-level tokenizers: one id per word, so token ids tell which document they came from


def word_tokenizer(words, adds_bos: bool, bos_token: str | None = "<s>", chat_template: str | None = None):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>"]
    vocab = {w: i for i, w in enumerate(specials + sorted(set(words) - set(specials)))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if adds_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token=bos_token, eos_token="</s>")
    if chat_template:
        fast.chat_template = chat_template
    return fast


def doc_words(i: int, n: int) -> str:
    return " ".join(f"d{i}w{j}" for j in range(n))


def data_cfg(path=None, **kw):
    base = {"path": None if path is None else str(path), "text_field": "text", "num_samples": 4, "seq_len": 16,
            "batch_size": 2, "eval_fraction": 0.25, "seed": 0, "bos": "auto", "sampling": "documents",
            "chat_template": False}
    return OmegaConf.create({**base, **kw})


def eval_cfg(**kw):
    base = {"enabled": True, "path": None, "seq_len": 16, "max_windows": None, "stride": None, "kl_windows": 1}
    return OmegaConf.create({**base, **kw})


def write_docs(tmp_path: Path, lengths: list[int]) -> Path:
    file = tmp_path / "docs.jsonl"
    file.write_text("".join(json.dumps({"text": doc_words(i, n)}) + "\n" for i, n in enumerate(lengths)))
    return file


def all_words(lengths):
    return [f"d{i}w{j}" for i, n in enumerate(lengths) for j in range(n)]


# --- BOS detection


def test_bos_is_detected_from_the_default_encoding(shared_path):
    from transformers import AutoTokenizer

    stories = AutoTokenizer.from_pretrained(shared_path("models", "stories260k"))
    assert stories("Once upon a time").input_ids[0] == stories.bos_token_id == 1  # the reference
    assert resolve_bos(stories, "auto") == 1
    assert resolve_bos(stories, False) is None
    # A tokenizer that has a BOS token but does not add it by default (like SmolLM2's): auto is off.
    quiet = word_tokenizer(["a"], adds_bos=False)
    assert quiet("a").input_ids == [3] and resolve_bos(quiet, "auto") is None
    assert resolve_bos(quiet, True) == 1
    assert resolve_bos(word_tokenizer(["a"], adds_bos=True), "auto") == 1
    with pytest.raises(FabricqError, match="data.bos=true, but the model's tokenizer has no BOS token"):
        resolve_bos(word_tokenizer(["a"], adds_bos=False, bos_token=None), True)


# --- calibration windows


@pytest.mark.parametrize("adds_bos", [True, False])
def test_stream_windows_start_with_bos_and_keep_seq_len(tmp_path, adds_bos):
    lengths = [40, 50, 30, 60]
    tok = word_tokenizer(all_words(lengths), adds_bos)
    text = prepare_text(tok, data_cfg(write_docs(tmp_path, lengths), sampling="stream", seq_len=16),
                        eval_cfg(enabled=False, path="not-read.txt"))
    stream = tok("\n\n".join(doc_words(i, n) for i, n in enumerate(lengths)), add_special_tokens=False).input_ids
    assert text.calibration.shape == (4, 16)
    for window in text.calibration.tolist():
        body = window[1:] if adds_bos else window
        assert (window[0] == 1) == adds_bos
        start = stream.index(body[0])
        assert stream[start : start + len(body)] == body  # a contiguous piece of the text


def test_documents_windows_start_at_documents_and_pack_short_ones(tmp_path):
    lengths = [40, 5, 6, 30, 7, 3, 25, 4]
    tok = word_tokenizer(all_words(lengths), adds_bos=True)
    text = prepare_text(tok, data_cfg(write_docs(tmp_path, lengths), num_samples=4, seq_len=16),
                        eval_cfg(enabled=False, path="not-read.txt"))
    docs = [tok(doc_words(i, n)).input_ids for i, n in enumerate(lengths)]  # BOS + words: the reference
    windows = text.calibration.tolist()
    for window in windows:
        assert len(window) == 16 and window[0] == 1
        # Split at BOS: every piece is the beginning of one document, each complete except the last.
        pieces = [[1] + p for p in _split(window[1:], 1)]
        for k, piece in enumerate(pieces):
            doc = next(d for d in docs if d[1] == piece[1])
            assert piece == doc[: len(piece)]
            if k < len(pieces) - 1:
                assert piece == doc
    # The three long documents give one window each from their start; the short ones are packed.
    assert sorted(w[1] for w in windows if w.count(1) == 1) == sorted(docs[i][1] for i in (0, 3, 6))
    assert sum(w.count(1) > 1 for w in windows) == 1


def test_documents_without_bos_are_separated_by_eos(tmp_path):
    lengths = [5, 6, 7, 3, 20, 20]
    tok = word_tokenizer(all_words(lengths), adds_bos=False)
    text = prepare_text(tok, data_cfg(write_docs(tmp_path, lengths), num_samples=3, seq_len=16),
                        eval_cfg(enabled=False, path="not-read.txt"))
    eos = tok.eos_token_id
    packed = next(w for w in text.calibration.tolist() if eos in w)
    assert 1 not in packed  # no BOS anywhere
    for piece in _split(packed, eos)[:-1]:
        i = int(tok.convert_ids_to_tokens(piece[0])[1:].split("w")[0])
        assert piece == tok(doc_words(i, lengths[i])).input_ids


def test_documents_give_further_windows_of_long_documents_only_when_needed(tmp_path):
    lengths = [100, 100]
    tok = word_tokenizer(all_words(lengths), adds_bos=True)
    text = prepare_text(tok, data_cfg(write_docs(tmp_path, lengths), num_samples=6, seq_len=16),
                        eval_cfg(enabled=False, path="not-read.txt"))
    doc0 = tok(doc_words(0, 100), add_special_tokens=False).input_ids
    windows = text.calibration.tolist()
    assert all(w[0] == 1 for w in windows)
    # Doc 0's first three windows of 15 words each, in order, and none of them repeated.
    assert [w[1:] for w in windows if w[1] in doc0] == [doc0[0:15], doc0[15:30], doc0[30:45]]
    with pytest.raises(FabricqError, match="give 12 windows of data.seq_len=16, but data.num_samples=13"):
        prepare_text(tok, data_cfg(write_docs(tmp_path, lengths), num_samples=13, seq_len=16),
                     eval_cfg(enabled=False, path="not-read.txt"))


def test_held_out_documents_never_reach_calibration(tmp_path):
    lengths = [30] * 8
    tok = word_tokenizer(all_words(lengths), adds_bos=True)
    for sampling in ("stream", "documents"):
        text = prepare_text(tok, data_cfg(write_docs(tmp_path, lengths), sampling=sampling, num_samples=6,
                                          seq_len=8), eval_cfg(seq_len=8))
        calib = set(text.calibration.flatten().tolist()) - {1}
        held = set(text.evaluation.flatten().tolist()) - {1}
        assert calib and held and not calib & held, sampling
        assert len({tok.convert_ids_to_tokens(i).split("w")[0] for i in held}) == 2  # 8 × 0.25 documents


# --- evaluation windows


def test_sliding_evaluation_windows_score_every_token_once():
    stream = torch.arange(10, 60)
    windows = evaluation_windows(stream, seq_len=8, max_windows=None, bos_id=1, stride=3)
    assert windows[:, 0].eq(1).all() and windows.shape[1] == 8
    from fabricq.evaluate import scored_positions

    scored = [w[-scored_positions(i, 8, 3):].tolist() for i, w in enumerate(windows)]
    flat = [t for s in scored for t in s]
    assert flat == list(range(10, 10 + len(flat)))  # each token once, in order, from the first
    assert len(windows) == (50 - 7) // 3 + 1
    plain = evaluation_windows(stream, seq_len=8, max_windows=2)
    assert plain.tolist() == [list(range(10, 18)), list(range(18, 26))]


def test_evaluation_disabled_ignores_eval_settings_and_the_split(tmp_path):
    one_doc = tmp_path / "one.txt"
    one_doc.write_text(doc_words(0, 200))
    tok = word_tokenizer(all_words([200]), adds_bos=True)
    text = prepare_text(tok, data_cfg(one_doc, sampling="stream"),
                        eval_cfg(enabled=False, path=str(tmp_path / "missing.txt"), stride=10_000, seq_len=-1))
    assert text.evaluation is None and text.calibration.shape == (4, 16)
    with pytest.raises(FabricqError, match="need at least 2 documents"):
        prepare_text(tok, data_cfg(one_doc, sampling="stream"), eval_cfg())


@pytest.mark.parametrize("field, value, message", [
    ("bos", "yes", "data.bos must be auto, true or false, got 'yes'"),
    ("sampling", "random", "data.sampling must be one of ('stream', 'documents'), got 'random'"),
    ("chat_template", "no", "data.chat_template must be true or false, got 'no'"),
    ("stride", 16, "eval.stride must be null or an integer from 1 to eval.seq_len - 1 (15), got 16"),
    ("stride", 0, "eval.stride must be null or an integer from 1 to eval.seq_len - 1 (15), got 0"),
])
def test_bad_text_settings(tmp_path, field, value, message):
    tok = word_tokenizer(all_words([30, 30]), adds_bos=True)
    data = data_cfg(write_docs(tmp_path, [30, 30]))
    ev = eval_cfg()
    (ev if field == "stride" else data)[field] = value
    with pytest.raises(FabricqError) as err:
        prepare_text(tok, data, ev)
    assert str(err.value) == message


# --- chat templates

TEMPLATE = "{% for m in messages %}<s> {{ m['role'] }} {{ m['content'] }} </s> {% endfor %}"


def test_chat_messages_are_rendered_through_the_template(tmp_path):
    chats = [[{"role": "user", "content": doc_words(i, 4)}, {"role": "assistant", "content": doc_words(i + 10, 5)}]
             for i in range(6)]
    file = tmp_path / "chats.jsonl"
    file.write_text("".join(json.dumps({"messages": c}) + "\n" for c in chats))
    words = all_words([4] * 6) + [f"d{i + 10}w{j}" for i in range(6) for j in range(5)] + ["user", "assistant"]
    tok = word_tokenizer(words, adds_bos=True, chat_template=TEMPLATE)
    text = prepare_text(tok, data_cfg(file, num_samples=2, seq_len=40, chat_template=True), eval_cfg(enabled=False, path="not-read.txt"))
    rendered = [tok(tok.apply_chat_template(c, tokenize=False), add_special_tokens=False).input_ids for c in chats]
    assert all(r[0] == 1 for r in rendered)  # the template writes BOS itself: windows must not double it
    window = text.calibration[0].tolist()
    first = next(r for r in rendered if r[2] == window[2])
    assert window[: len(first)] == first and window[len(first)] == 1  # the next conversation follows


def test_plain_text_becomes_a_user_turn_and_the_assistant_reply(tmp_path):
    file = tmp_path / "plain.txt"
    file.write_text("one two three four five six\n\nseven eight nine ten")
    chats = load_conversations(str(file))
    assert chats[0].messages == [{"role": "user", "content": "one two three"},
                                 {"role": "assistant", "content": "four five six"}]
    assert [m["content"] for m in chats[1].messages] == ["seven eight", "nine ten"]


def test_chat_template_errors_name_the_file_and_row(tmp_path):
    file = tmp_path / "chats.jsonl"
    good = {"messages": [{"role": "user", "content": "a"}]}
    file.write_text(json.dumps(good) + "\n" + json.dumps({"messages": [{"role": "user", "content": 3}]}) + "\n")
    with pytest.raises(FabricqError, match=r"chats.jsonl: line 2: 'messages' must be a non-empty list of"):
        load_conversations(str(file))
    file.write_text(json.dumps(good) + "\n\n" + json.dumps({"text": "no messages"}) + "\n")
    with pytest.raises(FabricqError, match=r"chats.jsonl: line 3: 'messages' must be"):
        load_conversations(str(file))
    tok = word_tokenizer(["a"], adds_bos=True)  # no chat template
    with pytest.raises(FabricqError, match="tokenizer has no chat template"):
        prepare_text(tok, data_cfg(file, chat_template=True), eval_cfg(enabled=False, path="not-read.txt"))


# --- bad data files


def _parquet(path: Path, column) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": column}), path)
    return path


BAD_FILES = [  # (name, bytes or a writer, message)
    ("empty.jsonl", b"", r"empty.jsonl is empty"),
    ("blank.txt", b" \n\n \n", r"blank.txt is empty"),
    ("broken.jsonl", b'{"text": "a"}\n{"text": "b"}\n{"text": "c"\n', r"broken.jsonl: line 3 is not valid JSON"),
    ("broken.json", b'[{"text": "a"},\n {"text": }]', r"broken.json: line 2 is not valid JSON"),
    ("fake.parquet", b"text,not,parquet\n", r"fake.parquet is not a readable parquet file"),
    ("binary.txt", b"fine\nstill fine\n\x00\x01\x02", r"binary.txt is not a text file: line 3 holds a NUL byte"),
    ("latin1.txt", "caf\u00e9\nna\u00efve".encode("latin-1"), r"latin1.txt is not UTF-8 text: byte 0xe9 on line 1"),
    ("number.jsonl", b'{"text": "a"}\n{"text": 7}\n', r"number.jsonl: line 2: field 'text' is int, not a string"),
    ("null.jsonl", b'{"text": "a"}\n{"text": null}\n', r"null.jsonl: line 2: field 'text' is null, not a string"),
    ("missing.jsonl", b'{"text": "a"}\n{"body": "b"}\n', r"missing.jsonl: line 2 has no field 'text'"),
    ("list.jsonl", b'{"text": "a"}\n["b"]\n', r"list.jsonl: line 2 is a JSON list, not an object"),
    ("numbers.parquet", lambda p: _parquet(p, [1, 2]), r"numbers.parquet: row 0: field 'text' is int, not a string"),
    ("nulls.parquet", lambda p: _parquet(p, ["a", None]), r"nulls.parquet: row 1: field 'text' is null"),
]


@pytest.mark.parametrize("name, content, message", BAD_FILES, ids=[b[0] for b in BAD_FILES])
def test_bad_data_files_name_the_file_and_row(tmp_path, name, content, message):
    file = tmp_path / name
    content(file) if callable(content) else file.write_bytes(content)
    with pytest.raises(FabricqError, match=message):
        load_documents(str(file))
    with pytest.raises(FabricqError, match=message):
        check_text_path(str(file), "data.path", "text")


def test_good_files_of_every_kind_read_the_same_documents(tmp_path):
    texts = ["first document", "second \u2028 one", "third"]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts))
    (tmp_path / "a.json").write_text(json.dumps([{"text": t} for t in texts]))
    (tmp_path / "a.txt").write_text("\ufeff" + "\n\n".join(texts), encoding="utf-8")
    _parquet(tmp_path / "a.parquet", texts)
    for suffix in ("jsonl", "json", "txt", "parquet"):
        assert load_documents(str(tmp_path / f"a.{suffix}")) == texts, suffix


def _split(ids: list[int], sep: int) -> list[list[int]]:
    """`ids` cut at every `sep` (dropped); for BOS-led pieces the first cut is empty and skipped."""
    out, cur = [], []
    for t in ids:
        if t == sep:
            out.append(cur)
            cur = []
        else:
            cur.append(t)
    out.append(cur)
    return [p for p in out if p] if sep == 1 else out


# --- through the app: perplexity equals plain transformers; errors before the model loads


EVAL_TEXT = ("Once upon a time there was a little girl named Lily. She loved to play outside in the sun. "
             "One day she saw a big red ball in the park and ran to get it. ") * 12


def _reference_ppl(model, ids: list[int], seq_len: int, stride: int | None, max_windows: int) -> tuple[float, int]:
    """The usual Hugging Face perplexity recipe, written from scratch: BOS + seq_len - 1 tokens per
    window; with a stride, labels of all but the last `stride` positions are -100."""
    bos, body = ids[0], ids[1:]
    step = stride or seq_len - 1
    nll, count = 0.0, 0
    for k in range(max_windows):
        chunk = body[k * step : k * step + seq_len - 1]
        if len(chunk) < seq_len - 1:
            break
        input_ids = torch.tensor([[bos] + chunk])
        labels = input_ids.clone()
        if stride and k:
            labels[0, : seq_len - stride] = -100
        n = int((labels[0, 1:] != -100).sum())
        with torch.no_grad():
            nll += float(model(input_ids=input_ids, labels=labels).loss) * n
        count += n
    return math.exp(nll / count), count


@pytest.mark.parametrize("stride", [None, 24])
def test_ppl_before_equals_plain_transformers(shared_path, tmp_path, stride):
    from in_process import run_app
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = shared_path("models", "stories260k")
    calib = shared_path("data", "tinystories-sample.txt")
    eval_file = tmp_path / "eval.txt"
    eval_file.write_text(EVAL_TEXT)
    report = run_app(f"model.path={model_dir}", f"data.path={calib}", f"eval.path={eval_file}",
                     "data.num_samples=4", "data.seq_len=64", "data.batch_size=2", "eval.seq_len=64",
                     "eval.max_windows=5", f"eval.stride={stride or 'null'}", f"output_dir={tmp_path / 'out'}")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ppl, scored = _reference_ppl(model, tokenizer(EVAL_TEXT).input_ids, 64, stride, 5)
    assert report["ppl_before"] == pytest.approx(ppl, rel=1e-5)
    assert report["eval_convention"] == {"bos": True, "seq_len": 64, "stride": stride, "windows": 5,
                                         "tokens_scored": scored}


def test_bad_data_file_fails_before_the_model_loads(shared_path, tmp_path, monkeypatch):
    from in_process import run_app

    import fabricq.app

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(fabricq.app, "load_model", no_model)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": ["not", "a", "string"]}\n')
    with pytest.raises(FabricqError, match=r"bad.jsonl: line 2: field 'text' is list, not a string"):
        run_app(f"model.path={shared_path('models', 'stories260k')}", f"data.path={bad}", "data.seq_len=64",
                "eval.seq_len=64", f"output_dir={tmp_path / 'out'}")
    assert not (tmp_path / "out").exists()


def test_bad_data_file_is_one_line_exit_2(shared_path, tmp_path):
    from conftest import run_cli

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": "broken\n')
    result = run_cli(f"model.path={shared_path('models', 'stories260k')}", f"data.path={bad}",
                     f"output_dir={tmp_path / 'out'}")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fabricq: error: ") and "bad.jsonl: line 2 is not valid JSON" in lines[0]
