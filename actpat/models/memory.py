"""Memory budgets: parse sizes, measure peak memory, pick a batch size, survive out-of-memory.

``--batch-size auto`` scores a warm-up batch of 1 sample, then probe batches of 1 and 2 while
measuring the process' peak memory in each (peak RSS on CPU through ``/proc/self/clear_refs``;
the allocator's peak on CUDA). The warm-up pays the one-off costs (a memory-mapped model paged
in, the float32 sums of the maps allocated), so the probes see the steady state. The fit is on
the probes' absolute peaks, ``peak = base + per_sample * B``: memory freed after a batch but kept
by the allocator is reused by the next one, so an absolute peak neither double-counts it nor
misses it, where a peak measured from the memory held before the batch would. From then on the
largest B whose predicted peak stays inside the budget is used (``--max-memory``; default: 70 %
of the available RAM on CPU, 85 % of the free memory of the GPU). The warm-up and probe batches
are ordinary batches: their samples count. The loop's callers keep the end of the run inside
the same peak (the mean maps are formed in place of the sums).

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
    """Batch sizes for the sample loop: fixed, or ``auto`` from a warm-up and two measured probe batches.

    ``next_size(remaining)`` is the size of the next batch; ``observe(size, before, peak)``
    records one scored batch's memory; ``shrink(size)`` caps later batches after an OOM.
    """

    requested: int | str = 4  # an int, or "auto"
    budget: int | None = None  # bytes the process' peak may reach (auto only)
    max_batch: int = 64
    warmup: tuple[int, int, int] | None = None  # (size, before, peak) of the warm-up batch
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
        if self.chosen is None:  # warm-up 1, probes 1 then 2
            size = 2 if self.warmup is not None and self.probes else 1
        else:
            size = self.chosen
        if self.cap is not None:
            size = min(size, self.cap)
        return max(1, min(size, remaining))

    def observe(self, size: int, before: int, peak: int) -> None:
        if self.chosen is not None:
            return
        if self.warmup is None:
            self.warmup = (size, before, peak)
            return
        self.probes.append((size, before, peak))
        sizes = {s for s, _, _ in self.probes}
        if len(sizes) >= 2 or len(self.probes) >= 3:
            self.chosen = self.fit()

    def fit(self) -> int:
        """Largest B with base + per_sample * B <= budget (at least 1), fitted on the probes'
        absolute peaks."""
        (s1, _, p1), (s2, b2, p2) = self.probes[0], self.probes[-1]
        t2 = max(p2 - b2, 0)  # what the second probe added on top of what was held before it
        per_sample = (p2 - p1) / (s2 - s1) if s2 != s1 else t2 / max(s2, 1)
        per_sample = max(per_sample, t2 / (2 * s2), 1.0)  # noise guard: never below half the mean
        base = max(p2 - per_sample * s2, 0)
        self.per_sample, self.base = per_sample, base
        budget = self.budget if self.budget is not None else p2 + t2 * 8
        size = int((budget - base) // per_sample)
        size = max(1, min(size, self.max_batch))
        if self.cap is not None:
            size = min(size, self.cap)
        return size

    def predicted_peak(self, size: int) -> int | None:
        """The fitted peak at ``size`` (None before the fit)."""
        if getattr(self, "per_sample", None) is None:
            return None
        return int(self.base + self.per_sample * size)

    def shrink(self, size: int) -> None:
        """After an OOM at ``size``: later batches use at most half of it."""
        self.cap = max(1, size // 2)
        if self.chosen is not None:
            self.chosen = min(self.chosen, self.cap)

    def describe(self) -> dict:
        out = {"requested": self.requested, "chosen": self.chosen}
        if self.requested == "auto":
            out.update(budget_bytes=self.budget, warmup=self.warmup, probes=self.probes,
                       per_sample_bytes=getattr(self, "per_sample", None),
                       base_bytes=getattr(self, "base", None),
                       predicted_peak_bytes=self.predicted_peak(self.chosen or 1))
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
