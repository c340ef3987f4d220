"""Symbolic derivatives of score statements vs torch autograd through the reference evaluator."""
import pytest
import torch

import attnc
from attnc.lowering.derivative import differentiable_tensors, pattern_grads
from attnc.lowering.ir import Node
from attnc.lowering.simplify import substitute
from attnc.lowering.evaluate import Env, Evaluator

B, H, L = 2, 3, 11
_G = Node("loopvar", "float", (), "$g")  # the adjoint seed, fed through the evaluator's volatile slots

PATTERNS = {
    "softcap_alibi": ("pattern p(cap: float = 3.0):\n    tensor slopes: float[heads]\n"
                      "    score = cap * tanh(score / cap)\n    score -= slopes[h] * abs(q - k)\n",
                      {"slopes": (H,)}),
    "gaussian_mixture": ("pattern p(side: int = 4, n: int = 3):\n    tensor alpha: float[heads, n]\n"
                         "    tensor sigma: float[heads, n]\n    let dy = q // side - k // side\n"
                         "    let dx = q % side - k % side\n"
                         "    score *= sum(alpha[h, i] * exp(-(dx * dx + dy * dy) / (2 * sigma[h, i] ** 2)) "
                         "for i in range(n))\n", {"alpha": (H, 3), "sigma": (H, 3)}),
    "table": ("pattern p:\n    tensor table: float[heads, 9]\n    score += table[h, clamp(q - k, -4, 4) + 4]\n",
              {"table": (H, 9)}),
    "temperature_minmax": ("pattern p(t: float = 0.7):\n    score /= t\n    score = max(score, -2.0) + min(score, 1.0)\n"
                           "    score = score if q > k else sigmoid(score) * 2.0\n", {}),
    "sum_reads_score": ("pattern p:\n    tensor w: float[3]\n    score = sum(w[i] * score ** 2 + exp(-abs(score)) for i in range(3))\n"
                        "    score = log(1.0 + softplus(score)) + sqrt(1.0 + score * score)\n", {"w": (3,)}),
}


def _env(p, tensors):
    sizes = {"batch": B, "heads": H, "kv_heads": H, "q_len": L, "k_len": L, "head_dim": 8}
    params = {x.name: x.default for x in p.ir.params}
    return Env(sizes, params, tensors, torch.float64, torch.device("cpu"), 0, L, B, H, L)


@pytest.mark.parametrize("name", sorted(PATTERNS))
def test_symbolic_gradients_match_autograd(name):
    src, shapes = PATTERNS[name]
    p = attnc.compile(src)
    g = torch.Generator().manual_seed(1)
    tensors = {k: (torch.rand(*s, generator=g, dtype=torch.float64) + 0.5).requires_grad_(True)
               for k, s in shapes.items()}
    s0 = torch.randn(B, H, L, L, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(B, H, L, L, generator=g, dtype=torch.float64)

    ev = Evaluator(_env(p, tensors))
    scores = [s0]
    for stmt in p.ir.scores:
        ev.volatile[("score", None)] = scores[-1]
        ev.local = {}
        scores.append(ev.eval(stmt).expand(B, H, L, L))
    (scores[-1] * w).sum().backward()

    detached = {k: t.detach() for k, t in tensors.items()}
    ev = Evaluator(_env(p, detached))
    grads = {k: torch.zeros_like(t) for k, t in detached.items()}
    seed = w
    for i, sg in reversed(list(enumerate(pattern_grads(p.ir)))):
        ev.volatile[("score", None)] = scores[i].detach()
        ev.volatile[("loopvar", "$g")] = seed
        ev.local = {}
        for lg in sg.loads:
            _scatter(ev, lg, grads)
        ev.local = {}
        seed = ev.eval(substitute(sg.d_score, {("param", "$g"): _G})).expand(B, H, L, L)
    torch.testing.assert_close(seed, s0.grad)
    assert sorted(grads) == differentiable_tensors(p.ir)
    for k in tensors:
        torch.testing.assert_close(grads[k], tensors[k].grad, msg=f"gradient of {k}")


def _scatter(ev, lg, grads, loops=None):
    loops = list(lg.loops) if loops is None else loops
    if loops:
        var, count = loops[0]
        for i in range(int(ev.eval(count))):
            ev.volatile[("loopvar", var)] = torch.tensor(i)
            ev.local = {}
            _scatter(ev, lg, grads, loops[1:])
        return
    adj = ev.eval(substitute(lg.adjoint, {("param", "$g"): _G})).expand(B, H, L, L)
    idx = torch.broadcast_tensors(*[ev.eval(a).expand(B, H, L, L) for a in lg.load.args])
    grads[lg.load.value].index_put_(tuple(idx), adj, accumulate=True)
