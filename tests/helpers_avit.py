"""Helpers of the A-ViT tests: an independent reference of the official A-ViT forward and losses.

Nothing here imports vitadapt's model code. The reference is written from shared/specs/avit_adavit.md §1.2-1.4
and follows the official computation literally: halted tokens stay in the tensor, their rows are zeroed
outside autograd (`.data`, done here as x - (x * halted).detach()), norms are masked, halted keys get a
-1000 additive bias, and every row (halted ones too) feeds the per-block halting score of the prior.
"""

import math
import os
from pathlib import Path
from typing import Dict

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
GOLDEN_ROOT = Path(os.environ.get("VITADAPT_GOLDEN_DIR") or (REPO.parent / "shared" / "golden"))
GOLDEN_DEV = GOLDEN_ROOT / "avit" / "golden_dev.pt"

EPS = 0.01
MASK_BIAS = -1000.0


def _ln(x, sd, p):
    return F.layer_norm(x, x.shape[-1:], sd[p + ".weight"], sd[p + ".bias"], eps=1e-6)


def _lin(x, sd, p):
    return F.linear(x, sd[p + ".weight"], sd.get(p + ".bias"))


def official_target(depth: int = 12, target_depth: int = 8, buffer: float = 0.02) -> torch.Tensor:
    """get_distribution_target(standardized=True): a unit Gaussian pdf, first `target_depth` entries sum 1-buffer."""
    pdf = [math.exp(-0.5 * (i - target_depth) ** 2) / math.sqrt(2 * math.pi) for i in range(depth)]
    scale = (1 - buffer) / sum(pdf[:target_depth])
    return torch.tensor([p * scale for p in pdf], dtype=torch.float32)


def ref_forward(config: dict, sd: Dict[str, torch.Tensor], images: torch.Tensor, labels=None) -> dict:
    """The official forward (act_mode 4) and, with labels, the official train losses (hard-label CE).

    config: {"num_heads", "patch_size", "gate_scale", "gate_center", "ponder", "alpha"}. The state_dict tensors
    may require grad; the returned losses are differentiable with respect to them."""
    heads, scale_g, center_g = config["num_heads"], config["gate_scale"], config["gate_center"]
    x = F.conv2d(images, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=config["patch_size"])
    x = x.flatten(2).transpose(1, 2)
    b, _, c = x.shape
    x = torch.cat([sd["cls_token"].expand(b, -1, -1), x], dim=1) + sd["pos_embed"]
    n = x.shape[1]
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    cum = torch.zeros(b, n)
    rem = torch.ones(b, n)
    mask = torch.ones(b, n)
    rho = torch.zeros(b, n)
    counter = torch.ones(b, n)
    output = torch.zeros(b, n, c)
    layer_scores, active = [], []
    out = x
    for i in range(depth):
        p = f"blocks.{i}"
        m = mask.unsqueeze(-1)
        out = out - (out * (1 - m)).detach()  # out.data *= mask: zero values, gradient unchanged
        active.append(mask.sum(dim=1))
        a_in = _ln(out * m, sd, p + ".norm1") * m
        qkv = _lin(a_in, sd, p + ".attn.qkv").reshape(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q @ k.transpose(-2, -1)) * (c // heads) ** -0.5 + ((1 - mask) * MASK_BIAS)[:, None, None, :]
        y = out + _lin((attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, c), sd, p + ".attn.proj")
        hidden = F.gelu(_lin(_ln(y * m, sd, p + ".norm2") * m, sd, p + ".mlp.fc1"))
        y = y + _lin(hidden, sd, p + ".mlp.fc2")
        h = torch.sigmoid(y[:, :, 0] * scale_g - center_g)
        layer_scores.append(torch.mean(h[1:]))  # the official batch slice
        out = y
        h_used = torch.ones(b, n) if i == depth - 1 else h
        cum = cum + h_used
        rho = rho + mask
        reached = (cum > 1 - EPS).float() * mask
        not_reached = (cum < 1 - EPS).float()
        contribution = y * m * (rem * reached).unsqueeze(-1) + y * m * (h_used * not_reached).unsqueeze(-1)
        rho = rho + rem * reached
        rem = rem - not_reached * h_used
        counter = counter + not_reached
        mask = (cum < 1 - EPS).float()
        output = output + contribution
    feats = _ln(output, sd, "norm")
    logits = _lin(feats[:, 0], sd, "head")
    res = {"logits": logits, "counter": counter, "rho": rho, "active": torch.stack(active, dim=1),
           "layer_scores": torch.stack(layer_scores), "output_post_norm": feats}
    if labels is not None:
        res["ce"] = F.cross_entropy(logits, labels)
        res["ponder"] = rho.mean() * config["ponder"]
        q = torch.stack(layer_scores)
        q = (q / q.sum()).clamp(0.01, 0.99)
        res["prior"] = config["alpha"] * F.kl_div(q.log(), official_target(depth), reduction="batchmean")
        res["total"] = res["ce"] + res["ponder"] + (res["prior"] if res["prior"].item() > 0 else 0)
    return res
