"""Memory budgets: parse sizes, measure peak memory, pick a batch size, survive out-of-memory.

``--batch-size auto`` scores a first batch of 1 sample and a second of 2 while measuring the
peak memory of each (peak RSS on CPU through ``/proc/self/clear_refs``; the allocator's peak on
CUDA), fits ``peak = fixed + per_sample * B`` and from then on uses the largest B whose
predicted peak stays inside the budget (``--max-memory``; default: 70 % of the available RAM
on CPU, 85 % of the free memory of the GPU). Those probe batches are ordinary batches: their
samples count.

Whatever the batch size, an out-of-memory error while scoring a batch (``torch.OutOfMemoryError``,
``MemoryError``, or a ``RuntimeError`` saying the allocator failed) is caught by the caller
(``is_oom``); the batch is split in halves and retried and later batches use the smaller size.
"""

from __future__ import annotations

import gc
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import UserError

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9,
          "gb": 10**9, "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30,
          "tib": 2**40}


def parse_size(text: str | int | float) -> int:
    """'4GB' -> 4e9 bytes, '512MiB' -> 512 * 2**20; plain numbers are bytes."""
    if isinstance(text, (int, float)):
        return int(text)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise UserError(f"cannot read memory size '{text}': write e.g. 4GB, 800MB or 16GiB")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def available_ram() -> int:
    """MemAvailable from /proc/meminfo (Linux), else a psutil-free fallback of total RAM."""
    try:
        text = Path("/proc/meminfo").read_text()
        return int(re.search(r"MemAvailable:\s+(\d+)", text).group(1)) * 1024
    except (OSError, AttributeError):
        import os

        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def default_budget(device: torch.device | str) -> int:
    """A safe share of what is free: 85 % of the GPU's free memory, or the current process'
    footprint plus 70 % of the available RAM on CPU (the budget bounds the process' peak)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(torch.cuda.memory_allocated(device) + 0.85 * free)
    return int(current_rss() + 0.7 * available_ram())


# --------------------------------------------------------------------------- measuring


def current_rss() -> int:
    try:
        text = Path("/proc/self/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+)", text).group(1)) * 1024
    except (OSError, AttributeError):
        return 0


class MemoryProbe:
    """Current and peak memory of this process on one device (bytes)."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)

    def current(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device)
        return current_rss()

    def reset_peak(self) -> bool:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return True
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (Linux)
            return True
        except OSError:
            return False

    def peak(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        try:
            text = Path("/proc/self/status").read_text()
            return int(re.search(r"VmHWM:\s+(\d+)", text).group(1)) * 1024
        except (OSError, AttributeError):
            return current_rss()


def is_oom(error: BaseException) -> bool:
    """True for the out-of-memory errors of PyTorch (CUDA, CPU allocator) and Python."""
    if isinstance(error, (MemoryError, getattr(torch, "OutOfMemoryError", MemoryError))):
        return True
    if isinstance(error, RuntimeError):
        text = str(error).lower()
        return "out of memory" in text or "can't allocate memory" in text \
            or "cannot allocate memory" in text
    return False


def release(device: torch.device | str) -> None:
    """Give freed memory back after an out-of-memory error."""
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------- batch sizes


@dataclass
class BatchPlanner:
    """Batch sizes for the sample loop: fixed, or ``auto`` from two measured probe batches.

    ``next_size(remaining)`` is the size of the next batch; ``observe(size, before, peak)``
    records one scored batch's memory; ``shrink(size)`` caps later batches after an OOM.
    """

    requested: int | str = 4  # an int, or "auto"
    budget: int | None = None  # bytes the process' peak may reach (auto only)
    max_batch: int = 64
    probes: list[tuple[int, int, int]] = field(default_factory=list)  # (size, before, peak)
    chosen: int | None = None
    cap: int | None = None  # after an OOM

    def __post_init__(self):
        if self.requested != "auto" and (not isinstance(self.requested, int) or self.requested < 1):
            raise UserError(f"--batch-size must be a positive integer or 'auto' "
                            f"(got {self.requested})")
        if self.requested != "auto":
            self.chosen = self.requested

    @property
    def probing(self) -> bool:
        return self.chosen is None

    def next_size(self, remaining: int) -> int:
        if self.chosen is None:  # probe batches: 1, then 2
            size = 1 if not self.probes else 2
        else:
            size = self.chosen
        if self.cap is not None:
            size = min(size, self.cap)
        return max(1, min(size, remaining))

    def observe(self, size: int, before: int, peak: int) -> None:
        if self.chosen is not None:
            return
        self.probes.append((size, before, peak))
        sizes = {s for s, _, _ in self.probes}
        if len(sizes) >= 2 or len(self.probes) >= 3:
            self.chosen = self.fit()

    def fit(self) -> int:
        """Largest B with before + fixed + per_sample * B <= budget (at least 1)."""
        (s1, b1, p1), (s2, b2, p2) = self.probes[0], self.probes[-1]
        t1, t2 = max(p1 - b1, 0), max(p2 - b2, 0)  # transient memory of each probe batch
        per_sample = (t2 - t1) / (s2 - s1) if s2 != s1 else t2 / max(s2, 1)
        per_sample = max(per_sample, t2 / (2 * s2), 1.0)  # noise guard: never below half the mean
        fixed = max(t2 - per_sample * s2, 0)
        self.per_sample, self.fixed = per_sample, fixed
        budget = self.budget if self.budget is not None else b2 + t2 * 8
        room = budget - b2 - fixed
        size = int(room // per_sample)
        size = max(1, min(size, self.max_batch))
        if self.cap is not None:
            size = min(size, self.cap)
        return size

    def shrink(self, size: int) -> None:
        """After an OOM at ``size``: later batches use at most half of it."""
        self.cap = max(1, size // 2)
        if self.chosen is not None:
            self.chosen = min(self.chosen, self.cap)

    def describe(self) -> dict:
        out = {"requested": self.requested, "chosen": self.chosen}
        if self.requested == "auto":
            out.update(budget_bytes=self.budget, probes=self.probes,
                       per_sample_bytes=getattr(self, "per_sample", None),
                       fixed_bytes=getattr(self, "fixed", None))
        if self.cap is not None:
            out["capped_after_oom"] = self.cap
        return out


def parse_batch_size(text: str | int) -> int | str:
    """'auto' or a positive integer (the --batch-size option)."""
    if isinstance(text, int) or text != "auto":
        try:
            value = int(text)
        except ValueError:
            raise UserError(f"--batch-size must be a positive integer or 'auto' (got {text})") \
                from None
        if value < 1:
            raise UserError(f"--batch-size must be at least 1 (got {value})")
        return value
    return "auto"
