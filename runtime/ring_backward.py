"""The backward of a sharded call (runtime/ring.py), one (query chunk, key chunk) pair at a
time against the merged rows the forward saved."""
from __future__ import annotations

import torch

from .autograd import scale_for
from .backward import triton_attention_backward
from .policy import KernelOptions
from .ring_patterns import Calls, placed
from .ring_transfers import drain, post, stream


class Gradients:
    """The backward of one rank's part, pair by pair; the gradients of q, of this rank's k and
    v, and of the float tensor arguments are summed over the pairs.

    With the generated kernels (`_flash`), a pair's backward kernels run against the merged row
    — its log-sum-exp L and output — which is exactly that pair's share of the row's gradient.
    The reference interpreter's backward takes no outside L, so there each pair's partial (o,
    lse) is recomputed and differentiated against the merged row: its output weighs
    w = exp(lse − L), so dLoss/do = w·dOut and dLoss/dlse = w·(rowsum(dOut·(o − out)) + dLoss/dL).
    A row's sink is always the second kind (the whole pattern on no keys)."""

    def __init__(self, calls: Calls, q, k, v, out, lse, grad_out, grad_lse, leaves, names):
        self.calls, self.plan, self.rank = calls, calls.plan, calls.rank
        self.q, self.out, self.lse, self.grad_out = q.detach(), out, lse, grad_out
        self.grad_lse = grad_lse if calls.softmax else None
        self.leaves = leaves
        self.leaf_names = names
        self.scale = scale_for(calls.arguments.get("scale"), q)
        backend = calls.arguments.get("backend", "auto")
        if backend == "auto":
            backend = calls.part._auto_backend(q.device)
        self.flash = backend == "triton"
        options = KernelOptions.of(calls.arguments.get("kernel_options"))
        self.options = options.text if options is not None else ""
        self.wants = (q.requires_grad, k.requires_grad, v.requires_grad)
        self.dq = torch.zeros_like(q) if q.requires_grad else None
        self.dk = torch.zeros_like(k) if k.requires_grad else None
        self.dv = torch.zeros_like(v) if v.requires_grad else None
        self.tensors = [torch.zeros_like(t) if t.requires_grad else None for t in leaves]
        wide = torch.promote_types(out.dtype, torch.float32)
        self.row_dot = (grad_out.to(wide) * out.to(wide)).sum(-1)

    def _rows(self, t, qc):
        return t[:, :, self.plan.local(self.rank, qc)]

    def _backprop(self, qc, outputs, grads, inputs) -> list:
        """d(outputs·grads) for `inputs` (zeros for those not reached); accumulates dq of qc
        and the float tensors' gradients, returns those of the other inputs."""
        qq = inputs[0]
        wanted = [t for t in (*inputs, *self.leaves) if t.requires_grad]
        pairs = [(o, g) for o, g in zip(outputs, grads) if o.requires_grad]
        got = torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs],
                                  allow_unused=True) if pairs and wanted else []
        by = {id(t): g for t, g in zip(wanted, got)}
        if self.dq is not None and by.get(id(qq)) is not None:
            self._rows(self.dq, qc).add_(by[id(qq)])
        for acc, t in zip(self.tensors, self.leaves):
            if acc is not None and by.get(id(t)) is not None:
                acc.add_(by[id(t)])
        return [by.get(id(t)) for t in inputs[1:]]

    def _shares(self, qc, o, lse_pair):
        """The output gradients of one partial (o, lse) of query chunk qc."""
        d_out = self._rows(self.grad_out, qc)
        if not self.calls.softmax:
            return [d_out]
        big = self._rows(self.lse, qc)
        finite = torch.isfinite(big)
        w = torch.where(finite, torch.exp(lse_pair.detach() - torch.where(finite, big, 0)), 0)
        wide = w.dtype
        into = (d_out.to(wide) * o.detach().to(wide)).sum(-1) - self._rows(self.row_dot, qc)
        if self.grad_lse is not None:
            into = into + torch.where(finite, self._rows(self.grad_lse, qc), 0).to(wide)
        return [(w[..., None] * d_out.to(wide)).to(o.dtype), w * into]

    def pairs(self, kc: int, kk, vv, home: bool):
        """Recompute and differentiate every pair of key chunk kc; returns its (dk, dv), added
        into this rank's own when `home`."""
        kk = kk.detach().requires_grad_(self.wants[1])
        vv = vv.detach().requires_grad_(self.wants[2])
        dk, dv = torch.zeros_like(kk), torch.zeros_like(vv)
        for qc in self.plan.held[self.rank]:
            if (qc, kc) not in self.plan.pairs:
                continue
            if self.flash:
                gk, gv = self._flash(qc, kc, kk.detach(), vv.detach())
                dk += gk
                dv += gv
                continue
            qq = self._rows(self.q, qc).detach().requires_grad_(self.wants[0])
            with torch.enable_grad():
                got = self.calls.pair(qq, qc, kc, kk, vv)
            outputs = list(got) if self.calls.softmax else [got]
            grads = self._shares(qc, outputs[0], outputs[1] if self.calls.softmax else None)
            gk, gv = self._backprop(qc, outputs, grads, [qq, kk, vv])
            if gk is not None:
                dk += gk
            if gv is not None:
                dv += gv
        if home:
            part = self.plan.local(self.rank, kc)
            if self.dk is not None:
                self.dk[:, :, part] += dk
            if self.dv is not None:
                self.dv[:, :, part] += dv
        return dk, dv

    def _flash(self, qc: int, kc: int, kk, vv):
        """The generated backward kernels of one pair, run against the merged row (its
        log-sum-exp and output, as FlashAttention's backward runs against a block's): no
        recompute of the pair's forward. Returns the pair's (dk, dv)."""
        calls = self.calls
        rows = self._rows(self.q, qc)
        bound = placed(calls.part, rows, kk, qc, kc, self.plan.chunk,
                       {**calls.arguments, **calls.thresholds})
        wrt = [n for n, t in zip(self.leaf_names, self.leaves) if t.requires_grad]
        grad_lse = None if self.grad_lse is None else self._rows(self.grad_lse, qc)
        dq, dk, dv, grads = triton_attention_backward(
            calls.part.ir, rows, kk, vv, self._rows(self.out, qc), self._rows(self.lse, qc),
            self._rows(self.grad_out, qc).contiguous(), grad_lse, bound, self.scale, wrt,
            options=self.options)
        if self.dq is not None:
            self._rows(self.dq, qc).add_(dq)
        for acc, name in zip(self.tensors, self.leaf_names):
            if acc is not None and name in grads:
                acc.add_(grads[name])
        return dk, dv

    def sink(self, qc: int, k, v) -> None:
        """Differentiate query chunk qc's sink partial (its output is 0: only the LSE counts)."""
        qq = self._rows(self.q, qc).detach().requires_grad_(self.wants[0])
        with torch.enable_grad():
            o, lse = self.calls.sink(qq, qc, k, v)
        self._backprop(qc, [lse], self._shares(qc, o, lse)[1:], [qq])

    def take_home(self, received: list[dict]) -> None:
        """Add the gradients of this rank's chunks that came back from the ranks that used them."""
        for got in received:
            for (_, c, name), g in got.items():
                acc = self.dk if name == "k" else self.dv
                if acc is not None:
                    acc[:, :, self.plan.local(self.rank, c)] += g


def pass_back(group, plan, rank: int, k, v, grads: Gradients, kv_grad: bool) -> None:
    """The backward's pairs and transfers, in the order every rank posts them
    (runtime/ring_transfers.py): this rank's key chunks first; then the others', as key/value
    round d arrives (round d + 1 already posted), each round's dK/dV posted home right after
    its pairs and this rank's own gradients taken back one round later."""
    for c in plan.held[rank]:
        grads.pairs(c, k[:, :, plan.local(rank, c)], v[:, :, plan.local(rank, c)], home=True)
    pending = []
    for d, got in stream(group, plan.kv_rounds(rank, {"k": k, "v": v})):
        sent = {}
        for c, kk, vv in plan.arrived(got):
            dk, dv = grads.pairs(c, kk, vv, home=False)
            if kv_grad:
                sent[(c, "k")], sent[(c, "v")] = dk, dv
        if kv_grad:  # received chunks' gradients go home; this rank's come back
            pending.append(post(group, plan.grad_round(rank, d, sent, {"k": k, "v": v})))
        grads.take_home(drain(pending[:-1]))
        pending = pending[-1:]
    grads.take_home(drain(pending))
