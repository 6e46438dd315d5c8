"""Helpers of tests/test_evit.py: an independent, slow reference of the official EViT forward, and synthetic goldens.

Nothing here imports vitadapt's model code. The reference is written from /work/shared/specs/evit_dvt.md §1.3-1.5:
explicit per-block loop over the official state_dict keys, full softmax attention, official top-k / fusion.
"""

import copy
import math
import os
from pathlib import Path
from typing import Dict, Optional, Sequence

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
GOLDEN_ROOT = Path(os.environ.get("VITADAPT_GOLDEN_DIR") or (REPO.parent / "shared" / "golden"))
GOLDEN_DEV = GOLDEN_ROOT / "evit" / "golden_dev.pt"
NO_GOLDEN_REASON = (f"no EViT golden files under {GOLDEN_ROOT / 'evit'} (the default is <repo>/../shared/golden; "
                    "set VITADAPT_GOLDEN_DIR to the folder that holds evit/golden_dev.pt)")


def _ln(x, sd, p):
    return F.layer_norm(x, x.shape[-1:], sd[p + ".weight"], sd[p + ".bias"], eps=1e-6)


def _lin(x, sd, p):
    return F.linear(x, sd[p + ".weight"], sd.get(p + ".bias"))


def _size(ctor):
    s = ctor["img_size"]
    return s[0] if isinstance(s, (list, tuple)) else s


def block_rates(ctor) -> list:
    rates = list(ctor["keep_rate"])
    return rates * ctor["depth"] if len(rates) == 1 else rates


@torch.no_grad()
def ref_forward(ctor: dict, sd: Dict[str, torch.Tensor], images: torch.Tensor, keep_rate: Optional[float] = None):
    """The official EViT.forward(images, keep_rate) in eval mode. Returns a dict with logits, idx {block: [B, k]},
    left_tokens (non-CLS tokens after each block), provenance {block: [B, k]} (original patch, -1 fused),
    fused {block: [B, 1, C]}, margin (smallest gap between consecutive sorted CLS-attention values among the top
    k + 1 at any reduction: how robust the kept set and its order are to float noise)."""
    sd = {k: v.double() for k, v in sd.items()}
    x = images.double()
    heads, depth = ctor["num_heads"], ctor["depth"]
    rates = block_rates(ctor)
    x = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=ctor["patch_size"])
    x = x.flatten(2).transpose(1, 2)
    b, n, c = x.shape
    x = torch.cat([sd["cls_token"].expand(b, -1, -1), x], dim=1) + sd["pos_embed"]
    prov = torch.arange(n).expand(b, n)  # original patch of every non-CLS token; -1 fused
    out = {"idx": {}, "left_tokens": [], "provenance": {}, "fused": {}, "margin": float("inf")}
    for i in range(depth):
        p = f"blocks.{i}"
        N = x.shape[1]
        h = _ln(x, sd, p + ".norm1")
        qkv = _lin(h, sd, p + ".attn.qkv").reshape(b, N, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = ((q @ k.transpose(-2, -1)) * (c // heads) ** -0.5).softmax(dim=-1)
        a = _lin((attn @ v).transpose(1, 2).reshape(b, N, c), sd, p + ".attn.proj")
        x = x + a
        static = rates[i]
        rate = static if keep_rate is None else keep_rate
        if static < 1 and rate < 1:
            left = math.ceil(rate * (N - 1))
            if left != N - 1:
                cls_attn = attn[:, :, 0, 1:].mean(dim=1)  # [B, N-1]
                vals, idx = torch.topk(cls_attn, left, dim=1, largest=True, sorted=True)
                full = cls_attn.sort(dim=1, descending=True).values[:, : left + 1]
                out["margin"] = min(out["margin"], (full[:, :-1] - full[:, 1:]).min().item())
                non_cls = x[:, 1:]
                kept = non_cls.gather(1, idx[..., None].expand(-1, -1, c))
                out["idx"][i] = idx
                kept_prov = prov.gather(1, idx)
                out["provenance"][i] = kept_prov
                if ctor["fuse_token"]:
                    fused = torch.zeros(b, 1, c, dtype=x.dtype)
                    for bi in range(b):
                        chosen = set(idx[bi].tolist())
                        for j in range(N - 1):  # the complement, ascending; raw (un-normalised) weights
                            if j not in chosen:
                                fused[bi, 0] += cls_attn[bi, j] * non_cls[bi, j]
                    out["fused"][i] = fused
                    x = torch.cat([x[:, :1], kept, fused], dim=1)
                    prov = torch.cat([kept_prov, torch.full((b, 1), -1)], dim=1)
                else:
                    x = torch.cat([x[:, :1], kept], dim=1)
                    prov = kept_prov
        h = _ln(x, sd, p + ".norm2")
        h = _lin(F.gelu(_lin(h, sd, p + ".mlp.fc1")), sd, p + ".mlp.fc2")
        x = x + h
        out["left_tokens"].append(x.shape[1] - 1)
    x = _ln(x, sd, "norm")
    out["logits"] = _lin(x[:, 0], sd, "head").float()
    out["fused"] = {k: v.float() for k, v in out["fused"].items()}
    return out


def schedule(epoch, it, iters_per_epoch, base, start, shrink_epochs):
    """helpers.adjust_keep_rate (spec §1.5), written out independently."""
    if epoch < start:
        return 1.0
    if epoch >= start + shrink_epochs:
        return base
    total = iters_per_epoch * shrink_epochs
    return base + (1.0 - base) * (math.cos(math.pi * (it - iters_per_epoch * start) / total) + 1) / 2


def variant_ctor(golden: dict, keep: float = 0.7, locations: Sequence[int] = (3, 6, 9), fuse: bool = True,
                 img_size: int = 96) -> dict:
    config = copy.deepcopy(dict(golden["config"]))
    ctor = dict(config["ctor"])
    rates = [1] * ctor["depth"]
    for loc in locations:
        rates[loc] = keep
    ctor.update(keep_rate=tuple(rates), fuse_token=fuse, img_size=(img_size, img_size))
    config["ctor"] = ctor
    return config


def variant_state_dict(golden: dict, config: dict, seed: int = 0) -> dict:
    """golden_dev's weights; a fresh N(0, 0.5^2) pos_embed when the image size changes the number of patches."""
    sd = {k: v.clone() for k, v in golden["state_dict"].items()}
    ctor = config["ctor"]
    n = (_size(ctor) // ctor["patch_size"]) ** 2 + 1
    if sd["pos_embed"].shape[1] != n:
        g = torch.Generator().manual_seed(seed)
        sd["pos_embed"] = 0.5 * torch.randn(1, n, ctor["embed_dim"], generator=g)
    return sd


def synthetic_golden(golden: dict, config: dict, sd: dict, images: torch.Tensor, override: float = 0.85) -> dict:
    """A golden file as the harness would write it (the keys check_evit reads), from the reference."""
    ref = ref_forward(config["ctor"], sd, images)
    over = ref_forward(config["ctor"], sd, images, keep_rate=override)
    one = ref_forward(config["ctor"], sd, images, keep_rate=1.0)
    inter = {"left_tokens": ref["left_tokens"], "idx": ref["idx"], "provenance_idx": ref["provenance"],
             "keep_rate_override": override, "logits_keep_rate_override": over["logits"],
             "left_tokens_keep_rate_override": over["left_tokens"], "logits_keep_rate_1": one["logits"]}
    if config["ctor"]["fuse_token"]:
        inter["fused_token"] = ref["fused"]
    return {"config": config, "state_dict": sd, "input": images, "logits": ref["logits"], "intermediates": inter,
            "schedule": golden["schedule"], "_margin": ref["margin"]}
