"""AdaViT (adaptive heads, blocks and tokens): golden parity, synthetic goldens from an independent reference of
the official forward (specs/avit_adavit.md §2, tests/helpers_adavit.py), packed vs masked execution and batch
independence (crafted images with fully skipped blocks and zero kept heads), costs (official table GFLOPs and
packed MACs), official and DeiT checkpoint files, and training end to end.

The shared golden lives in <repo>/../shared/golden/adavit (override with VITADAPT_GOLDEN_DIR); the tests that need
it skip when it is absent. Tolerances as the golden README asks: outputs 1e-5, losses 1e-6, decisions exact.
The usage losses and the FLOPs table functions have their own tests (test_adavit_costs.py).
"""

import argparse
import functools
import logging
import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import helpers_adavit as H  # noqa: E402
import helpers_e2e as h  # noqa: E402
from helpers_unit import max_diff, official_eval_model, random_images, write_goldens  # noqa: E402
from vitadapt.config import load_config  # noqa: E402
from vitadapt.errors import VitadaptError  # noqa: E402
from vitadapt.models import build_model  # noqa: E402
from vitadapt.models.adavit import official_to_config_opts  # noqa: E402
from vitadapt.parity import check_file  # noqa: E402
from vitadapt.utils.checkpoint import load_weights  # noqa: E402

OUT_ATOL = 1e-5
LOSS_ATOL = 1e-6
# Smallest |sigmoid(logit) - threshold| a test input may have: float noise (~1e-6 on the logits of these x5-scaled
# weights) cannot flip a decision.
MIN_MARGIN = 1e-4
DECISIONS = ("head_select", "layer_select", "token_select")

pytestmark = pytest.mark.usefixtures("one_thread")  # the goldens were recorded single-threaded


_max_diff, _images = max_diff, random_images
_model = functools.partial(official_eval_model, official_to_config_opts)


def _run(model, images):
    """(logits, stacked decisions as 0/1 uint8, per-block outputs [B, L, N, C]) of an eval forward, no grad."""
    model.trace_hidden = True
    with torch.no_grad():
        logits = model(images)
    d = model.stacked_decisions()
    hard = {k: None if d[k] is None else (d[k] > 0.5).to(torch.uint8) for k in DECISIONS}
    return logits, hard, torch.stack(model.last_hidden, dim=1)


def _hard(out):
    return {k: None if out[k] is None else (out[k] > 0.5).to(torch.uint8) for k in DECISIONS}


def _assert_same_decisions(a, b, what):
    for k in DECISIONS:
        assert (a[k] is None) == (b[k] is None), (what, k)
        if a[k] is not None:
            assert torch.equal(a[k], b[k]), f"{what}: {k} differ at {torch.nonzero(a[k] != b[k]).tolist()[:5]}"


def _hidden_atol(hidden):
    """1e-5 relative to the largest activation (the x5-scaled blocks of the goldens grow them to ~1e2)."""
    return OUT_ATOL * max(1.0, hidden.abs().max().item())


@pytest.fixture(scope="module")
def golden_dev():
    return h.load_golden_or_skip(H.GOLDEN_DEV)


# ==============================================================================================================
# 1. The shared golden (official MengLcool/AdaViT code)
# ==============================================================================================================

def test_reference_reproduces_golden_dev(golden_dev):
    """The independent reference (helpers_adavit) reproduces the official golden, replaying its Gumbel draws: what
    backs the synthetic goldens below."""
    g = golden_dev
    mine = H.golden_from_reference(g["config"], g["state_dict"], g["input"], g["labels"],
                                   replay=g["train"]["gumbel_calls"])
    assert _max_diff(mine["logits"], g["logits"]) <= OUT_ATOL
    assert _max_diff(mine["hidden"], g["hidden"]) <= OUT_ATOL
    assert _max_diff(mine["attn_origin"], g["attn_origin"]) <= OUT_ATOL
    for k in DECISIONS + ("block_full_skip",):
        assert torch.equal(mine[k], g[k]), k
    for k in ("head_select_logits", "layer_select_logits", "token_select_logits"):
        assert _max_diff(mine[k], g[k]) <= OUT_ATOL, k
    for kind, margin in g["decision_margin_min"].items():
        assert mine["decision_margin_min"][kind] == pytest.approx(margin, abs=1e-6), kind
    # The FLOPs table (closed form of specs §2.4) and the per-image GFLOPs of the official batch_select_flops.
    assert torch.equal(mine["flops_dict"], g["flops_dict"])
    assert _max_diff(mine["gflops"], g["gflops"]) <= 1e-7
    shipped = g["flops_shipped_deit_s"]
    table = H.flops_table(6, 197, 384, 4)
    assert torch.equal(table, shipped["flops_dict"])  # the released DeiT-S table, bit for bit
    gflops = H.table_gflops(table, shipped["head_select"], shipped["layer_select"], shipped["token_select"],
                            shipped["block_num"], shipped["base_flops"])
    assert _max_diff(gflops, shipped["gflops"]) <= 1e-7
    # Train mode: the same Gumbel calls in the official order, the same straight-through outputs.
    calls, ref_calls = mine["train"]["gumbel_calls"], g["train"]["gumbel_calls"]
    assert [c["module"] for c in calls] == [c["module"] for c in ref_calls]
    assert all(torch.equal(a["out"], b["out"]) for a, b in zip(calls, ref_calls))
    assert _max_diff(mine["train"]["logits"], g["train"]["logits"]) <= OUT_ATOL
    for k in DECISIONS:
        assert torch.equal(mine["train"][k], g["train"][k]), k
    for where in ("losses_eval", "train"):
        ref = g[where] if where == "losses_eval" else g["train"]["losses"]
        got = mine[where] if where == "losses_eval" else mine["train"]["losses"]
        for setting, terms in ref.items():
            for term, value in terms.items():
                assert _max_diff(got[setting][term], value) <= LOSS_ATOL, (where, setting, term)
    for setting in g["config"]["losses"]:
        ref = g["grads"][setting]
        assert set(mine["grads"][setting]) == set(ref)
        assert mine["grads"][setting + "_none"] == list(g["grads"][setting + "_none"]) == ["pos_embed"]
        scale = max(v.abs().max().item() for v in ref.values())
        worst = max(_max_diff(mine["grads"][setting][k], v) for k, v in ref.items())
        assert worst <= 1e-5 * scale, (setting, worst, scale)


def test_check_parity_cli_golden_dev(golden_dev):
    proc = h.check_parity_cli(H.GOLDEN_DEV)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "MISMATCH" not in proc.stdout and "all match" in proc.stdout, proc.stdout
    for execution in ("masked", "packed"):
        for what in ("logits", "head_select", "layer_select", "token_select", "output of every block",
                     "official GFLOPs", "train logits", "ada_main_defaults gradients", "all_terms gradients"):
            assert f"[{execution}] {what}" in proc.stdout, (execution, what)


# ==============================================================================================================
# 2. Other files from the same harness: synthetic goldens from the independent reference
# ==============================================================================================================

HELDOUT_PERTURBATION = dict(block_linear_scale=4.0, token_w_scale=12.0, token_bias=0.6, head_w_scale=25.0,
                            head_bias=0.3, layer_w_scale=15.0, layer_bias=0.8)
HELDOUT_LOSSES = {"ada_main_defaults": dict(H.ADA_MAIN_DEFAULTS, head_target_ratio=0.7, layer_loss_ratio=1.0,
                                            token_target_ratio=0.6),
                  "all_terms": H.all_terms(head_minimal=0.5, token_minimal=0.7, layer_entropy_weight=0.2)}
# A LayerNorm'd policy token has unit-scale channels: decision heads need smaller weights than on the raw CLS.
NORM_POLICY_PERTURBATION = dict(head_w_scale=3.0, head_bias=0.0, layer_w_scale=3.0, layer_bias=0.1)

SYNTHETIC = {
    # The README's held-out setting: img 80, embed 60 (head_dim 20), B=3, keep_layers 2, token decisions from
    # block 1, detach_attn_at_mlp, other seeds, perturbation and loss weights.
    "heldout": dict(ctor=H.constructor(img_size=80, embed_dim=60, keep_layers=2, ada_token_start_layer=1,
                                       ada_token_detach_attn_at_mlp=True),
                    batch=3, labels=[2, 0, 6], model_seed=11, input_seed=4242, noise_seed=31337,
                    perturbation=HELDOUT_PERTURBATION, losses=HELDOUT_LOSSES),
    "head_v2": dict(ctor=H.constructor(depth=6, ada_head_v2=True), model_seed=201),
    "head_attn": dict(ctor=H.constructor(depth=6, ada_head_attn=True), model_seed=402, input_seed=5),
    "head_attn_post_softmax": dict(ctor=H.constructor(depth=6, ada_head_attn=True, ada_token_pre_softmax=False),
                                   model_seed=202, input_seed=5),
    "token_without_mlp": dict(ctor=H.constructor(depth=6, ada_token_with_mlp=False), model_seed=3),
    "post_softmax": dict(ctor=H.constructor(depth=6, ada_token_pre_softmax=False), model_seed=804),
    "norm_policy": dict(ctor=H.constructor(depth=6, norm_policy=True), model_seed=205,
                        perturbation=NORM_POLICY_PERTURBATION),
    "layer_only": dict(ctor=H.constructor(depth=6, ada_head=False, ada_token=False, ada_token_with_mlp=False),
                       model_seed=6),
    "token_only": dict(ctor=H.constructor(depth=6, ada_head=False, ada_layer=False), model_seed=107),
    "head_only": dict(ctor=H.constructor(depth=6, ada_layer=False, ada_token=False, ada_token_with_mlp=False),
                      model_seed=8),
    # Token decisions start after the head/layer ones (padded differently in the FLOPs sum); fc1 units of head_v2
    # grouped by a mlp_ratio of 2.
    "late_tokens_head_v2_mlp2": dict(ctor=H.constructor(depth=6, ada_token_start_layer=3, ada_head_v2=True,
                                                        mlp_ratio=2), model_seed=110),
    "keep_layers_3": dict(ctor=H.constructor(depth=6, keep_layers=3), model_seed=612),
    # Gradients through the attention mask into the token decisions; no q/k/v biases (official class default).
    "attn_mask_grad_no_qkv_bias": dict(ctor=H.constructor(depth=6, ada_token_detach_attn=False, qkv_bias=False),
                                       model_seed=109),
}


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return write_goldens(tmp_path_factory.mktemp("adavit_synthetic"), H.synthetic_golden, SYNTHETIC)


def test_synthetic_goldens_exercise_what_they_should(synthetic):
    for name, (golden, _) in synthetic.items():
        ctor = golden["config"]["constructor"]
        for where, margins in (("eval", golden["decision_margin_min"]),
                               ("train", golden["train"]["decision_margin_min"])):
            assert min(margins.values()) > MIN_MARGIN, (name, where, margins)
        for k in DECISIONS:
            decided = golden[k]
            kind = k.split("_")[0]
            assert (decided is None) == (not ctor[f"ada_{kind}"]), (name, k)
            if decided is None:
                continue
            usage = decided[..., 1:].mean().item() if kind == "token" else decided.mean().item()
            assert 0.15 < usage < 0.95, (name, k, usage)
            assert not all(torch.equal(decided[0], decided[b]) for b in range(1, decided.shape[0])), (name, k)
            assert not torch.equal(decided, golden["train"][k]), (name, k)  # the noise changes some decisions
        if ctor["ada_layer"]:
            assert golden["block_full_skip"].sum() > 0, name  # some image skips some block entirely
    held = synthetic["heldout"][0]
    assert held["input"].shape == (3, 3, 80, 80) and held["hidden"].shape == (3, 12, 26, 60)
    assert held["head_select"].shape == (3, 10, 3) and held["token_select"].shape == (3, 11, 26)
    assert held["block_full_skip"].sum() > 0


@pytest.mark.parametrize("name", list(SYNTHETIC))
def test_check_file_on_synthetic_golden(synthetic, name):
    golden, path = synthetic[name]
    comparisons = check_file(str(path))
    bad = [c.line() for c in comparisons if not c.ok]
    assert not bad, bad
    names = [c.name for c in comparisons]
    for execution in ("masked", "packed"):
        for what in ("logits", "output of every block", "official GFLOPs per image", "train logits",
                     "ada_main_defaults gradients", "all_terms gradients"):
            assert any(n.startswith(f"[{execution}] {what}") for n in names), (execution, what)
        for k in DECISIONS:
            assert any(n == f"[{execution}] {k}" for n in names) == (golden[k] is not None), (execution, k)


@pytest.mark.parametrize("variant,expected", [("fc1_unmasked", "logits"), ("token_threshold_0.5", "token_select")])
def test_a_wrong_reference_is_caught(tmp_path, variant, expected):
    """check_file on a golden written by a deliberately wrong reading of the official code fails, naming what
    differs: the synthetic goldens can tell such details apart."""
    kw = dict(SYNTHETIC["head_v2"])
    if variant == "fc1_unmasked":  # plain ada_head: fc1's input channels are where the head mask goes
        kw["ctor"] = H.constructor(depth=6)
    path = tmp_path / f"wrong_{variant}.pt"
    torch.save(H.synthetic_golden(variant=variant, **kw), path)
    bad = [c.name for c in check_file(str(path)) if not c.ok]
    assert any(f"[masked] {expected}" in n for n in bad) and any(f"[packed] {expected}" in n for n in bad), bad


def test_no_drop_path_in_blocks_with_branch_decisions(synthetic):
    """VIT.DROP_PATH_RATE > 0: the official model applies no DropPath in blocks with layer decisions, and the
    linspace(0, rate, depth) rule gives block 0 (the only block without them at KEEP_LAYERS 1) rate 0, so the
    training forward (recorded Gumbel draws replayed) is the reference's without any drop path."""
    golden = synthetic["post_softmax"][0]
    model = _model(golden["config"], golden["state_dict"], "masked", ["VIT.DROP_PATH_RATE", "0.5"]).train()
    calls = iter(golden["train"]["gumbel_calls"])

    def replay(name, logits):
        call = next(calls)
        assert call["module"] == name
        return call["gumbel1"].reshape(logits.shape), call["gumbel2"].reshape(logits.shape)

    model.noise_source = replay
    torch.manual_seed(0)
    logits = model(golden["input"])
    assert _max_diff(logits, golden["train"]["logits"]) <= OUT_ATOL


# ==============================================================================================================
# 3. Packed (real skipping) equals masked (the official computation), per image, whatever the batch
# ==============================================================================================================

CRAFT_CTOR = H.constructor(depth=8)
CRAFT_PLAN = {
    2: {"heads_split": True, "layer_bias": 50.0},  # half the images keep no head at all, both branches on
    3: {"layer_split": True},  # half the images skip block 3 entirely
    4: {"head_bias": -50.0, "layer_bias": 50.0},  # no image keeps a head
    5: {"token_bias": -50.0},  # every image keeps only CLS
    6: {"layer_bias": -50.0},  # every image skips the block
    7: {"head_bias": 50.0, "layer_bias": 50.0, "token_bias": 50.0},  # everything on
}


@pytest.fixture(scope="module")
def crafted():
    images = _images(6, 64, seed=100)
    sd = H.craft(CRAFT_CTOR, H.random_state_dict(CRAFT_CTOR, seed=0), images, CRAFT_PLAN)
    config = H.golden_config(CRAFT_CTOR)
    with torch.no_grad():
        ref = H.ref_forward(CRAFT_CTOR, sd, images)
    return {"config": config, "sd": sd, "images": images, "ref": ref}


def test_crafted_cases_exist(crafted):
    ref = crafted["ref"]
    assert min(ref["margins"].values()) > MIN_MARGIN, ref["margins"]
    heads, layer, tokens = ref["head_select"], ref["layer_select"], ref["token_select"]  # blocks 1.. / 1.. / 0..
    zero_heads = heads[:, 1].sum(-1) == 0
    assert 0 < zero_heads.sum() < 6 and (layer[:, 1] == 1).all()  # block 2: some images keep no head, branches on
    skipped = layer[:, 2].sum(-1) == 0
    assert 0 < skipped.sum() < 6 and (layer[~skipped, 2] == 1).all()  # block 3: some images skip it entirely
    assert (heads[:, 3] == 0).all() and (tokens[:, 5, 1:] == 0).all() and (layer[:, 5] == 0).all()
    assert (heads[:, 6] == 1).all() and (layer[:, 6] == 1).all() and (tokens[:, 7] == 1).all()
    kept = tokens[:, :5, 1:].sum(-1)
    assert len(kept.unique()) > 4  # varied token counts elsewhere


def _setting(name, synthetic, crafted):
    if name == "crafted":
        return crafted["config"], crafted["sd"], crafted["images"]
    golden = synthetic[name][0]
    return golden["config"], golden["state_dict"], golden["input"]


PACKED_SETTINGS = ["crafted", "heldout", "head_v2", "head_attn", "token_without_mlp", "norm_policy", "layer_only",
                   "token_only", "head_only", "late_tokens_head_v2_mlp2", "keep_layers_3"]


@pytest.mark.parametrize("name", PACKED_SETTINGS)
def test_packed_equals_masked_and_reference(synthetic, crafted, name):
    config, sd, images = _setting(name, synthetic, crafted)
    with torch.no_grad():
        ref = H.ref_forward(config["constructor"], sd, images)
    results = {}
    for execution in ("masked", "packed", "packed pairs"):
        model = _packed_model(config, sd, execution)
        logits, decisions, hidden = _run(model, images)
        assert _max_diff(logits, ref["logits"]) <= OUT_ATOL, execution
        _assert_same_decisions(decisions, _hard(ref), f"{execution} vs reference")
        assert _max_diff(hidden, ref["hidden"]) <= _hidden_atol(ref["hidden"]), execution
        results[execution] = (logits, decisions, hidden)
    lm, dm, hm = results["masked"]
    for execution in ("packed", "packed pairs"):
        lp, dp, hp = results[execution]
        assert _max_diff(lp, lm) <= OUT_ATOL
        _assert_same_decisions(dp, dm, f"{execution} vs masked")
        assert _max_diff(hp, hm) <= _hidden_atol(hm)


def _packed_model(config, sd, execution):
    """The model in `execution` "masked", "packed" (on a CPU: attention with head decisions per image) or "packed
    pairs" (that attention over all (image, head) pairs at once, as on a GPU)."""
    model = _model(config, sd, execution.split()[0])
    model.per_image_attention = execution != "packed pairs"
    return model


def test_packed_equals_masked_golden_dev(golden_dev):
    results = {}
    for execution in ("masked", "packed"):
        model = _model(golden_dev["config"], golden_dev["state_dict"], execution)
        results[execution] = _run(model, golden_dev["input"])
    (lm, dm, hm), (lp, dp, hp) = results["masked"], results["packed"]
    assert _max_diff(lp, lm) <= OUT_ATOL and _max_diff(hp, hm) <= OUT_ATOL
    _assert_same_decisions(dp, dm, "packed vs masked")


@pytest.mark.parametrize("execution", ["packed", "packed pairs", "masked"])
@pytest.mark.parametrize("name", ["crafted", "heldout", "head_v2", "token_without_mlp"])
def test_an_image_does_not_depend_on_its_batch_mates(synthetic, crafted, name, execution):
    """Each image alone (batch 1), in the batch, in the batch reversed and in a batch of itself repeated: the same
    logits, decisions and per-block outputs (the crafted batch mixes images with no kept head, images that skip
    a block entirely, blocks no image runs and blocks where only CLS is kept)."""
    config, sd, images = _setting(name, synthetic, crafted)
    model = _packed_model(config, sd, execution)
    logits, decisions, hidden = _run(model, images)
    macs = model.macs_per_image()
    gflops = model.official_gflops()
    b = images.shape[0]
    reverse = torch.arange(b - 1, -1, -1)
    lr, dr, hr = _run(model, images[reverse])
    assert _max_diff(lr[reverse], logits) <= OUT_ATOL
    assert _max_diff(hr[reverse], hidden) <= _hidden_atol(hidden)
    _assert_same_decisions({k: None if v is None else v[reverse] for k, v in dr.items()}, decisions, "reversed")
    assert torch.equal(model.macs_per_image()[reverse], macs)
    for i in range(b):
        li, di, hi = _run(model, images[i:i + 1])
        assert _max_diff(li, logits[i:i + 1]) <= OUT_ATOL, i
        assert _max_diff(hi, hidden[i:i + 1]) <= _hidden_atol(hidden), i
        _assert_same_decisions(di, {k: None if v is None else v[i:i + 1] for k, v in decisions.items()}, f"image {i}")
        assert torch.equal(model.macs_per_image(), macs[i:i + 1]), i
        assert _max_diff(model.official_gflops(), gflops[i:i + 1]) <= 1e-7, i
    lrep, _, _ = _run(model, images[:1].repeat(3, 1, 1, 1))
    assert _max_diff(lrep, logits[:1].expand(3, -1)) <= OUT_ATOL


def test_packed_really_skips(crafted):
    """Packed execution runs no MLP a batch skips (block 6) and runs a block's MLP only on the kept tokens of the
    images whose MLP branch is on: a forward hook on fc2 counts the rows; masked runs everything densely."""
    config, sd, images = crafted["config"], crafted["sd"], crafted["images"]
    seen = {}
    for execution in ("packed", "masked"):
        model = _model(config, sd, execution)
        calls = []
        hooks = [model.blocks[i].mlp.fc2.register_forward_hook(
            lambda m, inp, out, i=i: calls.append((i, inp[0].reshape(-1, inp[0].shape[-1]).shape[0])))
            for i in range(len(model.blocks))]
        with torch.no_grad():
            model(images)
        for hook in hooks:
            hook.remove()
        seen[execution] = calls
    ref = crafted["ref"]
    ran = {i: n for i, n in seen["packed"]}
    assert 6 not in ran  # every image skips block 6
    # Block 7 runs the MLP of every kept token of every image (all tokens kept there).
    assert ran[7] == 6 * 17
    # Block 0 (no layer decision; token decisions, with MLP): only the kept tokens go through fc1.
    assert ran[0] == int(ref["token_select"][:, 0].sum().item())
    assert all(n == 6 * 17 for _, n in seen["masked"]) and len(seen["masked"]) == 8


def _matrix_products(model, images):
    """(logits, number of aten mm / addmm calls) of an eval forward."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm):
                Count.calls += 1
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), Count():
        logits = model(images)
    return logits, Count.calls


def test_images_keeping_the_same_heads_share_their_qkv_products(crafted):
    """On a CPU, packed attention takes the images that keep the same heads together: the batch [a, b, a, b]
    costs the q, k, v products of [a, b] (one per group of images keeping the same heads, not per image), and
    its outputs are [a, b]'s, in the batch's order."""
    config, sd, images = crafted["config"], crafted["sd"], crafted["images"]
    model = _packed_model(config, sd, "packed")
    # Image 0 and the image that adds the most products of its own to it (other heads kept where attention runs).
    pair = max((images[[0, j]] for j in range(1, len(images))), key=lambda pair: _matrix_products(model, pair)[1])
    logits, products = _matrix_products(model, pair)
    interleaved, interleaved_products = _matrix_products(model, pair[[0, 1, 0, 1]])
    assert interleaved_products == products
    assert _max_diff(interleaved, logits[[0, 1, 0, 1]]) <= OUT_ATOL
    _, per_image = _matrix_products(model, images[:1])
    assert products > per_image  # the second image has products of its own


@pytest.mark.parametrize("autocast", [False, True])
def test_packed_equals_masked_with_kept_heads_apart(crafted, autocast):
    """A block where every image keeps the first and the last head, not the middle one: packed attention computes the
    q, k, v of the two kept heads (not consecutive) in one product, as masked execution zeroes the dropped one (also
    under bf16 autocast)."""
    config, sd, images = crafted["config"], dict(crafted["sd"]), crafted["images"]
    block = 1
    head = f"blocks.{block}.head_select.mlp_head."
    sd[head + "weight"], sd[head + "bias"] = torch.zeros_like(sd[head + "weight"]), torch.tensor([50.0, -50.0, 50.0])
    results = {}
    for execution in ("masked", "packed"):
        model = _packed_model(config, sd, execution)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits = model(images).float()
        results[execution] = logits, model.stacked_decisions()
    (lm, dm), (lp, dp) = results["masked"], results["packed"]
    assert (dp["head_select"][:, block - 1] == torch.tensor([1.0, 0.0, 1.0])).all()  # stacked from KEEP_LAYERS 1
    assert (dp["layer_select"][:, block - 1, 0] == 1).any()  # and the block's attention runs
    assert torch.equal(dp["head_select"], dm["head_select"])
    assert _max_diff(lp, lm) <= (0.1 if autocast else OUT_ATOL)  # bf16: the tolerance of the autocast test above

# ==============================================================================================================
# 4. Costs: official table GFLOPs and the MACs packed execution computes
# ==============================================================================================================

@pytest.mark.parametrize("name", ["crafted", "heldout", "token_only", "layer_only", "late_tokens_head_v2_mlp2"])
def test_official_gflops_equals_reference_table(synthetic, crafted, name):
    config, sd, images = _setting(name, synthetic, crafted)
    ctor = config["constructor"]
    with torch.no_grad():
        ref = H.ref_forward(ctor, sd, images)
    table = H.flops_table(ctor["num_heads"], ref["hidden"].shape[2], ctor["embed_dim"], ctor["mlp_ratio"])
    expected = H.table_gflops(table, ref["head_select"], ref["layer_select"], ref["token_select"], ctor["depth"],
                              config["flops_base"])
    for execution in ("packed", "masked"):
        model = _model(config, sd, execution)
        with torch.no_grad():
            model(images)
        assert _max_diff(model.official_gflops(), expected) <= 1e-7, execution
        assert _max_diff(model.image_statistics()["gflops_official"], expected) <= 1e-7, execution
    if name == "crafted":  # zero kept heads cost 0 in the official table, whatever the MLP does
        assert len(expected.unique()) > 1


TINY_CTOR = H.constructor(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=3, num_classes=3)


def _forced_model(plan, execution="packed"):
    """The tiny model (N 17, C 48, 3 heads, hidden 192, depth 3) with decision heads of zero weight and +-50 biases:
    the same decisions for every image. plan: {block: {"heads": [3 x +-1], "layer": [2 x +-1], "tokens": +-1}}."""
    sd = H.random_state_dict(TINY_CTOR, seed=3)
    for i, step in plan.items():
        for key, name in (("heads", "head_select"), ("layer", "layer_select"), ("tokens", "attn.token_select")):
            if key in step:
                sd[f"blocks.{i}.{name}.mlp_head.weight"].zero_()
                sd[f"blocks.{i}.{name}.mlp_head.bias"][:] = 50.0 * torch.tensor(step[key], dtype=torch.float32)
    return _model(H.golden_config(TINY_CTOR), sd, execution), sd


def _macs(plan, execution="packed"):
    model, _ = _forced_model(plan, execution)
    with torch.no_grad():
        model(_images(2, 32, seed=1))
    macs = model.macs_per_image()
    assert macs[0] == macs[1]
    return int(macs[0].item())


ALL_ON = {i: {"heads": [1, 1, 1], "layer": [1, 1], "tokens": 1} for i in (1, 2)}
ALL_ON[0] = {"tokens": 1}


def test_macs_hand_count():
    """Block 0: all 17 tokens, 3 heads, both branches (no head/layer decision before KEEP_LAYERS 1). Block 1: heads
    0 and 2 kept (w = 32 channels), attention on, MLP off, only CLS kept. Block 2: no head kept, attention off, MLP
    on, all tokens."""
    plan = {0: {"tokens": 1}, 1: {"heads": [1, -1, 1], "layer": [1, -1], "tokens": -1},
            2: {"heads": [-1, -1, -1], "layer": [-1, 1], "tokens": 1}}
    C, N, hid = 48, 17, 192
    token_select = N * C  # Linear(C, 1) on every token (CLS's decision is then replaced by 1)
    head_layer_select = C * 3 + C * 2  # Linear(C, H) and Linear(C, 2) on CLS
    block0 = token_select + (3 * N * C * C + 2 * N * N * C + N * C * C) + (N * C * hid + N * hid * C)
    w, t = 32, 1
    # q, k, v and attention of the kept heads; proj, fc1 and fc2 over all channels (the dropped ones are zeros).
    block1 = token_select + head_layer_select + (3 * t * C * w + 2 * t * t * w + t * C * C)
    block2 = token_select + head_layer_select + (N * C * hid + N * hid * C)  # fc1 on all-zero channels, fc2
    patch_embed, head = 16 * 3 * 8 * 8 * C, C * 3
    expected = block0 + block1 + block2 + patch_embed + head
    assert _macs(plan) == expected
    assert _macs(plan, "masked") == expected  # the count is of the decisions, not of the execution


def test_macs_decrease_with_fewer_tokens_heads_branches():
    full = _macs(ALL_ON)
    C, N, hid = 48, 17, 192
    cases = {  # block 1 changes -> MACs saved
        "tokens": ({"tokens": -1}, (3 * (N - 1) * C * C + 2 * (N * N - 1) * C + (N - 1) * C * C)
                   + (N - 1) * 2 * C * hid),
        "one head less": ({"heads": [1, 1, -1]}, N * (3 * C * 16 + 2 * N * 16)),
        "attention off": ({"layer": [-1, 1]}, 3 * N * C * C + 2 * N * N * C + N * C * C),
        "MLP off": ({"layer": [1, -1]}, 2 * N * C * hid),
    }
    for what, (change, saved) in cases.items():
        plan = {i: dict(step) for i, step in ALL_ON.items()}
        plan[1].update(change)
        macs = _macs(plan)
        assert macs < full, what
        assert full - macs == saved, what


def test_macs_follow_each_images_decisions(crafted):
    """Per image of the crafted batch: MACs by hand from the reference's decisions."""
    config, sd, images = crafted["config"], crafted["sd"], crafted["images"]
    model = _model(config, sd, "packed")
    with torch.no_grad():
        model(images)
    ref = crafted["ref"]
    C, N, H_, hid, depth = 48, 17, 3, 192, 8
    expected = torch.zeros(6, dtype=torch.float64)
    for i in range(depth):
        blk = ref["per_block"][i]
        heads = blk["head"].sum(-1) if blk["head"] is not None else torch.full((6,), float(H_))
        a, m = (blk["layer"][:, 0], blk["layer"][:, 1]) if blk["layer"] is not None else (torch.ones(6), torch.ones(6))
        t = blk["token"].sum(-1) if blk["token"] is not None else torch.full((6,), float(N))
        w = heads * (C // H_)
        decide = N * C + (C * H_ + C * 2 if blk["head"] is not None else 0)
        attention = 3 * t * C * w + 2 * t * t * w + t * C * C
        mlp = 2 * t * C * hid
        expected += (decide + a * attention + m * mlp).double()
    expected += 16 * 3 * 16 * 16 * C + C * 10
    assert torch.equal(model.macs_per_image().double(), expected)
    assert len(expected.unique()) > 2


# ==============================================================================================================
# 5. Checkpoint files
# ==============================================================================================================

def _module_prefixed(sd):
    return {"module." + k: v for k, v in sd.items()}


def _official_pth_tar(path, sd, sd_ema):
    """An official AdaViT trainer file (timm saver.py): module.-prefixed official-layout weights, argparse args."""
    args = argparse.Namespace(model="ada_step_deit_small_patch16_224", ada_head=True, ada_layer=True,
                              ada_token_with_mlp=True, keep_layers=1, model_ema=True)
    torch.save({"epoch": 299, "arch": "ada_step_deit_small_patch16_224", "state_dict": _module_prefixed(sd),
                "optimizer": {"state": {}, "param_groups": [{"lr": 1e-5, "params": []}]}, "version": 2,
                "args": args, "state_dict_ema": _module_prefixed(sd_ema), "metric": 77.3}, path)
    return str(path)


def _fresh(ctor, extra=()):
    cfg = load_config("", official_to_config_opts(H.golden_config(ctor)) + ["NUM_GPUS", "0"] + list(extra))
    torch.manual_seed(0)
    return build_model(cfg).eval()


@pytest.fixture(scope="module")
def two_weights():
    """Two official-layout weight sets of the tiny model (the 'model' and the 'EMA' of a training file)."""
    return (H.random_state_dict(TINY_CTOR, seed=21, block_linear_scale=3.0, token_bias=0.2, layer_bias=1.0),
            H.random_state_dict(TINY_CTOR, seed=22, block_linear_scale=3.0, token_bias=0.2, layer_bias=1.0))


@pytest.mark.parametrize("execution", ["packed", "masked"])
def test_official_pth_tar_loads_strictly_with_its_ema_weights(tmp_path, two_weights, execution):
    sd, sd_ema = two_weights
    path = _official_pth_tar(tmp_path / "ada_deit_s.pth.tar", sd, sd_ema)
    model = _fresh(TINY_CTOR, ["VIT.TOKEN_EXECUTION", execution])
    report = load_weights(model, path)
    assert not report.missing and not report.unexpected
    assert "state_dict_ema" in report.container
    images = _images(3, 32, seed=7)
    with torch.no_grad():
        logits = model(images)
        ref_ema = H.ref_forward(TINY_CTOR, sd_ema, images)
        ref_model = H.ref_forward(TINY_CTOR, sd, images)
    assert _max_diff(ref_ema["logits"], ref_model["logits"]) > 1e-2  # the two weight sets are told apart
    assert _max_diff(logits, ref_ema["logits"]) <= OUT_ATOL
    _assert_same_decisions(_run(model, images)[1], _hard(ref_ema), "EMA weights")
    state = model.state_dict()
    assert torch.equal(state["blocks.1.attn.qkv.weight"], torch.cat([sd_ema[f"blocks.1.attn.{n}.weight"]
                                                                     for n in ("query", "key", "value")]))
    assert torch.equal(state["pos_embed"], sd_ema["pos_embed"])


def test_official_pth_tar_with_a_missing_decision_head_is_refused(tmp_path, two_weights):
    sd, sd_ema = ({k: v for k, v in s.items() if not k.startswith("blocks.2.layer_select.")} for s in two_weights)
    path = _official_pth_tar(tmp_path / "broken.pth.tar", sd, sd_ema)
    model = _fresh(TINY_CTOR)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(VitadaptError, match=r"blocks\.2\.layer_select\.mlp_head\.weight"):
        load_weights(model, path)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing loaded


def _deit_file(path, sd_official, num_classes=3):
    """A DeiT training file: {'model': fused-qkv weights without decision heads}."""
    sd = {k: v for k, v in H.to_vitadapt_layout(sd_official).items()
          if not any(s in k for s in ("head_select.", "layer_select.", "token_select.", "norm_policy."))}
    assert "blocks.0.attn.qkv.weight" in sd and not any("query" in k for k in sd)
    torch.save({"model": sd, "args": argparse.Namespace(model="deit_small_patch16_224")}, path)
    return str(path), sd


DECISION_KEYS_TINY = sorted([f"blocks.{i}.attn.token_select.mlp_head.{p}" for i in range(3) for p in ("weight", "bias")]
                            + [f"blocks.{i}.{n}.mlp_head.{p}" for i in (1, 2) for n in ("head_select", "layer_select")
                               for p in ("weight", "bias")])


def test_deit_file_loads_for_fine_tuning_with_new_decision_heads(tmp_path, two_weights, caplog):
    path, deit = _deit_file(tmp_path / "deit_tiny.pth", two_weights[0])
    model = _fresh(TINY_CTOR)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    with caplog.at_level(logging.INFO):
        # As the trainer loads TRAIN.CHECKPOINT_FILE_PATH.
        report = load_weights(model, path, reset_head_on_mismatch=True)
    assert not report.missing and not report.unexpected and not report.head_reset
    assert any("decision heads newly initialised" in c for c in report.converted), report.converted
    assert any("decision heads newly initialised" in r.getMessage() for r in caplog.records)
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in deit.items())
    decision = [k for k in state if k not in deit]
    assert sorted(decision) == DECISION_KEYS_TINY
    assert all(torch.equal(state[k], init[k]) for k in decision)


@pytest.mark.parametrize("keep", [0.0, 0.5, 0.95])
def test_new_decision_heads_start_keeping_with_decision_init_keep(tmp_path, two_weights, keep):
    """ADAVIT.DECISION_INIT_KEEP p: a new head, branch or token is kept with probability p in training at first (0:
    the official zero biases, under which a token is kept with probability sigmoid(-tau * logit(0.6))); fine-tuning
    a DeiT file starts from those decision heads."""
    path, _ = _deit_file(tmp_path / "deit_tiny.pth", two_weights[0])
    model = _fresh(TINY_CTOR, ["ADAVIT.DECISION_INIT_KEEP", keep])
    init = {k: v.clone() for k, v in model.state_dict().items() if k in DECISION_KEYS_TINY}
    load_weights(model, path, reset_head_on_mismatch=True)
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in init.items())
    assert keep > 0 or all(not state[k].any() for k in init if k.endswith(".bias"))
    for name in init:  # decisions that depend on the bias alone, to measure their keep rate
        if name.endswith(".weight"):
            state[name].zero_()
    model.load_state_dict(state)
    model.train()
    torch.manual_seed(0)
    with torch.no_grad():
        model(_images(64, 32, seed=3))
    usage = model.usage_per_block()
    official_token = torch.sigmoid(torch.tensor(-model.tau * math.log(0.6 / 0.4))).item()
    expected = {"head_usage": keep or 0.5, "attn_usage": keep or 0.5, "mlp_usage": keep or 0.5,
                "token_usage": keep or official_token}
    for name, value in expected.items():
        # Blocks 1, 2 decide heads and branches; tokens: block 0 (later blocks compound its decisions), CLS left out.
        decided = usage[name][:, 1:] if name != "token_usage" else (usage[name][:, 0] * 17 - 1) / 16
        assert abs(decided.mean().item() - value) < 0.08, (name, decided.mean().item(), value)


def test_decision_init_keep_out_of_range_is_refused():
    with pytest.raises(VitadaptError, match="ADAVIT.DECISION_INIT_KEEP"):
        _fresh(TINY_CTOR, ["ADAVIT.DECISION_INIT_KEEP", 1.0])


def test_deit_file_is_refused_for_evaluation(tmp_path, two_weights):
    path, _ = _deit_file(tmp_path / "deit_tiny.pth", two_weights[0])
    model = _fresh(TINY_CTOR)
    with pytest.raises(VitadaptError) as err:
        load_weights(model, path)
    message = str(err.value)
    assert "missing keys" in message
    for key in DECISION_KEYS_TINY:
        assert key in message, key
    assert "unexpected" not in message


def test_official_file_of_another_size_is_refused(tmp_path):
    other = H.constructor(img_size=32, patch_size=8, embed_dim=60, depth=3, num_heads=3, num_classes=3)
    sd = H.random_state_dict(other, seed=1)
    path = _official_pth_tar(tmp_path / "other.pth.tar", sd, sd)
    model = _fresh(TINY_CTOR)
    with pytest.raises(VitadaptError, match=r"blocks\.0\.attn\.qkv\.weight.*\(180, 60\).*\(144, 48\)"):
        load_weights(model, path)


def test_pos_embed_is_frozen_unless_asked():
    model = _fresh(TINY_CTOR)
    assert not model.pos_embed.requires_grad
    assert all(p.requires_grad for k, p in model.named_parameters() if k != "pos_embed")
    assert _fresh(TINY_CTOR, ["ADAVIT.TRAIN_POS_EMBED", "True"]).pos_embed.requires_grad


def test_pos_embed_from_scratch_is_the_official_sinusoid():
    """The official model starts pos_embed as the fixed sinusoid table (ada_t2t_vit.py:130) and never trains it;
    built from scratch (no checkpoint), vitadapt's frozen pos_embed must be that table, not frozen random noise."""
    model = _fresh(TINY_CTOR)
    assert _max_diff(model.pos_embed.detach(), H.sinusoid_table(17, 48)) <= 1e-6


# ==============================================================================================================
# 6. End to end through tools/run_net.py
# ==============================================================================================================

def _opts(data, out, **overrides):
    return h.tiny_opts(data, out, MODEL__NAME="AdaViTVisionTransformer", VIT__DEPTH=3, **overrides)


def _val_batch(data):
    from PIL import Image

    items = h.list_split(data, "val")
    tf = h.timm_eval_transform()
    return torch.stack([tf(Image.open(p).convert("RGB")) for p, _ in items]), torch.tensor([lab for _, lab in items])


def test_run_net_evaluates_an_official_file_with_its_ema_weights(tmp_path, image_folder, two_weights):
    sd, sd_ema = two_weights
    path = _official_pth_tar(tmp_path / "ada.pth.tar", sd, sd_ema)
    out = tmp_path / "out"
    rc = h.load_run_net().main(["--cfg", ""] + _opts(image_folder, out, TRAIN__ENABLE=False,
                                                     TEST__CHECKPOINT_FILE_PATH=path))
    assert rc == 0
    rec = h.records(out, "test_final")[-1]
    images, labels = _val_batch(image_folder)
    with torch.no_grad():
        ema, model = H.ref_forward(TINY_CTOR, sd_ema, images), H.ref_forward(TINY_CTOR, sd, images)
    assert min(ema["margins"].values()) > MIN_MARGIN
    loss_ema, loss_model = (F.cross_entropy(r["logits"], labels).item() for r in (ema, model))
    assert abs(loss_ema - loss_model) > 1e-3
    assert rec["loss"] == pytest.approx(loss_ema, abs=1e-5)
    table = H.flops_table(3, 17, 48, 4)
    gflops = H.table_gflops(table, ema["head_select"], ema["layer_select"], ema["token_select"], 3, 0.06)
    assert rec["gflops_official_mean"] == pytest.approx(gflops.mean().item(), abs=1e-6)
    assert rec["token_usage_mean"] == pytest.approx(ema["token_select"].mean().item(), abs=1e-5)
    assert rec["head_usage_per_block"][0] == 1.0  # block 0 decides no heads: all used


def test_run_net_refuses_a_deit_file_for_evaluation(tmp_path, image_folder, two_weights, capsys):
    path, _ = _deit_file(tmp_path / "deit.pth", two_weights[0])
    rc = h.load_run_net().main(["--cfg", ""] + _opts(image_folder, tmp_path / "out", TRAIN__ENABLE=False,
                                                     TEST__CHECKPOINT_FILE_PATH=path))
    assert rc == 2
    err = capsys.readouterr().err
    assert "blocks.1.head_select.mlp_head.weight" in err and "blocks.0.attn.token_select.mlp_head.bias" in err, err


@pytest.fixture(scope="module")
def adavit_run(tmp_path_factory, image_folder, two_weights):
    """2 epochs of fine-tuning from a DeiT file (fused qkv, no decision heads), then the test job."""
    root = tmp_path_factory.mktemp("adavit_run")
    path, deit = _deit_file(root / "deit.pth", two_weights[0])
    out = root / "out"
    rc = h.load_run_net().main(["--cfg", ""] + _opts(image_folder, out, TRAIN__CHECKPOINT_FILE_PATH=path,
                                                     SOLVER__MAX_EPOCH=2))
    return {"rc": rc, "out": out, "deit": deit}


def test_run_net_fine_tunes_from_a_deit_file(adavit_run):
    assert adavit_run["rc"] == 0
    log = (adavit_run["out"] / "stdout.log").read_text()
    assert "decision heads newly initialised" in log
    assert "missing keys" not in log and "unexpected keys" not in log


def test_run_net_logs_usage_losses_and_statistics(adavit_run):
    out = adavit_run["out"]
    epochs = h.records(out, "train_epoch")
    assert [r["epoch"] for r in epochs] == [1, 2]
    for r in epochs:
        for name in ("loss_head", "loss_layer", "loss_token"):
            assert name in r and math.isfinite(r[name]) and r[name] >= 0, (name, r)
        assert r["loss"] >= r["loss_head"] + r["loss_layer"] + r["loss_token"] - 1e-6
    rec = h.records(out, "test_final")[-1]
    assert 0 < rec["gflops_official_mean"] < 1
    for name in ("head_usage", "attn_usage", "mlp_usage", "token_usage"):
        mean, per_block = rec[f"{name}_mean"], rec[f"{name}_per_block"]
        assert 0.0 <= mean <= 1.0, (name, mean)
        assert len(per_block) == 3 and all(0.0 <= v <= 1.0 for v in per_block), (name, per_block)
        assert mean == pytest.approx(sum(per_block) / 3, abs=1e-3), name


def test_pos_embed_stays_frozen_in_training(adavit_run):
    state = h.load_ckpt(h.ckpt_path(adavit_run["out"], 2))["model_state"]
    deit = adavit_run["deit"]
    assert torch.equal(state["pos_embed"], deit["pos_embed"])
    assert not torch.equal(state["blocks.0.attn.qkv.weight"], deit["blocks.0.attn.qkv.weight"])  # training did run


def test_pos_embed_trains_when_asked(tmp_path, image_folder, two_weights):
    path, deit = _deit_file(tmp_path / "deit.pth", two_weights[0])
    out = tmp_path / "out"
    rc = h.load_run_net().main(["--cfg", ""] + _opts(image_folder, out, TRAIN__CHECKPOINT_FILE_PATH=path,
                                                     SOLVER__MAX_EPOCH=1, TEST__ENABLE=False,
                                                     ADAVIT__TRAIN_POS_EMBED=True))
    assert rc == 0
    state = h.load_ckpt(h.ckpt_path(out, 1))["model_state"]
    assert not torch.equal(state["pos_embed"], deit["pos_embed"])


@pytest.mark.parametrize("execution", ["packed", "packed pairs"])
def test_packed_equals_masked_under_autocast(execution):
    """Packed execution writes half-precision block outputs back into the float32 residual stream (CUDA AMP runs
    it this way; bf16 autocast on the CPU takes the same path), image by image and over all (image, head) pairs."""
    from vitadapt.models.adavit import AdaViTVisionTransformer
    from vitadapt.models.synthetic import calibrate_decisions_

    torch.manual_seed(0)
    model = AdaViTVisionTransformer(img_size=64, patch_size=16, num_classes=10, embed_dim=48, depth=4, num_heads=3).eval()
    images = _images(6, 64)
    calibrate_decisions_(model, images, usage=0.7)
    outputs = {}
    for name in (execution, "masked"):
        model.token_execution = name.split()[0]
        model.per_image_attention = name != "packed pairs"
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            outputs[name] = model(images).float()
    assert torch.isfinite(outputs[execution]).all()
    # bf16 rounding differs between the two computations; the decisions may not (bf16 tolerance on the logits).
    assert _max_diff(outputs[execution], outputs["masked"]) < 0.1


@pytest.mark.parametrize("decisions", ["all", "tokens_only"])
def test_masked_training_fused_attention_equals_the_official_order(decisions):
    """Masked training attends with one fused call (the detached token policy as a mask): the loss and every
    gradient, decision heads included, equal the official order of operations (VIT.FUSED_ATTENTION False) on the
    same Gumbel draws."""
    from vitadapt.engine.trainer import training_loss
    from vitadapt.models.adavit import AdaViTVisionTransformer
    from vitadapt.models.synthetic import calibrate_decisions_

    kwargs = dict(img_size=64, patch_size=16, num_classes=10, embed_dim=48, depth=4, num_heads=3,
                  token_execution="masked")
    if decisions == "tokens_only":
        kwargs.update(ada_head=False, ada_layer=False)
    images, labels = _images(6, 64), torch.arange(6) % 10
    results = {}
    for fused in (True, False):
        torch.manual_seed(0)
        model = AdaViTVisionTransformer(**kwargs)
        calibrate_decisions_(model, images, usage=0.7)
        for block in model.blocks:
            block.attn.fused = fused
        draws = {}

        def replay(name, logits):  # the same noise in both runs
            if name not in draws:
                g = torch.Generator().manual_seed(len(draws))
                draws[name] = tuple(-torch.empty(logits.shape).exponential_(generator=g).log() for _ in range(2))
            return draws[name]

        model.noise_source = replay
        model.train()
        logits = model(images)
        loss, _, _ = training_loss(model, logits, labels, F.cross_entropy)
        loss.backward()
        kept = torch.stack([d.tokens for d in model.last_decisions if d.tokens is not None])
        results[fused] = (loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}, kept)
    (loss_f, grads_f, kept_f), (loss_e, grads_e, kept_e) = results[True], results[False]
    assert 0 < (kept_f < 0.5).float().mean() < 0.9 and torch.equal(kept_f, kept_e)  # tokens dropped, alike
    assert abs(loss_f - loss_e) <= 1e-5 * abs(loss_e)
    assert grads_f.keys() == grads_e.keys() and any("select" in n for n in grads_f)
    for name, grad in grads_e.items():
        assert (grads_f[name] - grad).abs().max() <= 1e-5 * max(1.0, grad.abs().max()), name


def test_packed_follows_weight_changes():
    """Packed execution keeps a head-major copy of every qkv weight between forwards; a checkpoint load or an
    optimizer step (in-place updates) must reach it: packed stays equal to masked after each."""
    from vitadapt.models.adavit import AdaViTVisionTransformer
    from vitadapt.models.synthetic import calibrate_decisions_

    torch.manual_seed(0)
    kwargs = dict(img_size=64, patch_size=16, num_classes=10, embed_dim=48, depth=4, num_heads=3)
    model = AdaViTVisionTransformer(**kwargs).eval()
    images = _images(6, 64)
    calibrate_decisions_(model, images, usage=0.7)

    def packed_and_masked():
        outputs = []
        for execution in ("packed", "masked"):
            model.token_execution = execution
            with torch.no_grad():
                outputs.append(model(images))
        return outputs

    first, _ = packed_and_masked()
    other = AdaViTVisionTransformer(**kwargs)
    calibrate_decisions_(other, images, usage=0.7)
    model.load_state_dict(other.state_dict())  # copies in place into the same parameters
    packed, masked = packed_and_masked()
    assert _max_diff(packed, masked) <= OUT_ATOL and _max_diff(packed, first) > 1e-3
    with torch.no_grad():
        for block in model.blocks:
            block.attn.qkv.weight.mul_(1.5)  # what an optimizer step does to the weights
            block.attn.qkv.bias.add_(0.1)
    after_step, masked = packed_and_masked()
    assert _max_diff(after_step, masked) <= OUT_ATOL and _max_diff(after_step, packed) > 1e-3


def test_fine_tuning_fills_decision_heads_only_for_a_file_without_any(tmp_path):
    """A DeiT file starts the decision heads new; an AdaViT file of another layout (other KEEP_LAYERS) is refused."""
    from vitadapt.models.adavit import AdaViTVisionTransformer
    from vitadapt.utils.checkpoint import CheckpointError, load_weights
    from vitadapt.models.convert import CheckpointMismatchError

    kwargs = dict(img_size=64, patch_size=16, num_classes=10, embed_dim=48, depth=4, num_heads=3)
    other = AdaViTVisionTransformer(keep_layers=2, **kwargs)
    path = tmp_path / "keep2.pth.tar"
    torch.save({"state_dict_ema": {"module." + k: v for k, v in other.state_dict().items()}}, path)
    with pytest.raises((CheckpointError, CheckpointMismatchError), match="blocks.1.head_select.mlp_head.weight"):
        load_weights(AdaViTVisionTransformer(keep_layers=1, **kwargs), str(path), reset_head_on_mismatch=True)
