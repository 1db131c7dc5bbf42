"""Peak live tensor memory: the largest total size of PyTorch storages alive at once.

On a GPU the caching allocator already keeps this number (``torch.cuda.max_memory_allocated``).
On a CPU nothing does, so :class:`PeakMemoryTracker` counts it itself. It is a
``TorchDispatchMode``: every ATen operator call (forward, autograd's backward, optimizer
kernels, ``torch.zeros_like`` inside ``AdamW``...) passes through its ``__torch_dispatch__``,
which looks at the storages of the op's outputs. A storage seen for the first time is added
to the running total, and a weak reference on its Python ``UntypedStorage`` object (PyTorch
keeps one object per storage for as long as the storage lives) subtracts it again the moment
the storage is freed. So:

* views (``view``, ``transpose``, slicing, ``split``) share their base's storage and are counted
  once; in-place ops return a storage already counted and add nothing;
* ``.grad`` tensors are counted: autograd computes them with ordinary ops, and
  ``AccumulateGrad`` either keeps that op's output or adds into the existing ``.grad``;
* memory that existed before tracking began (parameters, optimizer state, the batch) is *not*
  an op output; register it with :meth:`PeakMemoryTracker.track_existing`,
  :meth:`~PeakMemoryTracker.track_module` and :meth:`~PeakMemoryTracker.track_optimizer` so
  the peak is the total live memory, not just what the tracked code allocated. A storage that
  was not registered but turns up as an op's input is counted from then on, and its bytes are
  reported as ``unregistered_bytes`` so a missed registration shows.

What it cannot see: scratch memory a kernel allocates and frees inside one operator (oneDNN
workspaces, the internals of a fused attention kernel), allocator rounding and fragmentation,
and storages resized through ``UntypedStorage.resize_`` directly (``Tensor.resize_`` is seen).
The peak is sampled when an operator returns, when both its inputs and its outputs are alive.

Accuracy: on pocketlm training steps (gpt2-125m and tiny, with and without selective activation
checkpointing) its peak equals that of PyTorch's ``torch.distributed._tools.mem_tracker.MemTracker``
to the byte, and on the gpt2-125m seed step it is within 0.1% of how far the process's peak RSS
rises (malloc set to unmap freed blocks); see ``benchmarks/memory.py`` and the tests.

Typical use, one steady-state training step (optimizer state already built)::

    tracker = PeakMemoryTracker()
    tracker.track_module(model)          # params, buffers, existing grads; labels new grads
    tracker.track_optimizer(optimizer)   # Adam moments etc.; marks the step's phase
    tracker.track_existing(batch_tensors, category="inputs")
    with tracker:
        train_step(...)
    report = tracker.report()
    print(report.peak_bytes / 2**30, report.peak_breakdown, report.peak_phase)

or simply ``measure_peak(fn, device=device, model=model, optimizer=optimizer)``, which on CUDA
uses the allocator's own statistics instead.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import threading
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import (
    TorchDispatchMode,
    is_traceable_wrapper_subclass,
)
from torch.utils._pytree import tree_flatten

GIB = 1024 ** 3

# Categories. Registered memory gets the category it was registered with; new storages get one
# from the phase they were created in, and parameter gradients / optimizer state are relabelled
# by hooks when autograd or the optimizer hands them over.
PARAMS = "params"
BUFFERS = "buffers"
GRADS = "grads"
OPTIMIZER_STATE = "optimizer_state"
INPUTS = "inputs"
UNREGISTERED = "unregistered"
PHASE_CATEGORY = {"forward": "activations", "backward": "backward", "optimizer": "optimizer_step",
                  "other": "other"}


@dataclass
class MemoryReport:
    """What one measurement found. Byte counts are of storages (``nbytes``), all devices counted
    unless the tracker was given one."""

    peak_bytes: int
    """Largest total size of live storages at any moment while tracking (registered ones included)."""
    current_bytes: int
    """Live tracked bytes when the report was made (at exit, for ``measure_peak``)."""
    start_bytes: int
    """Live tracked bytes when tracking began (what was registered before ``__enter__``)."""
    method: str
    """``dispatch-tracker`` (this module's ``PeakMemoryTracker``) or ``cuda-allocator``."""
    device: str | None = None
    peak_breakdown: dict[str, int] = field(default_factory=dict)
    """Bytes per category at the moment of the peak (tracker only); sums to ``peak_bytes``."""
    phase_peaks: dict[str, int] = field(default_factory=dict)
    """Largest live total seen in each phase: ``forward`` (from a tracked module's first call
    until backward starts, the loss included), ``backward``, ``optimizer`` (inside
    ``optimizer.step``) and ``other`` (the rest: gradient clipping, ``zero_grad``...)."""
    peak_phase: str | None = None
    """Phase in which the peak was reached."""
    peak_op: str | None = None
    """The operator whose output made the peak (``aten.mm.default``...)."""
    peak_autograd_node: str | None = None
    """In backward: the autograd node running at the peak (``NllLossBackward0``...)."""
    unregistered_bytes: int = 0
    """Bytes of storages first seen as an op *input*: created outside dispatch or existing
    before tracking without being registered. Counted only from when they were first seen."""
    n_ops: int = 0
    """Operators seen (tracker only)."""

    @property
    def peak_gib(self) -> float:
        return self.peak_bytes / GIB

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["peak_gib"] = round(self.peak_gib, 4)
        return d


def _storage_of(t: torch.Tensor) -> torch.UntypedStorage | None:
    """The tensor's own storage, or None for tensors without one we can count (sparse, meta,
    wrapper subclasses whose inner tensors are counted when their own ops run)."""
    if is_traceable_wrapper_subclass(t) or t.is_sparse or t.device.type == "meta":
        return None
    try:
        return t.untyped_storage()
    except (RuntimeError, NotImplementedError, TypeError):
        return None


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
        return
    leaves, _ = tree_flatten(obj)
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            yield leaf


def _free_callback(selfref: weakref.ref, key: int, serial: int, _ref: weakref.ref) -> None:
    tracker = selfref()
    if tracker is not None:
        tracker._on_free(key, serial)


class PeakMemoryTracker(TorchDispatchMode):
    """Context manager counting live tensor storages; see the module docstring.

    Args:
        device: count only storages on this device (``"cpu"``, ``"cuda"``, ``"cuda:1"``);
            None counts every device.
        track_inputs: also count storages first seen as an operator's input (reported as
            ``unregistered_bytes``). Leave on: it can only make the figure more complete.

    Properties ``peak_bytes`` and ``current_bytes`` are live; :meth:`report` summarises.
    One tracker measures one region; :meth:`reset_peak` starts a new peak from the current total.
    """

    def __init__(self, *, device: torch.device | str | None = None, track_inputs: bool = True) -> None:
        super().__init__()
        self._device = torch.device(device) if device is not None else None
        self._track_inputs = track_inputs
        self._lock = threading.RLock()
        # id(UntypedStorage) -> (weakref to it, bytes, serial). The weakref's callback subtracts.
        self._live: dict[int, tuple[weakref.ref, int, int]] = {}
        self._labels: dict[int, str] = {}  # serial -> category (kept after free, for the peak snapshot)
        self._serial = 0
        self._current = 0
        self._peak = 0
        self._start = 0
        self._peak_snapshot: dict[int, int] | None = None  # serial -> bytes at the peak
        self._peak_dirty = False  # the peak is the current state and no snapshot is taken yet
        self._peak_op: str | None = None
        self._peak_phase: str | None = None
        self._peak_node: str | None = None
        self._phase_peaks: dict[str, int] = {}
        self._phase_stack: list[str] = []
        self._state = "other"  # forward after a tracked module runs, other after backward/optimizer
        self._unregistered = 0
        self._n_ops = 0
        self._handles: list[Any] = []
        self._active = False
        self._selfref = weakref.ref(self)  # the free callbacks must not keep the tracker alive

    # ------------------------------------------------------------------ bookkeeping

    def _counts(self, storage: torch.UntypedStorage) -> bool:
        if self._device is None:
            return True
        dev = storage.device
        return dev.type == self._device.type and (self._device.index is None or dev.index == self._device.index)

    def _add(self, storage: torch.UntypedStorage, category: str) -> int:
        """Register ``storage`` if new (returns the bytes added); relabel never."""
        key = id(storage)
        if key in self._live or not self._counts(storage):
            return 0
        nbytes = storage.nbytes()
        serial = self._serial
        self._serial += 1
        ref = weakref.ref(storage, functools.partial(_free_callback, self._selfref, key, serial))
        self._live[key] = (ref, nbytes, serial)
        self._labels[serial] = category
        self._current += nbytes
        return nbytes

    def _on_free(self, key: int, serial: int) -> None:
        with self._lock:
            entry = self._live.get(key)
            if entry is None or entry[2] != serial:
                return
            if self._peak_dirty:  # leaving the peak: remember what was alive there
                self._take_snapshot()
            del self._live[key]
            self._current -= entry[1]
            if self._peak_snapshot is None or serial not in self._peak_snapshot:
                del self._labels[serial]  # only the peak's storages need a label after they die

    def _take_snapshot(self) -> None:
        old = self._peak_snapshot
        self._peak_snapshot = {serial: nbytes for _, nbytes, serial in self._live.values()}
        self._peak_dirty = False
        if old:  # storages of the old peak that died since: their labels are no longer needed
            for serial in old.keys() - self._peak_snapshot.keys():
                self._labels.pop(serial, None)

    def _resized(self, storage: torch.UntypedStorage) -> bool:
        """Follow a tracked storage whose size changed (``Tensor.resize_``); True if it did."""
        key = id(storage)
        entry = self._live.get(key)
        if entry is None:
            return False
        nbytes = storage.nbytes()
        if nbytes == entry[1]:
            return False
        if self._peak_dirty and nbytes < entry[1]:
            self._take_snapshot()
        self._live[key] = (entry[0], nbytes, entry[2])
        self._current += nbytes - entry[1]
        return True

    def _update_peak(self, op: str | None) -> None:
        phase = self.current_phase()
        if self._current > self._phase_peaks.get(phase, -1):
            self._phase_peaks[phase] = self._current
        if self._current > self._peak:
            self._peak = self._current
            self._peak_dirty = True
            self._peak_op = op
            self._peak_phase = phase
            node = torch._C._current_autograd_node()
            self._peak_node = type(node).__name__ if node is not None else None

    def _label(self, t: torch.Tensor | None, category: str) -> None:
        if t is None:
            return
        storage = _storage_of(t)
        if storage is None:
            return
        with self._lock:
            entry = self._live.get(id(storage))
            if entry is not None:
                self._labels[entry[2]] = category
            elif self._add(storage, category):
                self._update_peak(None)

    # ------------------------------------------------------------------ registration

    def track_existing(self, tensors: Any, category: str = INPUTS) -> int:
        """Count storages that already exist (any nesting of tensors: list, dict, tuple...).

        Each storage is counted once however many tensors view it; a storage already tracked
        keeps its category. Returns the bytes newly added. Call before or during tracking.
        """
        added = 0
        with self._lock:
            for t in _tensors(tensors):
                storage = _storage_of(t)
                if storage is not None:
                    added += self._add(storage, category)
            if self._active:
                if added:
                    self._update_peak(None)
            else:
                self._start = self._current
                if self._current > self._peak:
                    self._peak = self._current
                    self._peak_dirty = True
        return added

    def track_module(self, module: torch.nn.Module, *, label_grads: bool = True) -> int:
        """Register a module's parameters, buffers and existing ``.grad`` tensors, and let its
        submodules mark the ``forward`` phase: from the first call of any of them until backward
        starts (so a loss computed outside the modules counts as forward too). With
        ``label_grads``, gradients autograd accumulates later are labelled ``grads``
        (post-accumulate-grad hooks). The hooks are removed at ``__exit__``."""
        params = list(module.parameters())
        added = self.track_existing(params, PARAMS)
        added += self.track_existing(list(module.buffers()), BUFFERS)
        added += self.track_existing([p.grad for p in params if p.grad is not None], GRADS)

        def enter(*_: Any) -> None:
            if torch.is_grad_enabled() and torch._C._current_autograd_node() is None:
                self._state = "forward"

        for m in module.modules():  # every submodule: methods other than forward call them too
            self._handles.append(m.register_forward_pre_hook(enter))
        if label_grads:
            for p in {id(p): p for p in params if p.requires_grad}.values():
                self._handles.append(p.register_post_accumulate_grad_hook(lambda p: self._label(p.grad, GRADS)))
        return added

    def track_optimizer(self, optimizer: torch.optim.Optimizer) -> int:
        """Register an optimizer's state tensors (Adam moments, step counters) and mark its
        ``step`` as the ``optimizer`` phase; state created by that step is labelled
        ``optimizer_state`` when it ends."""
        def state_tensors() -> list[torch.Tensor]:
            return [v for s in optimizer.state.values() for v in _tensors(s)]

        added = self.track_existing(state_tensors(), OPTIMIZER_STATE)

        def pre(*_: Any) -> None:
            self._phase_stack.append("optimizer")

        def post(*_: Any) -> None:
            if self._phase_stack and self._phase_stack[-1] == "optimizer":
                self._phase_stack.pop()
            self._state = "other"
            for t in state_tensors():
                self._label(t, OPTIMIZER_STATE)

        self._handles.append(optimizer.register_step_pre_hook(pre))
        self._handles.append(optimizer.register_step_post_hook(post))
        return added

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Name the phase of the code inside (it wins over the automatic forward/backward/optimizer)."""
        self._phase_stack.append(name)
        try:
            yield
        finally:
            self._phase_stack.pop()

    def current_phase(self) -> str:
        if self._phase_stack:
            return self._phase_stack[-1]
        if torch._C._current_autograd_node() is not None:
            self._state = "other"  # whatever runs after backward (clipping...) is not forward
            return "backward"
        return self._state

    # ------------------------------------------------------------------ dispatch

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        with self._lock:
            self._n_ops += 1
            changed = False
            if self._track_inputs:
                for t in _tensors((args, kwargs)):
                    storage = _storage_of(t)
                    if storage is None:
                        continue
                    added = self._add(storage, UNREGISTERED)
                    if added:
                        self._unregistered += added
                        changed = True
            category = PHASE_CATEGORY.get(self.current_phase(), "other")
            for t in _tensors(out):
                storage = _storage_of(t)
                if storage is None:
                    continue
                if id(storage) in self._live:
                    changed |= self._resized(storage)  # Tensor.resize_; usually nothing
                elif self._add(storage, category):
                    changed = True
            if changed:
                self._update_peak(str(func))
            else:  # nothing new, but the phase may be new (e.g. a fused optimizer step allocates nothing)
                phase = self.current_phase()
                if self._current > self._phase_peaks.get(phase, -1):
                    self._phase_peaks[phase] = self._current
        return out

    def __enter__(self) -> PeakMemoryTracker:
        with self._lock:
            self._active = True
            self._start = self._current
            self._peak = max(self._peak, self._current)
        return super().__enter__()

    def __exit__(self, *exc: object) -> None:
        try:
            super().__exit__(*exc)
        finally:
            with self._lock:
                self._active = False
                self._state = "other"
                self._phase_stack.clear()
                for h in self._handles:
                    h.remove()
                self._handles.clear()

    # ------------------------------------------------------------------ results

    @property
    def peak_bytes(self) -> int:
        return self._peak

    @property
    def current_bytes(self) -> int:
        return self._current

    def reset_peak(self) -> None:
        """Start a new peak from the current total (e.g. to measure only a second step)."""
        with self._lock:
            self._peak = self._current
            self._peak_dirty = True
            self._peak_snapshot = None
            self._peak_op = self._peak_phase = self._peak_node = None
            self._phase_peaks = {}

    def peak_breakdown(self) -> dict[str, int]:
        """Bytes per category at the peak, largest first."""
        with self._lock:
            if self._peak_dirty or self._peak_snapshot is None:
                self._take_snapshot()
            totals: dict[str, int] = {}
            for serial, nbytes in self._peak_snapshot.items():
                cat = self._labels.get(serial, "other")
                totals[cat] = totals.get(cat, 0) + nbytes
        return dict(sorted(totals.items(), key=lambda kv: -kv[1]))

    def current_breakdown(self) -> dict[str, int]:
        """Live bytes per category now, largest first."""
        with self._lock:
            totals: dict[str, int] = {}
            for _, nbytes, serial in self._live.values():
                cat = self._labels.get(serial, "other")
                totals[cat] = totals.get(cat, 0) + nbytes
        return dict(sorted(totals.items(), key=lambda kv: -kv[1]))

    def report(self) -> MemoryReport:
        return MemoryReport(
            peak_bytes=self._peak, current_bytes=self._current, start_bytes=self._start,
            method="dispatch-tracker", device=str(self._device) if self._device is not None else None,
            peak_breakdown=self.peak_breakdown(), phase_peaks=dict(self._phase_peaks),
            peak_phase=self._peak_phase, peak_op=self._peak_op, peak_autograd_node=self._peak_node,
            unregistered_bytes=self._unregistered, n_ops=self._n_ops)

    def release(self) -> None:
        """Forget every tracked storage (drops the weak references); the numbers stay."""
        with self._lock:
            if self._peak_dirty:
                self._take_snapshot()
            self._live.clear()


def measure_peak(fn: Callable[[], Any], *, device: torch.device | str, model: torch.nn.Module | None = None,
                 optimizer: torch.optim.Optimizer | None = None, tensors: Any = None,
                 method: str = "auto") -> MemoryReport:
    """Run ``fn()`` once and report its peak live tensor memory, existing state included.

    ``method="auto"`` uses the CUDA caching allocator's statistics on a CUDA device
    (``reset_peak_memory_stats`` then ``max_memory_allocated``: everything allocated on that
    device counts, registered or not) and :class:`PeakMemoryTracker` elsewhere, with ``model``,
    ``optimizer`` and ``tensors`` (e.g. the batch) registered as existing memory.
    ``method="tracker"`` forces the tracker (it works on CUDA too and gives the breakdown).
    """
    device = torch.device(device)
    if method not in ("auto", "tracker", "cuda"):
        raise ValueError(f"method must be auto, tracker or cuda; got {method!r}")
    if method == "cuda" or (method == "auto" and device.type == "cuda"):
        if device.type != "cuda":
            raise ValueError("method='cuda' needs a CUDA device")
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return MemoryReport(peak_bytes=torch.cuda.max_memory_allocated(device),
                            current_bytes=torch.cuda.memory_allocated(device), start_bytes=start,
                            method="cuda-allocator", device=str(device))
    tracker = PeakMemoryTracker(device=device)
    if model is not None:
        tracker.track_module(model)
    if optimizer is not None:
        tracker.track_optimizer(optimizer)
    if tensors is not None:
        tracker.track_existing(tensors, INPUTS)
    with tracker:
        fn()
    report = tracker.report()
    tracker.release()
    return report


__all__ = ["GIB", "MemoryReport", "PeakMemoryTracker", "measure_peak"]
