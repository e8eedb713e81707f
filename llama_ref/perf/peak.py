"""Reading peak memory, the one way for every caller: the tensors of a block of training steps by category
(torch's ``MemTracker``, CPU and CUDA, real or fake tensors), and the peak of a whole run (the CUDA allocator's
``max_memory_allocated``, or the process's peak resident set on CPU).

Units: MiB (2**20 bytes), the unit ``torch.cuda.max_memory_allocated() / 2**20`` reports.
"""
from __future__ import annotations

import resource
import types
from typing import Any

import torch

MiB = 2 ** 20


CATEGORIES = ("parameter", "gradient", "optimizer state", "activation", "temporary", "buffer", "other")


# MemTracker's category names (the values of torch.distributed._tools.mem_tracker._MemRefType) → ours.
_TRACKER_NAMES = {"Parameter": "parameter", "Gradient": "gradient", "Optstate": "optimizer state",
                  "Activation": "activation", "Temp": "temporary", "Buffer": "buffer", "Other": "other"}


class MemTrackerUnavailable(RuntimeError):
    """This torch has no ``torch.distributed._tools.mem_tracker.MemTracker`` (it appeared in torch 2.5)."""


def mem_tracker_class() -> type:
    """torch's ``MemTracker`` class; MemTrackerUnavailable (saying which torch) where it does not exist."""
    try:
        from torch.distributed._tools.mem_tracker import MemTracker
    except ImportError as e:  # torch < 2.5, or a build without torch.distributed
        raise MemTrackerUnavailable(
            f"torch {torch.__version__} has no torch.distributed._tools.mem_tracker.MemTracker ({e}); "
            "measure_step_memory falls back to the CUDA allocator on CUDA, and cannot measure by category on CPU"
        ) from None
    return MemTracker


def mem_tracker_available() -> bool:
    """Whether this torch has MemTracker (torch >= 2.5 with torch.distributed): the gate every caller, the tests
    included, uses before measuring by category."""
    try:
        mem_tracker_class()
    except MemTrackerUnavailable:
        return False
    return True


def _fast_tracker_class():
    """MemTracker that keeps only the global peak: its ``_update_peak_stats`` also updates every module's local
    peak after every op (modules × ops deep copies, 80 % of a 1B model's prediction time), which we never read."""
    MemTracker = mem_tracker_class()
    from torch.distributed._tools import mem_tracker as mt
    total_key = getattr(mt, "_TOTAL_KEY", None)
    if total_key is None or not hasattr(MemTracker, "_update_peak_stats"):  # internals changed: the plain one
        return MemTracker

    class _GlobalPeakTracker(MemTracker):
        def _pre_fw_hook(self, module: torch.nn.Module, inputs: Any) -> None:
            # A root module's second forward (the next micro-batch of an accumulation window) is refused by
            # MemTracker unless its per-module stats are reset; the global peak, all we read, survives the reset.
            if module in self.memory_tracking and not self._mod_tracker.is_bw:
                if set(self._mod_tracker.parents) - {self._mod_tracker.get_known_fqn(module)} == {"Global"}:
                    self.reset_mod_stats()
            super()._pre_fw_hook(module, inputs)

        def _update_peak_stats(self, peak_state: Any) -> None:
            peaks = self.__dict__.setdefault("category_peaks", {})
            for dev, dev_snap in self._curr_mem_snap.items():
                if self._peak_mem.get(dev, 0) < dev_snap[total_key]:
                    self._peak_mem[dev] = dev_snap[total_key]
                    self._peak_mem_snap[dev] = dict(dev_snap)
                dev_peaks = peaks.setdefault(dev, {})
                for k, v in dev_snap.items():
                    if dev_peaks.get(k, 0) < v:
                        dev_peaks[k] = v

    return _GlobalPeakTracker


def _tracker_for(model: torch.nn.Module, optimizer: torch.optim.Optimizer, *inputs: torch.Tensor):
    tracker = _fast_tracker_class()()
    for p in model.parameters():
        # MemTracker hooks every parameter's gradient, and register_hook raises on a frozen parameter: mark those
        # as already hooked (they never get a gradient).
        if not p.requires_grad:
            noop = types.SimpleNamespace(remove=lambda: None)
            tracker._param_to_grad_hook_handles[p] = (noop, noop)
    tracker.track_external(model, optimizer, *inputs)
    return tracker


def _peak_breakdown(tracker) -> tuple[float, dict[str, float]]:
    snaps = tracker.get_tracker_snapshot("peak")
    if not snaps:
        return 0.0, {c: 0.0 for c in CATEGORIES}
    if len(snaps) > 1:  # several devices: report the largest
        snap = max(snaps.values(), key=lambda s: s.get("Total", 0))
    else:
        (snap,) = snaps.values()
    out = {c: 0.0 for c in CATEGORIES}
    for k, v in snap.items():
        name = str(getattr(k, "value", k))
        if name in _TRACKER_NAMES:
            out[_TRACKER_NAMES[name]] += v / MiB
    return snap.get("Total", sum(v for k, v in snap.items() if str(getattr(k, "value", k)) != "Total")) / MiB, out


def _category_peaks(tracker) -> dict[str, float]:
    """Each category's own maximum over the tracked block (MiB; the largest device's), whenever it happened: the
    activations' peak is at the end of forward, the gradients' at the end of backward, and so on."""
    out = {c: 0.0 for c in CATEGORIES}
    for dev_peaks in getattr(tracker, "category_peaks", {}).values():
        for k, v in dev_peaks.items():
            name = _TRACKER_NAMES.get(str(getattr(k, "value", k)))
            if name is not None:
                out[name] = max(out[name], v / MiB)
    return out


class PeakTracker:
    """MemTracker over a block of training steps: ``peak_mb``, ``breakdown_mb`` (the split of that peak) and
    ``category_peaks_mb`` (each category's own maximum) after the block; MiB. Raises MemTrackerUnavailable on
    torch < 2.5."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, *inputs: torch.Tensor):
        self._tracker = _tracker_for(model, optimizer, *inputs)
        self.peak_mb, self.breakdown_mb, self.category_peaks_mb = 0.0, {}, {}

    def __enter__(self) -> "PeakTracker":
        self._tracker.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._tracker.__exit__(*exc)
        self.peak_mb, self.breakdown_mb = _peak_breakdown(self._tracker)
        self.category_peaks_mb = _category_peaks(self._tracker)


def peak_memory_mb(device: str) -> tuple[float, str]:
    """(MB, what was measured): CUDA allocator peak, or this process's peak resident set on CPU."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(torch.device(device)) / 2**20, "cuda max_memory_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process peak RSS"


