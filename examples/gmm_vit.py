"""Train a small vision transformer whose attention is attnc's `gaussian_mixture` pattern.

Each head multiplies its logits by a learnable mixture of Gaussians of the 2-D patch distance
(GMM-ViT). The data set is generated here (no download): 16×16 images holding one noisy bar —
horizontal, vertical, diagonal or anti-diagonal — at a random place; the class is the
orientation, a local spatial feature that the Gaussian prior helps attention find.

    python examples/gmm_vit.py            # CPU: about a minute; a GPU is used when present
    python examples/gmm_vit.py --epochs 8 --train 4000

It prints the loss and accuracy per epoch and how the learned σ and α moved.
"""
from __future__ import annotations

import argparse
import time

import torch
from torch import nn

import attnc
from attnc.nn import PatternAttention

IMAGE, PATCH = 16, 2
GRID = IMAGE // PATCH  # 8×8 patches = 64 tokens


def make_bars(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """n images [n, 1, 16, 16] with one bar each, and labels in 0..3 (orientation)."""
    images = 0.3 * torch.randn(n, 1, IMAGE, IMAGE, generator=generator)
    labels = torch.randint(0, 4, (n,), generator=generator)
    length = 7
    for i in range(n):
        r, c = torch.randint(2, IMAGE - 2 - length, (2,), generator=generator).tolist()
        for t in range(length):
            y, x = {0: (r, c + t), 1: (r + t, c), 2: (r + t, c + t), 3: (r + t, c + length - 1 - t)}[int(labels[i])]
            images[i, 0, y, x] += 1.5
    return images, labels


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mixtures: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.attn = PatternAttention(
            attnc.std("gaussian_mixture"), width=GRID, n=mixtures,
            alpha=torch.ones(heads, mixtures),
            sigma=torch.linspace(1.0, 3.0, mixtures).repeat(heads, 1))

    def forward(self, x):
        B, L, D = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        a = self.attn(q.contiguous(), k.contiguous(), v.contiguous())
        x = x + self.out(a.transpose(1, 2).reshape(B, L, D))
        return x + self.mlp(self.norm2(x))


class GmmViT(nn.Module):
    def __init__(self, dim=32, depth=2, heads=4, mixtures=2, classes=4):
        super().__init__()
        self.embed = nn.Conv2d(1, dim, PATCH, PATCH)
        self.blocks = nn.ModuleList(Block(dim, heads, mixtures) for _ in range(depth))
        self.head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, classes))

    def forward(self, images):
        x = self.embed(images).flatten(2).transpose(1, 2)  # [B, 64, dim], no position embedding:
        for blk in self.blocks:                             # positions enter through the GMM prior
            x = blk(x)
        return self.head(x.mean(1))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--train", type=int, default=2000)
    ap.add_argument("--test", type=int, default=500)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(args.seed)
    xtr, ytr = make_bars(args.train, g)
    xte, yte = make_bars(args.test, g)
    xtr, ytr, xte, yte = (t.to(device) for t in (xtr, ytr, xte, yte))
    model = GmmViT().to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = model.blocks[0].attn
    sigma0, alpha0 = first.sigma.detach().clone(), first.alpha.detach().clone()
    print(f"GMM-ViT on {device}: {sum(p.numel() for p in model.parameters())} parameters, "
          f"{args.train} training images")
    losses = []
    for epoch in range(args.epochs):
        start, total, seen = time.perf_counter(), 0.0, 0
        perm = torch.randperm(args.train, device=device)
        model.train()
        for i in range(0, args.train, args.batch):
            idx = perm[i:i + args.batch]
            loss = nn.functional.cross_entropy(model(xtr[idx]), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total, seen = total + loss.item() * len(idx), seen + len(idx)
        model.eval()
        with torch.no_grad():
            acc = (model(xte).argmax(-1) == yte).float().mean().item()
        losses.append(total / seen)
        print(f"epoch {epoch + 1}: loss {losses[-1]:.3f}  test accuracy {acc:.1%}  "
              f"({time.perf_counter() - start:.1f} s)")
    print("block 0, head 0: sigma", [round(x, 3) for x in sigma0[0].tolist()], "->",
          [round(x, 3) for x in first.sigma[0].tolist()])
    print("block 0, head 0: alpha", [round(x, 3) for x in alpha0[0].tolist()], "->",
          [round(x, 3) for x in first.alpha[0].tolist()])
    moved = (first.sigma.detach().cpu() - sigma0.cpu()).abs().max().item()
    print(f"largest change of sigma: {moved:.3f}; loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    return losses, moved


if __name__ == "__main__":
    main()
