"""Make the repository importable as ``megatron_edit`` without ``pip install -e .``."""
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir)))
