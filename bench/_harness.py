"""A small harness for fair side-by-side benchmarks on a small, possibly shared machine.

Timings on a 2-core box collapse as soon as another process competes for a core, and the first call
of anything in a process pays for a cold allocator. So a benchmark built on this module:

1. refuses to report while other processes load the machine (``LoadMonitor``: /proc/stat minus our
   own CPU time), unless told ``--force``, and then says so next to every figure;
2. warms every contender up, then runs them in interleaved rounds (``interleave``: the order rotates
   each round) and reports the median of per-round ratios (``median_ratio``), so that a slow spell
   hits all contenders of a round alike;
3. measures peak memory separately from timing (``peak_memory``), because resetting the allocator to
   measure it would also make the next timed call cold again;
4. can time a first call in a fresh process (``run_fresh``), which is what a one-shot script sees.

API::

    monitor = LoadMonitor()                       # starts counting
    times = interleave({"ours": f, "theirs": g}, rounds=5, warmup=1)
    ratio = median_ratio(times["theirs"], times["ours"])   # > 1: ours is faster
    medians, ratios = interleaved_medians({...}, rounds=5, baseline="theirs")  # the same, summarised
    others = monitor.busy()                       # share of the machine other processes used
    check_load(others, force=args.force)          # raises SystemExit unless idle (or forced)
    extra_bytes = peak_memory(f)                  # or peak_memory_mb(f)
    check_idle_or_exit(force)                     # a one-second idle check, before or after a run
    wait_for_idle(timeout=600)                    # or wait (up to 10 min) for the others to finish

Nothing here is specific to one device: synchronisation and memory statistics go through
``torch.accelerator`` when an accelerator is in use, and through /proc on a CPU.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch

__all__ = [
    "LoadMonitor",
    "check_idle_or_exit",
    "check_load",
    "device_sync",
    "idle_now",
    "interleave",
    "interleaved_medians",
    "machine_is_idle",
    "median_ratio",
    "peak_memory",
    "peak_memory_mb",
    "run_fresh",
    "time_call",
    "wait_for_idle",
]

# Other processes may use this share of the machine (all cores together) before figures are refused.
MAX_OTHERS_BUSY = 0.10


# ---------------------------------------------------------------------------------------------
# Load
# ---------------------------------------------------------------------------------------------


def _busy_seconds() -> float:
    """CPU-seconds the whole machine spent busy since boot (every core), from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal [guest guest_nice: already inside user/nice]
    idle = fields[3] + fields[4]
    total = sum(fields[:8])
    return (total - idle) / os.sysconf("SC_CLK_TCK")


def _own_seconds() -> float:
    """CPU-seconds this process (and its finished children) used."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class LoadMonitor:
    """Measures how much of the machine *other* processes use between ``start()`` and ``busy()``.

    Our own CPU time is subtracted, so it can run around the timed work itself: a benchmark that
    saturates both cores reads about 0, a competing job reads its share. Returns None where /proc is
    missing (not Linux), in which case nothing can be checked.
    """

    def __init__(self) -> None:
        self.start()

    def start(self) -> None:
        try:
            self._t0, self._busy0, self._own0 = time.perf_counter(), _busy_seconds(), _own_seconds()
        except OSError:
            self._t0 = None

    def busy(self) -> float | None:
        """Share of all cores (0..1) that other processes used since ``start()``."""
        if self._t0 is None:
            return None
        wall = time.perf_counter() - self._t0
        others = (_busy_seconds() - self._busy0) - (_own_seconds() - self._own0)
        return max(0.0, others / (wall * (os.cpu_count() or 1)))


def idle_now(seconds: float = 1.0) -> float | None:
    """Sample the machine for ``seconds`` while doing nothing; returns the others' busy share."""
    monitor = LoadMonitor()
    time.sleep(seconds)
    return monitor.busy()


def wait_for_idle(timeout: float, seconds: float = 2.0) -> bool:
    """Wait up to ``timeout`` seconds for a ``seconds``-long window in which other processes use at
    most ``MAX_OTHERS_BUSY`` of the machine; returns whether one came."""
    deadline = time.monotonic() + timeout
    while True:
        others = idle_now(seconds)
        if others is None or others <= MAX_OTHERS_BUSY:
            return True
        if time.monotonic() >= deadline:
            return False


def machine_is_idle(seconds: float = 1.0) -> bool:
    """Whether other processes used at most ``MAX_OTHERS_BUSY`` of the machine over ``seconds``."""
    others = idle_now(seconds)
    return others is None or others <= MAX_OTHERS_BUSY


def check_idle_or_exit(force: bool, when: str = "before") -> None:
    """Sample the machine for a second (``when``: "before" or "after" the run, for the message) and
    exit unless it is idle; with ``force``, print a warning instead."""
    warning = check_load(idle_now(1.0), force, what=f"a check {when} the run")
    if warning:
        print(warning, flush=True)


def check_load(others: float | None, force: bool, what: str = "the timings") -> str:
    """Refuse (SystemExit) when other processes used more than ``MAX_OTHERS_BUSY`` of the machine.

    With ``force`` it returns a warning string to print next to the figures instead; "" when idle.
    """
    if others is None or others <= MAX_OTHERS_BUSY:
        return ""
    message = (
        f"other processes used {others:.0%} of the machine during {what} "
        f"(limit {MAX_OTHERS_BUSY:.0%}): the figures are not trustworthy"
    )
    if not force:
        raise SystemExit(f"refusing to report: {message}. Rerun on an idle machine, or pass --force.")
    return f"WARNING: {message} (--force)"


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------


def _accelerator(device: torch.device | str | None) -> bool:
    return device is not None and torch.device(device).type not in ("cpu", "meta")


def device_sync(device: torch.device | str | None = None) -> None:
    """Wait for queued kernels on an accelerator; a no-op on the CPU."""
    if _accelerator(device):
        torch.accelerator.synchronize()


def time_call(fn: Callable[[], object], device: torch.device | str | None = None) -> float:
    """Wall-clock seconds of one call, kernels included."""
    device_sync(device)
    t0 = time.perf_counter()
    fn()
    device_sync(device)
    return time.perf_counter() - t0


def interleave(
    contenders: dict[str, Callable[[], object]],
    rounds: int,
    warmup: int = 1,
    device: torch.device | str | None = None,
) -> dict[str, list[float]]:
    """Warm every contender up ``warmup`` times, then time ``rounds`` rounds of one call each.

    The order rotates every round, so no contender always runs right after the same neighbour (a
    neighbour that leaves the caches or the allocator in some state). Returns seconds per call, one
    list per contender, in round order.
    """
    names = list(contenders)
    for _ in range(warmup):
        for name in names:
            contenders[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(time_call(contenders[name], device))
    return times


def median_ratio(slow: list[float], fast: list[float]) -> float:
    """Median over rounds of ``slow[i] / fast[i]``: how many times faster ``fast`` is."""
    return statistics.median(s / f for s, f in zip(slow, fast, strict=True))


def interleaved_medians(
    contenders: dict[str, Callable[[], object]],
    rounds: int,
    baseline: str,
    warmup: int = 1,
    device: torch.device | str | None = None,
) -> tuple[dict[str, float], dict[str, float]]:
    """``interleave``, summarised: the median seconds per call of each contender, and each one's
    median per-round time ratio to ``baseline`` (``time / baseline time``: below 1 is faster)."""
    times = interleave(contenders, rounds, warmup, device)
    medians = {name: statistics.median(t) for name, t in times.items()}
    ratios = {name: median_ratio(t, times[baseline]) for name, t in times.items()}
    return medians, ratios


# ---------------------------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------------------------


def _rss_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"{field} not in /proc/self/status")


def _release_freed_memory() -> None:
    """Hand freed heap memory back to the OS, so that RSS reflects live tensors (glibc only)."""
    name = ctypes.util.find_library("c")
    if name:
        try:
            ctypes.CDLL(name).malloc_trim(0)
        except (OSError, AttributeError):
            pass


def peak_memory(fn: Callable[[], object], device: torch.device | str | None = None) -> int | None:
    """Bytes the call needs at its peak above what was live before it.

    On an accelerator: ``torch.accelerator`` peak allocated memory. On a CPU: the peak resident set
    (VmHWM, reset through /proc/self/clear_refs) minus the resident set before the call, after
    returning freed heap memory to the OS. It leaves the allocator cold, so do not time the next call
    in the same process. None when the platform offers no way to measure.
    """
    if _accelerator(device):
        device_sync(device)
        torch.accelerator.reset_peak_memory_stats()
        before = torch.accelerator.memory_allocated()
        fn()
        device_sync(device)
        return torch.accelerator.max_memory_allocated() - before
    try:
        _release_freed_memory()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak resident set (VmHWM) to the current one
        before = _rss_bytes("VmRSS")
        fn()
        return _rss_bytes("VmHWM") - before
    except OSError:
        return None


def peak_memory_mb(fn: Callable[[], object], device: torch.device | str | None = None) -> float:
    """``peak_memory`` in MiB (NaN where it cannot be measured)."""
    peak = peak_memory(fn, device)
    return float("nan") if peak is None else peak / 2**20


# ---------------------------------------------------------------------------------------------
# Fresh processes
# ---------------------------------------------------------------------------------------------


def run_fresh(argv: list[str], timeout: float | None = None) -> dict:
    """Run ``python argv...`` in a fresh process and parse the JSON object on its last stdout line.

    Used for first-call figures: a new process starts with a cold allocator, as a one-shot sampling
    script does. The child prints its result with ``print(json.dumps(...))``.
    """
    proc = subprocess.run(
        [sys.executable, *argv], capture_output=True, text=True, timeout=timeout, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"fresh run {argv} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
