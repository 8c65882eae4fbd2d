"""The on-disk protocol that makes saves atomic and loads verifiable.

Megatron-LM's names, so its tools find our checkpoints: ``<root>/iter_0000100/`` and the marker
``<root>/latest_checkpointed_iteration.txt``. A save is written to ``iter_0000100.partial/`` and only
renamed to its final name after every rank finished and the manifest (size and CRC-32 of every file) is
on disk; the marker is replaced last (write + fsync + rename). A save killed at any point therefore
leaves the previous checkpoint and the marker untouched: at worst a stale ``.partial`` directory, which
the next save of that iteration removes and which loading never looks at.
"""
from __future__ import annotations

import json
import os
import shutil
import zlib
from typing import Iterable, Optional

TRACKER = "latest_checkpointed_iteration.txt"
MANIFEST = "megatron_edit_manifest.json"
PARTIAL_SUFFIX = ".partial"
_CHUNK = 8 << 20


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used, with the file that is wrong in the message."""


def iteration_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def partial_dir(root: str, iteration: int) -> str:
    return iteration_dir(root, iteration) + PARTIAL_SUFFIX


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def prepare_partial(root: str, iteration: int) -> str:
    """(rank 0) An empty ``.partial`` directory for this save; a stale one from a killed save goes."""
    path = partial_dir(root, iteration)
    if os.path.exists(path):
        shutil.rmtree(path)
    os.makedirs(path)
    return path


def publish(root: str, iteration: int) -> str:
    """(rank 0) Rename the finished ``.partial`` directory to its final name, then move the marker.

    An existing directory of the same iteration (a run restarted from an older checkpoint that passes
    this iteration again) is moved aside first and removed only after the new one is in place."""
    final, partial = iteration_dir(root, iteration), partial_dir(root, iteration)
    old = final + ".old"
    if os.path.exists(final):
        if os.path.exists(old):
            shutil.rmtree(old)
        os.rename(final, old)
    os.rename(partial, final)
    _fsync_dir(root)
    if os.path.exists(old):
        shutil.rmtree(old)
    write_tracker(root, iteration)
    return final


def write_tracker(root: str, iteration: int) -> None:
    tmp = os.path.join(root, TRACKER + ".tmp")
    with open(tmp, "w") as f:
        f.write(str(iteration))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(root, TRACKER))
    _fsync_dir(root)


def read_tracker(root: str) -> Optional[int]:
    """The latest published iteration under ``root``; None when nothing was saved there yet."""
    if not os.path.isdir(root):
        raise CheckpointError(f"--load {root}: no such directory")
    path = os.path.join(root, TRACKER)
    if not os.path.exists(path):
        return None
    text = open(path).read().strip()
    try:
        iteration = int(text)
    except ValueError:
        raise CheckpointError(f"{path}: expected an iteration number, found {text[:40]!r}") from None
    directory = iteration_dir(root, iteration)
    if not os.path.isdir(directory):
        raise CheckpointError(f"{path} names iteration {iteration} but {directory} does not exist")
    return iteration


def checkpoint_files(directory: str) -> list[str]:
    """Every file of a checkpoint directory (relative paths, sorted), the manifest excluded."""
    out = []
    for base, _, files in os.walk(directory):
        for name in files:
            rel = os.path.relpath(os.path.join(base, name), directory)
            if rel != MANIFEST:
                out.append(rel)
    return sorted(out)


def digest(path: str) -> tuple[int, int]:
    """(size in bytes, CRC-32) of one file."""
    crc = 0
    size = 0
    with open(path, "rb") as f:
        while True:
            block = f.read(_CHUNK)
            if not block:
                break
            crc = zlib.crc32(block, crc)
            size += len(block)
    return size, crc


def write_manifest(directory: str, digests: dict[str, tuple[int, int]]) -> None:
    path = os.path.join(directory, MANIFEST)
    with open(path, "w") as f:
        json.dump({"format": 1, "files": {k: list(v) for k, v in sorted(digests.items())}}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def read_manifest(directory: str) -> Optional[dict[str, tuple[int, int]]]:
    """The manifest's {file: (size, crc)}; None for checkpoints written without one (Megatron-LM's)."""
    path = os.path.join(directory, MANIFEST)
    if not os.path.exists(path):
        return None
    try:
        data = json.load(open(path))
        return {k: (int(v[0]), int(v[1])) for k, v in data["files"].items()}
    except (ValueError, KeyError, TypeError, IndexError):
        raise CheckpointError(f"{path}: unreadable manifest (truncated or corrupted)") from None


def verify_files(directory: str, expected: dict[str, tuple[int, int]], names: Iterable[str]) -> None:
    """Check the given files against the manifest; the first problem raises, naming the file."""
    for name in names:
        path = os.path.join(directory, name)
        if not os.path.exists(path):
            raise CheckpointError(f"{path}: missing (listed in {MANIFEST})")
        size, crc = expected[name]
        actual_size = os.path.getsize(path)
        if actual_size != size:
            raise CheckpointError(f"{path}: truncated or overwritten: {actual_size} bytes, expected {size}")
        if digest(path)[1] != crc:
            raise CheckpointError(f"{path}: corrupted: CRC-32 does not match the manifest")


def verify_checkpoint(directory: str) -> int:
    """Check every file of one checkpoint directory against its manifest (one process); returns the
    number of files checked. Used by tools/inspect_checkpoint.py and the tests; training splits the same
    check over its ranks."""
    expected = read_manifest(directory)
    if expected is None:
        raise CheckpointError(f"{directory}: no {MANIFEST} (not written by megatron_edit, or not finished)")
    verify_files(directory, expected, sorted(expected))
    return len(expected)
