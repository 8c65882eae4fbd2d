"""Train the sentencepiece tokenizer (BPE by default, or unigram) on a .jsonl or .txt corpus.

Writes PREFIX.model. Choices, and why:
  * ``byte_fallback``: any character the vocabulary lacks becomes its UTF-8 bytes instead of <unk>,
    so no input is lost (this costs 256 byte pieces: the vocabulary must exceed ~300);
  * identity normalization, extra whitespace kept, and "\\n" as a user-defined piece: detokenize
    then returns the text exactly, line breaks and verse indentation included;
  * deterministic: the training sentences are a fixed, evenly strided subset of the corpus lines (at
    most ``--max-sentences``, which also keeps training to seconds), and the thread count is fixed
    (sentencepiece's result depends on it, so it is part of the recipe, default 1).
The megatron-core tokenizer then reads the model with EOD = sentencepiece's </s> (id 2) and no pad.

    python tools/train_tokenizer.py --input data/shakespeare.jsonl --vocab-size 1024 \\
        --model-prefix data/shakespeare_sp1024
"""
from __future__ import annotations

import argparse
import io
import os
import sys
import time
from typing import Optional, Sequence

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir)))

from megatron_edit.data.corpus import iter_documents  # noqa: E402
from megatron_edit.data.errors import DataError  # noqa: E402

# sentencepiece skips longer sentences; they are cut instead so no text is silently ignored.
MAX_SENTENCE_BYTES = 4192


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", required=True, help="corpus: .jsonl/.json (one object per line) or .txt")
    parser.add_argument("--vocab-size", type=int, required=True)
    parser.add_argument("--model-prefix", required=True, help="writes PREFIX.model")
    parser.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe")
    parser.add_argument("--json-key", default="text")
    parser.add_argument("--max-sentences", type=int, default=200_000, help="cap on training lines")
    parser.add_argument("--character-coverage", type=float, default=0.9995)
    parser.add_argument("--num-threads", type=int, default=1, help="part of the recipe: changes the model")
    return parser.parse_args(argv)


def training_sentences(path: str, json_key: str, max_sentences: int) -> list[str]:
    """Non-blank lines of all documents, evenly strided down to ``max_sentences`` (deterministic)."""
    lines: list[str] = []
    documents = 0
    for document in iter_documents(path, json_key):
        if not document.text.strip():
            continue
        documents += 1
        for line in document.text.splitlines():
            while len(line.encode("utf-8")) > MAX_SENTENCE_BYTES:
                cut = MAX_SENTENCE_BYTES // 4  # characters are at most 4 UTF-8 bytes
                lines.append(line[:cut])
                line = line[cut:]
            if line.strip():
                lines.append(line)
    if documents == 0:
        raise DataError(f"input file {path} has no non-empty documents")
    if len(lines) > max_sentences:
        lines = [lines[i * len(lines) // max_sentences] for i in range(max_sentences)]
    return lines


def train(args: argparse.Namespace) -> str:
    import sentencepiece

    if args.vocab_size <= 0 or args.max_sentences <= 0 or args.num_threads <= 0:
        raise DataError("--vocab-size, --max-sentences and --num-threads must be positive")
    sentences = training_sentences(args.input, args.json_key, args.max_sentences)
    model = io.BytesIO()
    try:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences),
            model_writer=model,
            model_type=args.model_type,
            vocab_size=args.vocab_size,
            byte_fallback=True,
            character_coverage=args.character_coverage,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            user_defined_symbols=["\n"],
            split_digits=True,
            input_sentence_size=0,  # we subsampled already, deterministically
            max_sentence_length=MAX_SENTENCE_BYTES,
            num_threads=args.num_threads,
            minloglevel=2,
        )
    except RuntimeError as exc:
        detail = str(exc).strip().splitlines()[-1] if str(exc).strip() else "unknown error"
        raise DataError(f"sentencepiece training on {args.input} failed: {detail}") from exc

    directory = os.path.dirname(os.path.abspath(args.model_prefix))
    os.makedirs(directory, exist_ok=True)
    model_path = args.model_prefix + ".model"
    with open(model_path, "wb") as stream:
        stream.write(model.getvalue())
    processor = sentencepiece.SentencePieceProcessor(model_proto=model.getvalue())
    print(
        f"trained {args.model_type} vocabulary {processor.get_piece_size()} on {len(sentences)} lines "
        f"of {args.input}; eod (</s>) id {processor.eos_id()}",
        file=sys.stderr,
    )
    return model_path


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    start = time.monotonic()
    try:
        model_path = train(args)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {model_path} in {time.monotonic() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
