"""`Pattern`: a checked, lowered pattern that can be called like an attention function."""
from __future__ import annotations

import collections
import functools
import hashlib
import warnings
from dataclasses import dataclass

import torch

from ..dsl.checker import check_library
from ..dsl.diagnostics import SpecError, closest
from ..dsl.loader import Library, PatternRef, build_library
from ..lowering.ir import PatternIR
from ..lowering.lower import lower_pattern
from ..lowering.printer import canonical_text, format_pattern
from .autograd import attention_op, forward, pack_params, scale_for, track
from .binding import (FLOAT_DTYPES, Bound, bind, bind_params, check_qkv, sizes_for,
                      specialization_of)
from .paging import Pages, needs_grad, pages_of
from .policy import KERNELS, OPTION_FIELDS, KernelOptions
from .positions import Positions, placement, positions_of

BACKENDS = ("auto", "reference", "triton")


class Pattern:
    """A compiled attention pattern. Call it as ``p(q, k, v, **arguments)``.

    q is [batch, heads, q_len, head_dim]; k and v are [batch, kv_heads, k_len, head_dim] (v may
    have its own head_dim). Returns the output [batch, heads, q_len, v_head_dim] in q's dtype,
    and with ``return_lse=True`` also the row log-sum-exp [batch, heads, q_len] in fp32.
    ``kernel_options={...}`` forces the generated kernels' tiles, warps and stages
    (`policy.KernelOptions`; `kernel_options_for` says what a call launches with).
    """

    def __init__(self, ir: PatternIR, source: str):
        self.ir = ir
        self.source = source
        #: validated call signatures -> Plan, least recently used dropped
        self._plans: collections.OrderedDict = collections.OrderedDict()

    @classmethod
    def from_source(cls, source: str, name: str | None = None, path: str = "<string>") -> "Pattern":
        """Parse, check and lower the pattern `name` of `source` (the only one if None)."""
        lib = build_library(source, path)
        check_library(lib)
        return cls(lower_pattern(_pick(lib, name)), source)

    @property
    def name(self) -> str:
        return self.ir.name

    @property
    def params(self):
        return self.ir.params

    @property
    def tensors(self):
        return self.ir.tensors

    def __repr__(self) -> str:
        parts = [f"{p.name}: {p.type}" + (f" = {p.default!r}" if p.default is not None else "")
                 for p in self.ir.params]
        parts += [f"{t.name}=<{t.elem} tensor>" for t in self.ir.tensors]
        return f"<attnc.Pattern {self.ir.name}({', '.join(parts)}) from {self.ir.path}>"

    @functools.cached_property
    def digest(self) -> str:
        """A content hash of the pattern's IR: equal for structurally equal patterns."""
        return hashlib.sha256(canonical_text(self.ir).encode()).hexdigest()

    def triton_source(self, **arguments) -> str:
        """The generated forward Triton kernel, specialized on the int/bool parameters given here
        (or their defaults); float parameters and tensors are runtime arguments of the kernel."""
        from ..lowering.emit import emit_forward
        return emit_forward(self.ir, specialization_of(self.ir, arguments)).source

    def ir_text(self) -> str:
        return format_pattern(self.ir)

    def layout(self, q_len: int, k_len: int | None = None, *, block=(128, 128), batch: int | None = None,
               heads: int | None = None, kv_heads: int | None = None, head_dim: int = 64, device=None,
               q_start=None, k_start=None, k_lens=None, **arguments):
        """The block layout (`runtime.layout.BlockLayout`) for these lengths, tile shape and
        arguments. batch / heads default to 1, or to what tensor arguments' shapes say.
        `q_start=`, `k_start=`, `k_lens=` place the queries and keys as in a call (a layout per
        sequence when they differ between sequences)."""
        from .layout import layout_for
        return layout_for(self.ir, q_len, q_len if k_len is None else k_len, block, batch, heads,
                          kv_heads, head_dim, device, arguments,
                          placement(q_start, k_start, k_lens))

    def bind(self, q, k, v, arguments: dict) -> Bound:
        check_qkv(q, k, v)
        return bind(self.ir, sizes_for(q.shape, k.shape), arguments, q.device)

    def __call__(self, q, k, v, *, scale: float | None = None, backend: str = "auto",
                 return_lse: bool = False, kernel_options: dict | None = None, q_start=None,
                 k_start=None, k_lens=None, block_table=None, **arguments):
        placed = placement(q_start, k_start, k_lens)
        if block_table is not None:
            return self._paged_call(q, k, v, block_table, scale, backend, return_lse,
                                    kernel_options, arguments, placed)
        if torch.compiler.is_compiling():
            return self._traced_call(q, k, v, scale, backend, return_lse, kernel_options,
                                     arguments, placed)
        return self._call(q, k, v, scale, backend, return_lse, kernel_options, arguments, placed)

    def _call(self, q, k, v, scale, backend, return_lse, kernel_options, arguments, placed,
              pages: Pages | None = None):
        """An eager call (`pages`: a paged one, whose k and v are the pools and `_plan` saw
        stand-ins of the logical cache)."""
        k_seen, v_seen = (k, v) if pages is None else (pages.view(q.shape[0], k),
                                                       pages.view(q.shape[0], v))
        plan = self._plan(q, k_seen, v_seen, scale, backend, return_lse, kernel_options,
                          arguments, placed, pages is not None)
        tensors = [arguments[n] for n in plan.tensor_names]
        bound = plan.bound(tensors, positions_of(q, k_seen, **placed) if placed else None)
        bound.pages = pages
        if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad
                                        or any(t.requires_grad for t in tensors)):
            out, lse = attention_op(self, q, k, v, tensors, plan.ints, plan.floats, plan.scale,
                                    plan.backend, bound, plan.options)
        else:  # nothing to differentiate: no autograd node, no LSE unless asked for
            out, lse = forward(self, q, k, v, bound, plan.scale, plan.backend, return_lse,
                               plan.options)
        return (out, lse) if return_lse else out

    def _paged_call(self, q, k, v, table, scale, backend, return_lse, kernel_options, arguments,
                    placed):
        """A call on a paged KV cache (`runtime/paging.py`): inference only."""
        if needs_grad(q, k, v, arguments):
            raise ValueError("a call with block_table= (a paged KV cache) is for inference and "
                             "has no backward: call it under torch.no_grad(), or pass contiguous "
                             "k and v [batch, kv_heads, k_len, head_dim] to train")
        pages = pages_of(q, k, v, table)
        if torch.compiler.is_compiling():
            return self._traced_call(q, k, v, scale, backend, return_lse, kernel_options,
                                     arguments, placed, pages)
        return self._call(q, k, v, scale, backend, return_lse, kernel_options, arguments,
                          placed, pages)

    def _plan(self, q, k, v, scale, backend, return_lse, kernel_options, arguments, placed,
              paged: bool = False) -> Plan:
        """The validated plan of a call signature (made once, then remembered)."""
        key = _call_key(q, k, v, scale, backend, return_lse, kernel_options, arguments,
                        tuple(placed) + (("block_table",) if paged else ()))
        plan = self._plans.get(key) if key is not None else None
        if plan is None:  # validate everything once per call signature
            plan = Plan.make(self, q, k, v, scale, backend, return_lse, kernel_options, arguments,
                             bool(placed))
            if key is not None:
                self._plans[key] = plan
                if len(self._plans) > PLAN_CACHE_SIZE:
                    self._plans.popitem(last=False)
        else:
            self._plans.move_to_end(key)
        return plan

    def _traced_call(self, q, k, v, scale, backend, return_lse, kernel_options, arguments,
                     placed, pages: Pages | None = None):
        """The call inside torch.compile: what the plan needs is static (dtypes, devices, head
        dims, parameter values, kernel options), so lengths may be dynamic without a recompile
        or graph break; checks that read lengths or head dims (kernel options against the
        kernel's limits among them) run when the op runs."""
        tensors = {n: t for n, t in arguments.items() if isinstance(t, torch.Tensor) and t.dim() > 0}
        scalars = tuple(sorted((n, x) for n, x in arguments.items() if n not in tensors))
        metas = tuple(sorted((n, (t.dim(), t.dtype, str(t.device))) for n, t in tensors.items()))
        ints, floats, scale, backend, options = _static_plan(
            self, (q.dim(), k.dim(), v.dim()), (q.dtype, k.dtype, v.dtype),
            (str(q.device), str(k.device), str(v.device)), scalars, metas, scale, backend,
            return_lse, _frozen(kernel_options))
        keys = k if pages is None else pages.view(q.shape[0], k)
        positions = positions_of(q, keys, **placed) if placed else None
        out, lse = attention_op(self, q, k, v, [tensors[t.name] for t in self.ir.tensors], ints,
                                floats, scale, backend, kernel_options=options,
                                positions=positions, pages=pages)
        return (out, lse) if return_lse else out

    def kernel_options_for(self, q, k, v, *, scale: float | None = None, backend: str = "auto",
                           kernel_options: dict | None = None, q_start=None, k_start=None,
                           k_lens=None, block_table=None, **arguments) -> dict:
        """The launch settings of the generated kernels for the call ``self(q, k, v, ...)``:
        ``{'forward': {...}, 'dq': {...}, 'dkdv': {...}}``, each with block_m, block_n,
        num_warps, num_stages, and the forward's split-K count `splits`. Passed back as
        ``kernel_options=`` it reproduces the same kernels. With autotuning on and nothing tuned
        yet for a kernel, the call is run once (forward and backward, on copies; a paged call
        forward only) so that the tuner chooses, as the call would."""
        placed = placement(q_start, k_start, k_lens)
        pools = k, v
        if block_table is not None:  # plan on stand-ins of the logical cache
            pages = pages_of(q, k, v, block_table)
            k, v = pages.view(q.shape[0], k), pages.view(q.shape[0], v)
        plan = Plan.make(self, q, k, v, scale, backend, False, kernel_options, arguments,
                         bool(placed))
        if plan.backend != "triton":
            raise ValueError(f"kernel_options_for: this call runs on backend='{plan.backend}', "
                             f"which launches no generated kernels; generated kernels run with "
                             f"CUDA tensors, or with backend='triton' under TRITON_INTERPRET=1")
        from .dispatch import (call_configs, call_specialization,
                               call_splits, forward_kernel)
        from .policy import Target
        bound = plan.bound([arguments[n] for n in plan.tensor_names],
                           positions_of(q, k, **placed) if placed else None)
        options = KernelOptions.parse(plan.options)
        configs = call_configs(self.ir, bound, q, v, options)
        if any(c is None for c in configs.values()):  # the autotuner has yet to choose
            call = dict(scale=scale, backend=backend, kernel_options=kernel_options, **placed,
                        **arguments)
            if block_table is not None:  # inference only: the forward chooses
                with torch.no_grad():
                    self(q, *pools, block_table=block_table, **call)
            else:
                with torch.enable_grad():
                    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
                    self(*leaves, **call).float().sum().backward()
            configs = call_configs(self.ir, bound, q, v, options, settled=True)
        out = {name: {f: getattr(configs[name], f) for f in OPTION_FIELDS} for name in KERNELS}
        kernel = forward_kernel(self.ir, *call_specialization(self.ir, bound)).kernel
        out["forward"]["splits"] = call_splits(kernel, bound, q, k, configs["forward"],
                                               Target.of(q.device))
        return out

    def _auto_backend(self, device: torch.device) -> str:
        if device.type == "cuda":
            from .dispatch import triton_available
            if triton_available():
                return "triton"
        return "reference"


def _pick(lib: Library, name: str | None) -> PatternRef:
    refs = lib.local_patterns()
    if name is None:
        if len(refs) == 1:
            return refs[0]
        names = ", ".join(r.pattern.name for r in refs)
        raise SpecError(refs[0].pattern.span if refs else None,
                        f"{lib.root.source.path} defines {len(refs)} patterns ({names}); choose one with name=...")
    for r in refs:
        if r.pattern.name == name:
            return r
    near = closest(name, [r.pattern.name for r in refs])
    raise SpecError(None, f"no pattern `{name}` in {lib.root.source.path}",
                    f"did you mean `{near}`?" if near else
                    "it defines: " + ", ".join(r.pattern.name for r in refs))


#: how many call signatures a pattern remembers
PLAN_CACHE_SIZE = 64


def _arg_key(x):
    if isinstance(x, torch.Tensor):
        if x.dim() == 0:  # a 0-dim tensor is a scalar parameter: its value decides the plan
            return ("0-dim", x.item())
        return (x.shape, x.dtype, x.device, x.layout, x.is_nested)
    return (type(x), x)


def _frozen(value):
    """A hashable form of a (nested) dict of kernel options, which `_thawed` reverses."""
    if isinstance(value, dict):
        return (_DICT, tuple(sorted((n, _frozen(x)) for n, x in value.items())))
    return value


def _thawed(value):
    if isinstance(value, tuple) and len(value) == 2 and value[0] == _DICT:
        return {n: _thawed(x) for n, x in value[1]}
    return value


_DICT = "<dict>"


def _call_key(q, k, v, scale, backend, return_lse, kernel_options, arguments, placed=()):
    """What a call's validation depends on: shapes, dtypes and devices of every tensor, the
    scalar arguments, scale, backend, kernel options, which position keywords it gives (their
    values are checked per call); None when something is not hashable (then the call is
    checked in full, and its error raised, every time)."""
    try:
        key = (q.shape, q.dtype, q.device, k.shape, k.dtype, k.device, v.shape, v.dtype, v.device,
               scale, backend, return_lse, _frozen(kernel_options),
               tuple(sorted((n, _arg_key(x)) for n, x in arguments.items())), placed)
        hash(key)
        return key
    except (AttributeError, TypeError, RuntimeError):
        return None


@dataclass(frozen=True)
class Plan:
    """A validated call signature: everything a call with these shapes, dtypes, devices and
    scalar arguments needs but its tensors (see `Pattern.__call__`)."""

    ints: tuple
    floats: tuple
    scale: float
    backend: str
    tensor_names: tuple[str, ...]    # the tensor arguments, in declaration order
    sizes: dict
    params: dict
    topk: int | None
    options: str                     # `KernelOptions.text` of the kernel options, "" for none

    @staticmethod
    def make(pattern: "Pattern", q, k, v, scale, backend, return_lse, kernel_options,
             arguments, placed: bool = False) -> "Plan":
        for name, t in (("q", q), ("k", k), ("v", v)):
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"`{name}` must be a torch.Tensor, got {type(t).__name__}")
        check_qkv(q, k, v)
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        arguments = {n: (x.item() if isinstance(x, torch.Tensor) and x.dim() == 0 else x)
                     for n, x in arguments.items()}
        bound = bind(pattern.ir, sizes_for(q.shape, k.shape), arguments, q.device, placed)
        scale = scale_for(scale, q)
        _check_lse(pattern, return_lse)
        requested = backend
        if backend == "auto":
            backend = pattern._auto_backend(q.device)
        options = _options_for(KernelOptions.of(kernel_options), requested, backend)
        if backend == "triton":
            from .dispatch import call_configs, check_backend, check_head_dims
            check_backend(q.device, q.dtype)
            check_head_dims(q.shape[3], v.shape[3])
            if options is not None:  # against the kernels' limits, at the door
                call_configs(pattern.ir, bound, q, v, options)
        track(pattern)
        ints, floats = pack_params(pattern.ir, bound.params)
        return Plan(ints, floats, scale, backend,
                    tuple(t.name for t in pattern.ir.tensors), bound.sizes, bound.params,
                    bound.topk, options.text if options is not None else "")

    def bound(self, tensors: list, positions: Positions | None = None) -> Bound:
        """The call's Bound, given its tensor arguments in declaration order and its positions."""
        return Bound(self.sizes, self.params, dict(zip(self.tensor_names, tensors)), self.topk,
                     positions)


def _options_for(options: KernelOptions | None, requested: str,
                 backend: str) -> KernelOptions | None:
    """The kernel options a call keeps: they set generated kernels, so `backend='reference'`
    rejects them, and `backend='auto'` that chose the reference drops them with a warning."""
    if options is None or backend == "triton":
        return options
    if requested == "reference":
        raise ValueError("kernel_options set the generated kernels' launches; backend='reference' "
                         "launches none: drop kernel_options or use backend='triton'")
    warnings.warn("kernel_options are ignored: backend='auto' chose the reference interpreter for "
                  "these tensors (generated kernels run with CUDA tensors, or with "
                  "backend='triton' under TRITON_INTERPRET=1)", stacklevel=4)
    return None


def _check_lse(pattern: "Pattern", return_lse: bool) -> None:
    if return_lse and pattern.ir.normalizer != "softmax":
        raise ValueError(f"return_lse=True needs the softmax normalizer; `{pattern.name}` uses "
                         f"{pattern.ir.normalizer}")


@torch.compiler.assume_constant_result
def _static_plan(pattern: Pattern, ranks, dtypes, devices, scalars, tensor_metas, scale,
                 backend, return_lse, kernel_options):
    """The plan of a traced call from what does not change with lengths; under torch.compile
    this runs once at trace time and its result is a constant, so the traced graph is one
    custom op and lengths stay dynamic."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    for name, rank, dtype in zip("qkv", ranks, dtypes):
        if rank != 4:
            raise ValueError(f"`{name}` must have 4 dimensions [batch, heads, length, head_dim]")
        if dtype not in FLOAT_DTYPES or dtype != dtypes[0]:
            raise ValueError(f"`q`, `k` and `v` must have one float dtype, got {dtypes}")
    if len(set(devices)) != 1:
        raise ValueError(f"`q`, `k` and `v` must be on one device, got {', '.join(devices)}")
    for name, (rank, dtype, device) in tensor_metas:
        if device != devices[0]:
            raise ValueError(f"tensor argument `{name}` is on {device}, but q is on {devices[0]}")
    arguments = dict(scalars)
    arguments.update({name: None for name, _ in tensor_metas})
    params = bind_params(pattern.ir, arguments)
    scale = None if scale is None else float(scale)  # None: the op takes 1/sqrt(head_dim)
    _check_lse(pattern, return_lse)
    requested = backend
    if backend == "auto":
        backend = pattern._auto_backend(torch.device(devices[0]))
    options = _options_for(KernelOptions.of(_thawed(kernel_options)), requested, backend)
    if backend == "triton":
        from .dispatch import check_backend
        check_backend(torch.device(devices[0]), dtypes[0])
    track(pattern)
    ints, floats = pack_params(pattern.ir, params)
    return ints, floats, scale, backend, options.text if options is not None else ""
