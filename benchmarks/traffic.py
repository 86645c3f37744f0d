"""Traffic model of the Triton kernels: what each launch moves and computes, and a roofline.

THIS IS A MODEL, NOT A MEASUREMENT. No GPU is involved: every kernel runs under the Triton
interpreter (``TRITON_INTERPRET=1``) on CPU, and the interpreter's memory and dot builders are
wrapped while a launch runs, so the counts are exact for the code as written, on any kernel:

* ``requested_bytes``: every global load / store / atomic element the programs issue, times
  its size (masked-off lanes excluded) — the traffic the SMs ask of L2.
* ``bytes``: the DRAM traffic model: distinct 32-byte sectors loaded plus distinct sectors
  stored, per launch (a launch's re-reads are assumed to hit L2, nothing survives between
  launches). Sector granularity charges scattered gathers what the memory system charges.
* ``flops``: ``2 M N K`` for every ``tl.dot`` on the tile shapes it is given (padding rows of
  partial tiles included: that waste is real); elementwise math is not counted.
* ``atomics`` and ``max_same_address_atomics``: atomic read-modify-writes, and the largest
  number that hit one address in one launch (a chain the hardware must serialise).
* torch operations the launchers run between kernels (``delta`` sums, ``index_add_``, dtype
  casts, zero fills) are counted as pseudo-launches named ``torch.<op>``: inputs read once,
  outputs written once.

Roofline per launch: ``max(flops / tensor peak, bytes / HBM bandwidth, atomic chain)``;
a kernel's time is the sum over its launches (no overlap between launches, none lost to
launch latency or tails). Peaks are the published dense numbers (``HARDWARE``); the atomic
chain is ``max_same_address_atomics x ATOMIC_CHAIN_NS`` — an assumption, not a published
figure. ``ideal_bytes`` is the op's own inputs read once and outputs written once.

Kernels run with the tile configs a GPU would run (``interpret_as_compiled`` where a
kernel module offers it), not the small interpreter tiles of the tests.

    omni bench kernels --traffic [--json] [--kernel SUBSTR] [--case SUBSTR]
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # must precede the first import of triton

import contextlib  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

SECTOR = 32  # bytes: the L2 / DRAM access granularity of NVIDIA GPUs since Volta
_CHUNK_BITS = 20  # sector bitmaps are kept in chunks of 2**20 sectors (32 MiB of address space)

# Published peaks (dense, no sparsity), bf16/fp16 tensor cores and HBM bandwidth:
#  * H100 SXM5 80 GB: 989.4 TFLOP/s dense BF16/FP16 tensor (1,979 with sparsity), 3.35 TB/s HBM3
#    (NVIDIA H100 Tensor Core GPU datasheet; NVIDIA Hopper architecture whitepaper, table 3).
#  * A100 SXM4 80 GB: 312 TFLOP/s dense BF16/FP16 tensor (624 with sparsity), 2,039 GB/s HBM2e
#    (NVIDIA A100 Tensor Core GPU datasheet).
#  fp32 operands: the kernels use IEEE fp32 dots on CUDA cores: 66.9 (H100) / 19.5 (A100) TFLOP/s.
HARDWARE = {
    "h100": {"tensor_tflops": {"bf16": 989.4, "fp16": 989.4, "fp32": 66.9}, "hbm_gbps": 3350.0},
    "a100": {"tensor_tflops": {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5}, "hbm_gbps": 2039.0},
}
# Assumed cost of one link of a same-address atomic chain (an L2 atomic unit's turnaround).
ATOMIC_CHAIN_NS = 2.0


# ------------------------------------------------------------------------------------------
# Counting
# ------------------------------------------------------------------------------------------


class _SectorSet:
    """Distinct 32-byte sectors touched, as chunked bitmaps (no per-element Python work)."""

    def __init__(self) -> None:
        self.chunks: dict[int, np.ndarray] = {}

    def add(self, addresses: np.ndarray) -> None:
        if addresses.size == 0:
            return
        sectors = addresses // SECTOR
        chunks = sectors >> _CHUNK_BITS
        first = int(chunks.flat[0])
        if (chunks == first).all():
            self._mark(first, sectors)
        else:
            for c in np.unique(chunks):
                self._mark(int(c), sectors[chunks == c])

    def _mark(self, chunk: int, sectors: np.ndarray) -> None:
        bitmap = self.chunks.get(chunk)
        if bitmap is None:
            bitmap = self.chunks[chunk] = np.zeros(1 << _CHUNK_BITS, dtype=bool)
        bitmap[sectors & ((1 << _CHUNK_BITS) - 1)] = True

    def count(self) -> int:
        return int(sum(int(b.sum()) for b in self.chunks.values()))

    def count_range(self, lo: int, hi: int) -> int:
        """Distinct sectors in ``[lo, hi)`` (sector numbers)."""
        total = 0
        for c in range(lo >> _CHUNK_BITS, ((hi - 1) >> _CHUNK_BITS) + 1):
            bitmap = self.chunks.get(c)
            if bitmap is not None:
                base = c << _CHUNK_BITS
                total += int(bitmap[max(lo, base) - base:min(hi, base + (1 << _CHUNK_BITS)) - base].sum())
        return total


class _AddressCounts:
    """How many atomics hit each address (chunked count arrays keyed by 4-byte word)."""

    def __init__(self) -> None:
        self.chunks: dict[int, np.ndarray] = {}

    def add(self, addresses: np.ndarray) -> None:
        words = addresses // 4
        chunks = words >> _CHUNK_BITS
        for c in np.unique(chunks):
            counts = self.chunks.get(int(c))
            if counts is None:
                counts = self.chunks[int(c)] = np.zeros(1 << _CHUNK_BITS, dtype=np.int64)
            np.add.at(counts, words[chunks == c] & ((1 << _CHUNK_BITS) - 1), 1)

    def max(self) -> int:
        return int(max((int(c.max()) for c in self.chunks.values()), default=0))


@dataclass
class Launch:
    """What one kernel launch (or one torch op between launches) did."""

    name: str
    grid: tuple[int, ...] = ()
    meta: dict[str, Any] = field(default_factory=dict)
    requested_bytes: int = 0
    flops: int = 0
    atomics: int = 0
    max_same_address_atomics: int = 0
    bytes: int = 0
    # (shape, bytes) of the DRAM model's bytes per argument tensor: lets a count at scaled
    # shapes be carried to full shapes tensor by tensor (see scale_launch).
    by_tensor: list[tuple[tuple[int, ...], int]] = field(default_factory=list)
    _args: list[tuple[int, int, tuple[int, ...]]] = field(default_factory=list, repr=False)
    _loads: _SectorSet = field(default_factory=_SectorSet, repr=False)
    _stores: _SectorSet = field(default_factory=_SectorSet, repr=False)
    _atomic_addrs: _AddressCounts = field(default_factory=_AddressCounts, repr=False)

    def close(self) -> None:
        self.bytes = SECTOR * (self._loads.count() + self._stores.count())
        self.max_same_address_atomics = self._atomic_addrs.max()
        end = 0
        for ptr, nbytes, shape in sorted(set(self._args)):  # clip overlapping views
            lo, hi = max(ptr // SECTOR, end), -(-(ptr + nbytes) // SECTOR)
            if hi > lo:
                moved = SECTOR * (self._loads.count_range(lo, hi) + self._stores.count_range(lo, hi))
                self.by_tensor.append((shape, moved))
                end = hi
        attributed = sum(b for _, b in self.by_tensor)
        if attributed < self.bytes:
            self.by_tensor.append(((), self.bytes - attributed))  # outside every argument: kept as is
        self._loads = self._stores = self._atomic_addrs = None  # free the bitmaps


def _elem_bytes(ptrs) -> int:
    return ptrs.get_element_ty().primitive_bitwidth // 8


def _live(ptrs, mask) -> np.ndarray:
    addresses = np.asarray(ptrs.data, dtype=np.uint64)
    if mask is None:
        return addresses.ravel()
    return addresses[np.broadcast_to(np.asarray(mask.data, dtype=bool), addresses.shape)]


class TrafficCounter:
    """Context manager: every interpreted launch (and torch op) inside it becomes a Launch."""

    def __init__(self) -> None:
        self.launches: list[Launch] = []
        self._current: Launch | None = None

    # interpreter builder hooks -------------------------------------------------------------
    def _load(self, real):
        def create_masked_load(ptrs, mask, other, cache_policy, is_volatile):
            if self._current is not None:
                live = _live(ptrs, mask)
                self._current.requested_bytes += live.size * _elem_bytes(ptrs)
                self._current._loads.add(live)
            return real(ptrs, mask, other, cache_policy, is_volatile)
        return create_masked_load

    def _store(self, real):
        def create_masked_store(ptrs, value, mask, cache_policy):
            if self._current is not None:
                live = _live(ptrs, mask)
                self._current.requested_bytes += live.size * _elem_bytes(ptrs)
                self._current._stores.add(live)
            return real(ptrs, value, mask, cache_policy)
        return create_masked_store

    def _atomic(self, live: np.ndarray, elem: int) -> None:
        if self._current is not None:
            self._current.atomics += int(live.size)
            self._current.requested_bytes += live.size * elem
            self._current._stores.add(live)
            self._current._atomic_addrs.add(live)

    def _rmw(self, real):
        def create_atomic_rmw(op, ptr, val, mask, sem, scope):
            self._atomic(_live(ptr, mask), _elem_bytes(ptr))
            return real(op, ptr, val, mask, sem, scope)
        return create_atomic_rmw

    def _cas(self, real):
        def create_atomic_cas(ptr, cmp, val, sem, scope):
            self._atomic(_live(ptr, None), _elem_bytes(ptr))
            return real(ptr, cmp, val, sem, scope)
        return create_atomic_cas

    def _dot(self, real):
        def create_dot(a, b, d, input_precision, max_num_imprecise_acc):
            if self._current is not None:
                *batch, m, k = a.data.shape
                n = b.data.shape[-1]
                self._current.flops += 2 * m * n * k * math.prod(batch)
            return real(a, b, d, input_precision, max_num_imprecise_acc)
        return create_dot

    def _grid_call(self, real):
        counter = self

        def call(executor, *args, **kwargs):
            meta = {k: v for k, v in kwargs.items() if k.startswith("BLOCK") or k in ("GROUP_M", "num_warps")}
            launch = Launch(getattr(executor.fn, "__name__", str(executor.fn)), meta=meta,
                            _args=[(t.data_ptr(), t.numel() * t.element_size(), tuple(t.shape))
                                   for t in _tensors((args, kwargs)) if t.numel()])
            outer, counter._current = counter._current, launch
            try:
                return real(executor, *args, **kwargs)
            finally:
                from triton.runtime.interpreter import interpreter_builder

                launch.grid = tuple(interpreter_builder.grid_dim)
                launch.close()
                counter.launches.append(launch)
                counter._current = outer
        return call

    @contextlib.contextmanager
    def counting(self) -> Iterator[TrafficCounter]:
        from triton.runtime import interpreter

        builder = interpreter.interpreter_builder
        hooks = {"create_masked_load": self._load, "create_masked_store": self._store,
                 "create_atomic_rmw": self._rmw, "create_atomic_cas": self._cas, "create_dot": self._dot}
        saved = {name: getattr(builder, name) for name in hooks}
        real_call = interpreter.GridExecutor.__call__
        real_device_call = interpreter.InterpretedFunction.__call__

        seen: set[int] = set()

        def device_call(fn, *args, **kwargs):
            # A helper's first call patches the language modules its globals see (for good:
            # the interpreter never restores that scope); re-scanning them on every later call
            # is most of the interpreter's time on kernels with jit helpers in their loops.
            if self._current is None or id(fn) not in seen:
                seen.add(id(fn))
                return real_device_call(fn, *args, **kwargs)
            return fn.rewrite()(*args, **kwargs)
        try:
            for name, wrap in hooks.items():
                setattr(builder, name, wrap(saved[name]))
            interpreter.GridExecutor.__call__ = self._grid_call(real_call)
            interpreter.InterpretedFunction.__call__ = device_call
            with _TorchOps(self):
                yield self
        finally:
            for name in hooks:
                setattr(builder, name, saved[name])  # instance attributes shadow the class's
            interpreter.GridExecutor.__call__ = real_call
            interpreter.InterpretedFunction.__call__ = real_device_call


# Operations that only describe or re-view memory (no traffic), or that the interpreter itself
# runs to copy arguments (kernels launch on CPU tensors here, nothing to copy on a GPU).
_FREE_OPS = {"view", "_unsafe_view", "reshape", "expand", "t", "transpose", "permute", "select", "slice",
             "as_strided", "unsqueeze", "squeeze", "alias", "detach", "empty", "empty_strided",
             "new_empty", "new_empty_strided", "empty_like", "lift_fresh", "_to_copy_meta", "set_",
             "is_same_size", "sym_size", "sym_stride", "sym_numel", "split", "unbind",
             "_has_compatible_shallow_copy_type",
             "clone_meta", "result_type", "_local_scalar_dense", "item"}
# Free only when they return their input; a real conversion or copy (seen as ``to`` itself
# inside a custom op's implementation, where its ``_to_copy`` is not re-dispatched) moves bytes.
_FREE_IF_SAME = {"to", "contiguous"}


class _TorchOps(TorchDispatchMode):
    """Counts torch ops run between launches: tensor inputs read once, outputs written once.

    Custom ops (``omni_core::*``) are re-dispatched to their implementation with this mode
    still active, so the torch work inside the launchers is seen too; work inside a kernel
    launch (the interpreter's own argument handling) is not counted.
    """

    def __init__(self, counter: TrafficCounter) -> None:
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace not in ("aten", "prims"):
            with self:
                return func.redispatch(torch._C.DispatchKeySet(torch._C.DispatchKey.CPU), *args, **kwargs)
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        if self.counter._current is not None or name in _FREE_OPS or (name in _FREE_IF_SAME and out is args[0]):
            return out
        inputs = _tensors((args, kwargs))
        moved = [(tuple(t.shape), t.numel() * t.element_size())
                 for t in inputs + [o for o in _tensors(out) if not any(o is i for i in inputs)]]
        nbytes = sum(b for _, b in moved)
        if nbytes:
            self.counter.launches.append(Launch(f"torch.{name}", requested_bytes=nbytes, bytes=nbytes,
                                                by_tensor=moved))
        return out


def _tensors(tree) -> list[torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, dict):
        return [t for v in tree.values() for t in _tensors(v)]
    if isinstance(tree, (list, tuple)):
        return [t for v in tree for t in _tensors(v)]
    return []


# ------------------------------------------------------------------------------------------
# Roofline
# ------------------------------------------------------------------------------------------


def launch_ms(launch: Launch, gpu: str, dtype: str) -> tuple[float, str]:
    """Modelled time of one launch on ``gpu`` and what bounds it."""
    hw = HARDWARE[gpu]
    terms = {
        "compute": launch.flops / (hw["tensor_tflops"][dtype] * 1e12) * 1e3,
        "bandwidth": launch.bytes / (hw["hbm_gbps"] * 1e9) * 1e3,
        "atomics": launch.max_same_address_atomics * ATOMIC_CHAIN_NS * 1e-6,
    }
    bound = max(terms, key=terms.get)
    return terms[bound], bound


def summarise(kernel: str, case: str, launches: list[Launch], ideal_bytes: int, dtype: str,
              note: str = "", useful_flops: int | None = None) -> dict[str, Any]:
    """One report row: totals over the launches, the roofline on H100 and A100.

    ``*_tensor_peak_fraction`` is ``useful_flops`` (the op's own FLOPs, padding excluded;
    the counted FLOPs when not given) at tensor peak over the modelled time."""
    row: dict[str, Any] = {
        "kernel": kernel, "case": case, "dtype": dtype,
        "launches": len([x for x in launches if not x.name.startswith("torch.")]),
        "bytes": sum(x.bytes for x in launches), "ideal_bytes": ideal_bytes,
        "requested_bytes": sum(x.requested_bytes for x in launches),
        "torch_bytes": sum(x.bytes for x in launches if x.name.startswith("torch.")),
        "flops": sum(x.flops for x in launches),
        "atomics": sum(x.atomics for x in launches),
        "max_same_address_atomics": max((x.max_same_address_atomics for x in launches), default=0),
    }
    row["bytes_over_ideal"] = round(row["bytes"] / ideal_bytes, 3) if ideal_bytes else None
    if useful_flops is not None:
        row["useful_flops"] = useful_flops
    for gpu in HARDWARE:
        times = [launch_ms(x, gpu, dtype) for x in launches]
        total = sum(t for t, _ in times)
        row[f"{gpu}_ms"] = total
        useful = row["flops"] if useful_flops is None else useful_flops
        compute = useful / (HARDWARE[gpu]["tensor_tflops"][dtype] * 1e12) * 1e3
        row[f"{gpu}_tensor_peak_fraction"] = round(compute / total, 3) if total else None
        if gpu == "h100":
            by_bound: dict[str, float] = {}
            for t, b in times:
                by_bound[b] = by_bound.get(b, 0.0) + t
            row["bound"] = max(by_bound, key=by_bound.get) if by_bound else "none"
    row["per_launch"] = [
        {"name": x.name, "grid": list(x.grid), **x.meta, "bytes": x.bytes, "requested_bytes": x.requested_bytes,
         "flops": x.flops, "atomics": x.atomics, "max_same_address_atomics": x.max_same_address_atomics,
         "h100_ms": launch_ms(x, "h100", dtype)[0]}
        for x in launches
    ]
    if note:
        row["note"] = note
    row["_launches"] = launches
    return row


def scale_launch(launch: Launch, dims: dict[int, int], flop_ratio: float) -> Launch:
    """The launch carried to full shapes: each argument tensor's bytes times its numel ratio
    (every dim found in ``dims`` replaced by its full size), FLOPs times ``flop_ratio``;
    requested bytes scale like the DRAM bytes, atomics like FLOPs."""
    def ratio(shape: tuple[int, ...]) -> float:
        return math.prod(dims.get(d, d) for d in shape) / math.prod(shape) if shape else 1.0

    by_tensor = [(tuple(dims.get(d, d) for d in shape), round(b * ratio(shape))) for shape, b in launch.by_tensor]
    moved = sum(b for _, b in by_tensor)
    return Launch(launch.name, grid=(), meta=launch.meta, flops=round(launch.flops * flop_ratio),
                  requested_bytes=round(launch.requested_bytes * moved / max(launch.bytes, 1)),
                  atomics=round(launch.atomics * flop_ratio), bytes=moved, by_tensor=by_tensor)


def count(fn: Callable[[], Any]) -> tuple[list[Launch], Any]:
    """Run ``fn`` under the counters; returns its launches and its result."""
    counter = TrafficCounter()
    with counter.counting():
        result = fn()
    return counter.launches, result


# ------------------------------------------------------------------------------------------
# Representative packs (ONE-PEACE-4B steps, scaled down)
# ------------------------------------------------------------------------------------------

TEXT, IMAGE, AUDIO = 0, 1, 2
NUM_MODALITIES = 3
# ONE-PEACE 4B: width 1536, 24 heads of 64, GeGLU FFN 6144 with sub-LN. The interpreter runs the
# FFN and LayerNorm at 1/6 of those widths (every tile config still divides them).
DIM, HEADS, HEAD_DIM, FFN = 256, 24, 64, 1024
FULL_TOKENS = 16384  # tokens of one packed step in the "4B shapes" target
SCALED_HEADS = 2  # attention runs 2 of the 24 heads (heads are independent programs)


def _views(paired: int, other_len: int, text_len: int, masked_other: int) -> list[list[tuple[int, int]]]:
    """A pair's five student views as segments (modality, tokens): text, the other modality,
    joint, masked other, masked joint (ONE-PEACE's views; the teacher's are the unmasked three)."""
    return [[(TEXT, text_len)], [(paired, other_len)], [(paired, other_len), (TEXT, text_len)],
            [(paired, masked_other)], [(paired, masked_other), (TEXT, text_len)]]


def pack_sequences(pack: str, pairs: int, seed: int = 0) -> list[list[tuple[int, int]]]:
    """Sequences of a step of ``pairs`` pairs. stage1: captions of 8-70 BPE tokens (+CLS),
    256 px images (256 patches + CLS), a quarter of the patches kept in masked views; stage2:
    captions as above, 1-15 s clips at 50 frames/s (+CLS), half the frames kept when masked."""
    g = torch.Generator().manual_seed(seed)
    seqs = []
    for _ in range(pairs):
        text = int(torch.randint(8, 71, (1,), generator=g)) + 1
        if pack == "stage1":
            seqs += _views(IMAGE, 257, text, 65)
        else:
            frames = int(torch.randint(50, 751, (1,), generator=g)) + 1
            seqs += _views(AUDIO, frames, text, frames // 2 + 1)
    return seqs


# Scaled packs: whole ONE-PEACE sequences (real lengths, so tiles see real segment structure),
# fewer of them. The FFN and LayerNorm run at the real widths (D 1536, F 6144).
PACKS = {"stage1": 2, "stage2": 1}


def _tokens(seqs: list[list[tuple[int, int]]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(cu_seqlens int32, modality int64, position int32) of packed sequences."""
    lengths, modality, position = [], [], []
    for seq in seqs:
        lengths.append(sum(n for _, n in seq))
        for m, n in seq:
            modality += [m] * n
            position += list(range(n))
    cu = torch.tensor([0, *np.cumsum(lengths).tolist()], dtype=torch.int32)
    return cu, torch.tensor(modality), torch.tensor(position, dtype=torch.int32)


def _bias_lut(max_pos: int) -> tuple[torch.Tensor, int]:
    """A ``[M, P, P]`` LUT of log-bucketed 1-D relative positions per modality (exact to
    +-8, log-spaced to +-P), each modality with its own rows of the table; returns (lut, NB)."""
    pos = torch.arange(max_pos)
    rel = pos[None, :] - pos[:, None]
    mag = rel.abs().float()
    log_b = 8 + (torch.log(mag.clamp(min=8) / 8) / math.log(max(max_pos, 16) / 8) * 8).long().clamp(max=15)
    bucket = torch.where(mag < 8, rel.abs(), log_b) * rel.sign() + 15
    per = 31
    lut = torch.stack([bucket + m * per for m in range(NUM_MODALITIES)]).to(torch.int32)
    return lut.contiguous(), per * NUM_MODALITIES


def _nbytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _phases(kernel: str, case: str, forward: Callable[[], torch.Tensor], inputs: list[torch.Tensor],
            dtype: str, note: str, useful_fwd_flops: int | None = None) -> list[dict[str, Any]]:
    """Count the forward, then the whole backward (every launch of ``autograd.grad``)."""
    leaves = [t for t in inputs if t.requires_grad]
    fwd, out = count(forward)
    dy = torch.randn_like(out)
    bwd, grads = count(lambda: torch.autograd.grad(out, leaves, dy))
    ideal_fwd = _nbytes(*inputs, out)
    ideal_bwd = _nbytes(dy, *inputs, *grads)
    useful_bwd = 2 * useful_fwd_flops if useful_fwd_flops is not None else None
    return [summarise(f"{kernel}_fwd", case, fwd, ideal_fwd, dtype, note, useful_fwd_flops),
            summarise(f"{kernel}_bwd", case, bwd, ideal_bwd, dtype, note, useful_bwd)]


BIAS_ARGS = ("bias_table", "bias_lut", "modality", "position")


def attention_cases(pack: str, dtype: torch.dtype = torch.bfloat16,
                    variants: tuple[str | None, ...] = ("compact", "dense", None),
                    fused: bool = False) -> list[dict[str, Any]]:
    """Cases ``<pack>-bias`` (a 1-D relative LUT in its compact ``[M, 2P-1]`` form),
    ``<pack>-bias-dense`` (the same LUT as ``[M, P, P]``) and ``<pack>-nobias``; with the
    variants "model" / "model-dense", ``<pack>-bias-model`` (ONE-PEACE-4B's real tables: 1-D
    log buckets with CLS entries for text and audio, BEiT's 2-D image table, in the CLS-aware
    compact ``[M, 2P+2]`` form at respaced image positions, as the model passes them) and
    ``<pack>-bias-model-dense`` (the same tables as the model's dense ``[M, P, P]`` LUT).
    Forward and whole backward each, the backward on the path the kernel's dispatch rule picks
    for the pack (``op.fused_backward``), or with ``fused`` on the fused kernel whatever the
    lengths (case names end in ``-fused``)."""
    from omni_core.kernels.varlen_attention import op as attention_op

    from omni_core.model.relpos import relative_lut
    from omni_core.ops import varlen_attention
    from omni_core.ops.attention import validate_varlen_attention

    seqs = pack_sequences(pack, PACKS[pack])
    cu, modality, position = _tokens(seqs)
    T = int(cu[-1])
    max_len = max(sum(n for _, n in s) for s in seqs)
    rows = []
    for bias in variants:
        g = torch.Generator().manual_seed(1)
        q, k, v = (torch.randn(T, SCALED_HEADS, HEAD_DIM, generator=g).to(dtype).requires_grad_() for _ in range(3))
        extra: dict[str, torch.Tensor] = {}
        if bias in ("compact", "dense"):
            lut, nb = _bias_lut(int(position.max()) + 1)
            extra = {"bias_lut": relative_lut(lut) if bias == "compact" else lut, "position": position}
        elif bias:
            lut, nb, pos = _model_lut(bias == "model", modality, position)
            extra = {"bias_lut": lut, "position": pos}
        if bias:
            extra = {"bias_table": (0.1 * torch.randn(nb, SCALED_HEADS, generator=g)).to(dtype).requires_grad_(),
                     "bias_lut": extra["bias_lut"], "modality": modality, "position": extra["position"]}
        inputs = [q, k, v, cu, *extra.values()]
        note = f"{T} tokens, {len(seqs)} sequences, {SCALED_HEADS} of {HEADS} heads, head dim {HEAD_DIM}"
        case = {"compact": "bias", "dense": "bias-dense", None: "nobias"}.get(bias, f"bias-{bias}")
        case += "-fused" if fused else ""
        # The value checks (cu_seqlens, LUT range: full reads of the LUT) run once per batch and
        # are memoised for every later layer: run them first, so the rows count one layer's call.
        validate_varlen_attention(q, k, v, cu, max_len, *(extra.get(n) for n in BIAS_ARGS))
        threshold = attention_op.FUSED_MIN_SEQLEN_K
        attention_op.FUSED_MIN_SEQLEN_K = 0 if fused else threshold
        try:
            rows += _phases("varlen_attention", f"{pack}-{case}",
                            lambda q=q, k=k, v=v, extra=extra: varlen_attention(q, k, v, cu, max_len, **extra),
                            inputs, "bf16", note)
        finally:
            attention_op.FUSED_MIN_SEQLEN_K = threshold
    return rows


def attention_path_sweep(lengths: tuple[int, ...] = (256, 512, 1024, 2048), tokens: int = 2048
                         ) -> list[dict[str, Any]]:
    """The attention backward on both paths (fused forced, two-kernel) for packs of ``tokens``
    tokens in sequences of one length L, no bias, bf16, head dim 64, 2 heads: the data behind
    the dispatch rule's FUSED_MIN_SEQLEN_K (``kernels/varlen_attention/op.py``). Rows
    ``sweep-L<L>-fused`` / ``-two_kernel``; the fused rows carry ``over_two_kernel`` (H100 and
    A100 modelled time ratios)."""
    from omni_core.kernels.varlen_attention import op as attention_op

    rows = []
    for L in lengths:
        n = max(1, tokens // L)
        cu = torch.arange(0, (n + 1) * L, L, dtype=torch.int32)
        g = torch.Generator().manual_seed(0)
        q, k, v, dout = (torch.randn(n * L, SCALED_HEADS, HEAD_DIM, generator=g).bfloat16() for _ in range(4))
        ideal = _nbytes(q, k, v, dout, q, k, v, q) + 2 * n * L * SCALED_HEADS * 4  # + out; grads; lse, delta
        pair = {}
        for path in ("fused", "two_kernel"):
            qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
            threshold = attention_op.FUSED_MIN_SEQLEN_K
            attention_op.FUSED_MIN_SEQLEN_K = 0 if path == "fused" else threshold
            try:
                out = attention_op.varlen_attention_triton(qq, kk, vv, cu, L, None, None, None, None, None,
                                                           deterministic=path == "two_kernel")
                launches, _ = count(lambda out=out, dout=dout: out.backward(dout))
            finally:
                attention_op.FUSED_MIN_SEQLEN_K = threshold
            pair[path] = summarise("varlen_attention_bwd", f"sweep-L{L}-{path}", launches, ideal, "bf16",
                                   f"{n} sequences of {L}, {SCALED_HEADS} heads, head dim {HEAD_DIM}")
        pair["fused"]["over_two_kernel"] = {gpu: pair["fused"][f"{gpu}_ms"] / pair["two_kernel"][f"{gpu}_ms"]
                                            for gpu in ("h100", "a100")}
        rows += [pair["fused"], pair["two_kernel"]]
    return rows


def _model_lut(compact: bool, modality: torch.Tensor,
               position: torch.Tensor) -> tuple[torch.Tensor, int, torch.Tensor]:
    """ONE-PEACE-4B's LUT as ``OmniModel.encode`` passes it: (lut, table rows, positions);
    compact, the image positions respaced to the 16-wide patch grid."""
    from omni_core.model.omni import PRESETS, bias_lut, bias_lut_compact
    from omni_core.model.relpos import grid_positions

    cfg = PRESETS["one-peace-4b"]
    dense = bias_lut(cfg)
    rows = int(dense.max()) + 1
    if not compact:
        return dense, rows, position
    spaced = grid_positions(position, cfg.image_size // 16)
    return bias_lut_compact(cfg), rows, torch.where(modality == IMAGE, spaced, position)


def _ffn_params(T: int, modality: torch.Tensor, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(2)

    def rnd(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * scale).to(dtype).requires_grad_()

    return {"x": rnd(T, DIM), "w_in": rnd(NUM_MODALITIES, DIM, FFN, scale=DIM**-0.5),
            "w_out": rnd(NUM_MODALITIES, FFN, DIM, scale=FFN**-0.5),
            "w_gate": rnd(NUM_MODALITIES, DIM, FFN, scale=DIM**-0.5),
            "ln_weight": rnd(NUM_MODALITIES, FFN, scale=0.1), "ln_bias": rnd(NUM_MODALITIES, FFN, scale=0.1)}


def ffn_cases(pack: str, pairs: int | None = None, dtype: torch.dtype = torch.bfloat16) -> list[dict[str, Any]]:
    """ONE-PEACE's FFN (GeGLU + sub-LN, no biases) over the pack's tokens, real widths."""
    from omni_core.ops import routed_ffn

    _, modality, _ = _tokens(pack_sequences(pack, pairs or PACKS[pack]))
    T = modality.numel()
    p = _ffn_params(T, modality, dtype)
    note = f"{T} tokens, D {DIM}, F {FFN}, GeGLU + sub-LN"

    def forward() -> torch.Tensor:
        return routed_ffn(p["x"], modality, p["w_in"], p["w_out"], w_gate=p["w_gate"],
                          ln_weight=p["ln_weight"], ln_bias=p["ln_bias"])

    return _phases("routed_ffn", pack, forward, [*p.values(), modality], "bf16", note, 6 * T * DIM * FFN)


def layer_norm_cases(pack: str, pairs: int | None = None, dtype: torch.dtype = torch.bfloat16) -> list[dict[str, Any]]:
    """The block's pre-LN over the pack's tokens at width 1536."""
    from omni_core.ops import layer_norm

    T = int(_tokens(pack_sequences(pack, pairs or PACKS[pack]))[0][-1])
    g = torch.Generator().manual_seed(3)
    x, w, b = (torch.randn(*shape, generator=g).to(dtype).requires_grad_() for shape in ((T, DIM), (DIM,), (DIM,)))
    return _phases("layer_norm", pack, lambda: layer_norm(x, w, b), [x, w, b], "bf16", f"{T} tokens, D {DIM}")


# ------------------------------------------------------------------------------------------
# The report
# ------------------------------------------------------------------------------------------


def carry_ffn(row: dict[str, Any], tokens: int, shape: tuple[int, int, int], case: str) -> dict[str, Any]:
    """An FFN row counted at the scaled pack carried to ``shape = (T, D, F)``: every argument
    tensor's bytes times its numel ratio (scale_launch), FLOPs times the TDF ratio (so the
    scaled pack's share of padding rows in partial tiles comes along: pessimistic at large T)."""
    T, D, F = shape
    dims = {tokens: T, DIM: D, FFN: F}
    launches = [scale_launch(x, dims, T * D * F / (tokens * DIM * FFN)) for x in row["_launches"]]
    weights = (3 * D * F + 2 * F) * NUM_MODALITIES * 2  # w_in, w_gate, w_out, LN weight and bias (bf16)
    acts = T * (2 * D * 2 + 8)  # x and y (or dy and dx) in bf16, int64 modality ids
    fwd = row["kernel"].endswith("fwd")
    ideal = weights + acts if fwd else 2 * weights + acts + T * D * 2
    useful = (6 if fwd else 12) * T * D * F
    note = (f"carried from the {row['case']} count ({tokens} tokens, D {DIM}, F {FFN}) tensor by tensor "
            f"to {T} tokens, D {D}, F {F}")
    return summarise(row["kernel"], case, launches, ideal, "bf16", note, useful_flops=useful)


def _ffn_rows(pack: str, shapes: dict[str, tuple[int, int, int]] | None = None) -> list[dict[str, Any]]:
    """The pack's FFN rows; for stage1 also the 4B shape (16k tokens) and any ``shapes``."""
    rows = ffn_cases(pack)
    if pack != "stage1":
        return rows
    T = _tokens(pack_sequences(pack, PACKS[pack]))[1].numel()
    shapes = {"4b-16k": (FULL_TOKENS, 1536, 6144), **(shapes or {})}
    return rows + [carry_ffn(row, T, shape, case) for case, shape in shapes.items() for row in rows]


CASES: dict[str, Callable[[], list[dict[str, Any]]]] = {
    "varlen_attention/stage1": lambda: attention_cases("stage1"),
    "varlen_attention/stage2": lambda: attention_cases("stage2"),
    "varlen_attention/stage1-model": lambda: attention_cases("stage1", variants=("model", "model-dense")),
    "varlen_attention/stage2-model": lambda: attention_cases("stage2", variants=("model", "model-dense")),
    "varlen_attention/stage1-fused": lambda: attention_cases("stage1", variants=("model", None), fused=True),
    "varlen_attention/stage2-fused": lambda: attention_cases("stage2", variants=("model", None), fused=True),
    "routed_ffn/stage1": lambda: _ffn_rows("stage1"),
    "routed_ffn/stage2": lambda: _ffn_rows("stage2"),
    "layer_norm/stage1": lambda: layer_norm_cases("stage1"),
    "layer_norm/stage2": lambda: layer_norm_cases("stage2"),
}

_TABLE = (("kernel", 22), ("case", 14), ("launch", 6), ("MB", 9), ("ideal MB", 9), ("x ideal", 7),
          ("GFLOP", 8), ("atomics", 9), ("max/addr", 8), ("H100 ms", 9), ("A100 ms", 9), ("bound", 9),
          ("H100 %TC", 8))


def format_row(r: dict[str, Any] | None) -> str:
    if r is None:
        cells = [name for name, _ in _TABLE]
    else:
        frac = r["h100_tensor_peak_fraction"]
        cells = [r["kernel"], r["case"], str(r["launches"]), f"{r['bytes'] / 1e6:.2f}", f"{r['ideal_bytes'] / 1e6:.2f}",
                 f"{r['bytes_over_ideal']:.2f}", f"{r['flops'] / 1e9:.2f}", str(r["atomics"]),
                 str(r["max_same_address_atomics"]), f"{r['h100_ms']:.4f}", f"{r['a100_ms']:.4f}", r["bound"],
                 f"{100 * frac:.0f}%" if frac is not None else "-"]
    return "  ".join(c.ljust(w) for c, (_, w) in zip(cells, _TABLE)).rstrip()


HEADER = ("TRAFFIC MODEL - a model, not a measurement: counts from the Triton interpreter on CPU, "
          "roofline from published H100 SXM / A100 SXM peaks (bf16 dense tensor 989.4 / 312 TFLOP/s, "
          f"HBM 3.35 / 2.039 TB/s), atomic chains at an assumed {ATOMIC_CHAIN_NS} ns a link.\n"
          f"Scaled packs: whole ONE-PEACE sequences ({PACKS['stage1']} stage-1 image-text pairs, "
          f"{PACKS['stage2']} stage-2 audio-text pair, five views each); attention {SCALED_HEADS} of {HEADS} heads "
          f"(head dim {HEAD_DIM}); FFN and LayerNorm at D {DIM}, F {FFN} (1/6 of 4B's 1536 / 6144). "
          "Case 4b-16k: the stage-1 count carried tensor by tensor to D 1536, F 6144, 16384 tokens.")


def run(kernel_filter: str | None = None, case_filter: str | None = None,
        ffn_shapes: dict[str, tuple[int, int, int]] | None = None) -> Iterator[dict[str, Any]]:
    """Every case's rows (or, with ``ffn_shapes``, only the FFN carried to those shapes)."""
    from omni_core.kernels import layer_norm as ln_kernels

    backend = os.environ.get("OMNI_BACKEND")
    os.environ["OMNI_BACKEND"] = "triton"
    ln_kernels.INTERPRET_AS_COMPILED = True
    cases = {"routed_ffn/shapes": lambda: _ffn_rows("stage1", ffn_shapes)} if ffn_shapes else CASES
    try:
        for name, make in cases.items():
            if kernel_filter and kernel_filter not in name.split("/")[0]:
                continue
            if case_filter and case_filter not in name.split("/")[1]:
                continue
            for row in make():
                row.pop("_launches", None)
                if (not case_filter or case_filter in row["case"]) and (not ffn_shapes or row["case"] in ffn_shapes):
                    yield row
    finally:  # callers in the same process (the tests) get their backend back
        ln_kernels.INTERPRET_AS_COMPILED = False
        if backend is None:
            os.environ.pop("OMNI_BACKEND", None)
        else:
            os.environ["OMNI_BACKEND"] = backend


def _shape(text: str) -> tuple[int, int, int]:
    T, D, F = (int(v) for v in text.lower().split("x"))
    return T, D, F


def main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="omni bench kernels --traffic", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="one JSON object per (kernel, case)")
    parser.add_argument("--kernel", default=None, help="only kernels whose name contains SUBSTR")
    parser.add_argument("--case", default=None, help="only cases whose name contains SUBSTR")
    parser.add_argument("--ffn-shape", action="append", type=_shape, metavar="TxDxF",
                        help="only the routed FFN, carried to T tokens, width D, hidden F (repeatable)")
    parser.add_argument("--attention-sweep", action="store_true",
                        help="only the attention backward on both paths for sequence lengths 256..2048")
    args = parser.parse_args(argv)
    if args.attention_sweep:
        os.environ["OMNI_BACKEND"] = "triton"
        rows = attention_path_sweep()
        for r in rows:
            r.pop("_launches", None)
        print(json.dumps(rows, indent=1) if args.json else "\n".join(
            [HEADER, format_row(None), *map(format_row, rows)]
            + [f"{r['case']}: fused / two-kernel modelled time H100 {r['over_two_kernel']['h100']:.3f}, "
               f"A100 {r['over_two_kernel']['a100']:.3f}" for r in rows if "over_two_kernel" in r]))
        return 0
    shapes = {f"T{T}-D{D}-F{F}": (T, D, F) for T, D, F in args.ffn_shape or []}
    start = time.time()
    if args.json:
        print(json.dumps(list(run(args.kernel, args.case, shapes)), indent=1))
        return 0
    print(HEADER)
    print(format_row(None), flush=True)
    for row in run(args.kernel, args.case, shapes):
        print(format_row(row), flush=True)
    print(f"({time.time() - start:.0f} s of interpreter time)")
    return 0


if __name__ == "__main__":
    import sys

    raise SystemExit(main(sys.argv[1:]))
