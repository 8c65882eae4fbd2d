"""``python -m megatron_edit.launch SCRIPT [ARGS...]``: run a Megatron-LM script with local SGD installed.

For torchrun: ``torchrun --nproc-per-node 8 -m megatron_edit.launch pretrain_gpt.py <flags> --local-sgd edit``.
The script runs unchanged, as ``python SCRIPT`` would run it (``__main__``, its folder first on sys.path,
so ``from gpt_builders import ...`` and the checkout's ``megatron`` resolve); before it starts, the adapter
(megatron_lm_adapter.install) wraps Megatron-LM's argument parsing and model/optimizer construction.
(``megatron_edit.training.launch`` is unrelated: it spawns megatron_edit's own entry for tests.)
"""
from __future__ import annotations

import os
import runpy
import sys
from typing import Optional, Sequence

USAGE = "usage: python -m megatron_edit.launch SCRIPT.py [SCRIPT ARGS...] (e.g. Megatron-LM's pretrain_gpt.py)"


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, file=sys.stderr)
        return 2
    script = os.path.abspath(argv[0])
    if not os.path.isfile(script):
        print(f"megatron_edit.launch: {argv[0]}: no such script", file=sys.stderr)
        return 2
    # As the interpreter does for `python SCRIPT`, and before anything imports megatron: the checkout's
    # megatron/ (training and core together) must win over the installed megatron-core.
    sys.argv = [script, *argv[1:]]
    sys.path.insert(0, os.path.dirname(script))

    from megatron_edit.arguments import FlagError
    from megatron_edit.checkpoint.megatron_lm import CheckpointFormatError
    from megatron_edit.megatron_lm_adapter import AdapterError, install

    try:
        install()
        runpy.run_path(script, run_name="__main__")
    except (AdapterError, FlagError, CheckpointFormatError) as e:
        print(f"megatron_edit.launch: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
