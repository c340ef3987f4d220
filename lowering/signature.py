"""Kernel signatures as data: what every positional argument of a generated kernel is.

A generated module describes each of its kernels (`attn_fwd`, `attn_kth`, `attn_bwd_dq`,
`attn_bwd_dkdv`) by a `Signature`: the ordered `Arg`s, each with a *kind* that says where its
value comes from at launch, the launch-time constexprs, and the kernel's grid and tile policy.
The skeleton's `def` line and its argument docstring are printed from it (`params_text`,
`doc_text`), and `runtime/launch.py` binds a call to it by walking the same list, so the
emitter and the launcher cannot disagree and no name is ever parsed to learn what it means.

Argument kinds (`Arg.kind`, with `Arg.of` / `Arg.axis`):

  tensor          pointer to a call tensor; `of` is its role (q, k, v, out, lse, do, delta,
                  kth, dq, dk, dv); `optional` ones may be None (then constexpr None)
  stride          `of`'s stride along `axis` (0 when the tensor is absent)
  size            a size by name: batch heads kv_heads q_len k_len head_dim v_dim
  scale           the softmax scale (float)
  param           a float parameter of the pattern (`of` = its name); int and bool parameters
                  are compiled in, never passed
  operand         a tensor argument of the pattern (`of` = its name); bool ones as uint8
  operand_dim     its size along `axis`
  operand_stride  its stride along `axis`
  grad            the gradient buffer of float tensor argument `of`
  layout          one list of the block layout, `of` in part_num part_idx full_num full_idx
  layout_stride   `of` = "num" (counts [B, H, tiles]) or "idx" ([B, H, tiles, tiles]), `axis`
"""
from __future__ import annotations

from dataclasses import dataclass

KINDS = ("tensor", "stride", "size", "scale", "param", "operand", "operand_dim", "operand_stride",
         "grad", "layout", "layout_stride")
SIZES = ("batch", "heads", "kv_heads", "q_len", "k_len", "head_dim", "v_dim", "splits")
#: the roles of call tensors and their axes, for strides and descriptions
ROLES = {
    "q": ("bhmd", "queries [batch, heads, q_len, head_dim]"),
    "k": ("bhnd", "keys [batch, kv_heads, k_len, head_dim]"),
    "v": ("bhnd", "values [batch, kv_heads, k_len, v_dim]"),
    "out": ("bhmd", "output [batch, heads, q_len, v_dim]"),
    "lse": ("bhm", "row log-sum-exp [batch, heads, q_len], fp32"),
    "do": ("bhmd", "gradient of the output [batch, heads, q_len, v_dim]"),
    "delta": ("bhm", "rowsum(dO * O) - dLSE [batch, heads, q_len]"),
    "kth": ("bhm", "top-k threshold per row [batch, heads, q_len]"),
    "dq": ("bhmd", "gradient of q [batch, heads, q_len, head_dim]"),
    "dk": ("bhnd", "gradient of k [batch, kv_heads, k_len, head_dim]"),
    "dv": ("bhnd", "gradient of v [batch, kv_heads, k_len, v_dim]"),
    "pos": ("b", "positions [batch, 3] int32: q_start, k_start, k_len of each sequence"),
    "table": ("bp", "block table [batch, max_pages] int32: each sequence's pages of keys, values"),
    "opart": ("sbhmd", "split-K partial outputs [splits, batch, heads, q_len, v_dim], fp32"),
    "mpart": ("sbhm", "split-K partial row maxima [splits, batch, heads, q_len], fp32, log2 units"),
    "lpart": ("sbhm", "split-K partial row sums [splits, batch, heads, q_len], fp32 (MP's strides)"),
}
LAYOUT_LISTS = ("part_num", "part_idx", "full_num", "full_idx")


@dataclass(frozen=True)
class Arg:
    """One positional argument: its name in the kernel, its kind, and what it refers to."""

    name: str
    kind: str
    of: str | None = None
    axis: int | None = None
    optional: bool = False

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"internal: unknown kernel argument kind {self.kind!r}")

    def describe(self) -> str:
        k, of = self.kind, self.of
        if k == "tensor":
            return ROLES[of][1] + (" (None when not asked for)" if self.optional else "")
        if k == "stride":
            return f"stride of {of} along {ROLES[of][0][self.axis]}"
        if k == "size":
            return f"size `{of}` (a runtime value)"
        if k == "scale":
            return "softmax scale (the score starts as q·k * scale)"
        if k == "param":
            return f"float parameter `{of}` of the pattern"
        if k == "operand":
            return f"tensor argument `{of}` of the pattern"
        if k == "operand_dim":
            return f"size of `{of}` along dimension {self.axis}"
        if k == "operand_stride":
            return f"stride of `{of}` along dimension {self.axis}"
        if k == "grad":
            return f"gradient buffer of `{of}` (fp32; [programs, numel] slices when deterministic)"
        if k == "layout":
            what = {"part_num": "PARTIAL tile counts", "part_idx": "PARTIAL tile indices",
                    "full_num": "FULL tile counts", "full_idx": "FULL tile indices"}[of]
            return f"block layout: {what}"
        return f"block layout: stride of the {'counts' if of == 'num' else 'indices'} along axis {self.axis}"


@dataclass(frozen=True)
class Signature:
    """A kernel function of a generated module.

    `grid`: 'query_tiles' (one program per query tile and (batch, head)) or 'key_tiles' (per
    key tile and (batch, kv head)). `config`: which tile policy it launches with ('forward',
    'dq', 'dkdv'; `runtime/policy.py`). `layout`: the block layout orientation it reads
    ('kv': key tiles per query tile, 'q': query tiles per key tile) or None."""

    name: str
    args: tuple[Arg, ...]
    constexprs: tuple[str, ...]
    grid: str
    config: str
    layout: str | None

    def groups(self) -> list[list[Arg]]:
        """Consecutive arguments that belong together: the call tensors, one tensor's strides,
        the sizes, one tensor argument with its dims and strides, ..."""
        out: list[list[Arg]] = []
        for a in self.args:
            if out and _group(out[-1][-1]) == _group(a):
                out[-1].append(a)
            else:
                out.append([a])
        return out

    def params_text(self, indent: str) -> str:
        """The `def` parameter list, a group per line, constexprs last."""
        lines = [", ".join(a.name for a in g) for g in self.groups()]
        cs = [f"{c}: tl.constexpr" for c in self.constexprs]
        lines += [", ".join(cs[i:i + 3]) for i in range(0, len(cs), 3)]
        return (",\n" + indent).join(lines)

    def doc_text(self) -> str:
        """The arguments and what each is, for the kernel's docstring."""
        out = []
        for g in self.groups():
            if len(g) == 1 or g[0].kind in ("tensor", "layout"):
                out += [f"{a.name}: {a.describe()}" for a in g]
            else:
                out.append(f"{', '.join(a.name for a in g)}: {_group_text(g)}")
        out.append(f"{', '.join(self.constexprs)}: constexprs")
        return "\n".join(out)

    def uses_layout(self) -> bool:
        return any(a.kind == "layout" for a in self.args)


def _group(a: Arg):
    if a.kind in ("operand", "operand_dim", "operand_stride"):
        return ("operand", a.of)
    if a.kind in ("stride", "layout_stride"):
        return (a.kind, a.of)
    return a.kind


def _group_text(g: list[Arg]) -> str:
    a = g[0]
    if a.kind == "stride":
        return f"strides of {a.of} along {ROLES[a.of][0]}"
    if a.kind == "layout_stride":
        return f"block layout: strides of the {'counts' if a.of == 'num' else 'indices'}"
    if a.kind == "operand":
        return f"tensor argument `{a.of}` of the pattern, its sizes and strides"
    if a.kind == "size":
        return "sizes (runtime values: new lengths do not recompile)"
    return "; ".join(x.describe() for x in g)


@dataclass(frozen=True)
class Constraints:
    """What every launch of a module must respect.

    `min_block_n`: the smallest key tile (top-k's threshold buffer spans one key tile);
    `shared_tiles`: every pass must use the forward's tiles (a keep decision reads the score, so
    the backward must form each score by the same dot as the forward to agree at ties)."""

    min_block_n: int = 16
    shared_tiles: bool = False


# ------------------------------------------------------------------ building signatures


def tensor(name: str, role: str, optional: bool = False) -> Arg:
    return Arg(name, "tensor", role, optional=optional)


def strides(role: str, prefix: str) -> tuple[Arg, ...]:
    axes = ROLES[role][0]
    return tuple(Arg(f"stride_{prefix}{c}", "stride", role, i) for i, c in enumerate(axes))


def sizes(*names: str) -> tuple[Arg, ...]:
    return tuple(Arg(n, "size", n) for n in names)


def layout(orientation: str | None) -> tuple[Arg, ...]:
    """The layout lists and their strides, or nothing for a kernel that computes its tiles."""
    if orientation is None:
        return ()
    lists = tuple(Arg(n.upper(), "layout", n) for n in LAYOUT_LISTS)
    num = tuple(Arg(f"stride_n{c}", "layout_stride", "num", i) for i, c in enumerate("bhm"))
    idx = tuple(Arg(f"stride_i{c}", "layout_stride", "idx", i) for i, c in enumerate("bhmn"))
    return lists + num + idx


@dataclass(frozen=True)
class Operand:
    """A pattern operand the generated code reads: a float parameter or a tensor argument."""

    name: str
    kind: str          # 'param' | 'tensor'
    rank: int = 0

    def args(self) -> tuple[Arg, ...]:
        if self.kind == "param":
            return (Arg(param_name(self.name), "param", self.name),)
        base = tensor_name(self.name)
        return ((Arg(base, "operand", self.name),)
                + tuple(Arg(dim_name(self.name, i), "operand_dim", self.name, i) for i in range(self.rank))
                + tuple(Arg(stride_name(self.name, i), "operand_stride", self.name, i) for i in range(self.rank)))


# how the expression printer names operands in generated code (the names are for readers and
# Triton; what an argument *is* travels in its Arg)
def param_name(name: str) -> str:
    return f"prm_{name}"


def tensor_name(name: str) -> str:
    return f"tns_{name}"


def dim_name(name: str, i: int) -> str:
    return f"tns_{name}_d{i}"


def stride_name(name: str, i: int) -> str:
    return f"tns_{name}_s{i}"


def grad_name(name: str) -> str:
    return f"grd_{name}"


def operand_args(operands: tuple[Operand, ...]) -> tuple[Arg, ...]:
    return tuple(a for o in operands for a in o.args())


def grad_args(names: tuple[str, ...]) -> tuple[Arg, ...]:
    return tuple(Arg(grad_name(n), "grad", n) for n in names)


_SIZES_FWD = sizes("batch", "heads", "kv_heads", "q_len", "k_len", "head_dim", "v_dim")
_SCALE = (Arg("sm_scale", "scale"),)


#: the call's positions table and its stride along the batch (every kernel takes them)
_POS = (tensor("Pos", "pos", optional=True), *strides("pos", "p"))
#: a paged call's block table and its strides (the kernels that read keys take them; K and V
#: are then page pools, whose batch-axis stride is the page stride)
_TABLE = (tensor("Table", "table", optional=True), *strides("table", "bt"))


#: split-K's partial results (None unsplit) and their strides (LP shares MP's)
_PARTS = (tensor("OutP", "opart", optional=True), tensor("MP", "mpart", optional=True),
          tensor("LP", "lpart", optional=True))
_PART_STRIDES = (*strides("opart", "os"), *strides("mpart", "ps"))


def forward_signatures(operands: tuple[Operand, ...], closed_form: bool) -> tuple[Signature, ...]:
    """The forward module's kernels in launch order: attn_kth (launched only for a split
    `select topk`), attn_fwd (its grid's third axis is the split count), attn_merge (launched
    only when split)."""
    kv = None if closed_form else "kv"
    fwd = (tensor("Q", "q"), tensor("K", "k"), tensor("V", "v"), tensor("Out", "out"),
           tensor("Lse", "lse", optional=True), *_POS, tensor("Kth", "kth", optional=True),
           *_PARTS, *_TABLE, *strides("q", "q"), *strides("k", "k"), *strides("v", "v"),
           *strides("out", "o"), *strides("lse", "l"), *strides("kth", "t"), *_PART_STRIDES,
           *layout(kv), *_SCALE, *_SIZES_FWD, *operand_args(operands))
    merge = (*_PARTS, tensor("Out", "out"), tensor("Lse", "lse", optional=True), *_POS,
             *_PART_STRIDES, *strides("out", "o"), *strides("lse", "l"), *_SIZES_FWD,
             *sizes("splits"), *operand_args(operands))
    return (
        kth_signature(operands, kv),
        Signature("attn_fwd", fwd, ("BLOCK_M", "BLOCK_N", "BLOCK_D", "BLOCK_DV", "HEAD_DIM",
                                    "V_DIM", "RETURN_LSE", "INPUT_PRECISION", "SPLIT", "PACK",
                                    "PAGE"),
                  "split_query_tiles", "forward", kv),
        Signature("attn_merge", merge, ("BLOCK_M", "BLOCK_DV", "V_DIM", "RETURN_LSE"),
                  "query_tiles", "forward", None))


def kth_signature(operands: tuple[Operand, ...], kv: str | None) -> Signature:
    """attn_kth: each row's top-k threshold, with the forward's tiles (a split forward and the
    backward launch it)."""
    return Signature(
        "attn_kth",
        (tensor("Q", "q"), tensor("K", "k"), tensor("Kth", "kth"), *_POS, *_TABLE,
         *strides("q", "q"), *strides("k", "k"), *strides("kth", "s"), *layout(kv),
         *_SCALE, *sizes("batch", "heads", "kv_heads", "q_len", "k_len", "head_dim"),
         *operand_args(operands)),
        ("BLOCK_M", "BLOCK_N", "BLOCK_D", "HEAD_DIM", "INPUT_PRECISION", "FP64", "PAGE"),
        "query_tiles", "forward", kv)


def backward_signatures(operands: tuple[Operand, ...], grads: tuple[str, ...], topk: bool,
                        closed_form: bool, closed_form_t: bool) -> tuple[Signature, ...]:
    """attn_kth (launched only with `select topk`), attn_bwd_dq, attn_bwd_dkdv; the
    query-major ones read the layout unless `closed_form`, dK/dV the transposed one unless
    `closed_form_t`."""
    ops = operand_args(operands)
    common = ("BLOCK_M", "BLOCK_N", "BLOCK_D", "HEAD_DIM")
    kv = None if closed_form else "kv"
    out = [kth_signature(operands, kv)]
    # Lse, Delta and Kth are [batch, heads, q_len] alike and share Lse's strides
    stats = (tensor("Lse", "lse"), tensor("Delta", "delta"), tensor("Kth", "kth", optional=not topk))
    out.append(Signature(
        "attn_bwd_dq",
        (tensor("Q", "q"), tensor("K", "k"), tensor("V", "v"), tensor("DO", "do"), *stats,
         tensor("DQ", "dq"), *_POS, *strides("q", "q"), *strides("k", "k"), *strides("v", "v"),
         *strides("do", "o"), *strides("dq", "g"), *strides("lse", "s"), *layout(kv), *_SCALE,
         *_SIZES_FWD, *ops, *grad_args(grads)),
        common + ("BLOCK_DV", "V_DIM", "INPUT_PRECISION", "FP64", "DETERMINISTIC"), "query_tiles",
        "dq", kv))
    q = None if closed_form_t else "q"
    out.append(Signature(
        "attn_bwd_dkdv",
        (tensor("Q", "q"), tensor("K", "k"), tensor("V", "v"), tensor("DO", "do"), *stats,
         tensor("DK", "dk"), tensor("DV", "dv"), *_POS, *strides("q", "q"), *strides("k", "k"),
         *strides("v", "v"), *strides("do", "o"), *strides("dk", "dk"), *strides("dv", "dv"),
         *strides("lse", "s"), *layout(q), *_SCALE, *_SIZES_FWD, *ops),
        common + ("BLOCK_DV", "V_DIM", "INPUT_PRECISION", "FP64"), "key_tiles", "dkdv",
        q))
    return tuple(out)
