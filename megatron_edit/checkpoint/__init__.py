"""Checkpoints of local-SGD runs (SPEC 7): save_load.py composes and applies them, worker_keys.py keeps
every worker's inner state, model_space.py reshards the outer state like the weights, files.py makes
saves atomic and loads verified."""

# A run with --local-sgd-debug-fault saves its parsed FaultSpec in the args of the common state, which
# megatron-core reads with torch.load(weights_only=True): every reader (the training load, the convert
# and inspect tools) needs the allowlisting that importing fault_injection does.
from megatron_edit import fault_injection as _fault_injection  # noqa: E402,F401
