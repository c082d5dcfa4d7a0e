"""Host-side chunk planner: NumPy turns HOST ``cu_seqlens`` into chunk metadata.

A prefill never reads anything back from the GPU: everything a kernel needs to find its
sequence and chunk is computed here, once, from the host copy of ``cu_seqlens`` (DESIGN.md §2),
then copied to the device asynchronously (``Plan.to_torch`` / ``Plan.to_jax``).

Definitions (``BT`` = chunk size, ``lens[n] = cu[n+1] - cu[n]``, ``nc[n] = ceil(lens[n] / BT)``):

- ``chunk_offsets`` [N_pad + 1]: ``[0, cumsum(nc)]``; padded sequences repeat ``NT``.
- ``chunk_indices`` [NT_pad, 2]: row ``chunk_offsets[n] + c`` holds ``(n, c)``, with the TRUE
  sequence id n (an empty sequence keeps its id and owns no rows). Rows ``>= NT`` hold
  ``(SENTINEL, SENTINEL)``: kernels skip them.
- ``cu_seqlens`` [N_pad + 1]: the caller's offsets, padded sequences empty (repeat ``cu[N]``).

Static shapes for ``jax.jit``: ``N``, ``NT`` and ``T`` are padded to buckets by ONE pure function,
:func:`bucket`, so batches of nearby sizes share a compilation.
"""
from __future__ import annotations

import dataclasses
import sys
import threading
from typing import Any, Callable

import numpy as np

__all__ = ["Plan", "plan", "bucket", "padded_sizes", "SENTINEL", "host_int_array", "Split", "dominant_seq",
           "split_policy", "split_pieces", "two_pass_policy", "two_pass_cost", "makespan",
           "seq_bucket_range"]

#: chunk_indices value of padding rows (both columns). Kernels test ``seq_id < 0`` and exit.
SENTINEL = -1

#: Mantissa bits kept by :func:`bucket`: sizes are m * 2**e with 8 <= m < 16, so the padding
#: waste is below 2**-3 = 1/8 of the real size (above the floor).
_BUCKET_BITS = 3
_FLOOR_TOKENS = 64
_FLOOR_SEQS = 8
_FLOOR_CHUNKS = 8
#: Batches of at most two sequences get buckets of their own below the floor, one for 0..1 and
#: one for 2: one or two long prompts leave a per-(sequence, v head) grid a fraction of the GPU,
#: where three to eight fill it, and a kernel traced with a device plan must pick its grid for the
#: whole bucket. One prompt alone leaves more than half the SMs idle at HV = 32, which the
#: mosaic_gpu co-resident kernel fills; two do not.
_FEW_SEQS = 2

#: :attr:`Plan.dominant`: in the bucket of two sequences, the index of one that holds at least this
#: many times the other's tokens (one long prompt beside a short one). Two such batches in one bucket
#: compile apart from two even ones, so a kernel traced with a device plan may order its work for
#: the long one (mosaic_gpu's co-resident kernel, long prompt first: the model of
#: ``coresident.long_first`` pays from a ratio of ~2.2 at HV = 32 on 132 SMs).
DOMINANT_RATIO = 3


def bucket(n: int, floor: int = 1) -> int:
    """Smallest bucket size >= ``n``: ``max(floor, m * 2**e)`` with ``8 <= m < 16``.

    Monotone, idempotent (``bucket(bucket(n)) == bucket(n)``), never below ``n``, and the waste
    ``bucket(n) - n`` is below ``n / 8`` whenever ``n > floor``. Pure: the same sizes always map
    to the same bucket, which is what makes one compilation serve many batches.
    """
    n = int(n)
    if n < 0:
        raise ValueError(f"bucket: size must be >= 0, got {n}")
    if n <= floor:
        return int(floor)
    shift = max(0, n.bit_length() - (_BUCKET_BITS + 1))
    step = 1 << shift
    return -(-n // step) * step


def padded_sizes(num_tokens: int, num_seqs: int, num_chunks: int) -> tuple[int, int, int]:
    """(T, N, NT) -> (T_pad, N_pad, NT_pad). The one bucketing policy of gdn.

    T_pad is also a multiple of 64 (whole chunks), floors are 64 tokens, 8 chunks, and 1, 2 or 8
    sequences (0..1 pad to 1, 2 to 2, 3..8 to 8).
    """
    t_pad = bucket(num_tokens, _FLOOR_TOKENS)
    t_pad = -(-t_pad // 64) * 64
    return t_pad, _seq_bucket(num_seqs), bucket(num_chunks, _FLOOR_CHUNKS)


def _seq_bucket(n: int) -> int:
    """N_pad for ``n`` sequences: ``bucket(n, 8)``, except that 0..1 pad to 1 and 2 stays 2."""
    return max(n, 1) if 0 <= n <= _FEW_SEQS else bucket(n, _FLOOR_SEQS)


def seq_bucket_range(n_pad: int) -> tuple[int, int] | None:
    """The sequence counts ``N`` that :func:`padded_sizes` pads to ``n_pad`` sequence rows, as
    ``(lo, n_pad)`` (inclusive; the floor buckets are 0..1, 2 and 3..8), or None if no count does (a
    plan padded by hand). What a kernel traced with a device plan may assume about ``N``."""
    n_pad = int(n_pad)
    if n_pad < 0 or _seq_bucket(n_pad) != n_pad:
        return None
    lo, hi = 0, n_pad  # the smallest n with _seq_bucket(n) == n_pad (it is monotone)
    while lo < hi:
        mid = (lo + hi) // 2
        if _seq_bucket(mid) < n_pad:
            lo = mid + 1
        else:
            hi = mid
    return lo, n_pad


def _is_device_array(x: Any) -> str | None:
    """Name of the device if ``x`` lives on an accelerator, else None (no data is read)."""
    mod = type(x).__module__
    if mod.startswith("torch"):
        dev = getattr(x, "device", None)
        if dev is not None and getattr(dev, "type", "cpu") != "cpu":
            return str(dev)
        return None
    if mod.startswith("jax") or mod.startswith("jaxlib"):
        try:
            devs = x.devices()
        except Exception:  # a tracer: no concrete device at all
            return "a traced jax value"
        plats = {d.platform for d in devs}
        if plats - {"cpu"}:
            return ",".join(sorted(str(d) for d in devs))
        return None
    if mod.startswith("cupy"):
        return "cupy device"
    return None


def host_int_array(x: Any, name: str) -> np.ndarray:
    """Validate a HOST integer sequence and return it as a read-only int64 NumPy vector."""
    dev = _is_device_array(x)
    if dev is not None:
        raise ValueError(
            f"{name} must be host integers (list, NumPy array or CPU tensor), got an array on "
            f"{dev}: reading it back would be the GPU-to-CPU sync gdn exists to remove. "
            f"Pass the host copy (e.g. vLLM's query_start_loc_cpu) or a prebuilt gdn.plan(...).")
    if type(x).__module__.startswith("torch"):
        x = x.detach().numpy()
    try:
        arr = np.asarray(x)
    except Exception as e:  # ragged lists and other odd objects
        raise TypeError(f"{name} must be a 1-D sequence of integers, got {type(x).__name__}") from e
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(arr.shape)}")
    if arr.dtype.kind not in "iu" and not (arr.size == 0 and arr.dtype.kind == "f"):
        raise TypeError(f"{name} must hold integers, got dtype {arr.dtype}")
    if arr.dtype.kind == "u" and arr.size and arr.max() > np.iinfo(np.int64).max:
        raise ValueError(f"{name} holds {int(arr.max())}, past any token count")
    return arr.astype(np.int64)


def _frozen(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a, dtype=np.int32)
    a.setflags(write=False)
    return a


@dataclasses.dataclass(frozen=True, eq=False)
class Plan:
    """Chunk metadata for one packed varlen batch. Immutable; reuse it across layers.

    Arrays (int32; NumPy on the host, or torch / jax after ``to_torch`` / ``to_jax``):
      cu_seqlens [N_pad + 1], chunk_indices [NT_pad, 2], chunk_offsets [N_pad + 1].
    Ints: num_seqs N, num_chunks NT, num_tokens T (= cu_seqlens[N]), the padded sizes
    padded_seqs N_pad, padded_chunks NT_pad, padded_tokens T_pad, chunk_size BT and nonempty_seqs.

    As a JAX pytree the three arrays are leaves and (chunk_size, padded sizes, ``dominant``) static
    aux data, so two batches in one bucket share a compilation (a bucket of two sequences holds
    three: even, the first dominant, the second dominant). The real counts are not part of the tree:
    after crossing a ``jax.jit`` boundary they are ``None`` (unknown while tracing).
    """

    cu_seqlens: Any
    chunk_indices: Any
    chunk_offsets: Any
    num_seqs: int | None
    num_chunks: int | None
    num_tokens: int | None
    padded_seqs: int
    padded_chunks: int
    padded_tokens: int
    chunk_size: int = 64
    #: sequences with at least one token (host count; None after a jit boundary like the others)
    nonempty_seqs: int | None = None
    #: static, part of the bucket: with two sequence rows, the index of the one holding at least
    #: ``DOMINANT_RATIO`` times the other's tokens, else None (:func:`dominant_seq`)
    dominant: int | None = None
    _cache: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)

    # -- conversions -------------------------------------------------------------------------
    @property
    def is_host(self) -> bool:
        return isinstance(self.cu_seqlens, np.ndarray)

    def _convert(self, key, fn) -> "Plan":
        return self.memo(key, lambda: dataclasses.replace(
            self, cu_seqlens=fn(self.cu_seqlens), chunk_indices=fn(self.chunk_indices),
            chunk_offsets=fn(self.chunk_offsets), _cache={}))

    def memo(self, key: tuple, fn: Callable[[], Any]) -> Any:
        """``fn()`` computed once per plan and ``key`` (a backend's host tables derived from this
        plan, say): a plan built once per step serves every layer of a model's forward."""
        with _LOCK:
            if key in self._cache:
                return self._cache[key]
        value = fn()  # outside the lock: fn may convert plans (which takes it)
        with _LOCK:
            return self._cache.setdefault(key, value)

    def to_torch(self, device: Any = "cuda") -> "Plan":
        """This plan with torch int32 arrays on ``device``: pinned host memory, non-blocking copy.

        Memoized per device, so a plan built once per step and used by every layer is copied once.
        """
        import torch

        if not self.is_host:
            raise ValueError("to_torch: convert from the host plan (gdn.plan(...)), not a device copy")
        device = torch.device(device)

        def conv(a):
            t = torch.from_numpy(np.array(a, dtype=np.int32))
            if device.type == "cpu":
                return t
            if torch.cuda.is_available():
                t = t.pin_memory()
            return t.to(device, non_blocking=True)

        return self._convert(("torch", str(device)), conv)

    def to_jax(self, device: Any = None) -> "Plan":
        """This plan with jax int32 arrays (on ``device``, default the default device)."""
        import jax

        _maybe_register()
        if not self.is_host:
            raise ValueError("to_jax: convert from the host plan (gdn.plan(...)), not a device copy")
        return self._convert(("jax", str(device)), lambda a: jax.device_put(np.asarray(a), device))

    def as_numpy(self) -> "Plan":
        return self

    # -- descriptions ------------------------------------------------------------------------
    @property
    def seq_lens(self) -> np.ndarray:
        """[N] host sequence lengths (host plans only)."""
        cu = np.asarray(self.cu_seqlens)
        return np.diff(cu[: self.num_seqs + 1])

    def summary(self) -> str:
        lens = self.seq_lens
        return (f"Plan: N={self.num_seqs} (pad {self.padded_seqs}), NT={self.num_chunks} chunks "
                f"(pad {self.padded_chunks}), T={self.num_tokens} tokens (pad {self.padded_tokens}), "
                f"BT={self.chunk_size}, lengths min/median/max = "
                f"{lens.min() if lens.size else 0}/{int(np.median(lens)) if lens.size else 0}/"
                f"{lens.max() if lens.size else 0}")

    def __repr__(self) -> str:
        kind = type(self.cu_seqlens).__module__.split(".")[0]
        return (f"Plan(N={self.num_seqs}, NT={self.num_chunks}, T={self.num_tokens}, "
                f"pad=({self.padded_seqs}, {self.padded_chunks}, {self.padded_tokens}), "
                f"BT={self.chunk_size}, arrays={kind})")


_LOCK = threading.Lock()


def plan(cu_seqlens: Any, chunk_size: int = 64, *, num_tokens: int | None = None) -> Plan:
    """Build the chunk plan of a packed varlen batch from HOST ``cu_seqlens``.

    Args:
      cu_seqlens: [N + 1] host integers (list, NumPy, CPU torch tensor), starting at 0,
        non-decreasing. A device array is rejected: reading it would sync.
      chunk_size: BT, a positive power of two (kernels use 64).
      num_tokens: token count of the arrays the caller already has (>= cu_seqlens[-1]); it
        becomes ``padded_tokens``. Default: the bucket of ``cu_seqlens[-1]``.

    Vectorized NumPy: no Python loop over sequences or chunks.
    """
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)):
        raise TypeError(f"chunk_size must be an int, got {type(chunk_size).__name__}")
    chunk_size = int(chunk_size)
    if chunk_size <= 0 or chunk_size & (chunk_size - 1):
        raise ValueError(f"chunk_size must be a positive power of two, got {chunk_size}")
    cu = host_int_array(cu_seqlens, "cu_seqlens")
    if cu.size < 1:
        raise ValueError("cu_seqlens must have at least one entry (N + 1 offsets), got none")
    if cu[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {int(cu[0])}")
    lens = np.diff(cu)
    if lens.size and lens.min() < 0:
        bad = int(np.argmax(lens < 0))
        raise ValueError(f"cu_seqlens must be non-decreasing; cu_seqlens[{bad + 1}] = "
                         f"{int(cu[bad + 1])} < cu_seqlens[{bad}] = {int(cu[bad])}")
    total = int(cu[-1])
    if total >= 2**31:
        raise ValueError(f"cu_seqlens[-1] = {total} does not fit int32 metadata")
    if num_tokens is not None:
        if isinstance(num_tokens, bool) or not isinstance(num_tokens, (int, np.integer)):
            raise TypeError(f"num_tokens must be an int, got {type(num_tokens).__name__}")
        num_tokens = int(num_tokens)
        if num_tokens < total:
            raise ValueError(f"num_tokens = {num_tokens} is smaller than cu_seqlens[-1] = {total}")

    n = lens.size
    nc = -(-lens // chunk_size)
    offsets = np.zeros(n + 1, np.int64)
    np.cumsum(nc, out=offsets[1:])
    nt = int(offsets[-1])

    t_pad, n_pad, nt_pad = padded_sizes(total, n, nt)
    if num_tokens is not None:
        t_pad = num_tokens

    # chunk rows: sequence id repeated nc times; chunk id = row - offsets[seq]. int32 from the
    # start: the arrays are built once, in their final dtype, with no per-sequence Python loop.
    ci = np.full((nt_pad, 2), SENTINEL, np.int32)
    seq_of_row = np.repeat(np.arange(n, dtype=np.int32), nc)
    ci[:nt, 0] = seq_of_row
    np.subtract(np.arange(nt, dtype=np.int32), offsets[seq_of_row], out=ci[:nt, 1], casting="unsafe")
    co = np.full(n_pad + 1, nt, np.int32)
    co[: n + 1] = offsets
    cu_pad = np.full(n_pad + 1, total, np.int32)
    cu_pad[: n + 1] = cu

    _maybe_register()
    return Plan(cu_seqlens=_frozen(cu_pad), chunk_indices=_frozen(ci), chunk_offsets=_frozen(co),
                num_seqs=n, num_chunks=nt, num_tokens=total, padded_seqs=n_pad,
                padded_chunks=nt_pad, padded_tokens=t_pad, chunk_size=chunk_size,
                nonempty_seqs=int(np.count_nonzero(lens)), dominant=dominant_seq(lens, n_pad))


def dominant_seq(seq_lens: Any, padded_seqs: int) -> int | None:
    """:attr:`Plan.dominant`: with two sequence rows (``padded_seqs == 2``), the index of the sequence
    whose length is at least ``DOMINANT_RATIO`` times the other's (the longer of the two), else None.
    An empty sequence beside a nonempty one makes that one dominant. Pure function of the host
    lengths; it orders work only (a kernel that trusts it gives the same results either way)."""
    lens = np.asarray(seq_lens, np.int64)
    if int(padded_seqs) != 2 or lens.size != 2:
        return None
    i = int(np.argmax(lens))
    return i if lens[i] > 0 and lens[i] >= DOMINANT_RATIO * lens[1 - i] else None


def _register_pytree() -> None:
    """Register Plan with JAX if JAX is importable (called lazily by the JAX backend)."""
    import jax

    def flatten(p: Plan):
        return ((p.cu_seqlens, p.chunk_indices, p.chunk_offsets),
                (p.chunk_size, p.padded_seqs, p.padded_chunks, p.padded_tokens, p.dominant))

    def unflatten(aux, children):
        bt, n_pad, nt_pad, t_pad, dominant = aux
        cu, ci, co = children
        return Plan(cu_seqlens=cu, chunk_indices=ci, chunk_offsets=co, num_seqs=None,
                    num_chunks=None, num_tokens=None, padded_seqs=n_pad, padded_chunks=nt_pad,
                    padded_tokens=t_pad, chunk_size=bt, dominant=dominant)

    try:
        jax.tree_util.register_pytree_node(Plan, flatten, unflatten)
    except ValueError:  # already registered
        pass


def _maybe_register() -> None:
    """Register the pytree once jax has been imported by anyone (cheap when it has not)."""
    global _REGISTERED
    if not _REGISTERED and "jax" in sys.modules:
        _register_pytree()
        _REGISTERED = True


_REGISTERED = False


# -- exact sequence split (host policy) ---------------------------------------------------------
@dataclasses.dataclass(frozen=True, eq=False)
class Split:
    """Long sequences cut into pieces of whole chunks (host NumPy int32, read-only).

    Each piece lies inside one sequence; a sequence's pieces are consecutive and in order.
    ``piece_cu_seqlens`` [P + 1] are the pieces' token offsets in the packed arrays (a valid
    ``cu_seqlens``: plan it with :func:`plan`), ``piece_seq`` [P] the sequence of each piece and
    ``piece_index`` [P] its position inside that sequence (0 = first). Empty sequences own no
    piece. ``max_pieces`` is the largest piece count of one sequence.
    """

    piece_cu_seqlens: np.ndarray
    piece_seq: np.ndarray
    piece_index: np.ndarray
    piece_chunks: int
    max_pieces: int
    #: the sequences' ``cu_seqlens`` [N + 1] the pieces were cut from
    cu_seqlens: np.ndarray | None = None
    chunk_size: int = 64

    @property
    def num_pieces(self) -> int:
        return int(self.piece_seq.size)


def split_policy(seq_lens: Any, units_per_seq: int, *, num_sms: int = 132, chunk_size: int = 64,
                 min_piece_chunks: int = 8, augment: float = 2.0, min_gain: float = 1.25) -> int | None:
    """Chunks per piece for the exact sequence split, or None when splitting does not pay.

    A per-sequence chunk-loop kernel runs ``units_per_seq`` CTAs per sequence (v heads x V tiles)
    for as many steps as the sequence has chunks. Modelled time: waves x steps, with
    ``waves = ceil(CTAs / num_sms)``. A split piece runs ``augment`` times the units (its state map
    M rides along as K extra value columns: 2x at K = V) for at most ``piece_chunks`` steps. The
    candidates are ``min_piece_chunks * 2**i``; the best is returned if it beats the unsplit
    estimate by ``min_gain``. Pure function of its arguments (host ints only).
    """
    lens = np.asarray(seq_lens, dtype=np.int64)
    nc = -(-lens // chunk_size)
    nc = nc[nc > 0]
    if nc.size == 0 or units_per_seq <= 0:
        return None

    def waves(ctas: int) -> int:
        return -(-int(ctas) // num_sms)

    base = waves(nc.size * units_per_seq) * int(nc.max())
    best, best_t = None, float(base) / min_gain
    c = int(min_piece_chunks)
    while c < nc.max():
        pieces = int(np.sum(-(-nc // c)))
        t = waves(np.ceil(pieces * units_per_seq * augment)) * c + 1  # +1: the scan and correction
        if t < best_t:
            best, best_t = c, t
        c *= 2
    return best


def makespan(tiles: Any, slots: int) -> float:
    """Modelled duration, in tiles, of CTAs of ``tiles`` tiles each on ``slots`` resident CTAs:
    longest first, each to the slot that frees first (list scheduling). Equal lengths give waves
    x length; a long sequence among short ones is not charged a wave per short one. Beyond 16
    CTAs per slot (the loop would cost more host time than it is worth), the smaller of the
    average load plus the longest CTA and waves x the longest: upper bounds of the same order,
    still exact for equal lengths."""
    d = np.asarray(tiles, dtype=np.int64)
    d = np.sort(d[d > 0])[::-1]
    if d.size == 0:
        return 0.0
    if d.size <= slots:
        return float(d[0])
    if d.size > 16 * slots:
        return float(min(d.sum() / slots + d[0], -(-d.size // slots) * d[0]))
    # The same list schedule, a group of equal lengths at a time (a split's pieces are nearly all
    # one length; one CTA at a time through a heap cost ~2 ms of host time per eager prefill of
    # one long sequence, 2026-12-05). Slot i, at load a_i, takes its j-th CTA of length x when its
    # load a_i + j x is the smallest of all slots': the group's m CTAs go to the m smallest of the
    # values {a_i + j x}. Ties between slots change which slot, not the loads' multiset.
    load = np.zeros(slots, np.int64)
    lengths, counts = np.unique(d, return_counts=True)
    for x, m in zip(lengths[::-1].tolist(), counts[::-1].tolist()):
        spread = int(load.max() - load.min())
        depth = m // slots + spread // x + 2  # no slot takes more of this group
        picks = (load[:, None] + x * np.arange(depth, dtype=np.int64)[None, :]).ravel()
        chosen = np.argpartition(picks, m - 1)[:m] if m < picks.size else np.arange(picks.size)
        load += x * np.bincount(chosen // depth, minlength=slots)
    return float(load.max())


#: How much faster than unsplit a split must model to be picked (:func:`two_pass_policy`).
SPLIT_MIN_GAIN = 1.1


def two_pass_policy(seq_lens: Any, *, loop_us: Callable[[np.ndarray], float],
                    map_us: Callable[[np.ndarray, np.ndarray], float], scan_step_us: float,
                    chunk_size: int = 64, candidates: tuple[int, ...] = (8, 16, 32, 64, 128, 256),
                    min_gain: float = SPLIT_MIN_GAIN) -> int | None:
    """Chunks per piece for a two-pass exact split, or None when it does not pay.

    The caller's cost model (host numbers only): ``loop_us(chunks)`` the chunk loop over
    sequences of ``chunks`` chunks each (the unsplit call, or pass 2 over the pieces);
    ``map_us(first, later)`` pass 1, the maps of every piece but the last of its sequence (a
    first piece's E only, a later one's E and M), in chunks; ``scan_step_us`` per step of the
    scan (one step per piece after a sequence's first). A candidate wins if its modelled time
    beats the unsplit one by ``min_gain``. Pure function of its arguments.
    """
    lens = np.asarray(seq_lens, dtype=np.int64)
    nc = -(-lens // chunk_size)
    nc = nc[nc > 0]
    if nc.size == 0:
        return None
    best, best_t = None, float(loop_us(nc)) / min_gain
    for c in candidates:
        if c >= nc.max():
            break
        t = sum(two_pass_cost(nc, c, loop_us=loop_us, map_us=map_us, scan_step_us=scan_step_us))
        if t < best_t:
            best, best_t = c, t
    return best


def two_pass_cost(chunks: Any, piece_chunks: int, *, loop_us: Callable[[np.ndarray], float],
                  map_us: Callable[[np.ndarray, np.ndarray], float],
                  scan_step_us: float) -> tuple[float, float, float]:
    """(pass 1, scan, pass 2) modelled times of sequences of ``chunks`` chunks cut into pieces of
    ``piece_chunks`` (:func:`two_pass_policy`'s model and arguments)."""
    nc = np.asarray(chunks, dtype=np.int64)
    nc = nc[nc > 0]
    c = int(piece_chunks)
    pieces = -(-nc // c)
    last = nc - c * (pieces - 1)
    all_pieces = np.concatenate([np.full(int(np.sum(pieces - 1)), c, np.int64), last])
    first = np.full(int(np.sum(pieces > 1)), c, np.int64)
    later = np.full(int(np.sum(np.maximum(pieces - 2, 0))), c, np.int64)
    steps = int(pieces.max()) - 1 if pieces.size else 0
    return float(map_us(first, later)), steps * scan_step_us, float(loop_us(all_pieces))


def split_pieces(cu_seqlens: Any, piece_chunks: int, chunk_size: int = 64) -> Split:
    """Cut every sequence of ``cu_seqlens`` (host) into pieces of ``piece_chunks`` chunks."""
    cu = host_int_array(cu_seqlens, "cu_seqlens")
    if piece_chunks <= 0:
        raise ValueError(f"piece_chunks must be positive, got {piece_chunks}")
    lens = np.diff(cu)
    step = piece_chunks * chunk_size
    npieces = -(-lens // step)  # 0 for empty sequences
    p = int(npieces.sum())
    piece_seq = np.repeat(np.arange(lens.size, dtype=np.int64), npieces)
    first = np.zeros(lens.size + 1, np.int64)
    np.cumsum(npieces, out=first[1:])
    piece_index = np.arange(p, dtype=np.int64) - first[piece_seq]
    starts = cu[piece_seq] + piece_index * step
    pcu = np.empty(p + 1, np.int64)
    pcu[:p] = starts
    pcu[p] = cu[-1]
    # pieces tile [0, cu[-1]) without gaps: empty sequences hold no tokens, so each piece ends
    # where the next one starts
    return Split(_frozen(pcu), _frozen(piece_seq), _frozen(piece_index), int(piece_chunks),
                 int(npieces.max()) if npieces.size else 0, _frozen(cu), int(chunk_size))
