"""`BlockLayout`: which (query tile, key tile) pairs a block-sparse kernel visits, and how.

`build_layout(ir, bound, q_len, k_len, block_m, block_n, device)` runs the analysis of
`lowering.sparsity` (and `lowering.closed_form`) and caches the result per (pattern IR, parameter
values, sizes, tile shape, device, identity and `_version` of every tensor argument).
"""
from __future__ import annotations

import weakref
from collections import OrderedDict
from functools import cached_property

import torch

from ..lowering.closed_form import ClosedForm, derive
from ..lowering.ir import PatternIR, walk
from ..lowering.placement import place
from ..lowering.sparsity import EMPTY, FULL, PARTIAL, analyze, constant_masks, index_deps, text

#: how many layouts the cache keeps (least recently used are dropped)
CACHE_SIZE = 64
_CHARS = {EMPTY: " ", PARTIAL: "░", FULL: "█"}
#: what the characters of `BlockLayout.text` mean
LEGEND = (f"'{_CHARS[FULL]}' full tile (every position allowed: no mask work), '{_CHARS[PARTIAL]}' partial "
          f"(the mask is evaluated per element), '{_CHARS[EMPTY]}' empty (skipped); '|' frames each row")


class BlockLayout:
    """Tile classes of a bound pattern: 0 = EMPTY, 1 = PARTIAL, 2 = FULL.

    `classes` is int8 `[Bd, Hd, n_q_tiles, n_k_tiles]`, Bd = batch (or 1 when the masks do not
    read `b`), Hd = heads (or 1). FULL means every in-range element of the tile is allowed.
    The kernel index tensors (int32, on `device`) are built on first use: `kv_partial_num/idx`,
    `kv_full_num/idx` per query tile (ascending key tiles, padded with 0), and the transposes
    `q_partial_num/idx`, `q_full_num/idx` per key tile, for the backward pass.
    `tiers` names how each mask was analysed ('closed_form' | 'symbolic' | 'data' | 'fallback');
    `notes` says, in words, where precision may have been lost; `exact` is True when no such
    loss was recorded. `closed_form` is a `ClosedForm` or None."""

    def __init__(self, classes: torch.Tensor, block_m: int, block_n: int, q_len: int, k_len: int,
                 masks, tiers, notes, closed_form: ClosedForm | None, device):
        self.classes = classes
        self.block_m, self.block_n, self.q_len, self.k_len = block_m, block_n, q_len, k_len
        self.n_q_tiles, self.n_k_tiles = classes.shape[2], classes.shape[3]
        self.masks = tuple(text(m) for m in masks)
        self.tiers, self.notes = list(tiers), list(notes)
        self.closed_form = closed_form
        self.device = device

    @property
    def exact(self) -> bool:
        return not self.notes

    def to_dense(self) -> torch.Tensor:
        return self.classes

    # kernel-facing index tensors -------------------------------------------------------------

    @staticmethod
    def _lists(sel: torch.Tensor):
        n = sel.shape[-1]
        ar = torch.arange(n, device=sel.device, dtype=torch.int32)
        keyed = torch.where(sel, ar, torch.full_like(ar, n))
        idx = torch.sort(keyed, dim=-1).values
        num = sel.sum(-1, dtype=torch.int32)
        return num.contiguous(), torch.where(idx == n, torch.zeros_like(idx), idx).contiguous()

    @cached_property
    def _kv(self):
        return self._lists(self.classes == PARTIAL), self._lists(self.classes == FULL)

    @cached_property
    def _q(self):
        t = self.classes.transpose(2, 3)
        return self._lists(t == PARTIAL), self._lists(t == FULL)

    kv_partial_num = property(lambda self: self._kv[0][0])
    kv_partial_idx = property(lambda self: self._kv[0][1])
    kv_full_num = property(lambda self: self._kv[1][0])
    kv_full_idx = property(lambda self: self._kv[1][1])
    q_partial_num = property(lambda self: self._q[0][0])
    q_partial_idx = property(lambda self: self._q[0][1])
    q_full_num = property(lambda self: self._q[1][0])
    q_full_idx = property(lambda self: self._q[1][1])

    # summaries ---------------------------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        c = torch.bincount(self.classes.reshape(-1).to(torch.int64), minlength=3).tolist()
        return {"empty": c[0], "partial": c[1], "full": c[2]}

    def density(self) -> float:
        """Fraction of tiles a kernel visits (PARTIAL or FULL)."""
        total = self.classes.numel()
        return 0.0 if total == 0 else float((self.classes != EMPTY).sum()) / total

    def text(self, max_width: int = 64) -> str:
        """A picture per batch/head slice: ' ' empty, '░' partial, '█' full. Large layouts are
        downsampled: a character stands for a block of tiles, ' ' / '█' only if all of them are."""
        Bd, Hd, nQ, nK = self.classes.shape
        step = max(1, -(-max(nQ, nK) // max_width))
        c = self.counts()
        lines = [f"BlockLayout {self.q_len}x{self.k_len}, tiles {self.block_m}x{self.block_n} "
                 f"({nQ}x{nK}), density {self.density():.3f}: {c['empty']} empty, {c['partial']} partial, "
                 f"{c['full']} full" + (f"; 1 char = {step}x{step} tiles" if step > 1 else "")]
        for m, tier in zip(self.masks, self.tiers):
            lines.append(f"  mask {m}: {tier}")
        for n in self.notes:
            lines.append(f"  note: {n}")
        cls = self.classes.cpu()
        for b in range(Bd):
            for h in range(Hd):
                if Bd > 1 or Hd > 1:
                    lines.append(f"[b={b if Bd > 1 else '*'}, h={h if Hd > 1 else '*'}]")
                s = cls[b, h]
                for i in range(0, nQ, step):
                    row = []
                    for j in range(0, nK, step):
                        blk = s[i:i + step, j:j + step]
                        lo, hi = int(blk.min()), int(blk.max())
                        row.append(_CHARS[lo] if lo == hi else _CHARS[PARTIAL])
                    lines.append("|" + "".join(row) + "|")
        return "\n".join(lines)

    __str__ = text

    def __repr__(self) -> str:
        c = self.counts()
        return (f"<BlockLayout {self.q_len}x{self.k_len} tiles {self.block_m}x{self.block_n} "
                f"classes {list(self.classes.shape)} empty={c['empty']} partial={c['partial']} "
                f"full={c['full']} closed_form={'yes' if self.closed_form else 'no'}>")

    def save_png(self, path) -> None:
        """Save the tile classes as an image (needs matplotlib)."""
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            raise ImportError("BlockLayout.save_png needs matplotlib: pip install matplotlib") from None
        Bd, Hd = self.classes.shape[:2]
        fig, axes = plt.subplots(Bd, Hd, squeeze=False, figsize=(4 * Hd, 4 * Bd))
        for b in range(Bd):
            for h in range(Hd):
                ax = axes[b][h]
                ax.imshow(self.classes[b, h].cpu().numpy(), cmap="Greys", vmin=0, vmax=2, interpolation="nearest")
                ax.set_title(f"b={b} h={h}", fontsize=8)
                ax.set_xlabel("key tile")
                ax.set_ylabel("query tile")
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)


_cache: OrderedDict = OrderedDict()


def _key(ir, bound, q_len, k_len, block_m, block_n, device):
    tensors = tuple(sorted((name, id(t), t._version) for name, t in bound.tensors.items()))
    placed = None if bound.positions is None else bound.positions.host()
    return (ir, tuple(sorted(bound.params.items())), tuple(sorted(bound.sizes.items())), q_len, k_len,
            block_m, block_n, str(device), tensors, placed)


def build_layout(ir: PatternIR, bound, q_len: int, k_len: int, block_m: int, block_n: int,
                 device=None) -> BlockLayout:
    """The block layout of `ir` bound to `bound` (a runtime.binding.Bound), cached."""
    if block_m <= 0 or block_n <= 0:
        raise ValueError(f"tile sizes must be positive, got ({block_m}, {block_n})")
    if device is None:
        device = next((t.device for t in bound.tensors.values()), torch.device("cpu"))
    device = torch.device(device)
    key = _key(ir, bound, q_len, k_len, block_m, block_n, device)
    hit = _cache.get(key)
    if hit is not None and all(r() is bound.tensors[n] for n, r in hit[1].items()):
        _cache.move_to_end(key)
        return hit[0]
    from .binding import Bound
    sizes = dict(bound.sizes, q_len=q_len, k_len=k_len)
    inner = Bound(sizes, bound.params, bound.tensors)
    tensors = inner.expanded(ir)  # broadcast dims at declared shapes
    if bound.positions is None:
        classes, masks, tiers, notes, cf = _classify(ir.masks, Bound(sizes, bound.params, tensors),
                                                     q_len, k_len, block_m, block_n, device)
    else:
        classes, masks, tiers, notes, cf = _placed(ir, bound.positions.host(), sizes, bound.params,
                                                   tensors, block_m, block_n, device)
    layout = BlockLayout(classes, block_m, block_n, q_len, k_len, masks, tiers, notes, cf, device)
    _cache[key] = (layout, {n: weakref.ref(t) for n, t in bound.tensors.items()})
    while len(_cache) > CACHE_SIZE:
        _cache.popitem(last=False)
    return layout


def _classify(masks, inner, q_len: int, k_len: int, block_m: int, block_n: int, device):
    """(classes, constant masks, tiers, notes, closed form) of `masks` bound to `inner`."""
    masks = constant_masks(masks, inner.table())
    masks = tuple(m for m in masks if not (m.op == "const" and m.value is True))
    deps = set().union(*(index_deps(m) for m in masks)) if masks else set()
    Bd = inner.sizes.get("batch", 1) if "b" in deps else 1
    Hd = inner.sizes.get("heads", 1) if "h" in deps else 1
    result = analyze(masks, inner, q_len, k_len, block_m, block_n, device, Bd, Hd)
    cf = derive(masks, block_m, q_len, k_len)
    tiers = list(result.tiers)
    if cf is not None and cf.exact:
        tiers = ["closed_form"] * len(tiers)
    return result.classes, masks, tiers, list(result.notes), cf


def _placed(ir: PatternIR, values, sizes: dict, params: dict, tensors: dict, block_m: int,
            block_n: int, device):
    """`_classify` for a call with positions: each sequence's tiles from the placed masks with
    its (q_start, k_start, k_len) bound (sequences placed alike share one analysis), keys past
    its k_len EMPTY; classes [batch, Hd, nQ, nK], or [1, ...] when every sequence is alike."""
    from .binding import Bound
    masks = place(ir).masks
    q_len, n_k = sizes["q_len"], -(-sizes["k_len"] // block_n)
    done: dict = {}
    for triple in dict.fromkeys(values):
        q_start, k_start, k_len = triple
        inner = Bound(dict(sizes, q_start=q_start, k_start=k_start, k_len=k_len), params, tensors)
        got = _classify(masks, inner, q_len, k_len, block_m, block_n, device)
        cls = got[0]
        pad = n_k - cls.shape[3]  # key tiles past this sequence's keys
        if pad:
            cls = torch.cat([cls, cls.new_zeros(cls.shape[:3] + (pad,))], dim=3)
        done[triple] = (cls,) + got[1:]
    first = done[values[0]]
    if len(done) == 1 and first[0].shape[0] == 1:
        return first
    Hd = max(c[0].shape[1] for c in done.values())
    rows = [done[t][0][b if done[t][0].shape[0] > 1 else 0].expand(Hd, -1, -1)
            for b, t in enumerate(values)]
    notes = list(dict.fromkeys(n for c in done.values() for n in c[3]))
    return (torch.stack(rows).contiguous(),) + first[1:3] + (notes, first[4])


def _masks_read(ir: PatternIR, index: str, size: str) -> bool:
    """Whether a mask reads the index `index` or the size `size` (other than through a tensor)."""
    return any((n.op == "index" and n.value == index) or (n.op == "size" and n.value == size)
               for m in ir.masks for n in walk(m))


def layout_for(ir: PatternIR, q_len: int, k_len: int, block, batch, heads, kv_heads, head_dim,
               device, arguments: dict, placed: dict | None = None) -> BlockLayout:
    """`Pattern.layout`: infer batch / heads from tensor arguments, bind, build (`placed`: the
    call's position keywords)."""
    from .binding import bind
    try:
        block_m, block_n = (block, block) if isinstance(block, int) else (int(block[0]), int(block[1]))
    except (TypeError, ValueError, IndexError):
        raise ValueError(f"block must be an int or a pair (BLOCK_M, BLOCK_N), got {block!r}") from None
    inferred = {}
    for t in ir.tensors:
        value = arguments.get(t.name)
        if isinstance(value, torch.Tensor) and value.dim() == len(t.dims):
            for d, n in zip(t.dims, value.shape):
                if d.op == "size" and d.value in ("batch", "heads"):
                    inferred.setdefault(d.value, int(n))
    given = {"batch": batch, "heads": heads}
    for index, size, one in (("b", "batch", "batch element"), ("h", "heads", "head")):
        if given[size] is None and size not in inferred and _masks_read(ir, index, size):
            raise ValueError(f"the masks of `{ir.name}` read `{index}`, so the layout can differ "
                             f"from one {one} to the next: pass {size}= to `layout` (or a tensor "
                             f"argument with a `{size}` dimension)")
    batch = inferred.get("batch", 1) if batch is None else batch
    heads = inferred.get("heads", 1) if heads is None else heads
    sizes = {"batch": batch, "heads": heads, "kv_heads": heads if kv_heads is None else kv_heads,
             "q_len": q_len, "k_len": k_len, "head_dim": head_dim}
    if device is None:
        device = next((v.device for v in arguments.values() if isinstance(v, torch.Tensor)), None)
    device = torch.device(device) if device is not None else None
    bound = bind(ir, sizes, arguments, device, bool(placed))
    if placed:
        from .positions import positions_of
        where = device or torch.device("cpu")  # shapes only: what positions_of reads
        bound.positions = positions_of(torch.empty((batch, 1, q_len, 0), device=where),
                                       torch.empty((batch, 1, k_len, 0), device=where), **placed)
    return build_layout(ir, bound, q_len, k_len, block_m, block_n, device)
