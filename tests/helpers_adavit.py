"""Helpers of the AdaViT tests: an independent reference of the official AdaViT forward, losses and FLOPs.

Nothing here imports vitadapt. The reference is written from shared/specs/avit_adavit.md §2 and the semantics
of the official MengLcool/AdaViT code (models/ada_transformer_block.py, ada_t2t_vit.py, losses.py,
block_flops_dict.py), DeiT variant (use_t2t False), and works on the OFFICIAL state_dict layout: separate
blocks.i.attn.{query,key,value}, decision heads blocks.i.{head_select,layer_select}.mlp_head and
blocks.i.attn.token_select.mlp_head, blocks.i.norm_policy, a frozen sinusoid pos_embed.

It follows the official computation literally (masking only):
* per block, in this order: layer_select and head_select from the block input's CLS token (norm_policy: a
  LayerNorm first), then token_select from norm1(x)[:, 1:] inside the attention;
* `_gumbel_sigmoid`: train sigmoid((logit + g1 - g2) / tau), eval sigmoid(logit); hard straight-through
  (y > thr) - y.detach() + y; thresholds 0.5 / 0.5 / 0.6 (token), tau 5;
* heads: q, k, v output channels (weights and biases) of dropped heads zeroed, proj and MLP fc1 input channels
  zeroed (biases kept); ada_head_v2: fc1 output units (bias too) of the dropped heads' channels zeroed instead;
  ada_head_attn (only_head_attn): nothing zeroed, a dropped head's attention is the identity (again after the
  token mask in evaluation only, as the official code);
* tokens: policy = outer(ts, ts) (detached with detach_attn); pre-softmax (and always in eval): logits * policy
  with -inf wherever 1 - policy - I > 0, then softmax; post-softmax (training): L1-normalise attn * policy;
  attention output * ts; with_mlp: MLP output * ts (detached with detach_attn_at_mlp);
* x = x + a * attn; x = x + m * mlp with the branch decisions a, m (no drop path: every rate is 0 here).

`golden_from_reference` writes a golden file in the layout of shared/golden/adavit/golden_dev.pt (the keys
vitadapt.parity.check_adavit reads) for settings the shared harness did not record; `synthetic_golden` adds
random official-layout weights with the goldens' perturbation recipe.
"""

import math
import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
GOLDEN_ROOT = Path(os.environ.get("VITADAPT_GOLDEN_DIR") or (REPO.parent / "shared" / "golden"))
GOLDEN_DEV = GOLDEN_ROOT / "adavit" / "golden_dev.pt"

TAU = 5.0
THRESHOLDS = {"layer": 0.5, "head": 0.5, "token": 0.6}
LN_EPS = 1e-6
HEAD_MEAN_EPS = 1e-6
ENTROPY_EPS = 1e-7

# The official constructor arguments (AdaStepT2T_ViT) as the golden harness records them, README dev setting.
DEFAULT_CONSTRUCTOR = {
    "img_size": 64, "patch_size": 16, "in_chans": 3, "num_classes": 10, "embed_dim": 48, "depth": 12,
    "num_heads": 3, "mlp_ratio": 4, "qkv_bias": True, "qk_scale": None, "drop_rate": 0.0, "attn_drop_rate": 0.0,
    "drop_path_rate": 0.0, "norm_eps": 1e-6, "norm_layer": "partial(nn.LayerNorm, eps=1e-06)",
    "norm_policy": False, "use_t2t": False, "tokens_type": "performer (unused when use_t2t=False)", "token_dim": 64,
    "ada_head": True, "ada_head_v2": False, "dyna_data": False, "ada_head_attn": False, "head_slowfast": False,
    "ada_layer": True, "ada_block": False, "head_select_tau": 5.0, "layer_select_tau": 5.0, "token_select_tau": 5.0,
    "ada_token": True, "ada_token_with_mlp": True, "ada_token_start_layer": 0, "ada_token_pre_softmax": True,
    "ada_token_detach_attn": True, "ada_token_detach_attn_at_mlp": False, "ada_token_nonstep": False,
    "keep_layers": 1, "head_select_bias": True, "layer_select_bias": True,
}

# AdaLoss keyword arguments (the golden's config['losses'][setting]).
ADA_MAIN_DEFAULTS = {"head_loss_ratio": 2.0, "layer_loss_ratio": 2.0, "token_loss_ratio": 2.0,
                     "head_target_ratio": 0.5, "layer_target_ratio": 0.5, "token_target_ratio": 0.5,
                     "head_diverse_ratio": 0.0, "layer_diverse_ratio": 0.0, "head_entropy_weight": 0.0,
                     "layer_entropy_weight": 0.0, "head_minimal": 0.0, "head_minimal_weight": 0.0,
                     "layer_minimal": 0.0, "layer_minimal_weight": 0.0, "token_minimal": 0.0,
                     "token_minimal_weight": 0.0}


def all_terms(**overrides) -> dict:
    """An AdaLoss setting with every diverse / entropy / minimal term on (the golden's 'all_terms' by default)."""
    kw = {"head_diverse_ratio": 0.1, "head_entropy_weight": 0.1, "head_loss_ratio": 2.0, "head_minimal": 0.3,
          "head_minimal_weight": 0.5, "head_target_ratio": 0.6, "layer_diverse_ratio": 0.2,
          "layer_entropy_weight": 0.05, "layer_loss_ratio": 1.5, "layer_minimal": 0.4, "layer_minimal_weight": 0.5,
          "layer_target_ratio": 0.7, "token_loss_ratio": 2.0, "token_minimal": 0.2, "token_minimal_weight": 1.0,
          "token_target_ratio": 0.4}
    kw.update(overrides)
    return kw


# ----------------------------------------------------------------------------------------------- small pieces
def sinusoid_table(n_position: int, d_hid: int) -> torch.Tensor:
    """models/transformer_block.py get_sinusoid_encoding: [1, n, d], sin on even channels, cos on odd ones."""
    table = np.array([[pos / np.power(10000, 2 * (j // 2) / d_hid) for j in range(d_hid)]
                      for pos in range(n_position)])
    table[:, 0::2] = np.sin(table[:, 0::2])
    table[:, 1::2] = np.cos(table[:, 1::2])
    return torch.FloatTensor(table).unsqueeze(0)


def _ln(x, sd, p):
    return F.layer_norm(x, x.shape[-1:], sd[p + ".weight"], sd[p + ".bias"], eps=LN_EPS)


def _lin(x, sd, p):
    return F.linear(x, sd[p + ".weight"], sd.get(p + ".bias"))


def depth_of(sd) -> int:
    return len({k.split(".")[1] for k in sd if k.startswith("blocks.")})


def block_flags(ctor: dict, i: int) -> dict:
    """Which decision modules block i has, as AdaStepT2T_ViT builds its StepAdaBlocks."""
    head = bool(ctor["ada_head"]) and i >= ctor["keep_layers"]
    layer = bool(ctor["ada_layer"]) and i >= ctor["keep_layers"]
    return {"head": head, "layer": layer, "token": bool(ctor["ada_token"]) and i >= ctor["ada_token_start_layer"],
            "norm_policy": bool(ctor.get("norm_policy")) and (head or layer),
            "head_attn": bool(ctor.get("ada_head_attn")) and head}


class Gumbel:
    """The two Gumbel(0, 1) draws of every training `_gumbel_sigmoid` call: drawn from a seeded generator, or
    replayed from recorded calls (a golden's train['gumbel_calls']); every call is recorded, in order."""

    def __init__(self, seed: Optional[int] = None, replay: Optional[Sequence[dict]] = None):
        self.generator = torch.Generator().manual_seed(seed if seed is not None else 0)
        self.replay = list(replay) if replay is not None else None
        self.calls: List[dict] = []

    def __call__(self, module: str, logits: torch.Tensor):
        if self.replay is not None:
            call = self.replay[len(self.calls)]
            assert call["module"] == module, (call["module"], module)
            g1, g2 = call["gumbel1"].reshape(logits.shape), call["gumbel2"].reshape(logits.shape)
        else:
            g1, g2 = (-torch.empty(logits.shape).exponential_(generator=self.generator).log() for _ in range(2))
        return g1, g2


def gumbel_sigmoid(logits, kind: str, module: str, training: bool, noise: Optional[Gumbel], record: list,
                   thresholds: Optional[dict] = None):
    thr = (thresholds or THRESHOLDS)[kind]
    if training:
        g1, g2 = noise(module, logits)
        y_soft = torch.sigmoid((logits + g1 - g2) / TAU)
    else:
        g1 = g2 = None
        y_soft = torch.sigmoid(logits)
    y_hard = torch.zeros_like(logits).masked_fill(y_soft > thr, 1.0)
    out = y_hard - y_soft.detach() + y_soft
    record.append({"module": module, "kind": {"layer": "BlockLayerSelect", "head": "BlockHeadSelect",
                                              "token": "SimpleTokenSelect"}[kind],
                   "tau": TAU, "hard": True, "threshold": thr, "training": training, "logits": logits.detach().clone(),
                   "gumbel1": g1, "gumbel2": g2, "y_soft": y_soft.detach().clone(), "out": out.detach().clone()})
    if noise is not None and training:
        noise.calls.append(record[-1])
    return out


# ----------------------------------------------------------------------------------------------- the forward
def ref_forward(ctor: dict, sd: Dict[str, torch.Tensor], images: torch.Tensor, training: bool = False,
                noise: Optional[Gumbel] = None, variant: Optional[str] = None) -> dict:
    """The official AdaStepT2T_ViT forward (DeiT variant). `sd` in the official layout; its tensors may require
    grad (the outputs are differentiable with respect to them). training: Gumbel noise from `noise`, pre_softmax
    False takes effect, head_attn's second application is off.

    variant: a deliberately WRONG reading of the official code, for the tests' own sensitivity checks:
    "fc1_unmasked" (head decisions do not reach MLP fc1's input), "token_threshold_0.5" (the spec's hidden 0.6
    token threshold replaced by 0.5).

    Returns logits, decisions stacked as the official outputs (head_select [B, Lh, H], layer_select [B, Ll, 2],
    token_select [B, Lt, N], head/layer/token select logits), hidden [B, L, N, C], calls (every
    _gumbel_sigmoid call), margins {kind: min |y_soft - threshold|} and per-block lists."""
    heads, p = ctor["num_heads"], ctor["patch_size"]
    x = F.conv2d(images, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=p)
    x = x.flatten(2).transpose(1, 2)
    b, _, c = x.shape
    x = torch.cat([sd["cls_token"].expand(b, -1, -1), x], dim=1) + sd["pos_embed"]
    n = x.shape[1]
    dh = c // heads
    scale = ctor.get("qk_scale") or dh ** -0.5
    eye = torch.eye(n)
    ratio = int(ctor["mlp_ratio"])
    lists = {k: [] for k in ("head_select", "layer_select", "token_select", "head_select_logits",
                             "layer_select_logits", "token_select_logits")}
    hidden, attn_origin, calls, per_block = [], [], [], []
    for i in range(depth_of(sd)):
        pre = f"blocks.{i}"
        f = block_flags(ctor, i)
        policy_token = _ln(x, sd, pre + ".norm_policy")[:, 0] if f["norm_policy"] else x[:, 0]
        layer = head = width = ts = None

        def decide(kind, logits, module):
            thresholds = dict(THRESHOLDS, token=0.5) if variant == "token_threshold_0.5" else THRESHOLDS
            return gumbel_sigmoid(logits, kind, module, training, noise, calls, thresholds)

        if f["layer"]:
            layer_logits = _lin(policy_token, sd, pre + ".layer_select.mlp_head")
            layer = decide("layer", layer_logits, pre + ".layer_select")
            lists["layer_select"].append(layer)
            lists["layer_select_logits"].append(layer_logits)
        if f["head"]:
            head_logits = _lin(policy_token, sd, pre + ".head_select.mlp_head")
            head = decide("head", head_logits, pre + ".head_select")
            lists["head_select"].append(head)
            lists["head_select_logits"].append(head_logits)
            width = head.unsqueeze(-1).expand(-1, -1, dh).reshape(b, c)  # [B, C] channel mask
        width_attn = None if (width is None or f["head_attn"]) else width
        width_mlp = None if variant == "fc1_unmasked" else width_attn
        if width_mlp is not None and ctor.get("ada_head_v2"):
            width_mlp = width.unsqueeze(-1).expand(-1, -1, ratio).reshape(b, c * ratio)  # fc1 output units

        # ---- attention (AdaAttention.forward on norm1(x))
        h = _ln(x, sd, pre + ".norm1")

        def proj_qkv(name):
            y = _lin(h, sd, f"{pre}.attn.{name}")
            return y if width_attn is None else y * width_attn[:, None, :]  # masked weight rows and bias

        q, k, v = (proj_qkv(name).reshape(b, n, heads, dh).permute(0, 2, 1, 3) for name in ("query", "key", "value"))
        attn_pre = (q @ k.transpose(-2, -1)) * scale
        attn = attn_pre.softmax(dim=-1)
        if f["head_attn"]:
            gate = head[:, :, None, None]
            attn = attn * gate + eye * (1 - gate)
        attn_origin.append(attn.detach())
        if f["token"]:
            tok_logits = _lin(h[:, 1:], sd, pre + ".attn.token_select.mlp_head")  # [B, N-1, 1]
            sel = decide("token", tok_logits, pre + ".attn.token_select")
            ts = torch.cat([sel.new_ones(b, 1, 1), sel], dim=1).transpose(1, 2)  # [B, 1, N]
            policy = torch.bmm(ts.transpose(-1, -2), ts).unsqueeze(1)  # [B, 1, N, N]
            if ctor["ada_token_detach_attn"]:
                policy = policy.detach()
            if ctor["ada_token_pre_softmax"] or not training:
                fill = torch.zeros_like(attn_pre).masked_fill((1 - policy - eye) > 0, float("-inf"))
                attn = (attn_pre * policy + fill).softmax(dim=-1)
            else:
                attn = F.normalize(attn * policy, p=1, dim=-1)
            ts = ts.squeeze(1)  # [B, N]
            if f["head_attn"] and not training:
                gate = head[:, :, None, None]
                attn = attn * gate + eye * (1 - gate)
            lists["token_select"].append(ts)
            lists["token_select_logits"].append(tok_logits.squeeze(-1))
        out = (attn @ v).transpose(1, 2).reshape(b, n, c)
        if width_attn is not None:
            out = out * width_attn[:, None, :]  # proj input channels (bias kept)
        out = _lin(out, sd, pre + ".attn.proj")
        if ts is not None:
            out = out * ts.unsqueeze(-1)
        x = x + (out if layer is None else layer[:, 0, None, None] * out)

        # ---- MLP (AdaMlp on norm2(x))
        z = _ln(x, sd, pre + ".norm2")
        if width_mlp is not None and not ctor.get("ada_head_v2"):
            z = z * width_mlp[:, None, :]  # fc1 input channels (bias kept)
        z = _lin(z, sd, pre + ".mlp.fc1")
        if width_mlp is not None and ctor.get("ada_head_v2"):
            z = z * width_mlp[:, None, :]  # fc1 output units, bias included
        m = _lin(F.gelu(z), sd, pre + ".mlp.fc2")
        if ctor["ada_token_with_mlp"] and ts is not None:
            gate = ts.detach() if ctor["ada_token_detach_attn_at_mlp"] else ts
            m = m * gate.unsqueeze(-1)
        x = x + (m if layer is None else layer[:, 1, None, None] * m)
        hidden.append(x)
        per_block.append({"head": head, "layer": layer, "token": ts})
    feats = _ln(x, sd, "norm")
    logits = _lin(feats[:, 0], sd, "head")

    def stack(values):
        return torch.stack(values, dim=1) if values else None

    res = {k: stack(v) for k, v in lists.items()}
    res.update(logits=logits, hidden=torch.stack(hidden, dim=1), attn_origin=torch.stack(attn_origin, dim=1),
               calls=calls, per_block=per_block)
    margins = {}
    for call in calls:
        kind = {"BlockLayerSelect": "layer", "BlockHeadSelect": "head", "SimpleTokenSelect": "token"}[call["kind"]]
        gap = (call["y_soft"] - call["threshold"]).abs().min().item()
        margins[kind] = min(margins.get(kind, float("inf")), gap)
    res["margins"] = margins
    return res


# ----------------------------------------------------------------------------------------------- losses, FLOPs
def _entropy(prob):
    return -(prob * prob.clamp(min=ENTROPY_EPS).log() + (1 - prob) * (1 - prob).clamp(min=ENTROPY_EPS).log())


def ada_loss(logits, labels, out: dict, kw: dict) -> dict:
    """models/losses.py AdaLoss with base criterion CrossEntropy (hard labels): total and the unweighted terms."""
    base = F.cross_entropy(logits, labels)
    head, layer, token = out["head_select"], out["layer_select"], out["token_select"]
    zero = logits.new_zeros(1).mean()
    if head is not None:
        if layer is not None:
            mask = (layer.sum(-1, keepdim=True) > 0).type_as(layer).expand(-1, -1, head.shape[-1])
        else:
            mask = head.new_ones(head.shape)
        head_loss = ((head * mask).sum() / (mask.sum() + HEAD_MEAN_EPS) - kw["head_target_ratio"]).abs()
        per = (head * mask).sum(0) / (mask.sum(0) + HEAD_MEAN_EPS)
        if kw["head_diverse_ratio"] > 0:
            head_loss = head_loss + kw["head_diverse_ratio"] * (per - kw["head_target_ratio"]).abs().mean()
        if kw["head_entropy_weight"] > 0:
            head_loss = head_loss - kw["head_entropy_weight"] * _entropy(out["head_select_logits"].sigmoid()).mean()
        if kw["head_minimal_weight"] > 0:
            head_loss = head_loss + kw["head_minimal_weight"] * (kw["head_minimal"] - per).clamp(min=0.0).sum()
    else:
        head_loss = zero
    if layer is not None:
        layer_loss = (layer.mean() - kw["layer_target_ratio"]).abs()
        if kw["layer_diverse_ratio"] > 0:
            diverse = (layer.mean((0, -1)) - kw["layer_target_ratio"]).abs().mean()
            layer_loss = layer_loss + kw["layer_diverse_ratio"] * diverse
        if kw["layer_entropy_weight"] > 0:
            layer_loss = layer_loss - kw["layer_entropy_weight"] * _entropy(out["layer_select_logits"].sigmoid()).mean()
        if kw["layer_minimal_weight"] > 0:
            minimal = (kw["layer_minimal"] - layer.mean(0)).clamp(min=0.0).sum()
            layer_loss = layer_loss + kw["layer_minimal_weight"] * minimal
    else:
        layer_loss = zero
    if token is not None:
        token_loss = (token.mean() - kw["token_target_ratio"]) ** 2
        if kw["token_minimal_weight"] > 0:
            minimal = (kw["token_minimal"] - token.mean(-1)).clamp(min=0.0).sum()
            token_loss = token_loss + kw["token_minimal_weight"] * minimal
    else:
        token_loss = zero
    total = (base + kw["head_loss_ratio"] * head_loss + kw["layer_loss_ratio"] * layer_loss
             + kw["token_loss_ratio"] * token_loss)
    return {"total": total, "base_loss": base, "head_loss": head_loss, "layer_loss": layer_loss,
            "token_loss": token_loss}


def flops_table(num_heads: int, num_tokens: int, embed_dim: int, mlp_ratio: float) -> torch.Tensor:
    """The official per-block GFLOPs table [h, t, attn, mlp] (specs §2.4 closed form, float32 token rounding)."""
    hid = int(embed_dim * mlp_ratio)
    ln = 5 * num_tokens * embed_dim
    table = torch.zeros(num_heads + 1, num_tokens + 1, 2, 2, dtype=torch.float32)
    for hh in range(1, num_heads + 1):
        w = embed_dim * hh // num_heads
        for t in range(1, num_tokens + 1):
            tt = int(np.float32(num_tokens) * np.float32(t / num_tokens))
            attn = ln + 3 * tt * embed_dim * w + 2 * tt * tt * w + tt * w * w
            mlp = tt * w * hid + tt * hid * embed_dim
            for a in (0, 1):
                for m in (0, 1):
                    table[hh, t, a, m] = (a * attn + ln + m * mlp) / 1e9
    return table


def table_gflops(table, head_select, layer_select, token_select, depth: int, base: float) -> torch.Tensor:
    """block_flops_dict.batch_select_flops: per image base + sum over blocks of table[h, t, a, m], the blocks
    without a decision counted full (they are the first ones), python loop in the table's float32."""
    hmax, tmax = table.shape[0] - 1, table.shape[1] - 1
    batch = next(s for s in (head_select, layer_select, token_select) if s is not None).shape[0]
    out = []
    for bi in range(batch):
        hs = [hmax] * depth if head_select is None else \
            [hmax] * (depth - head_select.shape[1]) + head_select[bi].sum(-1).int().tolist()
        ls = [[1, 1]] * depth if layer_select is None else \
            [[1, 1]] * (depth - layer_select.shape[1]) + layer_select[bi].int().tolist()
        ts = [tmax] * depth if token_select is None else \
            [tmax] * (depth - token_select.shape[1]) + token_select[bi].sum(-1).int().tolist()
        flops = base
        for hh, t, ll in zip(hs, ts, ls):
            flops = flops + table[hh, t, ll[0], ll[1]]
        out.append(float(flops))
    return torch.tensor(out)


# ----------------------------------------------------------------------------------------------- state dicts
def constructor(**overrides) -> dict:
    ctor = dict(DEFAULT_CONSTRUCTOR)
    ctor.update(overrides)
    return ctor


def random_state_dict(ctor: dict, seed: int = 0, block_linear_scale: float = 5.0, token_w_scale: float = 15.0,
                      token_bias: float = 0.4, head_w_scale: float = 20.0, head_bias: float = 0.0,
                      layer_w_scale: float = 20.0, layer_bias: float = 2.5,
                      bias_std: float = 0.0) -> Dict[str, torch.Tensor]:
    """Random official-layout weights, initialised as AdaStepT2T_ViT does (trunc_normal(.02) linears with zero bias,
    unit LayerNorms, default conv init, sinusoid pos_embed), then the golden harness's perturbation: block linears
    (query/key/value/proj/fc1/fc2) weight x block_linear_scale, <select>.mlp_head.weight x <select>_w_scale and
    bias = <select>_bias. bias_std > 0 also draws the block linear biases at random."""
    g = torch.Generator().manual_seed(seed)
    c, heads, depth, p = ctor["embed_dim"], ctor["num_heads"], ctor["depth"], ctor["patch_size"]
    hid = int(c * ctor["mlp_ratio"])
    n = (ctor["img_size"] // p) ** 2 + 1

    def tn(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).clamp(-2.0, 2.0)

    def bias(d):
        return torch.randn(d, generator=g) * bias_std if bias_std else torch.zeros(d)

    fan_in = ctor["in_chans"] * p * p
    bound = 1 / math.sqrt(fan_in)
    sd = {"cls_token": tn(1, 1, c), "pos_embed": sinusoid_table(n, c),
          "patch_embed.proj.weight": (torch.rand(c, ctor["in_chans"], p, p, generator=g) * 2 - 1) * bound,
          "patch_embed.proj.bias": (torch.rand(c, generator=g) * 2 - 1) * bound}
    for i in range(depth):
        pre = f"blocks.{i}"
        f = block_flags(ctor, i)
        if f["norm_policy"]:
            sd[pre + ".norm_policy.weight"], sd[pre + ".norm_policy.bias"] = torch.ones(c), torch.zeros(c)
        sd[pre + ".norm1.weight"], sd[pre + ".norm1.bias"] = torch.ones(c), torch.zeros(c)
        for name in ("query", "key", "value"):
            sd[f"{pre}.attn.{name}.weight"] = tn(c, c) * block_linear_scale
            if ctor["qkv_bias"]:
                sd[f"{pre}.attn.{name}.bias"] = bias(c)
        sd[pre + ".attn.proj.weight"], sd[pre + ".attn.proj.bias"] = tn(c, c) * block_linear_scale, bias(c)
        if f["token"]:
            sd[pre + ".attn.token_select.mlp_head.weight"] = tn(1, c) * token_w_scale
            sd[pre + ".attn.token_select.mlp_head.bias"] = torch.full((1,), float(token_bias))
        sd[pre + ".norm2.weight"], sd[pre + ".norm2.bias"] = torch.ones(c), torch.zeros(c)
        sd[pre + ".mlp.fc1.weight"], sd[pre + ".mlp.fc1.bias"] = tn(hid, c) * block_linear_scale, bias(hid)
        sd[pre + ".mlp.fc2.weight"], sd[pre + ".mlp.fc2.bias"] = tn(c, hid) * block_linear_scale, bias(c)
        if f["head"]:
            sd[pre + ".head_select.mlp_head.weight"] = tn(heads, c) * head_w_scale
            sd[pre + ".head_select.mlp_head.bias"] = torch.full((heads,), float(head_bias))
        if f["layer"]:
            sd[pre + ".layer_select.mlp_head.weight"] = tn(2, c) * layer_w_scale
            sd[pre + ".layer_select.mlp_head.bias"] = torch.full((2,), float(layer_bias))
    sd["norm.weight"], sd["norm.bias"] = torch.ones(c), torch.zeros(c)
    sd["head.weight"], sd["head.bias"] = tn(ctor["num_classes"], c), torch.zeros(ctor["num_classes"])
    return sd


def to_vitadapt_layout(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The official layout with query/key/value joined into qkv (what a DeiT/timm/vitadapt file holds)."""
    out = {}
    for k, v in sd.items():
        for name in ("query", "key", "value"):
            if f".attn.{name}." in k:
                break
        else:
            out[k] = v
            continue
        if name == "query":
            pre, kind = k.split(".attn.query.")
            out[f"{pre}.attn.qkv.{kind}"] = torch.cat([sd[f"{pre}.attn.{n}.{kind}"] for n in ("query", "key", "value")])
    return out


# ----------------------------------------------------------------------------------------------- golden files
def golden_config(ctor: dict, losses: Optional[dict] = None, flops_base: float = 0.06, **extra) -> dict:
    losses = losses or {"ada_main_defaults": dict(ADA_MAIN_DEFAULTS), "all_terms": all_terms()}
    depth = ctor["depth"]
    config = {
        "split": "synthetic (tests/helpers_adavit.py)", "constructor": dict(ctor),
        "constructor_kwargs_ignored_by_official_code": ["ada_block", "ada_token_nonstep", "head_select_bias",
                                                        "layer_select_bias", "layer_select_tau", "head_select_tau",
                                                        "token_select_tau", "head_slowfast"],
        "hardcoded": {"gumbel_tau": TAU, "head_threshold": THRESHOLDS["head"], "layer_threshold": THRESHOLDS["layer"],
                      "token_threshold": THRESHOLDS["token"], "pos_embed": "fixed sinusoid table, requires_grad=False",
                      "token_mask_fill": float("-inf")},
        "blocks_with_head_select": [i for i in range(depth) if block_flags(ctor, i)["head"]],
        "blocks_with_layer_select": [i for i in range(depth) if block_flags(ctor, i)["layer"]],
        "blocks_with_token_select": [i for i in range(depth) if block_flags(ctor, i)["token"]],
        "losses": losses, "flops_base": flops_base,
        "loss_base_criterion": "nn.CrossEntropyLoss() on hard labels",
    }
    config.update(extra)
    return config


def golden_from_reference(config: dict, sd: Dict[str, torch.Tensor], images: torch.Tensor, labels: torch.Tensor,
                          noise_seed: int = 999, replay: Optional[Sequence[dict]] = None,
                          variant: Optional[str] = None) -> dict:
    """Every key vitadapt.parity.check_adavit reads (and a few more), computed by ref_forward: eval outputs,
    official GFLOPs, AdaLoss per setting in eval and train, the train forward with fresh Gumbel noise (seeded) or
    `replay`ed draws, and the gradients of each setting's total loss (pos_embed frozen: grads[setting + '_none'])."""
    ctor = config["constructor"]
    with torch.no_grad():
        ev = ref_forward(ctor, sd, images, variant=variant)
    n = ev["hidden"].shape[2]
    table = flops_table(ctor["num_heads"], n, ctor["embed_dim"], ctor["mlp_ratio"])
    gflops = table_gflops(table, ev["head_select"], ev["layer_select"], ev["token_select"], ctor["depth"],
                          config["flops_base"])
    with torch.no_grad():
        losses_eval = {s: {k: v.detach() for k, v in ada_loss(ev["logits"], labels, ev, kw).items()}
                       for s, kw in config["losses"].items()}
    params = {k: v.detach().clone().requires_grad_(k != "pos_embed") for k, v in sd.items()}
    noise = Gumbel(seed=noise_seed, replay=replay)
    tr = ref_forward(ctor, params, images, training=True, noise=noise, variant=variant)
    trainable = [k for k, v in params.items() if v.requires_grad]
    grads, train_losses = {}, {}
    for setting, kw in config["losses"].items():
        loss = ada_loss(tr["logits"], labels, tr, kw)
        train_losses[setting] = {k: v.detach() for k, v in loss.items()}
        got = torch.autograd.grad(loss["total"], [params[k] for k in trainable], allow_unused=True, retain_graph=True)
        grads[setting] = {k: torch.zeros_like(params[k]) if g is None else g.detach() for k, g in zip(trainable, got)}
        grads[setting + "_none"] = [k for k in params if k not in trainable]

    def det(t):
        return None if t is None else t.detach()

    train = {k: det(tr[k]) for k in ("logits", "head_select", "layer_select", "token_select", "head_select_logits",
                                     "layer_select_logits", "token_select_logits")}
    train["gumbel_calls"] = noise.calls
    train["losses"] = train_losses
    train["decision_margin_min"] = tr["margins"]
    golden = {"config": config, "state_dict": {k: v.clone() for k, v in sd.items()}, "input": images,
              "labels": labels, "logits": ev["logits"], "hidden": ev["hidden"], "attn_origin": ev["attn_origin"],
              "gflops": gflops, "flops_dict": table, "losses_eval": losses_eval, "eval_gumbel_calls": ev["calls"],
              "decision_margin_min": ev["margins"], "train": train, "grads": grads}
    for k in ("head_select", "layer_select", "token_select", "head_select_logits", "layer_select_logits",
              "token_select_logits"):
        golden[k] = ev[k]
    if ev["layer_select"] is not None:
        golden["block_full_skip"] = (ev["layer_select"].sum(-1) == 0).to(torch.float32)
    golden["usage"] = {k: (None if ev[k + "_select"] is None else ev[k + "_select"].mean().item())
                       for k in ("head", "layer", "token")}
    return golden


def synthetic_golden(ctor: Optional[dict] = None, batch: int = 4, labels: Optional[Sequence[int]] = None,
                     model_seed: int = 0, input_seed: int = 123, noise_seed: int = 999,
                     losses: Optional[dict] = None, perturbation: Optional[dict] = None,
                     variant: Optional[str] = None) -> dict:
    """A golden file as the official AdaViT harness would write it, for the constructor arguments `ctor`."""
    ctor = ctor or constructor()
    perturbation = dict(perturbation or {})
    sd = random_state_dict(ctor, seed=model_seed, **perturbation)
    images = torch.randn(batch, ctor["in_chans"], ctor["img_size"], ctor["img_size"],
                         generator=torch.Generator().manual_seed(input_seed))
    if labels is None:
        labels = [(3 * i + 1) % ctor["num_classes"] for i in range(batch)]
    config = golden_config(ctor, losses, seeds={"model": model_seed, "input": input_seed, "train_noise": noise_seed},
                           perturbation=perturbation, labels=list(labels))
    return golden_from_reference(config, sd, images, torch.tensor(list(labels)), noise_seed=noise_seed,
                                 variant=variant)


# ----------------------------------------------------------------------------------------------- crafted cases
def split_bias(logits: torch.Tensor) -> float:
    """A bias shift that puts the threshold (logit 0) midway between the two middle values of `logits` [B]: about
    half the images above, half below, with the widest margin there."""
    values = sorted(logits.tolist())
    k = len(values) // 2
    return -(values[k - 1] + values[k]) / 2


def craft(ctor: dict, sd: Dict[str, torch.Tensor], images: torch.Tensor,
          plan: Dict[int, dict]) -> Dict[str, torch.Tensor]:
    """Rewrites decision heads block by block (in order: a block's decisions depend on the blocks before it):
    plan[i] may hold
      "heads_split": every head row = row 0, bias splitting the images: half keep every head, half none;
      "layer_split": both branch rows = row 0, bias splitting the images: half run the block, half skip it fully;
      "head_bias" / "layer_bias" / "token_bias": a constant bias (+-50: force on / off for every image);
      "head_force": per-head bias list with zero weights (the same heads kept for every image)."""
    sd = {k: v.clone() for k, v in sd.items()}
    for i in sorted(plan):
        step = plan[i]
        pre = f"blocks.{i}"
        with torch.no_grad():
            for key, name in (("head_bias", "head_select"), ("layer_bias", "layer_select"),
                              ("token_bias", "attn.token_select")):
                if key in step:
                    sd[f"{pre}.{name}.mlp_head.bias"][:] = step[key]
            if "head_force" in step:
                sd[pre + ".head_select.mlp_head.weight"].zero_()
                sd[pre + ".head_select.mlp_head.bias"][:] = torch.tensor(step["head_force"], dtype=torch.float32)
            for key, name in (("heads_split", "head_select"), ("layer_split", "layer_select")):
                if step.get(key):
                    w = sd[f"{pre}.{name}.mlp_head.weight"]
                    w[:] = w[0]
                    sd[f"{pre}.{name}.mlp_head.bias"][:] = 0.0
                    out = ref_forward(ctor, sd, images)
                    index = (ctor["depth"] - out[name + "_logits"].shape[1])
                    logits = out[name + "_logits"][:, i - index, 0]
                    sd[f"{pre}.{name}.mlp_head.bias"][:] = split_bias(logits)
    return sd


# ----------------------------------------------------------------------------------------------- T2T-ViT variant
# The official ada_step_t2t_vit_*_lnorm models: AdaStepT2T_ViT(use_t2t=True, tokens_type='performer', qkv_bias
# False, norm_layer nn.LayerNorm (eps 1e-5), qk_scale None unless pretrained), here with tiny dimensions.
T2T_CONSTRUCTOR = dict(DEFAULT_CONSTRUCTOR, img_size=48, num_classes=5, embed_dim=24, depth=4, num_heads=3,
                       mlp_ratio=3.0, qkv_bias=False, norm_eps=1e-5, norm_layer="nn.LayerNorm", use_t2t=True,
                       tokens_type="performer", token_dim=8)
T2T_SPLITS = {"performer": ((7, 4, 2), (3, 2, 1), (3, 2, 1))}
ADAVIT_REPO = Path(os.environ.get("VITADAPT_ADAVIT_REPO") or (REPO.parent / ".mirror" / "MengLcool+AdaViT" / "repo"))
OFFICIAL_T2T_FILES = ("ada_t2t_vit", "ada_transformer_block", "token_performer", "token_transformer",
                      "transformer_block")


def t2t_constructor(**overrides) -> dict:
    ctor = dict(T2T_CONSTRUCTOR)
    ctor.update(overrides)
    return ctor


def t2t_grids(ctor: dict) -> List[int]:
    """Side of the token grid after each soft split of the official T2T_module."""
    size, out = ctor["img_size"], []
    for kernel, stride, padding in T2T_SPLITS[ctor["tokens_type"]]:
        size = (size + 2 * padding - kernel) // stride + 1
        out.append(size)
    return out


def random_t2t_state_dict(ctor: dict, seed: int = 0, tokenizer_scale: float = 1.0,
                          **perturbation) -> Dict[str, torch.Tensor]:
    """Random weights in the layout of the official AdaStepT2T_ViT(use_t2t=True), written from its code (not from
    an instance): `random_state_dict`'s blocks and decision heads (attn.{query,key,value}.weight, no bias with
    qkv_bias False), and instead of patch_embed the T2T_module of two Token_performer (w [m, e] fixed orthogonal
    random features * sqrt(m), kqv [3e, d], proj [e, e], norm1 [d], norm2 [e], mlp.0 / mlp.2 [e, e]) and
    project [C, 9 token_dim]; pos_embed [1, grid^2 + 1, C] the sinusoid table. tokenizer_scale multiplies the
    tokenizer's linear weights (trunc_normal(.02) as the official init)."""
    sd = random_state_dict(ctor, seed=seed, **perturbation)
    g = torch.Generator().manual_seed(seed + 1000)
    c, e = ctor["embed_dim"], ctor["token_dim"]
    m = int(e * 0.5)
    (k0, _, _), (k1, _, _), (k2, _, _) = T2T_SPLITS[ctor["tokens_type"]]
    grid = t2t_grids(ctor)[-1]

    def tn(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).clamp(-2.0, 2.0) * tokenizer_scale

    out = {"cls_token": sd["cls_token"], "pos_embed": sinusoid_table(grid * grid + 1, c)}
    for name, d in (("attention1", ctor["in_chans"] * k0 * k0), ("attention2", e * k1 * k1)):
        pre = f"tokens_to_token.{name}."
        w = torch.linalg.qr(torch.randn(e, m, generator=g))[0].t() * math.sqrt(m)  # orthogonal rows, as the official
        out.update({pre + "w": w.contiguous(), pre + "kqv.weight": tn(3 * e, d), pre + "kqv.bias": torch.zeros(3 * e),
                    pre + "proj.weight": tn(e, e), pre + "proj.bias": torch.zeros(e),
                    pre + "norm1.weight": torch.ones(d), pre + "norm1.bias": torch.zeros(d),
                    pre + "norm2.weight": torch.ones(e), pre + "norm2.bias": torch.zeros(e),
                    pre + "mlp.0.weight": tn(e, e), pre + "mlp.0.bias": torch.zeros(e),
                    pre + "mlp.2.weight": tn(e, e), pre + "mlp.2.bias": torch.zeros(e)})
    out["tokens_to_token.project.weight"] = tn(c, e * k2 * k2)
    out["tokens_to_token.project.bias"] = torch.zeros(c)
    out.update({k: v for k, v in sd.items()
                if k not in ("cls_token", "pos_embed") and not k.startswith("patch_embed.")})
    return out


def official_t2t_module(workdir: Path):
    """The official models/ada_t2t_vit.py (and the four files it imports), copied from the AdaViT repository
    (ADAVIT_REPO: a checkout, or a bare git mirror read with `git show`) into `workdir` and imported as a package
    of its own, with the installed timm. None when the repository is not there or the code does not import."""
    import importlib
    import shutil
    import subprocess
    import sys
    import warnings

    package = workdir / "official_adavit_t2t"
    package.mkdir(parents=True, exist_ok=True)
    for name in OFFICIAL_T2T_FILES:
        source = ADAVIT_REPO / "models" / f"{name}.py"
        if source.is_file():
            shutil.copy(source, package / f"{name}.py")
            continue
        try:
            text = subprocess.run(["git", "-C", str(ADAVIT_REPO), "show", f"HEAD:models/{name}.py"], check=True,
                                  capture_output=True, text=True, timeout=60).stdout
        except (OSError, subprocess.SubprocessError):
            return None
        (package / f"{name}.py").write_text(text)
    (package / "__init__.py").write_text("")  # not the official __init__ (it also imports deit.py)
    sys.path.insert(0, str(workdir))
    sys.dont_write_bytecode, before = True, sys.dont_write_bytecode
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # timm's deprecated import paths, registry overwrites
            return importlib.import_module("official_adavit_t2t.ada_t2t_vit")
    except Exception:
        return None
    finally:
        sys.dont_write_bytecode = before
        sys.path.remove(str(workdir))


def official_t2t_model(module, ctor: dict):
    """The official AdaStepT2T_ViT for the constructor arguments `ctor` (T2T variant, tiny)."""
    kwargs = {k: ctor[k] for k in ("img_size", "tokens_type", "in_chans", "num_classes", "embed_dim", "depth",
                                   "norm_policy", "ada_head", "ada_head_v2", "ada_head_attn", "ada_layer",
                                   "ada_token", "ada_token_with_mlp", "ada_token_start_layer",
                                   "ada_token_pre_softmax", "ada_token_detach_attn", "ada_token_detach_attn_at_mlp",
                                   "keep_layers", "num_heads", "mlp_ratio", "qkv_bias", "qk_scale", "drop_rate",
                                   "attn_drop_rate", "drop_path_rate", "token_dim")}
    return module.AdaStepT2T_ViT(use_t2t=True, **kwargs)


class OfficialGumbelRecorder:
    """Wraps the official `_gumbel_sigmoid` (module `block_module`) while active: every training call runs the
    ORIGINAL function, then the RNG state is rewound and its two Gumbel draws are drawn again exactly as it drew
    them, checked to reproduce its output and recorded as {module, gumbel1, gumbel2} in call order (the module
    name from forward pre-hooks on the official decision modules)."""

    def __init__(self, block_module, model):
        self.block_module, self.calls, self.current = block_module, [], None
        self.original = block_module._gumbel_sigmoid
        kinds = (block_module.SimpleTokenSelect, block_module.BlockHeadSelect, block_module.BlockLayerSelect)
        self.hooks = [m.register_forward_pre_hook(lambda mod, args, name=name: setattr(self, "current", name))
                      for name, m in model.named_modules() if isinstance(m, kinds)]

    def __enter__(self):
        def recording(logits, tau=1, hard=False, eps=1e-10, training=True, threshold=0.5):
            state = torch.get_rng_state()
            out = self.original(logits, tau, hard, eps, training, threshold)
            if training:
                after = torch.get_rng_state()
                torch.set_rng_state(state)
                g1 = -torch.empty_like(logits).exponential_().log()
                g2 = -torch.empty_like(logits).exponential_().log()
                assert torch.equal(torch.get_rng_state(), after)
                soft = ((logits + g1 - g2) / tau).sigmoid()
                assert torch.equal((soft > threshold).to(out.dtype), out.detach())
                self.calls.append({"module": self.current, "gumbel1": g1.detach(), "gumbel2": g2.detach()})
            return out

        self.block_module._gumbel_sigmoid = recording
        return self

    def __exit__(self, *exc):
        self.block_module._gumbel_sigmoid = self.original
        for hook in self.hooks:
            hook.remove()
