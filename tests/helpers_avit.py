"""Helpers of the A-ViT tests: an independent reference of the official A-ViT forward and losses.

Nothing here imports vitadapt's model code. The reference is written from shared/specs/avit_adavit.md §1.2-1.4
and follows the official computation literally: halted tokens stay in the tensor, their rows are zeroed
outside autograd (`.data`, done here as x - (x * halted).detach()), norms are masked, halted keys get a
-1000 additive bias, and every row (halted ones too) feeds the per-block halting score of the prior.

`synthetic_golden` writes a golden file in the layout of shared/golden/avit/golden_dev.pt (the keys
vitadapt.parity.check_avit reads) from this reference, for settings the shared harness did not record.
"""

import math
import os
from pathlib import Path
from typing import Dict, Optional, Sequence

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


def ref_forward(config: dict, sd: Dict[str, torch.Tensor], images: torch.Tensor, labels=None,
                detach_halted_scores: bool = False) -> dict:
    """The official forward (act_mode 4) and, with labels, the official train losses (hard-label CE).

    config: {"num_heads", "patch_size", "gate_scale", "gate_center", "ponder", "alpha"}. The state_dict tensors
    may require grad; the returned losses are differentiable with respect to them.

    Besides the logits and losses it returns, per block l: `masks` [B, L, N] (1: the token enters block l),
    `h` [B, L, N] (raw halting scores of every row, halted ones included) and `margin`, the smallest distance
    |c - (1 - eps)| of a running token's cumulative score at a halting decision (how far float noise is from
    flipping a decision).

    detach_halted_scores: a deliberately WRONG variant for the tests' own check: the prior reads the halted rows'
    scores without their gradient (what an implementation that drops the halted tokens' outputs would compute)."""
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
    layer_scores, active, masks, hs = [], [], [], []
    margin = float("inf")
    out = x
    for i in range(depth):
        p = f"blocks.{i}"
        m = mask.unsqueeze(-1)
        out = out - (out * (1 - m)).detach()  # out.data *= mask: zero values, gradient unchanged
        active.append(mask.sum(dim=1))
        masks.append(mask)
        a_in = _ln(out * m, sd, p + ".norm1") * m
        qkv = _lin(a_in, sd, p + ".attn.qkv").reshape(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q @ k.transpose(-2, -1)) * (c // heads) ** -0.5 + ((1 - mask) * MASK_BIAS)[:, None, None, :]
        y = out + _lin((attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, c), sd, p + ".attn.proj")
        hidden = F.gelu(_lin(_ln(y * m, sd, p + ".norm2") * m, sd, p + ".mlp.fc1"))
        y = y + _lin(hidden, sd, p + ".mlp.fc2")
        h = torch.sigmoid(y[:, :, 0] * scale_g - center_g)
        hs.append(h)
        h_score = h * mask + (h * (1 - mask)).detach() if detach_halted_scores else h
        layer_scores.append(torch.mean(h_score[1:]))  # the official batch slice
        out = y
        h_used = torch.ones(b, n) if i == depth - 1 else h
        cum = cum + h_used
        if i < depth - 1 and bool(mask.any()):
            margin = min(margin, (cum.detach() - (1 - EPS)).abs()[mask > 0].min().item())
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
           "layer_scores": torch.stack(layer_scores), "output_post_norm": feats,
           "masks": torch.stack(masks, dim=1), "h": torch.stack(hs, dim=1), "margin": margin}
    if labels is not None:
        res["ce"] = F.cross_entropy(logits, labels)
        res["ponder"] = rho.mean() * config["ponder"]
        q = torch.stack(layer_scores)
        q = (q / q.sum()).clamp(0.01, 0.99)
        res["prior"] = config["alpha"] * F.kl_div(q.log(), official_target(depth), reduction="batchmean")
        res["total"] = res["ce"] + res["ponder"] + (res["prior"] if res["prior"].item() > 0 else 0)
    return res


def corrected_prior(h: torch.Tensor, masks: torch.Tensor, weight: float, target_depth: int) -> torch.Tensor:
    """The corrected prior (AVIT.OFFICIAL_PRIOR False), written out from its definition: per-block score = the sum
    of h over the patch tokens that ran the block, / (B * (N0 - 1)); target N(arange(L); target_depth, 1)
    normalised to sum 1; KL 'batchmean' on the 1-D scores (/ L)."""
    b, depth, n = h.shape
    scores = (h * masks)[:, :, 1:].sum(dim=(0, 2)) / (b * (n - 1))
    pdf = torch.tensor([math.exp(-0.5 * (i - target_depth) ** 2) for i in range(depth)], dtype=torch.float64)
    target = (pdf / pdf.sum()).float()
    q = (scores / scores.sum()).clamp(0.01, 0.99)
    return weight * (target * (target.log() - q.log())).sum() / depth


# ----------------------------------------------------------------------------------------------- synthetic goldens
def random_state_dict(img_size: int = 64, patch_size: int = 16, embed_dim: int = 48, depth: int = 12,
                      num_heads: int = 3, num_classes: int = 10, mlp_ratio: float = 4.0, seed: int = 0,
                      patch_scale: float = 3.0, drift: float = 0.35, bias_std: float = 0.0) -> Dict[str, torch.Tensor]:
    """A random official-layout (DeiT key names) A-ViT state_dict, initialised as the official init_weights does
    (trunc_normal(.02) linears / pos / cls, zero linear biases, unit LayerNorms, default conv init), then the
    golden README's perturbation that spreads the halting depths: patch_embed.proj.weight[0] *= patch_scale and
    blocks[i].mlp.fc2.bias[0] += drift. bias_std > 0 also draws the linear biases and LayerNorm affines at random
    (a non-zero qkv bias gives halted tokens a non-trivial query)."""
    g = torch.Generator().manual_seed(seed)

    def tn(*shape, std=0.02):
        return (torch.randn(*shape, generator=g) * std).clamp(-2 * std, 2 * std)

    def bias(*shape):
        return torch.randn(*shape, generator=g) * bias_std if bias_std else torch.zeros(*shape)

    def affine(d):
        if not bias_std:
            return torch.ones(d), torch.zeros(d)
        return 1 + 5 * bias_std * torch.randn(d, generator=g), torch.randn(d, generator=g) * bias_std

    c, hidden, n = embed_dim, int(embed_dim * mlp_ratio), (img_size // patch_size) ** 2 + 1
    fan_in = 3 * patch_size * patch_size
    bound = 1 / math.sqrt(fan_in)
    sd = {"cls_token": tn(1, 1, c), "pos_embed": tn(1, n, c),
          "patch_embed.proj.weight": (torch.rand(c, 3, patch_size, patch_size, generator=g) * 2 - 1) * bound,
          "patch_embed.proj.bias": (torch.rand(c, generator=g) * 2 - 1) * bound}
    sd["patch_embed.proj.weight"][0] *= patch_scale
    for i in range(depth):
        p = f"blocks.{i}"
        sd[p + ".norm1.weight"], sd[p + ".norm1.bias"] = affine(c)
        sd[p + ".attn.qkv.weight"], sd[p + ".attn.qkv.bias"] = tn(3 * c, c), bias(3 * c)
        sd[p + ".attn.proj.weight"], sd[p + ".attn.proj.bias"] = tn(c, c), bias(c)
        sd[p + ".norm2.weight"], sd[p + ".norm2.bias"] = affine(c)
        sd[p + ".mlp.fc1.weight"], sd[p + ".mlp.fc1.bias"] = tn(hidden, c), bias(hidden)
        sd[p + ".mlp.fc2.weight"], sd[p + ".mlp.fc2.bias"] = tn(c, hidden), bias(c)
        sd[p + ".mlp.fc2.bias"][0] += drift
    sd["norm.weight"], sd["norm.bias"] = affine(c)
    sd["head.weight"], sd["head.bias"] = tn(num_classes, c), bias(num_classes)
    return sd


def golden_config(img_size: int = 64, patch_size: int = 16, embed_dim: int = 48, depth: int = 12, num_heads: int = 3,
                  num_classes: int = 10, gate_scale: float = 10.0, gate_center: float = 30.0, ponder: float = 5e-4,
                  alpha: float = 1e-3) -> dict:
    """The `config` entry of a golden file (the official constructor arguments, args and hard-coded constants)."""
    constructor = {"img_size": img_size, "patch_size": patch_size, "in_chans": 3, "num_classes": num_classes,
                   "embed_dim": embed_dim, "depth": depth, "num_heads": num_heads, "mlp_ratio": 4.0, "qkv_bias": True,
                   "representation_size": None, "distilled": False, "drop_rate": 0.0, "attn_drop_rate": 0.0,
                   "drop_path_rate": 0.0, "weight_init": "", "norm_eps": 1e-6}
    args = {"act_mode": 4, "gate_scale": float(gate_scale), "gate_center": float(gate_center),
            "ponder_token_scale": float(ponder), "distr_prior_alpha": float(alpha)}
    return {"split": "synthetic (tests/helpers_avit.py)", "constructor": constructor, "args": args,
            "hardcoded": {"eps": EPS, "halting_threshold": 1 - EPS, "masked_softmax_bias": MASK_BIAS}}


def ref_config(config: dict) -> dict:
    """ref_forward's config from a golden `config` entry."""
    ctor, args = config["constructor"], config["args"]
    return {"num_heads": ctor["num_heads"], "patch_size": ctor["patch_size"], "gate_scale": args["gate_scale"],
            "gate_center": args["gate_center"], "ponder": args["ponder_token_scale"], "alpha": args["distr_prior_alpha"]}


def golden_from_reference(config: dict, sd: Dict[str, torch.Tensor], images: torch.Tensor, labels: torch.Tensor,
                          detach_halted_scores: bool = False) -> dict:
    """Every key vitadapt.parity.check_avit reads, computed by ref_forward (gradients by autograd through it).
    grads[loss] holds the parameters the loss reaches, grads[loss + '_none'] those it does not (None gradient)."""
    cfg = ref_config(config)
    with torch.no_grad():
        ev = ref_forward(cfg, sd, images)
    params = {k: v.detach().clone().requires_grad_(True) for k, v in sd.items()}
    tr = ref_forward(cfg, params, images, labels, detach_halted_scores=detach_halted_scores)
    names = list(params)
    grads = {}
    losses = {"total": tr["total"], "ponder": tr["ponder"], "distr": tr["prior"]}
    for name, loss in losses.items():
        got = torch.autograd.grad(loss, [params[k] for k in names], allow_unused=True, retain_graph=True)
        grads[name] = {k: gr.detach() for k, gr in zip(names, got) if gr is not None}
        grads[name + "_none"] = sorted(k for k, gr in zip(names, got) if gr is None)
    depth = ev["masks"].shape[1]
    train = {"logits_train": tr["logits"].detach(), "base_ce": tr["ce"].detach(),
             "rho_token_mean": tr["rho"].mean().detach(), "ponder_loss": tr["ponder"].detach(),
             "halting_score_layer": tr["layer_scores"].detach(), "distr_prior_loss": tr["prior"].detach(),
             "distr_prior_loss_added": bool(tr["prior"].item() > 0), "total_loss": tr["total"].detach(),
             "counter_token_train": tr["counter"], "rho_token_train": tr["rho"].detach()}
    return {"config": config, "state_dict": {k: v.clone() for k, v in sd.items()}, "input": images, "labels": labels,
            "logits": ev["logits"], "output_post_norm": ev["output_post_norm"], "counter_token": ev["counter"],
            "rho_token": ev["rho"], "mask_in": ev["masks"], "active_tokens_per_layer": ev["active"],
            "h_raw": ev["h"], "distr_target": official_target(depth), "decision_margin_min": ev["margin"],
            "train": train, "grads": grads}


def synthetic_golden(batch: int = 4, img_size: int = 64, embed_dim: int = 48, num_heads: int = 3,
                     gate_scale: float = 10.0, gate_center: float = 30.0, ponder: float = 5e-4, alpha: float = 1e-3,
                     patch_scale: float = 3.0, drift: float = 0.35, model_seed: int = 0, input_seed: int = 123,
                     bias_std: float = 0.0, labels: Optional[Sequence[int]] = None, patch_size: int = 16,
                     num_classes: int = 10, detach_halted_scores: bool = False) -> dict:
    """A golden file as the official A-ViT harness would write it (golden/avit/README.md layout, depth 12): random
    official-layout weights with the README's perturbation, torch.manual_seed(input_seed) input, the reference's
    outputs, losses and gradients."""
    config = golden_config(img_size, patch_size, embed_dim, 12, num_heads, num_classes, gate_scale, gate_center,
                           ponder, alpha)
    sd = random_state_dict(img_size, patch_size, embed_dim, 12, num_heads, num_classes, seed=model_seed,
                           patch_scale=patch_scale, drift=drift, bias_std=bias_std)
    images = torch.randn(batch, 3, img_size, img_size, generator=torch.Generator().manual_seed(input_seed))
    if labels is None:
        labels = [(3 * i + 1) % num_classes for i in range(batch)]
    golden = golden_from_reference(config, sd, images, torch.tensor(list(labels)), detach_halted_scores)
    golden["config"].update(seeds={"model": model_seed, "input": input_seed},
                            perturbation={"patch_embed_row0_scale": patch_scale, "fc2_bias0_drift": drift,
                                          "bias_std": bias_std})
    return golden


def depth_histogram(golden: dict):
    """How many tokens have each depth 0..12 (the README's histogram)."""
    return torch.bincount(golden["counter_token"].long().flatten(), minlength=13).tolist()


# ----------------------------------------------------------------------------------------------- distributed job
def distributed_halting_job(cfg, more_cfgs=()):
    """In every process (vitadapt.engine.launch_job): trains per cfg, then per each of more_cfgs, in the same
    process group; after each run saves this rank's final parameters to <OUTPUT_DIR>/rank{r}.pt."""
    import torch.distributed as dist

    from vitadapt.engine import train

    rank = dist.get_rank() if dist.is_initialized() else 0
    for c in (cfg,) + tuple(more_cfgs):
        model = train(c)
        torch.save(model.state_dict(), os.path.join(c.OUTPUT_DIR, f"rank{rank}.pt"))
