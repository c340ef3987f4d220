"""The standard library against independent formulas.

For every pattern in `stdlib/`, the reference interpreter is compared with

* a dense formula written here in plain torch (an explicit [q_len, k_len] mask / bias, softmax or
  sigmoid, matmul), computed in fp64 from the same fp32 inputs; and
* FlexAttention (`torch.nn.attention.flex_attention`, eager on the CPU) with an equivalent
  `mask_mod` / `score_mod`, for every pattern FlexAttention can express (all but top-k and
  sigmoid).

Where a paper defines a pattern as a set of positions (Sparse Transformer, NATTEN, dilated
windows), the mask is built here from that definition with Python loops, not from the `.attn`
formula. Small shapes: GQA (4 query heads over 2 kv heads), odd lengths, q_len != k_len, a value
head dim that differs from the query head dim.
"""
from __future__ import annotations

import functools
import math
import re
import warnings
from importlib import resources
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import pytest
import torch

import attnc

STDLIB = Path(str(resources.files("attnc.stdlib")))

B, H, HKV, D, DV = 2, 4, 2, 16, 8
SQUARE = (48, 48)
RECT = (37, 64)       # q_len != k_len (top-left aligned)
RECT_SCALE = 0.37     # rectangular runs also pass an explicit scale
ATOL, RTOL = 1e-5, 1e-5
NEG_INF = float("-inf")


# --------------------------------------------------------------------------- the cases

@dataclass
class Case:
    """One stdlib pattern with concrete arguments and an independent definition of it.

    `mask(b, h, q, k, a)` and `score(s, b, h, q, k, a)` receive broadcastable int64 index grids
    (the dense formula) or 0-d index tensors (FlexAttention); `a` holds the scalar arguments,
    the tensor arguments and whatever `aux` precomputes from them (loop-built tables)."""

    id: str
    pattern: str                      # name for attnc.std
    args: dict = field(default_factory=dict)
    tensors: Callable | None = None   # (Lq, Lk, gen) -> dict of tensor arguments
    aux: Callable | None = None       # (a, Lq, Lk) -> dict of helper tables for the formulas
    mask: Callable | None = None
    score: Callable | None = None
    topk: int | None = None
    sigmoid: bool = False
    sink: Callable | None = None      # (b, h, q, a) -> the softmax sink of each row
    shapes: tuple = (SQUARE, RECT)

    @property
    def flex(self) -> bool:
        return self.topk is None and not self.sigmoid and self.sink is None


def _table(Lq, Lk, allowed):
    """A [Lq, Lk] bool table from a Python predicate on (q, k) — the paper's set definition."""
    t = torch.zeros(Lq, Lk, dtype=torch.bool)
    for i in range(Lq):
        for j in range(Lk):
            t[i, j] = bool(allowed(i, j))
    return t


def _dilated_table(a, Lq, Lk):
    keys = lambda i: {i - j * a.dilation for j in range(a.window)} | \
        (set() if a.causal else {i + j * a.dilation for j in range(a.window)})
    return {"table": _table(Lq, Lk, lambda i, j: j in keys(i))}


def _strided_table(a, Lq, Lk):
    # Child et al. 2019: A1 = {t, ..., i} with t = max(0, i - l); A2 = {j : (i - j) mod l = 0}
    l = a.stride
    a1 = lambda i, j: max(0, i - l) <= j <= i
    a2 = lambda i, j: j <= i and (i - j) % l == 0
    return {"table": _table(Lq, Lk, lambda i, j: a1(i, j) or a2(i, j))}


def _fixed_table(a, Lq, Lk):
    # Child et al. 2019: A1 = {j : floor(j/l) = floor(i/l)}, A2 = {j : j mod l in {l - c, ..., l}}
    l, c = a.stride, a.summary
    return {"table": _table(Lq, Lk, lambda i, j: j <= i and (j // l == i // l or j % l in range(l - c, l + 1)))}


def _natten_start(i, L, kernel, d):
    """NATTEN's window start along one axis (the window is shifted, not cut, at the borders)."""
    ns = kernel // 2
    if d <= 1:
        return max(i - ns, 0) + (i + ns >= L) * (L - i - ns - 1)
    if i - ns * d < 0:
        return i % d
    if i + ns * d >= L:
        imodd = i % d
        a = (L // d) * d
        rest = L - a
        return (L - rest + imodd - 2 * ns * d) if imodd < rest else (a + imodd - kernel * d)
    return i - ns * d


def _natten_axis(L, kernel, d):
    t = torch.zeros(L, L, dtype=torch.bool)
    for i in range(L):
        s = _natten_start(i, L, kernel, d)
        for j in range(kernel):
            t[i, s + j * d] = True
    return t


def _natten_tables(a, Lq, Lk):
    return {"ty": _natten_axis(a.height, a.kernel, a.dilation), "tx": _natten_axis(a.width, a.kernel, a.dilation)}


def _grid_distances(width, Lq, Lk):
    """Squared Euclidean and Manhattan distances between patches of a row-major grid."""
    def coords(n):
        p = torch.arange(n, dtype=torch.float64)
        return torch.stack([torch.div(p, width, rounding_mode="floor"), torch.remainder(p, width)], -1)
    cq, ck = coords(Lq), coords(Lk)
    return torch.cdist(cq, ck, p=2) ** 2, torch.cdist(cq, ck, p=1)


def _gmm_aux(a, Lq, Lk):
    d2, _ = _grid_distances(a.width, Lq, Lk)
    alpha, sigma = a.alpha.double(), a.sigma.double()                  # [H, n]
    w = (alpha[:, :, None, None] * torch.exp(-d2 / (2 * sigma[:, :, None, None] ** 2))).sum(1)
    return {"W": w}                                                     # [H, Lq, Lk]


def _alibi2d_aux(a, Lq, Lk):
    d2, d1 = _grid_distances(a.width, Lq, Lk)
    return {"dist": d1 if a.manhattan else d2.sqrt()}


def _relbias_aux(a, Lq, Lk):
    md = a.max_distance
    rel = (torch.arange(Lk)[None, :] - torch.arange(Lq)[:, None]).clamp(-md, md) + md
    return {"full": a.bias.double()[:, rel]}                            # [H, Lq, Lk]


def _geo_aux(a, Lq, Lk):
    return {"m": torch.tensor([2.0 ** (-8.0 * (i + 1) / H) for i in range(H)], dtype=torch.float64)}


def _rand(shape, gen, lo=0.0, hi=1.0):
    return lo + (hi - lo) * torch.rand(shape, generator=gen)


def _docs(Lq, Lk, gen):
    # sorted random document ids with several boundaries per row, different per batch element
    return {"doc": torch.sort(torch.randint(0, 5, (B, Lq), generator=gen), dim=-1).values}


def _kv_docs(Lq, Lk, gen):
    # sorted key ids; the queries are the last Lq keys (decoding), or more ids past the keys
    k_doc = torch.sort(torch.randint(0, 5, (B, Lk), generator=gen), dim=-1).values
    q_doc = k_doc[:, Lk - Lq:] if Lq <= Lk else torch.cat(
        [k_doc, torch.full((B, Lq - Lk), 5, dtype=k_doc.dtype)], dim=1)
    return {"q_doc": q_doc, "k_doc": k_doc}


def _globals(Lq, Lk, gen):
    g = torch.rand(B, Lq, generator=gen) < 0.1
    g[:, 0] = True
    return {"is_global": g}


def _slopes(Lq, Lk, gen):
    return {"slopes": _rand((H,), gen, 0.05, 0.6)}


def _gmm(n):
    return lambda Lq, Lk, gen: {"alpha": _rand((H, n), gen, -1.0, 2.0), "sigma": _rand((H, n), gen, 0.5, 3.0)}


def _bias_table(md):
    return lambda Lq, Lk, gen: {"bias": torch.randn(H, 2 * md + 1, generator=gen)}


def _sinks(Lq, Lk, gen):
    return {"sinks": _rand((H,), gen, -1.0, 2.0)}


causal_mask = lambda b, h, q, k, a: k <= q

CASES = [
    Case("causal", "causal", mask=causal_mask),
    Case("sliding_window", "sliding_window", {"window": 7},
         mask=lambda b, h, q, k, a: (k <= q) & (k > q - a.window)),
    Case("sliding_window-default", "sliding_window", {},
         mask=causal_mask),  # window 1024 covers these lengths
    Case("streaming", "streaming", {"window": 6, "sinks": 3},
         mask=lambda b, h, q, k, a: (k <= q) & ((q - k < a.window) | (k < a.sinks))),
    Case("prefix_lm", "prefix_lm", {"prefix": 11},
         mask=lambda b, h, q, k, a: (k <= q) | (k < a.prefix)),
    Case("document", "document", {}, tensors=_docs, shapes=(SQUARE,),
         mask=lambda b, h, q, k, a: (a.doc[b, q] == a.doc[b, k]) & (k <= q)),
    Case("document-bidirectional", "document", {"causal": False}, tensors=_docs, shapes=(SQUARE,),
         mask=lambda b, h, q, k, a: a.doc[b, q] == a.doc[b, k]),
    Case("document_kv", "document_kv", {}, tensors=_kv_docs, shapes=(SQUARE, RECT, (64, 37)),
         aux=lambda a, Lq, Lk: {"shift": Lk - Lq},  # bottom-right causal alignment
         mask=lambda b, h, q, k, a: (a.q_doc[b, q] == a.k_doc[b, k]) & (k <= q + a.shift)),
    Case("document_kv-bidirectional", "document_kv", {"causal": False}, tensors=_kv_docs,
         shapes=(RECT,), mask=lambda b, h, q, k, a: a.q_doc[b, q] == a.k_doc[b, k]),
    Case("chunked", "chunked", {"chunk": 10},
         mask=lambda b, h, q, k, a: (q // a.chunk == k // a.chunk) & (k <= q)),
    Case("chunked-block_diagonal", "chunked", {"chunk": 16, "causal": False},
         mask=lambda b, h, q, k, a: q // a.chunk == k // a.chunk),
    Case("dilated", "dilated", {"window": 5, "dilation": 3, "causal": True}, aux=_dilated_table,
         mask=lambda b, h, q, k, a: a.table[q, k]),
    Case("dilated-bidirectional", "dilated", {"window": 4, "dilation": 2, "causal": False}, aux=_dilated_table,
         mask=lambda b, h, q, k, a: a.table[q, k]),
    Case("strided", "strided", {"stride": 7}, aux=_strided_table,
         mask=lambda b, h, q, k, a: a.table[q, k]),
    Case("strided_fixed", "strided_fixed", {"stride": 8, "summary": 2}, aux=_fixed_table,
         mask=lambda b, h, q, k, a: a.table[q, k]),
    Case("neighborhood_2d", "neighborhood_2d", {"height": 6, "width": 8, "kernel": 3}, aux=_natten_tables,
         shapes=((48, 48),),
         mask=lambda b, h, q, k, a: a.ty[q // a.width, k // a.width] & a.tx[q % a.width, k % a.width]),
    Case("neighborhood_2d-dilated", "neighborhood_2d", {"height": 7, "width": 9, "kernel": 3, "dilation": 2},
         aux=_natten_tables, shapes=((63, 63),),
         mask=lambda b, h, q, k, a: a.ty[q // a.width, k // a.width] & a.tx[q % a.width, k % a.width]),
    Case("neighborhood_2d-k5d2", "neighborhood_2d", {"height": 11, "width": 10, "kernel": 5, "dilation": 2},
         aux=_natten_tables, shapes=((110, 110),),
         mask=lambda b, h, q, k, a: a.ty[q // a.width, k // a.width] & a.tx[q % a.width, k % a.width]),
    Case("longformer", "longformer", {"window": 6}, tensors=_globals, shapes=(SQUARE,),
         mask=lambda b, h, q, k, a: ((q - k).abs() <= a.window // 2) | a.is_global[b, q] | a.is_global[b, k]),
    Case("alibi", "alibi", {}, tensors=_slopes, mask=causal_mask,
         score=lambda s, b, h, q, k, a: s - a.slopes[h] * (q - k).abs()),
    Case("alibi-bidirectional", "alibi", {"causal": False}, tensors=_slopes,
         score=lambda s, b, h, q, k, a: s - a.slopes[h] * (q - k).abs()),
    Case("alibi_geometric", "alibi_geometric", {}, aux=_geo_aux, mask=causal_mask,
         score=lambda s, b, h, q, k, a: s - a.m[h] * (q - k).abs()),
    Case("alibi_2d", "alibi_2d", {"width": 8}, tensors=_slopes, aux=_alibi2d_aux,
         score=lambda s, b, h, q, k, a: s - a.slopes[h] * a.dist[q, k]),
    Case("alibi_2d-manhattan", "alibi_2d", {"width": 7, "manhattan": True}, tensors=_slopes, aux=_alibi2d_aux,
         score=lambda s, b, h, q, k, a: s - a.slopes[h] * a.dist[q, k]),
    Case("gaussian_mixture", "gaussian_mixture", {"width": 8}, tensors=_gmm(3), aux=_gmm_aux,
         score=lambda s, b, h, q, k, a: s * a.W[h, q, k]),
    Case("gaussian_mixture-n2", "gaussian_mixture", {"width": 6, "n": 2}, tensors=_gmm(2), aux=_gmm_aux,
         score=lambda s, b, h, q, k, a: s * a.W[h, q, k]),
    Case("gaussian_mixture_additive", "gaussian_mixture_additive", {"width": 8}, tensors=_gmm(3), aux=_gmm_aux,
         score=lambda s, b, h, q, k, a: s + a.W[h, q, k]),
    Case("gaussian_mixture_weight", "gaussian_mixture.gaussian_mixture_weight", {"width": 8}, tensors=_gmm(3)),
    Case("relative_bias", "relative_bias", {"max_distance": 9}, tensors=_bias_table(9), aux=_relbias_aux,
         score=lambda s, b, h, q, k, a: s + a.full[h, q, k]),
    Case("softcap", "softcap", {"cap": 1.5},
         score=lambda s, b, h, q, k, a: a.cap * torch.tanh(s / a.cap)),
    Case("temperature", "temperature", {"tau": 0.3},
         score=lambda s, b, h, q, k, a: s / a.tau),
    Case("temperature-default", "temperature", {},
         score=lambda s, b, h, q, k, a: s),
    Case("topk", "topk", {"top": 5}, topk=5),
    Case("topk-default", "topk", {}, topk=32),
    Case("sigmoid", "sigmoid", {}, sigmoid=True),
    Case("learned_sinks", "learned_sinks", {}, tensors=_sinks, mask=causal_mask,
         sink=lambda b, h, q, a: a.sinks[h]),
]

CASE_BY_ID = {c.id: c for c in CASES}
DENSE_PARAMS = [pytest.param(c, s, id=f"{c.id}-{s[0]}x{s[1]}") for c in CASES for s in c.shapes]
FLEX_PARAMS = [p for p in DENSE_PARAMS if p.values[0].flex]


# --------------------------------------------------------------------------- helpers

@functools.lru_cache(maxsize=None)
def _std(name):
    return attnc.std(name)


def _seed(*parts) -> int:
    return sum((i + 1) * ord(ch) for i, ch in enumerate("/".join(map(str, parts)))) % (2 ** 31)


def _inputs(case, Lq, Lk):
    gen = torch.Generator().manual_seed(_seed(case.id, Lq, Lk))
    q = torch.randn(B, H, Lq, D, generator=gen)
    k = torch.randn(B, HKV, Lk, D, generator=gen)
    v = torch.randn(B, HKV, Lk, DV, generator=gen)
    tensors = case.tensors(Lq, Lk, gen) if case.tensors else {}
    return q, k, v, tensors


def _namespace(case, tensors, Lq, Lk):
    """Scalar arguments with the pattern's defaults filled in, the tensors, and the aux tables."""
    p = _std(case.pattern)
    args = {prm.name: prm.default for prm in p.params if prm.default is not None}
    args.update(case.args)
    a = SimpleNamespace(**args, **tensors)
    if case.aux:
        for name, t in case.aux(a, Lq, Lk).items():
            setattr(a, name, t)
    return a


def _grids(Lq, Lk):
    return (torch.arange(B).view(B, 1, 1, 1), torch.arange(H).view(1, H, 1, 1),
            torch.arange(Lq).view(1, 1, Lq, 1), torch.arange(Lk).view(1, 1, 1, Lk))


def dense_attention(case, a, q, k, v, scale):
    """The independent dense formula: explicit mask and scores, then softmax / sigmoid, in fp64."""
    Lq, Lk = q.shape[2], k.shape[2]
    group = q.shape[1] // k.shape[1]
    q, k, v = q.double(), k.double().repeat_interleave(group, 1), v.double().repeat_interleave(group, 1)
    s = (q @ k.transpose(-1, -2)) * scale
    b, h, qi, ki = _grids(Lq, Lk)
    if case.score:
        s = case.score(s, b, h, qi, ki, a).to(torch.float64).expand(B, H, Lq, Lk)
    allowed = torch.ones(B, H, Lq, Lk, dtype=torch.bool)
    if case.mask:
        allowed = allowed & case.mask(b, h, qi, ki, a)
    if case.topk is not None:
        for idx in torch.nonzero(allowed.any(-1)).tolist():
            row, ok = s[tuple(idx)], allowed[tuple(idx)]
            vals = torch.sort(row[ok], descending=True).values
            if len(vals) > case.topk:
                allowed[tuple(idx)] = ok & (row >= vals[case.topk - 1])
    if case.sigmoid:
        p = torch.where(allowed, torch.sigmoid(s - math.log(Lk)), torch.zeros_like(s))
        return p @ v, None
    sm = s.masked_fill(~allowed, NEG_INF)
    if case.sink:  # one more column in the softmax, with no value
        sink = case.sink(b, h, qi, a).to(torch.float64).expand(B, H, Lq, 1)
        sm = torch.cat([sm, sink], dim=-1)
    lse = torch.logsumexp(sm, dim=-1)
    p = torch.where(allowed, torch.exp(sm - lse[..., None])[..., :Lk], torch.zeros_like(s))
    return p @ v, lse


def flex_run(case, a, q, k, v, scale):
    from torch.nn.attention.flex_attention import AuxRequest, create_block_mask, flex_attention
    Lq, Lk = q.shape[2], k.shape[2]
    score_mod = block_mask = None
    if case.score:
        def score_mod(s, b, h, qi, ki):
            return case.score(s, b, h, qi, ki, a).to(s.dtype)
    if case.mask:
        def mask_mod(b, h, qi, ki):
            return case.mask(b, h, qi, ki, a)
        block_mask = create_block_mask(mask_mod, B=B, H=None, Q_LEN=Lq, KV_LEN=Lk, device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out, aux = flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale,
                                  enable_gqa=True, return_aux=AuxRequest(lse=True))
    return out, aux.lse


def _scale_for(shape):
    return RECT_SCALE if shape == RECT else None


def _check_close(actual, expected, what):
    assert not torch.isnan(actual).any(), f"{what}: NaN"
    torch.testing.assert_close(actual.double(), expected.double(), atol=ATOL, rtol=RTOL, msg=lambda m: f"{what}: {m}")


def _check_lse(actual, expected, what):
    assert not torch.isnan(actual).any(), f"{what}: NaN in lse"
    fin = torch.isfinite(expected)
    assert torch.equal(torch.isfinite(actual), fin), f"{what}: lse is -inf at different rows"
    assert (actual[~fin] == NEG_INF).all(), f"{what}: empty rows must have lse -inf"
    _check_close(actual[fin], expected[fin], what + " lse")


# --------------------------------------------------------------------------- the library itself

def _stdlib_patterns():
    found = []
    for f in sorted(STDLIB.glob("*.attn")):
        for name in re.findall(r"^pattern\s+([A-Za-z_]\w*)", f.read_text(), flags=re.M):
            found.append(name if name == f.stem else f"{f.stem}.{name}")
    return found


def test_every_stdlib_pattern_is_tested():
    tested = {c.pattern for c in CASES}
    missing = [p for p in _stdlib_patterns() if p not in tested]
    assert not missing, f"stdlib patterns without a test case: {missing}"
    assert {"causal", "sliding_window", "streaming", "prefix_lm", "document", "chunked", "dilated",
            "strided", "neighborhood_2d", "longformer", "alibi", "alibi_2d", "gaussian_mixture",
            "relative_bias", "softcap", "temperature", "topk", "sigmoid"} <= set(attnc.std_names())


@pytest.mark.parametrize("name", attnc.std_names())
def test_stdlib_file_loads_and_has_a_header(name):
    text = (STDLIB / f"{name}.attn").read_text()
    lines = text.splitlines()
    assert lines[0].startswith(f"# {name} — "), "the header starts with `# NAME — what it is`"
    header = "\n".join(l for l in lines if l.startswith("#"))
    assert "Source:" in header and "Parameters" in header
    p = attnc.std(name)
    assert p.name == name  # attnc.std picks the pattern named like the file


# --------------------------------------------------------------------------- reference vs formulas

def _setup(case, shape):
    """Inputs of one case at one shape: q, k, v, the tensor arguments, the formulas' namespace
    and the scale to pass (None: the default)."""
    Lq, Lk = shape
    q, k, v, tensors = _inputs(case, Lq, Lk)
    return q, k, v, tensors, _namespace(case, tensors, Lq, Lk), _scale_for(shape)


@pytest.mark.parametrize("case,shape", DENSE_PARAMS)
def test_reference_matches_dense_formula(case, shape):
    Lq, Lk = shape
    q, k, v, tensors, a, scale = _setup(case, shape)
    p = _std(case.pattern)
    want_out, want_lse = dense_attention(case, a, q, k, v, scale if scale is not None else 1 / math.sqrt(D))
    if case.sigmoid:
        out = p(q, k, v, backend="reference", scale=scale, **case.args, **tensors)
        _check_close(out, want_out, case.id)
        return
    out, lse = p(q, k, v, backend="reference", scale=scale, return_lse=True, **case.args, **tensors)
    assert out.shape == (B, H, Lq, DV) and out.dtype == torch.float32
    assert lse.shape == (B, H, Lq)
    _check_close(out, want_out, case.id)
    _check_lse(lse, want_lse, case.id)
    out2 = p(q, k, v, backend="reference", scale=scale, **case.args, **tensors)
    assert torch.equal(out, out2), "return_lse must not change the output"


@pytest.mark.parametrize("case,shape", FLEX_PARAMS)
def test_reference_matches_flex_attention(case, shape):
    q, k, v, tensors, a, scale = _setup(case, shape)
    flex_out, flex_lse = flex_run(case, a, q, k, v, scale)
    out, lse = _std(case.pattern)(q, k, v, backend="reference", scale=scale, return_lse=True,
                                       **case.args, **tensors)
    _check_close(out, flex_out, case.id + " vs flex")
    _check_lse(lse, flex_lse, case.id + " vs flex")


# --------------------------------------------------------------------------- edge cases

def test_fully_masked_rows_give_zero_and_minus_inf():
    # chunked with q_len > k_len: queries of the last chunks have no key of their chunk
    p = attnc.std("chunked")
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(B, H, 64, D, generator=gen, requires_grad=True)
    k = torch.randn(B, HKV, 37, D, generator=gen, requires_grad=True)
    v = torch.randn(B, HKV, 37, DV, generator=gen, requires_grad=True)
    out, lse = p(q, k, v, backend="reference", return_lse=True, chunk=16)
    empty = torch.arange(64) >= 48
    assert torch.isfinite(out).all()
    assert (out[:, :, empty] == 0).all()
    assert (lse[:, :, empty] == NEG_INF).all() and torch.isfinite(lse[:, :, ~empty]).all()
    (out.sum() + lse[:, :, ~empty].sum()).backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert (q.grad[:, :, empty] == 0).all()
    # the non-empty rows agree with the formula, and FlexAttention agrees on all rows
    case = CASE_BY_ID["chunked"]
    a = SimpleNamespace(chunk=16, causal=True)
    want_out, want_lse = dense_attention(case, a, q.detach(), k.detach(), v.detach(), 1 / math.sqrt(D))
    _check_close(out.detach(), want_out, "chunked 64x37")
    _check_lse(lse.detach(), want_lse, "chunked 64x37")
    flex_out, flex_lse = flex_run(case, a, q.detach(), k.detach(), v.detach(), None)
    _check_close(out.detach(), flex_out, "chunked 64x37 vs flex")
    _check_lse(lse.detach(), flex_lse, "chunked 64x37 vs flex")


def test_topk_keeps_ties():
    p = attnc.std("topk")
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(1, 2, 5, D, generator=gen)
    k = torch.randn(1, 2, 12, D, generator=gen)
    k[:, :, 6:] = k[:, :, :6]  # every score appears twice
    v = torch.randn(1, 2, 12, DV, generator=gen)
    out = p(q, k, v, backend="reference", top=3)
    s = (q.double() @ k.double().transpose(-1, -2)) / math.sqrt(D)
    kth = torch.sort(s, dim=-1, descending=True).values[..., 2:3]
    keep = s >= kth - 1e-9
    assert (keep.sum(-1) == 4).all()  # the 3rd largest is tied, so 4 keys are kept
    want = torch.softmax(s.masked_fill(~keep, NEG_INF), -1) @ v.double()
    _check_close(out, want, "topk ties")


def test_topk_row_with_few_allowed_keys_keeps_all():
    src = "import std.topk\nimport std.causal\npattern p(top: int = 4):\n    use topk(top)\n    use causal\n"
    p = attnc.compile(src)
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 1, 9, D, generator=gen) for _ in range(3))
    out = p(q, k, v, backend="reference")
    want = attnc.std("causal")(q, k, v, backend="reference")
    _check_close(out[:, :, :4], want[:, :, :4], "rows with <= top keys are plain causal")
    assert not torch.allclose(out[:, :, 4:], want[:, :, 4:])


def test_sigmoid_has_no_lse():
    q = torch.randn(1, 1, 4, D)
    with pytest.raises(ValueError):
        attnc.std("sigmoid")(q, q, q, backend="reference", return_lse=True)


def test_composition_with_use():
    # stdlib patterns are building blocks: a window, a soft cap and ALiBi in one pattern
    src = ("import std.sliding_window\nimport std.softcap\nimport std.alibi\n"
           "pattern mix(window: int = 5):\n"
           "    use softcap(cap = 2.0)\n"
           "    use alibi\n"
           "    use sliding_window(window)\n")
    p = attnc.compile(src)
    Lq, Lk = RECT
    gen = torch.Generator().manual_seed(11)
    q = torch.randn(B, H, Lq, D, generator=gen)
    k = torch.randn(B, HKV, Lk, D, generator=gen)
    v = torch.randn(B, HKV, Lk, DV, generator=gen)
    slopes = _rand((H,), gen, 0.1, 0.5)
    case = Case("mix", "mix",
                mask=lambda b, h, q, k, a: (k <= q) & (q - k < 5),
                score=lambda s, b, h, q, k, a: 2.0 * torch.tanh(s / 2.0) - slopes[h] * (q - k).abs())
    want_out, want_lse = dense_attention(case, None, q, k, v, 1 / math.sqrt(D))
    out, lse = p(q, k, v, backend="reference", return_lse=True, slopes=slopes)
    _check_close(out, want_out, "mix")
    _check_lse(lse, want_lse, "mix")


GRAD_CASES = ["alibi", "alibi_2d", "gaussian_mixture", "gaussian_mixture_additive", "relative_bias",
              "learned_sinks"]


@pytest.mark.parametrize("cid", GRAD_CASES)
def test_learnable_tensors_receive_the_formula_gradient(cid):
    case = CASE_BY_ID[cid]
    Lq, Lk = SQUARE
    q, k, v, tensors = _inputs(case, Lq, Lk)
    tensors = {n: t.double().requires_grad_() for n, t in tensors.items()}
    q, k, v = (t.double().requires_grad_() for t in (q, k, v))
    out = _std(case.pattern)(q, k, v, backend="reference", **case.args, **tensors)
    got = torch.autograd.grad(out.square().sum(), [q, k, v, *tensors.values()])
    a = _namespace(case, tensors, Lq, Lk)
    want_out, _ = dense_attention(case, a, q, k, v, 1 / math.sqrt(D))
    want = torch.autograd.grad(want_out.square().sum(), [q, k, v, *tensors.values()])
    for name, g, w in zip(["q", "k", "v", *tensors], got, want):
        torch.testing.assert_close(g, w, atol=1e-9, rtol=1e-9, msg=lambda m: f"d/d{name}: {m}")


def test_defaults_of_window_patterns():
    # with the defaults, windows much longer than the sequence reduce to plain causal attention
    gen = torch.Generator().manual_seed(13)
    q = torch.randn(1, 2, 33, D, generator=gen)
    k = torch.randn(1, 2, 33, D, generator=gen)
    v = torch.randn(1, 2, 33, DV, generator=gen)
    causal = attnc.std("causal")(q, k, v, backend="reference")
    for name in ("sliding_window", "streaming", "dilated", "strided", "chunked"):
        args = {"dilation": 1} if name == "dilated" else {}
        out = attnc.std(name)(q, k, v, backend="reference", **args)
        _check_close(out, causal, name)


def test_grid_patterns_compose():
    # 2-D neighborhood + 2-D ALiBi + Gaussian mixture in one pattern: no clash of their lets
    src = ("import std.neighborhood_2d\nimport std.alibi_2d\nimport std.gaussian_mixture\n"
           "pattern nat(height: int = 6, width: int = 8):\n"
           "    use gaussian_mixture(width)\n"
           "    use alibi_2d(width, manhattan = true)\n"
           "    use neighborhood_2d(height, width, kernel = 3)\n")
    p = attnc.compile(src)
    L = 48
    gen = torch.Generator().manual_seed(17)
    q = torch.randn(B, H, L, D, generator=gen)
    k = torch.randn(B, HKV, L, D, generator=gen)
    v = torch.randn(B, HKV, L, DV, generator=gen)
    tensors = {**_gmm(3)(L, L, gen), **_slopes(L, L, gen)}
    a = SimpleNamespace(height=6, width=8, kernel=3, dilation=1, manhattan=True, **tensors)
    for extra in (_gmm_aux, _alibi2d_aux, _natten_tables):
        for name, t in extra(a, L, L).items():
            setattr(a, name, t)
    nat, ali, gmm = CASE_BY_ID["neighborhood_2d"], CASE_BY_ID["alibi_2d"], CASE_BY_ID["gaussian_mixture"]
    case = Case("nat", "nat", mask=nat.mask,
                score=lambda s, b, h, q, k, a: ali.score(gmm.score(s, b, h, q, k, a), b, h, q, k, a))
    want_out, want_lse = dense_attention(case, a, q, k, v, 1 / math.sqrt(D))
    out, lse = p(q, k, v, backend="reference", return_lse=True, **tensors)
    _check_close(out, want_out, "nat")
    _check_lse(lse, want_lse, "nat")
