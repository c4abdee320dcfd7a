"""`gpt`: a small causal transformer over characters (model.name=gpt with data.dataset=text).

Token and learned position embeddings, `depth` pre-norm blocks (causal multi-head self-attention,
then a GELU MLP of 4 x width), a final LayerNorm and a linear head over the vocabulary, as in
GPT-2 and nanoGPT, without dropout (so that torch.func vectorizes the workers exactly). The
forward returns logits shaped (B, V, T), classes second, which is what F.cross_entropy expects
for targets (B, T): the harness's loss, argmax(1) and accuracy work on tokens unchanged.
Attention is written out (matmul, causal mask, softmax) rather than calling a fused kernel: every
rank computes it with the same kernels, and vmap has rules for each step.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn


class CausalSelfAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2) for t in (q, k, v))
        att = (q @ k.transpose(-2, -1)) / math.sqrt(C // self.heads)
        future = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)
        att = att.masked_fill(future, float("-inf")).softmax(dim=-1)
        return self.proj((att @ v).transpose(1, 2).reshape(B, T, C))


class Block(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(width), CausalSelfAttention(width, heads)
        self.ln2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, vocab: int, block_size: int, width: int = 128, depth: int = 2, heads: int = 4):
        super().__init__()
        self.block_size = block_size
        self.tokens, self.positions = nn.Embedding(vocab, width), nn.Embedding(block_size, width)
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(depth))
        self.ln = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab)
        for name, p in self.named_parameters():   # GPT-2's initialisation
            if p.dim() > 1:
                nn.init.normal_(p, std=0.02)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, idx):
        idx = idx.long()        # the harness's dtype-free probes pass zeros as floats
        T = idx.shape[1]
        x = self.tokens(idx) + self.positions(torch.arange(T, device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x)).transpose(1, 2)     # (B, V, T)
