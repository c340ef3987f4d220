"""Fuzz cases: what one is (`Case`, saved as JSON by the corpus), how hypothesis draws them
(`cases`, over a `Profile` of sizes, dtypes and tiles), and the tensors a case is called with
(`inputs`)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

import torch
from hypothesis import strategies as st

from ...dsl import ast as A
from ...dsl.diagnostics import SpecError
from ...dsl.printer import print_module
from ...dsl.strategies import DYADIC, fuzz_modules
from ..binding import sizes_for
from ..pattern import Pattern
from ..policy import supported_tiles
from ..samples import random_tensor_arguments
from .outcomes import Rejected, first_line

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
#: the tile shapes a case may take: every one the launch policy gives, on the CPU and on GPUs
SUPPORTED_TILES = supported_tiles()


@dataclass(frozen=True)
class Profile:
    """What `cases()` draws: sizes, dtypes, tiles, pattern depth."""

    max_len: int = 200
    batches: tuple[int, ...] = (1, 2)
    kv_heads: tuple[int, ...] = (1, 2)
    gqa_ratios: tuple[int, ...] = (1, 2, 4)
    head_dims: tuple[int, ...] = (16, 24, 64)
    dtypes: tuple[str, ...] = ("float32", "float16", "bfloat16")
    tiles: tuple[tuple[int, int], ...] = SUPPORTED_TILES
    depth: int = 2
    #: under Triton's interpreter (slow), the most tiles one case may visit (batch x heads x
    #: query tiles x key tiles); a case over it takes the smallest supported tiles that fit
    interpreter_tile_budget: int = 600


#: the long run and the command line
LONG = Profile()
#: CI, cheap properties: full size range, every tile shape
CI_CHEAP = Profile()
#: CI, the kernel property under Triton's interpreter (slow): small lengths and heads, 16x16 tiles
CI_KERNEL = Profile(max_len=64, kv_heads=(1,), head_dims=(16, 24), tiles=((16, 16),))
PROFILES = {"long": LONG, "ci-cheap": CI_CHEAP, "ci-kernel": CI_KERNEL}


@dataclass
class Case:
    """One fuzz input. `tensors` (name -> tensor) is None until drawn from `seed`."""

    source: str
    name: str | None
    batch: int
    heads: int
    kv_heads: int
    q_len: int
    k_len: int
    head_dim: int
    v_dim: int
    dtype: str
    block_m: int
    block_n: int
    seed: int
    params: dict = field(default_factory=dict)
    tensors: dict | None = None
    module: A.Module | None = field(default=None, compare=False, repr=False)  # the generated AST

    def describe(self) -> str:
        return (f"batch={self.batch} heads={self.heads} kv_heads={self.kv_heads} q_len={self.q_len} "
                f"k_len={self.k_len} head_dim={self.head_dim} v_dim={self.v_dim} dtype={self.dtype} "
                f"tiles={self.block_m}x{self.block_n} seed={self.seed} params={self.params}")

    def to_json(self) -> dict:
        d = {k: v for k, v in asdict(replace(self, module=None, tensors=None)).items()
             if k not in ("module", "tensors", "source")}
        d["tensors"] = {n: {"dtype": str(t.dtype).removeprefix("torch."), "values": t.tolist()}
                        for n, t in (self.tensors or {}).items()}
        return d

    @staticmethod
    def from_json(source: str, d: dict) -> "Case":
        fields = {k: v for k, v in d.items() if k in Case.__dataclass_fields__ and k not in ("tensors", "source")}
        tensors = {n: torch.tensor(t["values"], dtype=getattr(torch, t["dtype"]))
                   for n, t in d.get("tensors", {}).items()}
        return Case(source=source, tensors=tensors or None, **fields)


def _draw_param(draw, typ: str, default):
    if typ == "int":
        return draw(st.one_of(st.integers(0, 48), st.integers(-4, -1), st.integers(49, 300))) \
            if default is None or draw(st.booleans()) \
            else default
    if typ == "float":
        return draw(st.sampled_from(DYADIC + (-0.5, -1.0))) if default is None or draw(st.booleans()) \
            else float(default)
    return draw(st.booleans())


def _ast_params(module: A.Module, name: str):
    pat = next(p for p in module.patterns if p.name == name)
    out = []
    for p in pat.params:
        d = p.default
        value = None
        if isinstance(d, A.Num):
            value = d.value
        elif isinstance(d, A.Unary) and isinstance(d.operand, A.Num):
            value = -d.operand.value
        elif isinstance(d, A.Bool):
            value = d.value
        out.append((p.name, p.type, value))
    return out


@st.composite
def cases(draw, profile: Profile = LONG, source: str | None = None, name: str | None = None):
    """Random cases: a generated pattern (or the given `source`/`name`) with random inputs."""
    if source is None:
        module = draw(fuzz_modules(name="fuzzed", depth=profile.depth))
        source, name = print_module(module), "fuzzed"
        params = _ast_params(module, name)
    else:
        module = None
        params = [(p.name, p.type, p.default) for p in compiled_pattern(source, name).ir.params]
    kv = draw(st.sampled_from(profile.kv_heads))
    head_dim = draw(st.sampled_from(profile.head_dims))
    batch, heads = draw(st.sampled_from(profile.batches)), kv * draw(st.sampled_from(profile.gqa_ratios))
    q_len, k_len = draw(st.integers(1, profile.max_len)), draw(st.integers(1, profile.max_len))
    tiles = draw(st.sampled_from(profile.tiles))
    if not torch.cuda.is_available():
        def visits(t):
            return batch * heads * -(-q_len // t[0]) * -(-k_len // t[1])
        if visits(tiles) > profile.interpreter_tile_budget:
            fit = [t for t in profile.tiles if visits(t) <= profile.interpreter_tile_budget]
            tiles = min(fit, key=lambda t: t[0] * t[1]) if fit else max(profile.tiles, key=lambda t: t[0] * t[1])
    return Case(
        source=source, name=name, module=module, batch=batch, heads=heads, kv_heads=kv, q_len=q_len,
        k_len=k_len, head_dim=head_dim, v_dim=draw(st.one_of(st.just(head_dim), st.sampled_from(profile.head_dims))),
        dtype=draw(st.sampled_from(profile.dtypes)), block_m=tiles[0], block_n=tiles[1],
        seed=draw(st.integers(0, 2 ** 16)),
        params={n: _draw_param(draw, typ, default) for n, typ, default in params})


_COMPILED: dict = {}


def compiled_pattern(source: str, name: str | None):
    """The pattern `name` of `source`, compiled once (the most recent few hundred are kept)."""
    key = (source, name)
    if key not in _COMPILED:
        if len(_COMPILED) > 256:
            _COMPILED.clear()
        _COMPILED[key] = Pattern.from_source(source, name, path="fuzz.attn")
    return _COMPILED[key]


def inputs(case: Case, pattern):
    """q, k, v (in the case's dtype) and the arguments (parameters and tensors) for a case."""
    g = torch.Generator().manual_seed(case.seed)
    dtype = DTYPES[case.dtype]
    q = torch.randn(case.batch, case.heads, case.q_len, case.head_dim, generator=g).to(dtype)
    k = torch.randn(case.batch, case.kv_heads, case.k_len, case.head_dim, generator=g).to(dtype)
    v = torch.randn(case.batch, case.kv_heads, case.k_len, case.v_dim, generator=g).to(dtype)
    if case.tensors is None:
        sizes = sizes_for(q.shape, k.shape)
        params = {p.name: case.params.get(p.name, p.default) for p in pattern.ir.params}
        try:
            case.tensors = random_tensor_arguments(pattern.ir, sizes, params, generator=g)
        except (SpecError, ValueError) as e:
            raise Rejected(f"tensor arguments: {first_line(e)}") from None
    return q, k, v, dict(case.params, **case.tensors)
