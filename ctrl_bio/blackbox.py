"""Black-box rewards: any Python callable or external program scored on a batch of decoded samples.

A policy-gradient fine-tuner (:mod:`ctrl_bio.policy_gradient`) needs reward *values* only. The values come
from outside the model (an RDKit property, a compressed file size, a docking program), so every failure
mode is expected and must stay visible: a sample whose value is missing, unparseable, infinite, or lost
to a crash or a timeout becomes NaN and is counted in ``failures``; it is never read as zero (a zero
would be a real, often very good, reward). The fine-tuner drops NaN samples from its update.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

#: Turns a batch of samples x0 (B, ...) and labels y (B, K) into what a callable or program scores.
Decoder = Callable[[Tensor], Any]


class _Counted:
    """Counts queried samples and failed ones (NaN) over the object's lifetime."""

    def __init__(self) -> None:
        self.queries = 0
        self.failures = 0

    def _finish(self, values: Tensor) -> Tensor:
        values = torch.where(torch.isfinite(values), values, torch.full_like(values, float("nan")))
        self.queries += values.shape[0]
        self.failures += int(torch.isnan(values).sum())
        return values


def _to_values(raw: Any, n: int) -> Tensor:
    """A length-n float tensor from a callable's output; anything of the wrong size is all NaN."""
    values = torch.as_tensor(np.asarray(raw, dtype=np.float64).reshape(-1), dtype=torch.float32)
    if values.shape != (n,):
        return torch.full((n,), float("nan"))
    return values


class CallableReward(_Counted):
    """Wrap ``fn(decoded_x0, y) -> n numbers`` (list, array or tensor) as a counted, gradient-free reward.

    Args:
        fn: the scorer; may return None or NaN for a sample it cannot score. An exception counts as a
            failure of the whole batch (all NaN) unless ``raise_errors``.
        decode: maps the samples tensor to what ``fn`` takes (e.g. SMILES strings); default: a detached
            CPU numpy array.
        raise_errors: re-raise exceptions of ``fn`` instead of counting them.
    """

    def __init__(self, fn: Callable[[Any, Tensor], Any], decode: Decoder | None = None, raise_errors: bool = False):
        super().__init__()
        self.fn, self.decode, self.raise_errors = fn, decode, raise_errors

    def __call__(self, x0: Tensor, y: Tensor) -> Tensor:
        n = x0.shape[0]
        decoded = self.decode(x0) if self.decode is not None else x0.detach().cpu().numpy()
        try:
            raw = self.fn(decoded, y.detach().cpu())
            raw = [np.nan if v is None else v for v in raw] if isinstance(raw, (list, tuple)) else raw
            values = _to_values(raw, n)
        except Exception:
            if self.raise_errors:
                raise
            values = torch.full((n,), float("nan"))
        return self._finish(values).to(x0.device)


def parse_values(text: str, n: int) -> Tensor:
    """n numbers, one per line (first token of each non-empty line); missing or unparseable ones are NaN."""
    values = torch.full((n,), float("nan"))
    lines = [line.split()[0] for line in text.splitlines() if line.strip()]
    for i, token in enumerate(lines[:n]):
        try:
            values[i] = float(token.rstrip(","))
        except ValueError:
            pass
    return values


class CommandReward(_Counted):
    """Score samples with an external program, one number per sample.

    The samples are written to a file in a fresh temporary directory, as ``.npy`` (shape (B, ...)) or as CSV
    (one flattened sample per row); the requested labels, if the command asks for them, to ``labels.npy``
    ((B, K) integers). The command names the files with the placeholders ``{input}``, ``{labels}`` and
    ``{output}``; without ``{input}`` the input path is appended as its last argument. It writes one number
    per line, in sample order, to ``{output}`` if it names one, else to stdout. A non-zero exit status, a
    timeout, a missing output file or a line that is not a number gives NaN for the samples concerned and
    is counted in ``failures``; the training run goes on. ``last_error`` keeps the last reason.

    Args:
        command: a shell-free argument list, or a string split with :func:`shlex.split`.
        timeout_s: seconds before the program is killed and its whole batch counts as failed.
        file_format: ``npy`` or ``csv``.
        decode: maps the samples tensor to the array that is written (default: detached float numpy).
    """

    def __init__(self, command: str | Sequence[str], timeout_s: float = 60.0, file_format: str = "npy",
                 decode: Decoder | None = None):
        super().__init__()
        if file_format not in ("npy", "csv"):
            raise ValueError(f"file_format must be 'npy' or 'csv', got {file_format!r}")
        self.command = shlex.split(command) if isinstance(command, str) else [str(c) for c in command]
        if not self.command:
            raise ValueError("the reward command is empty")
        self.timeout_s, self.file_format, self.decode = float(timeout_s), file_format, decode
        self.last_error: str | None = None

    def _argv(self, paths: dict[str, Path]) -> list[str]:
        """The command with its placeholders filled in; only ``{input}``, ``{labels}`` and ``{output}`` are
        replaced (not ``str.format``), so braces of the program's own syntax (``awk '{print $1}'``) stay as written."""
        argv = []
        for arg in self.command:
            for name, path in paths.items():
                arg = arg.replace("{" + name + "}", str(path))
            argv.append(arg)
        if not any("{input}" in arg for arg in self.command):
            argv.append(str(paths["input"]))
        return argv

    def __call__(self, x0: Tensor, y: Tensor) -> Tensor:
        n = x0.shape[0]
        array = self.decode(x0) if self.decode is not None else x0.detach().cpu().float().numpy()
        with tempfile.TemporaryDirectory(prefix="ctrl_bio_reward_") as tmp:
            paths = {"input": Path(tmp) / f"samples.{self.file_format}", "labels": Path(tmp) / "labels.npy",
                     "output": Path(tmp) / "rewards.txt"}
            if self.file_format == "npy":
                np.save(paths["input"], array)
            else:
                np.savetxt(paths["input"], np.asarray(array).reshape(n, -1), delimiter=",")
            if any("{labels}" in arg for arg in self.command):
                np.save(paths["labels"], y.detach().cpu().numpy())
            values = self._run(self._argv(paths), paths["output"], n)
        return self._finish(values).to(x0.device)

    def _run(self, argv: list[str], output: Path, n: int) -> Tensor:
        failed = torch.full((n,), float("nan"))
        try:
            # A session of its own: on timeout the whole process group goes, the program's children included
            # (a shell script's workers would otherwise run on, and hold the output pipes open).
            proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                    start_new_session=True)
        except OSError as err:
            self.last_error = f"could not start {argv[0]}: {err}"
            return failed
        try:
            stdout, stderr = proc.communicate(timeout=self.timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            self.last_error = f"timed out after {self.timeout_s:g} s: {shlex.join(argv)}"
            return failed
        if proc.returncode != 0:
            self.last_error = f"exit status {proc.returncode}: {stderr.strip()[-500:]}"
            return failed
        uses_file = any("{output}" in arg for arg in self.command)
        if uses_file and not output.exists():
            self.last_error = f"the command wrote no output file {output.name}"
            return failed
        try:
            text = output.read_text() if uses_file else stdout
        except (OSError, UnicodeDecodeError) as err:
            self.last_error = f"cannot read the output file {output.name}: {err}"
            return failed
        values = parse_values(text, n)
        if torch.isnan(values).any():
            self.last_error = f"{int(torch.isnan(values).sum())} of {n} values missing or not numbers"
        return values


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the process group of ``proc`` (started with ``start_new_session=True``) and reap ``proc``."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()
    proc.communicate()


def label_likelihood_black_box(log_prob_fn: Callable[[Tensor], Tensor]) -> Callable[[Tensor, Tensor], Tensor]:
    """A categorical label likelihood ``x0 -> (B, n_classes)`` log-probabilities as a gradient-free reward.

    Returns ``(x0, y) -> log p(y_0 | x0)`` of shape (B,), computed under ``torch.no_grad`` on a detached
    input, so a policy-gradient estimator can only use its values (what it would get from a program).
    """

    @torch.no_grad()
    def reward(x0: Tensor, y: Tensor) -> Tensor:
        log_probs = log_prob_fn(x0.detach())
        return log_probs.gather(1, y[:, :1].long()).squeeze(1).detach()

    return reward
