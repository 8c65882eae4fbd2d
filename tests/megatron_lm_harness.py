"""Run Megatron-LM's own pretrain_gpt.py through ``python -m megatron_edit.launch`` under torchrun, on CPU.

Gated on ``MEGATRON_LM_PATH`` (a Megatron-LM checkout: tag core_v0.16.1 with megatron-core 0.16.x, or
core_v0.19.x with 0.19.x); ``MEGATRON_LM_PYTHON`` is an interpreter that can import its
``megatron.training`` (default: the one running pytest). Test-process plumbing only, none of it is
product behaviour:

- core_v0.19 trees import ``typing.override`` (Python 3.12). On Python 3.11 the subprocesses get a
  ``sitecustomize`` that adds it from ``typing_extensions`` -- in these test processes only; megatron_edit
  itself never patches ``typing``.
- Megatron-LM compiles its dataset helpers at start-up with ``python3`` / ``python3-config`` from PATH:
  the interpreter's own bin directory goes first, and under pyenv ``PYENV_VERSION`` pins the running
  version (a checkout's ``.python-version`` would otherwise pick another interpreter).
- Every run is its own process group, killed whole on timeout, so no rank outlives its test.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile

import pytest

MEGATRON_LM = os.environ.get("MEGATRON_LM_PATH")
MLM_PYTHON = os.environ.get("MEGATRON_LM_PYTHON", sys.executable)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_megatron_lm = pytest.mark.skipif(not MEGATRON_LM, reason="MEGATRON_LM_PATH is not set")

# A tiny GPT in Megatron-LM's flags; dropout off so that runs can be compared bit for bit.
TINY = ["--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
        "--max-position-embeddings", "32", "--micro-batch-size", "1", "--global-batch-size", "8",
        "--lr", "1e-3", "--min-lr", "1e-4", "--lr-decay-style", "cosine", "--mock-data",
        "--tokenizer-type", "NullTokenizer", "--vocab-size", "128", "--bf16", "--hidden-dropout", "0",
        "--attention-dropout", "0", "--eval-iters", "0", "--eval-interval", "1000", "--seed", "1234",
        "--use-distributed-optimizer", "--overlap-grad-reduce", "--overlap-param-gather"]

ITERATION = re.compile(r"iteration\s+(\d+)/\s*\d+ \|.*?lm loss: (\S+) \|.*?grad norm: (\S+) \|")
SYNC = re.compile(r"^ local-sgd sync \| iteration\s+(\d+) \| workers: (\d+) \| fragment: (\S+) \| "
                  r"pseudo-grad norm: (\S+) \|.*?outer bytes sent \((\S+)\): (\d+)", re.M)


def _environment(scratch: str) -> dict:
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    paths = [MEGATRON_LM, REPO]
    probe = subprocess.run([MLM_PYTHON, "-c", "import typing, sys; print(hasattr(typing, 'override')); "
                            "print('%d.%d.%d' % sys.version_info[:3])"], capture_output=True, text=True)
    has_override, version = probe.stdout.split()
    if has_override != "True":
        with open(os.path.join(scratch, "sitecustomize.py"), "w") as f:
            f.write("import typing\nif not hasattr(typing, 'override'):\n"
                    "    import typing_extensions\n    typing.override = typing_extensions.override\n")
        paths.insert(0, scratch)
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["PATH"] = os.path.dirname(MLM_PYTHON) + os.pathsep + env.get("PATH", "")
    if "PYENV_ROOT" in env or ".pyenv" in env.get("PATH", ""):
        env["PYENV_VERSION"] = version
    return env


class Run:
    def __init__(self, returncode: int, stdout: str, stderr: str):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr

    def losses(self) -> dict[int, str]:
        """{iteration: the printed lm loss}, as printed (strings: compared bit for bit)."""
        return {int(i): loss for i, loss, _ in ITERATION.findall(self.stdout)}

    def grad_norms(self) -> dict[int, str]:
        return {int(i): norm for i, _, norm in ITERATION.findall(self.stdout)}

    def syncs(self) -> list[tuple[int, int, str, str, str, int]]:
        """(iteration, workers, fragment, pseudo-grad norm, wire format, bytes) per sync line."""
        return [(int(i), int(w), f, n, fmt, int(b)) for i, w, f, n, fmt, b in SYNC.findall(self.stdout)]

    def tail(self) -> str:
        return (self.stdout[-3000:] + "\n--- stderr ---\n" + self.stderr[-6000:])


def run_megatron_lm(nproc: int, flags: list[str], timeout: int = 600) -> Run:
    """torchrun --nproc-per-node N -m megatron_edit.launch pretrain_gpt.py TINY + flags, from the checkout."""
    with tempfile.TemporaryDirectory() as scratch:
        cmd = [MLM_PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), "-m", "megatron_edit.launch",
               os.path.join(MEGATRON_LM, "pretrain_gpt.py"), *TINY, *flags]
        proc = subprocess.Popen(cmd, cwd=MEGATRON_LM, env=_environment(scratch), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            pytest.fail(f"Megatron-LM run timed out after {timeout} s:\n{(out or '')[-2000:]}\n{(err or '')[-4000:]}")
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        _keep_log(cmd, out, err)
        return Run(proc.returncode, out, err)


def _keep_log(cmd: list[str], out: str, err: str) -> None:
    """With MEGATRON_LM_LOG_DIR set, each run's command and output go to a numbered file there (the
    lines a closing note or a bug report quotes)."""
    directory = os.environ.get("MEGATRON_LM_LOG_DIR")
    if not directory:
        return
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f"run{len(os.listdir(directory)):03d}.log")
    with open(path, "w") as f:
        f.write("$ " + " ".join(cmd[cmd.index("megatron_edit.launch") - 1:]) + "\n" + (out or "")
                + "\n--- stderr ---\n" + (err or ""))
