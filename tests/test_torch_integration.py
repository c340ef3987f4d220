"""autograd.Function / custom-op wiring, torch.compile without graph breaks, nn.Module."""
import torch

import attnc
from attnc.nn import PatternAttention

ALIBI = ("pattern alibi(cap: float = 5.0):\n    tensor slopes: float[heads]\n"
         "    score = cap * tanh(score / cap)\n    score -= slopes[h] * abs(q - k)\n    mask q >= k\n")


def _qkv(B=1, H=2, L=9, D=4, dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(B, H, L, D, generator=g, dtype=dtype, requires_grad=True) for _ in range(3)]


def test_gradcheck_through_the_custom_op():
    p = attnc.compile(ALIBI)
    q, k, v = _qkv()
    slopes = torch.rand(2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda q, k, v, s: p(q, k, v, slopes=s), (q, k, v, slopes))
    assert torch.autograd.gradcheck(lambda q, k, v, s: p(q, k, v, slopes=s, return_lse=True)[1].sum(),
                                    (q, k, v, slopes))


def test_module_owns_learnable_tensors_and_round_trips_state():
    m = PatternAttention(attnc.compile(ALIBI), cap=3.0, slopes=torch.tensor([0.5, 0.25]))
    assert [n for n, _ in m.named_parameters()] == ["slopes"]
    q, k, v = _qkv(dtype=torch.float32)
    m(q, k, v).pow(2).sum().backward()
    assert m.slopes.grad is not None and m.slopes.grad.abs().sum() > 0
    m2 = PatternAttention(attnc.compile(ALIBI), cap=3.0, slopes=torch.zeros(2))
    m2.load_state_dict(m.state_dict())
    torch.testing.assert_close(m2(q, k, v), m(q, k, v))
    frozen = PatternAttention(attnc.compile(ALIBI), frozen=("slopes",), slopes=torch.ones(2))
    assert list(frozen.parameters()) == [] and "slopes" in frozen.state_dict()


def test_torch_compile_fullgraph_traces_without_graph_break():
    p = attnc.compile(ALIBI)

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(8, 8)
            self.attn = PatternAttention(p, slopes=torch.tensor([0.5, 0.25]))

        def forward(self, x):
            B, L, _ = x.shape
            qkv = self.proj(x).view(B, L, 2, 4).transpose(1, 2)
            return self.attn(qkv, qkv, qkv).transpose(1, 2).reshape(B, L, 8)

    model = Block()
    x = torch.randn(2, 7, 8)
    eager = model(x)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    torch.testing.assert_close(out, eager)
    out.sum().backward()
    assert model.attn.slopes.grad is not None


def test_gmm_vit_example_trains():
    import importlib.util
    import os
    path = os.path.join(os.path.dirname(__file__), "..", "examples", "gmm_vit.py")
    spec = importlib.util.spec_from_file_location("gmm_vit", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    losses, moved = mod.main(["--epochs", "2", "--train", "192", "--test", "32", "--batch", "32"])
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0] and moved > 0
