"""The differential properties: the generated forward kernel (`kernel`) and backward kernels
(`grad`) against the reference interpreter in fp64, within a tolerance scaled by the same-dtype
reference's own error (FlexAttention's criterion)."""
from __future__ import annotations

import torch

from ...dsl.diagnostics import SpecError
from ..maskview import allowed_mask, evaluate_masks, final_score
from ..policy import tile_override
from .case import Case, inputs
from .outcomes import PropertyFailure, Rejected, Stats, Unsupported, crash, first_line

def call_pattern(pattern, q, k, v, args, backend, lse, tiles=None):
    """`pattern(q, k, v, ...)` on `backend`, with the tile shape `tiles` when one is given."""
    if tiles is None:
        return pattern(q, k, v, backend=backend, return_lse=lse, **args)
    with tile_override(*tiles):
        return pattern(q, k, v, backend=backend, return_lse=lse, **args)


def _reference(case, pattern, q, k, v, args, lse):
    try:
        return call_pattern(pattern, q, k, v, args, "reference", lse)
    except (SpecError, ValueError) as e:
        raise Rejected(f"reference: {first_line(e)}") from None
    except Exception as e:  # noqa: BLE001
        raise crash("kernel", "the reference interpreter", e) from None


#: (factor on the same-dtype reference's error, floor relative to the output's magnitude)
TOLERANCE = {"float32": (8.0, 2e-5), "float16": (4.0, 2e-3), "bfloat16": (4.0, 1.6e-2)}
#: top-k rows whose threshold is within this (relative) distance of another score are fragile
TOPK_MARGIN = 1e-3


def _fragile_rows(pattern, bound64, q64, k64, scale) -> torch.Tensor:
    """bool [B, H, Lq]: rows where `select topk` is decided by a near tie (a rounding difference
    may legitimately keep a different key set)."""
    B, H, Lq = q64.shape[0], q64.shape[1], q64.shape[2]
    if pattern.ir.topk is None:
        return torch.zeros(B, H, Lq, dtype=torch.bool)
    n = bound64.topk
    s = final_score(pattern.ir, bound64, q64, k64, scale)
    keep = evaluate_masks(pattern.ir, bound64, score=s)
    s = torch.where(keep, s, torch.full_like(s, float("-inf")))
    Lk = s.shape[-1]
    if n >= Lk:
        return torch.zeros(B, H, Lq, dtype=torch.bool)
    t = torch.topk(s, n, dim=-1).values[..., -1:]
    near = (s - t).abs() <= TOPK_MARGIN * (1 + t.abs())
    fragile = (near & (s != t) & keep).any(-1)
    return fragile & torch.isfinite(t.squeeze(-1))


def _max_err(a: torch.Tensor, b: torch.Tensor, rows: torch.Tensor) -> float:
    d = (a.double() - b.double()).abs()
    d = d[rows] if rows is not None else d
    return float(d.max()) if d.numel() else 0.0


def _under_test(prop: str, what: str, run):
    """Run the backend under test: a SpecError naming an internal or compile failure is a bug,
    any other SpecError a cleanly unsupported case, any other exception a crash."""
    try:
        return run()
    except SpecError as e:
        msg = e.message
        if "internal" in msg or "Triton could not compile" in msg:
            raise PropertyFailure(prop, f"{what} failed:\n{e}") from None
        raise Unsupported(msg.splitlines()[0][:120]) from None
    except Exception as e:  # noqa: BLE001
        raise crash(prop, what, e) from None


def check_kernel(case: Case, pattern, backend: str = "triton", stats: Stats | None = None) -> None:
    q, k, v, args = inputs(case, pattern)
    softmax = pattern.ir.normalizer == "softmax"
    q64, k64, v64 = q.double(), k.double(), v.double()
    args64 = {n: (t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t) for n, t in args.items()}
    truth = _reference(case, pattern, q64, k64, v64, args64, softmax)
    ref = _reference(case, pattern, q, k, v, args, softmax)
    if not softmax:
        truth, ref = (truth, None), (ref, None)
    if not torch.isfinite(truth[0]).all():
        raise Rejected("the fp64 reference output is not finite")
    got = _under_test("kernel", f"the {backend} backend",
                      lambda: call_pattern(pattern, q, k, v, args, backend, softmax, (case.block_m, case.block_n)))
    if not softmax:
        got = (got, None)
    out, lse = got
    if out.shape != truth[0].shape or out.dtype != q.dtype:
        raise PropertyFailure("kernel", f"output is {out.dtype} {list(out.shape)}, expected {q.dtype} "
                                        f"{list(truth[0].shape)}")
    if torch.isnan(out).any():
        raise PropertyFailure("kernel", f"output has NaN in {int(torch.isnan(out).any(-1).sum())} rows")
    bound64 = pattern.bind(q64, k64, v64, args64)
    scale = 1.0 / case.head_dim ** 0.5
    empty = ~allowed_mask(pattern.ir, bound64, q64, k64, scale).any(-1)  # [B, H, Lq]
    if softmax:
        got_inf, want_inf = torch.isneginf(lse), torch.isneginf(truth[1])
        if not torch.equal(got_inf, want_inf):
            diff = (got_inf != want_inf).nonzero()[:4].tolist()
            raise PropertyFailure("kernel", f"fully masked rows differ (LSE -inf) at [b, h, q] {diff}: kernel "
                                            f"{[bool(got_inf[tuple(i)]) for i in diff]}, reference "
                                            f"{[bool(want_inf[tuple(i)]) for i in diff]}")
    if bool((out[empty] != 0).any()):
        rows = (empty & (out != 0).any(-1)).nonzero()[:4].tolist()
        raise PropertyFailure("kernel", f"fully masked rows {rows} [b, h, q] are not zero")
    rows = ~_fragile_rows(pattern, bound64, q64, k64, scale)
    if stats is not None:
        stats.fragile_rows += int((~rows).sum())
    factor, floor = TOLERANCE[case.dtype]
    magnitude = float(truth[0].abs().max()) if truth[0].numel() else 0.0
    got_err, ref_err = _max_err(out, truth[0], rows), _max_err(ref[0], truth[0], rows)
    if got_err > factor * ref_err + floor * (1 + magnitude):
        worst = ((out.double() - truth[0]).abs().amax(-1) * rows).flatten().argmax()
        b, h, i = (int(x) for x in torch.unravel_index(worst, rows.shape))
        raise PropertyFailure("kernel", f"output error {got_err:.3g} exceeds {factor} x reference error "
                                        f"{ref_err:.3g} + {floor * (1 + magnitude):.3g} (worst row b={b} h={h} "
                                        f"q={i}: kernel {out[b, h, i, :4].tolist()}..., fp64 reference "
                                        f"{truth[0][b, h, i, :4].tolist()}...)")
    if softmax:
        fin = rows & torch.isfinite(truth[1])
        lmag = float(truth[1][fin].abs().max()) if bool(fin.any()) else 0.0
        got_err, ref_err = _max_err(lse, truth[1], fin), _max_err(ref[1], truth[1], fin)
        if got_err > factor * ref_err + 2e-5 * (1 + lmag):
            raise PropertyFailure("kernel", f"LSE error {got_err:.3g} exceeds {factor} x reference error "
                                            f"{ref_err:.3g} + {2e-5 * (1 + lmag):.3g}")


def _grads(pattern, q, k, v, args, backend, softmax, tiles, w, u):
    """Gradients of sum(out * w) + sum(lse * u) (finite LSE only) with respect to q, k, v and the
    float tensor arguments, in that order (tensor arguments sorted by name)."""
    names = sorted(n for n, t in args.items() if isinstance(t, torch.Tensor) and t.is_floating_point())
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    targs = dict(args)
    for n in names:
        targs[n] = args[n].detach().clone().requires_grad_(True)
        leaves.append(targs[n])
    got = call_pattern(pattern, *leaves[:3], targs, backend, softmax, tiles)
    out, lse = got if softmax else (got, None)
    loss = (out.double() * w).sum()
    if lse is not None:
        loss = loss + (torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse)).double() * u).sum()
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for g, x in zip(grads, leaves)], ["q", "k", "v", *names]


def check_grad(case: Case, pattern, backend: str = "triton", stats: Stats | None = None) -> None:
    """Generated backward kernels vs autograd through the fp64 reference: dQ, dK, dV and the
    gradients of float tensor arguments, within the same-dtype reference's own error (scaled)."""
    q, k, v, args = inputs(case, pattern)
    softmax = pattern.ir.normalizer == "softmax"
    q64, k64, v64 = q.double(), k.double(), v.double()
    args64 = {n: (t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t) for n, t in args.items()}
    bound64 = pattern.bind(q64, k64, v64, args64)
    scale = 1.0 / case.head_dim ** 0.5
    rows = ~_fragile_rows(pattern, bound64, q64, k64, scale)  # near top-k ties may pick other keys
    g = torch.Generator().manual_seed(case.seed + 1)
    B, H, Lq = q.shape[:3]
    w = torch.randn(B, H, Lq, v.shape[-1], generator=g, dtype=torch.float64) * rows[..., None]
    u = torch.randn(B, H, Lq, generator=g, dtype=torch.float64) * rows
    try:
        truth, names = _grads(pattern, q64, k64, v64, args64, "reference", softmax, None, w, u)
        ref, _ = _grads(pattern, q, k, v, args, "reference", softmax, None, w, u)
    except (SpecError, ValueError) as e:
        raise Rejected(f"reference: {first_line(e)}") from None
    except Exception as e:  # noqa: BLE001
        raise crash("grad", "the reference backward", e) from None
    if not all(torch.isfinite(t).all() for t in truth):
        raise Rejected("the fp64 reference gradient is not finite")
    got, _ = _under_test("grad", f"the {backend} backward",
                         lambda: _grads(pattern, q, k, v, args, backend, softmax,
                                        (case.block_m, case.block_n), w, u))
    factor, floor = TOLERANCE[case.dtype]
    for name, a, r, t in zip(names, got, ref, truth):
        if torch.isnan(a).any():
            raise PropertyFailure("grad", f"d{name} has NaN")
        magnitude = float(t.abs().max()) if t.numel() else 0.0
        got_err, ref_err = _max_err(a, t, None), _max_err(r, t, None)
        if got_err > factor * ref_err + floor * (1 + magnitude):
            raise PropertyFailure("grad", f"d{name} error {got_err:.3g} exceeds {factor} x reference error "
                                          f"{ref_err:.3g} + {floor * (1 + magnitude):.3g}")
