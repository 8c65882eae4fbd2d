"""Checkpoints of local-SGD runs (SPEC 7): save_load.py composes and applies them, worker_keys.py keeps
every worker's inner state, model_space.py reshards the outer state like the weights, files.py makes
saves atomic and loads verified."""
