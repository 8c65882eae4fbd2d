"""What the launcher's fork server imports once, so that every rank forks with it already loaded.

A spawned rank spends about 7 CPU-seconds importing torch and megatron-core (megatron-core pulls in
torch._dynamo and torch._inductor) before its first step; a 4-rank test paid that 4 times per run, and
the imports were most of the test suite's CPU time. The fork server
(:func:`megatron_edit.training.launch.run_processes`) imports this module before it forks any rank: the
modules the rank entry imports, in the order it imports them, with Hugging Face transformers kept out
first exactly as the rank entry does (:func:`megatron_edit.training.launch.keep_transformers_out`).
Nothing here starts a thread, opens a process group or reads a rank's environment.
"""
from megatron_edit.training.launch import keep_transformers_out

keep_transformers_out()

import torch  # noqa: E402,F401
from megatron.core import parallel_state  # noqa: E402,F401

from megatron_edit import mcore_adapter  # noqa: E402,F401
from megatron_edit.checkpoint import save_load  # noqa: E402,F401
from megatron_edit.training import model, pretrain_gpt  # noqa: E402,F401
