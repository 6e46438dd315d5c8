"""AdaViT usage losses and FLOPs accounting (vitadapt/models/adavit_costs.py) against the official code.

Golden: shared/golden/adavit/golden_dev.pt (official AdaLoss, batch_select_flops and the shipped DeiT-S FLOPs
table; override the folder with VITADAPT_GOLDEN_DIR); the tests that need it skip when it is absent. The gradient
and edge-case tests use an independent reference written from specs/avit_adavit.md §2.3 with explicit loops.
Tolerances as the golden README asks: losses 1e-6, GFLOPs 1e-7; the tables exactly.
"""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import helpers_e2e as h  # noqa: E402
from helpers_avit import GOLDEN_ROOT  # noqa: E402
from vitadapt.models.adavit_costs import (  # noqa: E402
    UsageLossWeights,
    exact_base_gflops,
    head_usage_loss,
    layer_usage_loss,
    official_base_gflops,
    official_flops_table,
    official_gflops,
    official_token_counts,
    token_usage_loss,
    usage_loss,
)

GOLDEN_DEV = GOLDEN_ROOT / "adavit" / "golden_dev.pt"
LOSS_ATOL = 1e-6
GFLOPS_ATOL = 1e-7
SETTINGS = ("ada_main_defaults", "all_terms")


@pytest.fixture(scope="module")
def golden():
    return h.load_golden_or_skip(GOLDEN_DEV)


def _dims(golden):
    c = golden["config"]["constructor"]
    num_tokens = 1 + (c["img_size"] // c["patch_size"]) ** 2
    return c, num_tokens


def _weights(golden, setting):
    return UsageLossWeights.from_adaloss_kwargs(golden["config"]["losses"][setting])


# ------------------------------------------------------------------------------------------- independent reference

def _entropy(p):
    eps = 1e-7
    return -(p * p.clamp(min=eps).log() + (1 - p) * (1 - p).clamp(min=eps).log())


def ref_losses(head, layer, token, head_logits, layer_logits, w):
    """Spec §2.3 with explicit loops over blocks/heads (the official 1e-6 in the masked-mean denominators)."""
    eps = 1e-6
    B, Lh, H = head.shape
    mask = torch.stack([torch.stack([(layer[b, l].sum() > 0).to(head.dtype) for l in range(Lh)]) for b in range(B)])
    num = sum(head[b, l, k] * mask[b, l] for b in range(B) for l in range(Lh) for k in range(H))
    m = num / (mask.sum() * H + eps)
    per = [[sum(head[b, l, k] * mask[b, l] for b in range(B)) / (mask[:, l].sum() + eps) for k in range(H)]
           for l in range(Lh)]
    l_head = (m - w.head_target_ratio).abs()
    l_head = l_head + w.head_diverse_ratio * sum((p - w.head_target_ratio).abs() for r in per for p in r) / (Lh * H)
    l_head = l_head - w.head_entropy_weight * _entropy(torch.sigmoid(head_logits)).mean()
    l_head = l_head + w.head_minimal_weight * sum(torch.relu(w.head_minimal - p) for r in per for p in r)

    Ll = layer.shape[1]
    l_layer = (layer.mean() - w.layer_target_ratio).abs()
    l_layer = l_layer + w.layer_diverse_ratio * sum((layer[:, l].mean() - w.layer_target_ratio).abs()
                                                    for l in range(Ll)) / Ll
    l_layer = l_layer - w.layer_entropy_weight * _entropy(torch.sigmoid(layer_logits)).mean()
    l_layer = l_layer + w.layer_minimal_weight * sum(torch.relu(w.layer_minimal - layer[:, l, j].mean())
                                                     for l in range(Ll) for j in range(2))

    l_token = (token.mean() - w.token_target_ratio) ** 2
    l_token = l_token + w.token_minimal_weight * sum(torch.relu(w.token_minimal - token[b, l].mean())
                                                     for b in range(token.shape[0]) for l in range(token.shape[1]))
    return l_head, l_layer, l_token


def _all_terms():
    return UsageLossWeights(head_ratio=2.0, layer_ratio=1.5, token_ratio=3.0, head_target_ratio=0.6,
                            layer_target_ratio=0.7, token_target_ratio=0.4, head_diverse_ratio=0.1,
                            layer_diverse_ratio=0.2, head_entropy_weight=0.1, layer_entropy_weight=0.05,
                            head_minimal_weight=0.5, head_minimal=0.55, layer_minimal_weight=0.5, layer_minimal=0.5,
                            token_minimal_weight=1.0, token_minimal=0.5)


def _soft_inputs(seed=0, B=3, Lh=4, H=3, Lt=5, N=6, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)

    def u(*shape):
        return (0.05 + 0.9 * torch.rand(*shape, generator=g, dtype=dtype))

    token = u(B, Lt, N)
    token[..., 0] = 1.0  # CLS always kept
    return u(B, Lh, H), u(B, Lh, 2), token, torch.randn(B, Lh, H, generator=g, dtype=dtype), \
        torch.randn(B, Lh, 2, generator=g, dtype=dtype)


# ------------------------------------------------------------------------------------------------ losses: golden

@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("setting", SETTINGS)
def test_usage_losses_match_official(golden, setting, mode):
    src = golden if mode == "eval" else golden["train"]
    ref = golden["losses_eval"][setting] if mode == "eval" else golden["train"]["losses"][setting]
    w = _weights(golden, setting)
    hs, ls, ts = src["head_select"], src["layer_select"], src["token_select"]
    hl, ll = src["head_select_logits"], src["layer_select_logits"]

    raw = {"head": head_usage_loss(hs, ls, hl, w), "layer": layer_usage_loss(ls, ll, w),
           "token": token_usage_loss(ts, w)}
    for k in raw:
        assert raw[k].shape == () and raw[k].dtype == torch.float32
        assert abs(raw[k].item() - ref[k + "_loss"].item()) <= LOSS_ATOL, (k, raw[k], ref[k + "_loss"])

    terms = usage_loss(hs, ls, ts, hl, ll, weights=w)
    assert set(terms) == {"head", "layer", "token"}
    ratios = {"head": w.head_ratio, "layer": w.layer_ratio, "token": w.token_ratio}
    for k in terms:
        torch.testing.assert_close(terms[k], ratios[k] * raw[k], rtol=0, atol=0)
    total = ref["base_loss"] + terms["head"] + terms["layer"] + terms["token"]
    assert abs(total.item() - ref["total"].item()) <= LOSS_ATOL


def test_golden_loss_settings_exercise_every_term(golden):
    """all_terms really switches every optional term on, and the ada_main defaults are the dataclass defaults."""
    assert _weights(golden, "ada_main_defaults") == UsageLossWeights()
    w = _weights(golden, "all_terms")
    for name in ("head_diverse_ratio", "layer_diverse_ratio", "head_entropy_weight", "layer_entropy_weight",
                 "head_minimal_weight", "layer_minimal_weight", "token_minimal_weight"):
        assert getattr(w, name) > 0, name
    # and the masked head mean matters in the golden: some blocks are fully skipped
    assert (golden["layer_select"].sum(-1) == 0).any() and (golden["train"]["layer_select"].sum(-1) == 0).any()


# ------------------------------------------------------------------------------- losses: reference and gradients

def test_losses_equal_independent_reference_with_gradients():
    w = _all_terms()
    head, layer, token, hl, ll = _soft_inputs()
    layer[0, 1] = 0.0  # a fully skipped block: its heads leave the masked means
    layer[2, 3] = 0.0
    inputs = [t.requires_grad_() for t in (head, layer, token, hl, ll)]
    ours = (head_usage_loss(head, layer, hl, w), layer_usage_loss(layer, ll, w), token_usage_loss(token, w))
    ref = ref_losses(head, layer, token, hl, ll, w)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    for a, b in zip(ours, ref):
        ga = torch.autograd.grad(a, inputs, allow_unused=True, retain_graph=True)
        gb = torch.autograd.grad(b, inputs, allow_unused=True, retain_graph=True)
        for x, y in zip(ga, gb):
            assert (x is None) == (y is None)
            if x is not None:
                torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12)


def test_usage_loss_gradcheck_soft_decisions():
    """Numerical vs analytic gradients w.r.t. soft usages and logits (away from the kinks of |.| and relu)."""
    w = _all_terms()
    head, layer, token, hl, ll = _soft_inputs(seed=1)

    def total(head, layer, token, hl, ll):
        return sum(usage_loss(head, layer, token, hl, ll, weights=w).values())

    args = tuple(t.clone().requires_grad_() for t in (head, layer, token, hl, ll))
    assert torch.autograd.gradcheck(total, args, eps=1e-6, atol=1e-7)

    # with skipped blocks the mask is a constant (layer_select not perturbed: the mask flips at 0)
    skipped = layer.clone()
    skipped[1, 0] = 0.0
    skipped[0, 2] = 0.0
    args = tuple(t.clone().requires_grad_() for t in (head, token, hl, ll))
    assert torch.autograd.gradcheck(lambda h_, t_, hl_, ll_: total(h_, skipped, t_, hl_, ll_), args, eps=1e-6,
                                    atol=1e-7)


def test_head_mask_has_no_gradient_and_straight_through_passes_soft_gradient():
    w = UsageLossWeights()
    head, layer, _, _, _ = _soft_inputs(seed=2)
    layer = layer.requires_grad_()
    head_loss = head_usage_loss(head, layer, None, w)
    assert not head_loss.requires_grad  # the mask (layer_select.sum(-1) > 0) is not differentiable
    # straight-through hard decisions: value of the hard decision, gradient of the soft one
    soft = head.clone().requires_grad_()
    hard = (soft > 0.5).to(soft.dtype) - soft.detach() + soft
    (g_st,) = torch.autograd.grad(head_usage_loss(hard, layer.detach(), None, w), soft)
    probe = (soft > 0.5).to(soft.dtype).requires_grad_()
    (g_hard,) = torch.autograd.grad(head_usage_loss(probe, layer.detach(), None, w), probe)
    torch.testing.assert_close(g_st, g_hard)


def test_minimal_terms_token_scales_with_batch_head_layer_do_not():
    """The token minimal term sums over batch x blocks; head/layer minimal sum over blocks of batch means."""
    w = UsageLossWeights(head_minimal_weight=1.0, head_minimal=0.9, layer_minimal_weight=1.0, layer_minimal=0.9,
                         token_minimal_weight=1.0, token_minimal=0.9, head_ratio=0, layer_ratio=0, token_ratio=0,
                         head_target_ratio=0, layer_target_ratio=0, token_target_ratio=0)
    head, layer, token, _, _ = _soft_inputs(seed=3)
    twice = [torch.cat([x, x]) for x in (head, layer, token)]
    base_t = token.mean()
    tok1 = token_usage_loss(token, w) - base_t ** 2
    tok2 = token_usage_loss(twice[2], w) - base_t ** 2
    torch.testing.assert_close(tok2, 2 * tok1)
    # equal up to the official 1e-6 in the masked-mean denominators (the mask sum doubles, the 1e-6 does not)
    torch.testing.assert_close(head_usage_loss(twice[0], twice[1], None, w), head_usage_loss(head, layer, None, w),
                               rtol=1e-5, atol=0)
    torch.testing.assert_close(layer_usage_loss(twice[1], None, w), layer_usage_loss(layer, None, w))


def test_missing_decisions_and_argument_checks():
    w = _all_terms()
    head, layer, token, hl, ll = _soft_inputs(seed=4, dtype=torch.float32)
    # no layer decision: the head mask is all ones
    ones = torch.ones_like(layer)
    torch.testing.assert_close(head_usage_loss(head, None, hl, w), head_usage_loss(head, ones, hl, w))
    # a missing decision contributes a zero scalar on the others' device/dtype
    terms = usage_loss(None, layer.double(), None, None, ll.double(), weights=w)
    assert terms["head"].item() == 0 and terms["token"].item() == 0
    assert terms["head"].dtype == torch.float64 and terms["head"].shape == ()
    none = usage_loss(None, None, None)
    assert all(v.item() == 0 and v.shape == () for v in none.values())
    # only the entropy terms need logits
    usage_loss(head, layer, token, weights=UsageLossWeights())
    with pytest.raises(ValueError, match="head_logits"):
        usage_loss(head, layer, token, None, ll, weights=w)
    with pytest.raises(ValueError, match="layer_logits"):
        usage_loss(head, layer, token, hl, None, weights=w)
    with pytest.raises(ValueError, match="head_diverse_ratio"):
        UsageLossWeights(head_diverse_ratio=-0.1)
    with pytest.raises(TypeError):
        UsageLossWeights(token_ratio="2")
    with pytest.raises(KeyError, match="head_slowfast"):
        UsageLossWeights.from_adaloss_kwargs({"head_slowfast": 1.0})
    assert UsageLossWeights.from_adaloss_kwargs({"head_loss_ratio": 3.0}).head_ratio == 3.0


# ------------------------------------------------------------------------------------------------------- FLOPs

def test_flops_table_matches_official_tiny(golden):
    c, n = _dims(golden)
    table = official_flops_table(c["num_heads"], n, c["embed_dim"], c["mlp_ratio"])
    assert table.shape == golden["flops_dict"].shape == (c["num_heads"] + 1, n + 1, 2, 2)
    assert table.dtype == torch.float32
    torch.testing.assert_close(table, golden["flops_dict"], rtol=0, atol=1e-12)
    f64 = official_flops_table(c["num_heads"], n, c["embed_dim"], c["mlp_ratio"], token_rounding="float64")
    torch.testing.assert_close(f64, golden["flops_dict_float64_rounding"], rtol=0, atol=1e-12)


def test_flops_table_matches_shipped_deit_s(golden):
    shipped = golden["flops_shipped_deit_s"]["flops_dict"]
    table = official_flops_table(6, 197, 384, 4)
    assert table.shape == shipped.shape == (7, 198, 2, 2)
    torch.testing.assert_close(table, shipped, rtol=0, atol=1e-12)
    # the float64 (released Python) and exact token counts do not give the shipped table
    for rounding in ("float64", "exact"):
        assert not torch.equal(official_flops_table(6, 197, 384, 4, token_rounding=rounding), shipped)


def test_token_rounding_and_documented_quirks():
    counts = official_token_counts(197)
    assert [t for t in range(198) if counts[t] != t] == [13, 26, 51, 52, 53, 102, 104, 106, 117, 119, 121]
    short = torch.tensor([13, 26, 51, 52, 53, 102, 104, 106, 117, 119, 121])
    assert torch.equal(counts[short], short - 1)  # one token less, never more
    f64 = official_token_counts(197, "float64")
    assert [t for t in range(1, 17) if f64[t] != t] == [1, 2, 4, 8, 16]
    assert torch.equal(official_token_counts(197, "exact"), torch.arange(198))
    with pytest.raises(ValueError):
        official_token_counts(197, "float16")

    H, N, C, hid = 6, 197, 384, 1536
    tab = official_flops_table(H, N, C, 4, token_rounding="exact", dtype=torch.float64)
    ln = 5 * N * C
    assert (tab[0] == 0).all() and (tab[:, 0] == 0).all()  # zero heads or zero tokens: free, MLP included
    assert tab[3, 100, 0, 0].item() == ln / 1e9  # both branches off still pays norm2 on all N tokens
    h, t = 3, 100
    w = C * h // H
    attn = ln + 3 * t * C * w + 2 * t * t * w + t * w * w  # proj counted w x w
    mlp = t * w * hid + t * hid * C
    assert tab[h, t, 1, 1].item() == (attn + ln + mlp) / 1e9
    assert tab[h, t, 1, 0].item() == (attn + ln) / 1e9 and tab[h, t, 0, 1].item() == (ln + mlp) / 1e9
    # DeiT-S full block and full model (spec: 12 * 0.37915 + 0.06 = 4.61)
    assert abs(tab[H, N, 1, 1].item() - 0.37915) < 1e-5
    with pytest.raises(ValueError):
        official_flops_table(5, 197, 384, 4)


def test_per_sample_gflops_match_official(golden):
    c, n = _dims(golden)
    depth = c["depth"]
    table = official_flops_table(c["num_heads"], n, c["embed_dim"], c["mlp_ratio"])
    base = golden["config"]["flops_base"]
    assert base == official_base_gflops("ada_step_deit_small_patch16_224") == 0.06
    decisions = golden["head_select"], golden["layer_select"], golden["token_select"]
    got = official_gflops(table, *decisions, depth=depth, base=base, keep_layers=c["keep_layers"],
                          token_start_layer=c["ada_token_start_layer"])
    assert got.shape == (decisions[0].shape[0],) and got.dtype == torch.float32
    torch.testing.assert_close(got, golden["gflops"], rtol=0, atol=GFLOPS_ATOL)
    # decisions differ per image, so the GFLOPs do too
    assert got.unique().numel() == got.numel()

    exact_base = exact_base_gflops(n - 1, c["patch_size"], c["in_chans"], c["embed_dim"], c["num_classes"])
    torch.testing.assert_close(official_gflops(table, *decisions, depth=depth, base=exact_base),
                               golden["gflops_exact_base"], rtol=0, atol=GFLOPS_ATOL)

    full = official_gflops(table, None, None, None, depth=depth, base=base, batch_size=2)
    torch.testing.assert_close(full, torch.full((2,), golden["gflops_full_model"]), rtol=0, atol=GFLOPS_ATOL)
    full64 = official_gflops(table.double(), None, None, None, depth=depth, base=base, batch_size=1)
    assert full64.dtype == torch.float64 and abs(full64.item() - golden["gflops_full_model"]) < 1e-12
    # all-on decisions equal the full model
    ones = [torch.ones_like(d) for d in decisions]
    torch.testing.assert_close(official_gflops(table, *ones, depth=depth, base=base), full[:1].expand(4))


def test_per_sample_gflops_shipped_deit_s(golden):
    s = golden["flops_shipped_deit_s"]
    table = official_flops_table(6, 197, 384, 4)
    got = official_gflops(table, s["head_select"], s["layer_select"], s["token_select"], depth=s["block_num"],
                          base=s["base_flops"], keep_layers=1, token_start_layer=0)
    torch.testing.assert_close(got, s["gflops"], rtol=0, atol=GFLOPS_ATOL)
    full = official_gflops(table, None, None, None, depth=12, base=official_base_gflops("deit_small"), batch_size=1)
    assert abs(full.item() - 4.61) < 5e-3
    assert official_base_gflops("ada_step_t2t_vit_19_lnorm") == 0.33


def _ref_gflops(table, head, layer, token, depth, base):
    """block_flops_dict.select_flops, one image at a time: leading undecided blocks full, Python loop."""
    H, N = table.shape[0] - 1, table.shape[1] - 1
    out = []
    for b in range(head.shape[0]):
        hs = [H] * (depth - head.shape[1]) + [int(v) for v in head[b].sum(-1)]
        ls = [[1, 1]] * (depth - layer.shape[1]) + [[int(x) for x in v] for v in layer[b]]
        ts = [N] * (depth - token.shape[1]) + [int(v) for v in token[b].sum(-1)]
        f = base
        for hh, tt, ll in zip(hs, ts, ls):
            f += table[hh, tt, ll[0], ll[1]]
        out.append(f)
    return torch.stack(out)


def test_gflops_leading_blocks_without_decisions_and_checks():
    """keep_layers 2 / token start 1 (the heldout layout): undecided leading blocks count full."""
    g = torch.Generator().manual_seed(5)
    H, N, depth = 3, 26, 12
    table = official_flops_table(H, N, 60, 4)
    head = (torch.rand(3, 10, H, generator=g) > 0.4).float()
    head[0, 3] = 0  # a zero-head block
    layer = (torch.rand(3, 10, 2, generator=g) > 0.4).float()
    token = (torch.rand(3, 11, N, generator=g) > 0.5).float()
    token[..., 0] = 1
    got = official_gflops(table, head, layer, token, depth=depth, base=0.33, keep_layers=2, token_start_layer=1)
    torch.testing.assert_close(got, _ref_gflops(table, head, layer, token, depth, 0.33), rtol=0, atol=0)
    # a missing decision counts full for every block
    got = official_gflops(table, head, None, token, depth=depth, base=0.33)
    torch.testing.assert_close(got, _ref_gflops(table, head, torch.ones(3, 0, 2), token, depth, 0.33), rtol=0, atol=0)
    with pytest.raises(ValueError, match="head_select"):
        official_gflops(table, head, layer, token, depth=depth, base=0.33, keep_layers=1)
    with pytest.raises(ValueError, match="token_select"):
        official_gflops(table, head, layer, token, depth=depth, base=0.33, token_start_layer=0)
    with pytest.raises(ValueError, match="tokens"):
        official_gflops(table, head, layer, token[..., :-1], depth=depth, base=0.33)
    with pytest.raises(ValueError, match="batch_size"):
        official_gflops(table, None, None, None, depth=depth, base=0.33)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(golden):
    c, n = _dims(golden)
    table = official_flops_table(c["num_heads"], n, c["embed_dim"], c["mlp_ratio"])
    dev = torch.device("cuda")
    assert torch.equal(official_flops_table(c["num_heads"], n, c["embed_dim"], c["mlp_ratio"], device=dev).cpu(), table)
    d = [golden[k].to(dev) for k in ("head_select", "layer_select", "token_select")]
    got = official_gflops(table, *d, depth=c["depth"], base=0.06)
    assert got.device.type == "cuda"
    torch.testing.assert_close(got.cpu(), golden["gflops"], rtol=0, atol=GFLOPS_ATOL)
    w = _weights(golden, "all_terms")
    terms = usage_loss(*d, golden["head_select_logits"].to(dev), golden["layer_select_logits"].to(dev), weights=w)
    ref = golden["losses_eval"]["all_terms"]
    assert terms["head"].device.type == "cuda"
    assert abs(terms["head"].item() / w.head_ratio - ref["head_loss"].item()) <= LOSS_ATOL
    assert abs(terms["token"].item() / w.token_ratio - ref["token_loss"].item()) <= LOSS_ATOL
