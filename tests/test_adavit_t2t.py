"""AdaViT on T2T-ViT (vitadapt.models.adavit.AdaViTT2TViT; official `ada_step_t2t_vit_19_lnorm`): parity with the
official AdaStepT2T_ViT(use_t2t=True) when its code is at hand (the AdaViT repository, see helpers_adavit.ADAVIT_REPO;
skipped otherwise), the plain T2T-ViT it reduces to, official checkpoint files, the config, and the official FLOPs
(t2t-19 table and its base constant)."""

import argparse
import importlib
import logging
import subprocess

import pytest
import torch
import torch.nn.functional as F

import helpers_adavit as H
from helpers_unit import max_diff, random_images
from vitadapt.config import ConfigError, load_config
from vitadapt.errors import VitadaptError
from vitadapt.models import MODEL_REGISTRY, build_model
from vitadapt.models.adavit import (AdaViTT2TViT, AdaViTVisionTransformer, DecisionHead, official_to_config_opts)
from vitadapt.models.adavit_costs import (OFFICIAL_BASE_GFLOPS_T2T, exact_t2t_base_gflops, official_base_gflops,
                                          official_flops_table, official_gflops)
from vitadapt.models.convert import LoadReport, load_into_model
from vitadapt.models.flops import block_macs
from vitadapt.models.t2t import T2TModule, T2TViT
from vitadapt.models.vit import Block
from vitadapt.utils.checkpoint import load_weights

CONFIG = H.REPO / "configs" / "ImageNet" / "AdaViT" / "AdaViT_T2T_ViT_19.yaml"
OUT_ATOL = 1e-5
MIN_MARGIN = 1e-4  # smallest |sigmoid(logit) - threshold| of a compared decision: float noise cannot flip it
DECISIONS = ("head_select", "layer_select", "token_select")
# Tiny official constructor arguments (the README switches) and variants: later decisions, norm_policy (its
# LayerNorm eps is the backbone's 1e-5), the pretrained-style qk_scale embed_dim**-0.5, head_v2.
SETTINGS = {
    "readme": H.t2t_constructor(),
    "keep2_tokens_from_1_norm_policy": H.t2t_constructor(keep_layers=2, ada_token_start_layer=1, norm_policy=True,
                                                         ada_token_detach_attn_at_mlp=True),
    "qk_scale": H.t2t_constructor(qk_scale=24 ** -0.5, img_size=64),
    "head_v2": H.t2t_constructor(ada_head_v2=True, ada_token_with_mlp=False),
}

pytestmark = pytest.mark.usefixtures("one_thread")


def _opts(ctor, extra=()):
    return official_to_config_opts(H.golden_config(ctor, flops_base=OFFICIAL_BASE_GFLOPS_T2T)) + ["NUM_GPUS", "0"] \
        + list(extra)


def _model(ctor, sd=None, execution="packed", extra=()):
    cfg = load_config("", _opts(ctor, ["VIT.TOKEN_EXECUTION", execution] + list(extra)))
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    if sd is not None:
        report = load_into_model(model, sd, LoadReport("official layout"))
        assert not report.missing and not report.unexpected
    return model


def _hard(d):
    return {k: None if d.get(k) is None else (d[k] > 0.5).to(torch.uint8) for k in DECISIONS}


def _margin(model):
    d = model.stacked_decisions()
    gaps = [(d[f"{kind}_select_logits"].sigmoid() - model.thresholds[name]).abs().min().item()
            for kind, name in (("head", "heads"), ("layer", "layer"), ("token", "tokens"))
            if d[f"{kind}_select_logits"] is not None]
    return min(gaps)


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    module = H.official_t2t_module(tmp_path_factory.mktemp("official_adavit"))
    if module is None:
        pytest.skip(f"the official AdaViT code is not available or does not import ({H.ADAVIT_REPO})")
    return module


# ==============================================================================================================
# 1. The official code (MengLcool/AdaViT models/ada_t2t_vit.py), run on CPU with the installed timm
# ==============================================================================================================

def test_official_ada_step_t2t_vit_19_lnorm_is_what_the_config_builds(official, monkeypatch):
    """The official factory's arguments (captured, nothing built) are the config's: performer tokenizer, 448 / 19 /
    7 heads / mlp 3, and without --pretrained (the README evaluation) no qk_scale, i.e. head_dim**-0.5."""
    import inspect

    params = inspect.signature(official.AdaStepT2T_ViT.__init__).parameters
    seen = []
    monkeypatch.setattr(official, "AdaStepT2T_ViT",
                        lambda **kw: seen.append(kw) or argparse.Namespace(num_classes=1000))
    official.ada_step_t2t_vit_19_lnorm(pretrained=False, ada_head=True, ada_layer=True, ada_token=True,
                                       ada_token_with_mlp=True, keep_layers=1)
    kw = seen[0]
    assert kw["tokens_type"] == "performer" and "qk_scale" not in kw and "norm_layer" not in kw  # nn.LayerNorm
    cfg = load_config(str(CONFIG), ["NUM_GPUS", "0"])
    assert (kw["embed_dim"], kw["depth"], kw["num_heads"], kw["mlp_ratio"]) == \
        (cfg.VIT.EMBED_DIM, cfg.VIT.DEPTH, cfg.VIT.NUM_HEADS, cfg.VIT.MLP_RATIO)
    assert cfg.T2T.QK_SCALE == 0.0 and cfg.T2T.TOKENS_TYPE == "performer" and cfg.T2T.NORM_EPS == 1e-5
    # The class defaults the factory leaves in place: qkv_bias False, token_dim 64.
    assert params["qkv_bias"].default is False and not cfg.VIT.QKV_BIAS
    assert params["token_dim"].default == cfg.T2T.TOKEN_DIM == 64
    assert params["norm_layer"].default is torch.nn.LayerNorm  # eps 1e-5
    seen.clear()
    monkeypatch.setattr(official, "load_pretrained", lambda *args, **kwargs: None)  # its URL is empty anyway
    official.ada_step_t2t_vit_19_lnorm(pretrained=True)  # T2T-ViT's pretrained-weights scale, only with --pretrained
    assert seen[0]["qk_scale"] == 448 ** -0.5


@pytest.mark.parametrize("name", list(SETTINGS))
def test_hand_built_layout_is_the_official_state_dict(official, name):
    ctor = SETTINGS[name]
    model = H.official_t2t_model(official, ctor)
    theirs = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    mine = {k: tuple(v.shape) for k, v in H.random_t2t_state_dict(ctor).items()}
    assert mine == theirs
    frozen = sorted(k for k, p in model.named_parameters() if not p.requires_grad)
    assert frozen == ["pos_embed", "tokens_to_token.attention1.w", "tokens_to_token.attention2.w"]
    # Ours: the same fixed tensors are buffers (never trained), every other official parameter is one of ours
    # (q, k, v joined).
    ours = _model(ctor)
    params = {k for k, _ in ours.named_parameters()}
    assert not params & set(frozen) and set(frozen) <= set(ours.state_dict())
    joined = {k.replace(".query.", ".qkv.") for k, p in model.named_parameters()
              if p.requires_grad and ".key." not in k and ".value." not in k}
    assert params == joined
    # Every LayerNorm has the official eps (1e-5: "lnorm"; too small an effect for the logit comparisons to see).
    eps = [{n: m.eps for n, m in net.named_modules() if isinstance(m, torch.nn.LayerNorm)} for net in (model, ours)]
    assert eps[0] == eps[1] and set(eps[0].values()) == {1e-5}
    # The same attention scale in every block.
    assert [b.attn.scale for b in model.blocks] == [b.attn.scale for b in ours.blocks]


def _official_eval(official, ctor, sd, images):
    model = H.official_t2t_model(official, ctor).eval()
    model.load_state_dict(sd, strict=True)
    with torch.no_grad():
        logits, head, layer, token, _, hidden, _ = model(images, ret_attn_list=True)
    return logits, {"head_select": head, "layer_select": layer, "token_select": token}, torch.stack(hidden, dim=1)


@pytest.mark.parametrize("execution", ["masked", "packed"])
@pytest.mark.parametrize("name", list(SETTINGS))
def test_eval_equals_the_official_model(official, name, execution):
    ctor = SETTINGS[name]
    sd = H.random_t2t_state_dict(ctor, seed=5, tokenizer_scale=5.0, layer_bias=0.5)
    images = random_images(4, ctor["img_size"], seed=11)
    logits, decisions, hidden = _official_eval(official, ctor, sd, images)
    model = _model(ctor, sd, execution)
    model.trace_hidden = True
    with torch.no_grad():
        mine = model(images)
    assert _margin(model) > MIN_MARGIN
    assert max_diff(mine, logits) <= OUT_ATOL
    assert max_diff(torch.stack(model.last_hidden, dim=1), hidden) <= OUT_ATOL * max(1.0, hidden.abs().max().item())
    ours = _hard(model.stacked_decisions())
    for key in DECISIONS:
        assert torch.equal(ours[key], decisions[key].to(torch.uint8)), key
    # The decisions are per image, and not all on or all off.
    for key in DECISIONS:
        assert 0 < decisions[key].mean() < 1, key
    assert any(not torch.equal(decisions[k][0], decisions[k][i]) for k in DECISIONS for i in range(1, 4))


@pytest.mark.parametrize("name", ["readme", "keep2_tokens_from_1_norm_policy"])
def test_train_mode_equals_the_official_model_with_its_gumbel_draws(official, name):
    """Training forward (Gumbel-sigmoid decisions, straight-through) with the official draws replayed: logits,
    decisions and the gradients of CE + the mean of every decision. Both tokenizers in eval mode: the official
    Token_performer has hard-coded dropout 0.1, whose masks cannot be shared."""
    ctor = SETTINGS[name]
    sd = H.random_t2t_state_dict(ctor, seed=5, tokenizer_scale=5.0, layer_bias=0.5)
    images, labels = random_images(3, ctor["img_size"], seed=2), torch.tensor([0, 3, 1])

    def loss_of(logits, head, layer, token):
        return F.cross_entropy(logits, labels) + head.mean() + layer.mean() + token.mean()

    theirs = H.official_t2t_model(official, ctor)
    theirs.load_state_dict(sd, strict=True)
    theirs.train()
    theirs.tokens_to_token.eval()
    torch.manual_seed(17)
    block_module = importlib.import_module(official.StepAdaBlock.__module__)  # where _gumbel_sigmoid lives
    with H.OfficialGumbelRecorder(block_module, theirs) as rec:
        ref_logits, head, layer, token, _ = theirs(images)
    loss_of(ref_logits, head, layer, token).backward()
    assert len(rec.calls) == sum(1 for c in rec.calls if c["module"]) > 0

    model = _model(ctor, sd, "masked")
    calls = iter(rec.calls)

    def replay(module, logits):
        call = next(calls)
        assert call["module"] == module, (call["module"], module)
        return call["gumbel1"].reshape(logits.shape), call["gumbel2"].reshape(logits.shape)

    model.noise_source = replay
    model.train()
    model.tokens_to_token.eval()
    logits = model(images)
    d = model.stacked_decisions()
    loss_of(logits, d["head_select"], d["layer_select"], d["token_select"]).backward()
    assert next(calls, None) is None  # every official draw used, in the official order
    assert max_diff(logits, ref_logits) <= OUT_ATOL
    for key, ref in zip(DECISIONS, (head, layer, token)):
        assert torch.equal(d[key].detach(), ref.detach()), key
    official_grads = {k: p.grad for k, p in theirs.named_parameters() if p.requires_grad}
    reference = model.adapt_official_state_dict(official_grads, LoadReport("official grads"))
    mine = {k: p.grad for k, p in model.named_parameters()}
    assert set(mine) == set(reference)
    for key, grad in mine.items():
        ref = reference[key]
        assert grad is not None and ref is not None, key
        assert max_diff(grad, ref) <= 1e-5 * max(1.0, ref.abs().max().item()), key
    assert any(mine[k].abs().sum() > 0 for k in mine if "select" in k)  # the decision heads learn


def test_official_t2t19_flops_table_is_the_closed_form(tmp_path):
    """The shipped adavit_ckpt/t2t-19-h-l-tmlp_flops_dict.pth equals official_flops_table(7, 197, 448, 3.0)."""
    path = tmp_path / "t2t19.pth"
    try:
        data = subprocess.run(["git", "-C", str(H.ADAVIT_REPO), "show",
                               "HEAD:adavit_ckpt/t2t-19-h-l-tmlp_flops_dict.pth"], check=True, capture_output=True,
                              timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        pytest.skip(f"the AdaViT repository is not available ({H.ADAVIT_REPO})")
    path.write_bytes(data)
    shipped = torch.load(path, weights_only=True)
    assert shipped.shape == (8, 198, 2, 2) and shipped.dtype == torch.float32
    assert torch.equal(official_flops_table(7, 197, 448, 3.0), shipped)


# ==============================================================================================================
# 2. The model: shared AdaViT decisions on the T2T-ViT backbone
# ==============================================================================================================

def test_registered_and_built_from_the_shared_classes():
    assert MODEL_REGISTRY.get("AdaViTT2TViT") is AdaViTT2TViT
    assert issubclass(AdaViTT2TViT, AdaViTVisionTransformer) and issubclass(AdaViTT2TViT, T2TViT)
    model = _model(SETTINGS["keep2_tokens_from_1_norm_policy"])
    assert all(type(b) is Block for b in model.blocks) and isinstance(model.tokens_to_token, T2TModule)
    assert model.blocks[0].attn.qkv.bias is None and model.blocks[0].attn.qk_scale is None
    assert model.norm.eps == model.blocks[0].norm1.eps == 1e-5
    assert model.blocks[1].head_select is None and isinstance(model.blocks[2].head_select, DecisionHead)
    assert model.blocks[0].attn.token_select is None and model.blocks[1].attn.token_select is not None
    assert model.blocks[2].norm_policy.eps == 1e-5  # the backbone's LayerNorm, as the official norm_layer
    assert isinstance(model.pos_embed, torch.Tensor) and "pos_embed" not in dict(model.named_parameters())
    torch.testing.assert_close(model.pos_embed, H.sinusoid_table(10, 24), atol=0, rtol=0)
    assert model.no_weight_decay() == {"cls_token"}
    assert model.official_base_gflops == 0.33
    # The DeiT variant is unchanged: its norm_policy LayerNorm keeps eps 1e-6.
    deit = AdaViTVisionTransformer(img_size=32, patch_size=16, embed_dim=24, depth=2, num_heads=3, norm_policy=True)
    assert deit.blocks[1].norm_policy.eps == deit.norm.eps == 1e-6


def _forced_on(sd):
    """The decision heads' weights zeroed and biases +50: every head, branch and token kept for every image."""
    sd = dict(sd)
    for k in sd:
        if "_select.mlp_head." in k:
            sd[k] = torch.zeros_like(sd[k]) if k.endswith("weight") else torch.full_like(sd[k], 50.0)
    return sd


@pytest.mark.parametrize("execution", ["masked", "packed"])
def test_all_decisions_on_is_the_plain_t2t_vit(execution):
    ctor = H.t2t_constructor(qk_scale=24 ** -0.5)
    sd = _forced_on(H.random_t2t_state_dict(ctor, seed=1, tokenizer_scale=5.0))
    model = _model(ctor, sd, execution)
    plain = T2TViT(img_size=48, embed_dim=24, depth=4, num_heads=3, mlp_ratio=3.0, token_dim=8, num_classes=5,
                   qk_scale=24 ** -0.5).eval()
    dense = {k: v for k, v in model.state_dict().items() if "_select." not in k}
    report = load_into_model(plain, dense, LoadReport("AdaViT weights without decision heads"))
    assert not report.missing and not report.unexpected
    images = random_images(3, 48, seed=4)
    with torch.no_grad():
        ada, ref = model(images), plain(images)
    assert all(bool(v.all()) for v in _hard(model.stacked_decisions()).values())
    assert max_diff(ada, ref) <= 1e-5
    # Same cost too: the plain model's MACs plus the decision heads'.
    c, n, depth = 24, 10, 4
    heads = (depth - 1) * (c * 3 + c * 2) + depth * n * c  # token_select reads every token
    assert torch.equal(model.macs_per_image(), plain.macs_per_image().to(torch.float64) + heads)


def test_macs_and_official_gflops_follow_each_images_decisions():
    ctor = SETTINGS["readme"]
    sd = H.random_t2t_state_dict(ctor, seed=3, tokenizer_scale=5.0)
    model = _model(ctor, sd)
    images = random_images(4, 48, seed=11)
    with torch.no_grad():
        model(images)
    d = model.stacked_decisions()
    table = H.flops_table(3, 10, 24, 3.0)
    expected = H.table_gflops(table, d["head_select"], d["layer_select"], d["token_select"], 4, 0.33)
    torch.testing.assert_close(model.official_gflops(), expected, atol=1e-7, rtol=0)
    macs = model.macs_per_image()
    assert len(macs.unique()) > 1
    tokenizer = model.tokens_to_token.macs(48)
    assert bool((macs > tokenizer).all()) and bool((macs < tokenizer + 4 * 2e6).all())
    assert model.image_statistics()["gflops_official"].shape == (4,)


def test_forward_backward_with_usage_losses():
    ctor = SETTINGS["readme"]
    model = _model(ctor, H.random_t2t_state_dict(ctor, seed=3, tokenizer_scale=5.0)).train()
    w = model.tokens_to_token.attention1.w.clone()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    logits = model(random_images(2, 48, seed=1))
    aux = model.auxiliary_losses()
    assert set(aux) == {"head", "layer", "token"}
    (F.cross_entropy(logits, torch.tensor([0, 1])) + sum(aux.values())).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert model.blocks[1].head_select.mlp_head.weight.grad.abs().sum() > 0
    opt.step()
    assert torch.equal(model.tokens_to_token.attention1.w, w)  # fixed random features


# ==============================================================================================================
# 3. Checkpoint files
# ==============================================================================================================

def _official_pth_tar(path, sd, sd_ema):
    """An official AdaViT trainer file (timm saver.py): module.-prefixed official-layout weights and argparse args."""
    args = argparse.Namespace(model="ada_step_t2t_vit_19_lnorm", ada_head=True, ada_layer=True,
                              ada_token_with_mlp=True, keep_layers=1, model_ema=True)
    prefixed = [{"module." + k: v for k, v in s.items()} for s in (sd, sd_ema)]
    torch.save({"epoch": 299, "arch": "ada_step_t2t_vit_19_lnorm", "state_dict": prefixed[0],
                "optimizer": {"state": {}, "param_groups": [{"lr": 1e-5, "params": []}]}, "version": 2,
                "args": args, "state_dict_ema": prefixed[1], "metric": 81.1}, path)
    return str(path)


@pytest.fixture(scope="module")
def two_weights():
    ctor = SETTINGS["readme"]
    return (H.random_t2t_state_dict(ctor, seed=21, tokenizer_scale=5.0),
            H.random_t2t_state_dict(ctor, seed=22, tokenizer_scale=5.0))


@pytest.mark.parametrize("execution", ["packed", "masked"])
def test_official_pth_tar_loads_strictly_with_its_ema_weights(tmp_path, two_weights, execution):
    sd, sd_ema = two_weights
    path = _official_pth_tar(tmp_path / "ada_t2t_vit_19.pth.tar", sd, sd_ema)
    model = _model(SETTINGS["readme"], execution=execution)
    report = load_weights(model, path)
    assert not report.missing and not report.unexpected
    assert "state_dict_ema" in report.container
    assert any("joined attn.query/key/value" in c for c in report.converted)
    state = model.state_dict()
    for key, value in sd_ema.items():
        if ".attn.query." in key:
            parts = [sd_ema[key.replace(".query.", f".{n}.")] for n in ("query", "key", "value")]
            assert torch.equal(state[key.replace(".query.", ".qkv.")], torch.cat(parts)), key
        elif ".attn.key." not in key and ".attn.value." not in key:
            assert torch.equal(state[key], value), key
    images = random_images(2, 48, seed=7)
    with torch.no_grad():
        logits = model(images)
    ema_model, raw_model = _model(SETTINGS["readme"], sd_ema), _model(SETTINGS["readme"], sd)
    with torch.no_grad():
        assert max_diff(logits, ema_model(images)) <= OUT_ATOL
        assert max_diff(logits, raw_model(images)) > 1e-3  # the two weight sets are told apart


def test_wrong_layouts_are_refused_naming_the_keys(tmp_path, two_weights):
    sd, _ = two_weights
    model = _model(SETTINGS["readme"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # A file without the performer's fixed random features and a decision head.
    broken = {k: v for k, v in sd.items()
              if k != "tokens_to_token.attention2.w" and not k.startswith("blocks.2.layer_select.")}
    path = _official_pth_tar(tmp_path / "broken.pth.tar", broken, broken)
    with pytest.raises(VitadaptError) as err:
        load_weights(model, path)
    for key in ("tokens_to_token.attention2.w", "blocks.2.layer_select.mlp_head.weight",
                "blocks.2.layer_select.mlp_head.bias"):
        assert key in str(err.value), key
    # An Ada-DeiT file (patch embedding, no tokenizer) for the T2T model.
    deit = H.random_state_dict(H.constructor(img_size=48, embed_dim=24, depth=4, num_heads=3, mlp_ratio=3.0,
                                             num_classes=5, qkv_bias=False))
    path = _official_pth_tar(tmp_path / "ada_deit.pth.tar", deit, deit)
    with pytest.raises(VitadaptError) as err:
        load_weights(model, path)
    message = str(err.value)
    assert "patch_embed.proj.weight" in message and "tokens_to_token.project.weight" in message
    assert "nothing was loaded" in message
    # Query / key / value with biases (a qkv_bias model) for this qkv_bias False model.
    biased = dict(sd, **{f"blocks.0.attn.{n}.bias": torch.zeros(24) for n in ("query", "key", "value")})
    path = _official_pth_tar(tmp_path / "biased.pth.tar", biased, biased)
    with pytest.raises(VitadaptError, match=r"blocks\.0\.attn\.qkv\.bias"):
        load_weights(model, path)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing loaded


def test_t2t_vit_file_initialises_fine_tuning_and_is_refused_for_evaluation(tmp_path, two_weights, caplog):
    """A plain T2T-ViT checkpoint (fused qkv, no decision heads): new decision heads when fine-tuning only."""
    plain = {k: v for k, v in H.to_vitadapt_layout(two_weights[0]).items() if "_select." not in k}
    path = tmp_path / "t2t_vit.pth.tar"
    torch.save({"state_dict_ema": plain, "state_dict": plain}, path)
    model = _model(SETTINGS["readme"])
    init = {k: v.clone() for k, v in model.state_dict().items()}
    with caplog.at_level(logging.INFO):
        report = load_weights(model, str(path), reset_head_on_mismatch=True)
    assert not report.missing and not report.unexpected
    assert any("decision heads newly initialised" in c for c in report.converted)
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in plain.items())
    assert all(torch.equal(state[k], init[k]) for k in state if "_select." in k)
    with pytest.raises(VitadaptError, match=r"blocks\.1\.head_select\.mlp_head\.weight"):
        load_weights(_model(SETTINGS["readme"]), str(path))


# ==============================================================================================================
# 4. Config and FLOPs base constant
# ==============================================================================================================

def test_config_builds_and_validates():
    cfg = load_config(str(CONFIG), ["NUM_GPUS", "0"])
    assert cfg.MODEL.NAME == "AdaViTT2TViT"
    assert (cfg.VIT.EMBED_DIM, cfg.VIT.DEPTH, cfg.VIT.NUM_HEADS, cfg.VIT.MLP_RATIO) == (448, 19, 7, 3.0)
    assert (cfg.T2T.TOKENS_TYPE, cfg.T2T.TOKEN_DIM, cfg.T2T.QK_SCALE) == ("performer", 64, 0.0)
    a = cfg.ADAVIT
    assert a.HEAD and a.LAYER and a.TOKEN and a.TOKEN_WITH_MLP and a.KEEP_LAYERS == 1 and a.TOKEN_START_LAYER == 0
    assert a.OFFICIAL_BASE_GFLOPS == OFFICIAL_BASE_GFLOPS_T2T == official_base_gflops("ada_step_t2t_vit_19_lnorm")
    assert (cfg.SOLVER.BASE_LR, cfg.SOLVER.WEIGHT_DECAY, cfg.SOLVER.MAX_EPOCH, cfg.SOLVER.WARMUP_EPOCHS) == \
        (5e-4, 0.05, 300, 10.0)
    assert cfg.MODEL_EMA.ENABLE and cfg.MODEL_EMA.DECAY == 0.99996 and cfg.DATA.IN_VAL_CROP_RATIO == 0.9
    # Full width, two blocks (the full depth takes seconds to initialise): the 19-block parameter count follows.
    small = load_config(str(CONFIG), ["NUM_GPUS", "0", "VIT.DEPTH", "2"])
    model = build_model(small)
    assert type(model) is AdaViTT2TViT and model.patch_grid == (14, 14) and model.blocks[0].attn.scale == 0.125
    per_block = sum(p.numel() for p in model.blocks[1].parameters())
    total = sum(p.numel() for p in model.parameters()) + 17 * per_block
    decision = (sum(p.numel() for k, p in model.named_parameters() if "_select." in k)
                + 17 * (448 + 1 + 7 * 449 + 2 * 449))  # blocks 2-18: token, head and layer decisions
    assert decision == 81_269 and total == 39_166_339  # T2T-ViT-19: 39.2 M (its README) + AdaViT's decision heads


def test_config_checks():
    base = ["NUM_GPUS", "0", "VIT.DEPTH", "2"]
    with pytest.raises(ConfigError, match="TRAIN_POS_EMBED"):
        load_config(str(CONFIG), base + ["ADAVIT.TRAIN_POS_EMBED", "True"])
    with pytest.raises(ConfigError, match="T2T.TOKENS_TYPE"):  # the T2T node's checks apply to this model too
        load_config(str(CONFIG), base + ["T2T.TOKENS_TYPE", "convolution"])
    with pytest.raises(ConfigError, match="KEEP_LAYERS"):
        load_config(str(CONFIG), base + ["ADAVIT.KEEP_LAYERS", "3"])
    with pytest.raises(ValueError, match="train_pos_embed"):
        AdaViTT2TViT(img_size=48, embed_dim=24, depth=2, num_heads=3, token_dim=8, train_pos_embed=True)


def test_config_warns_about_the_deit_base_constant(caplog):
    with caplog.at_level(logging.WARNING):
        load_config(str(CONFIG), ["NUM_GPUS", "0", "ADAVIT.OFFICIAL_BASE_GFLOPS", "0.06"])
    assert any("OFFICIAL_BASE_GFLOPS" in r.getMessage() for r in caplog.records)


def test_official_constructor_arguments_map_to_the_t2t_model():
    opts = dict(zip(*[iter(_opts(SETTINGS["qk_scale"]))] * 2))
    assert opts["MODEL.NAME"] == "AdaViTT2TViT" and float(opts["T2T.QK_SCALE"]) == 24 ** -0.5
    assert opts["T2T.TOKEN_DIM"] == "8" and opts["VIT.QKV_BIAS"] == "False" and "VIT.PATCH_SIZE" not in opts
    no_base = dict(zip(*[iter(official_to_config_opts({"constructor": SETTINGS["readme"]}))] * 2))
    assert float(no_base["ADAVIT.OFFICIAL_BASE_GFLOPS"]) == 0.33
    with pytest.raises(ValueError, match="qk_scale"):  # DeiT variant: still refused
        official_to_config_opts(H.golden_config(H.constructor(qk_scale=0.1)))


def test_base_constant_is_the_cost_outside_the_blocks():
    """0.33 (ada_main.py) against a count of the tokenizer + final norm + head by the tables' convention (fvcore: a
    multiply-add is one flop, LayerNorm five per element), for T2T-ViT-19 at 224."""
    from vitadapt.models.flops import FlopCountAnalysis

    exact = exact_t2t_base_gflops(224, 448, 1000, 64)
    assert exact == pytest.approx(0.3129056, abs=1e-9)
    tokenizer = T2TModule(224, "performer", 3, 448, 64).eval()
    counter = FlopCountAnalysis(tokenizer, torch.zeros(1, 3, 224, 224))
    counter.unsupported_ops_warnings(False)
    counter.uncalled_modules_warnings(False)
    fvcore = counter.total() / 1e9 + (5 * 197 * 448 + 448 * 1000) / 1e9
    assert fvcore == pytest.approx(exact, rel=1e-4)  # fvcore's einsum counts go through numpy's rounded estimate
    # The analytic MAC count of the tokenizer (no LayerNorms) is the same count without them.
    norms = 5 * (3136 * 147 + 3136 * 64 + 784 * 576 + 784 * 64) + 5 * 197 * 448
    assert tokenizer.macs(224) + norms + 448 * 1000 == round(exact * 1e9)
    assert exact < OFFICIAL_BASE_GFLOPS_T2T < exact + 0.02  # 0.017 G above the count: 0.2% of the dense model


def test_full_size_official_gflops_and_the_readme_figure():
    table = official_flops_table(7, 197, 448, 3.0)
    full = official_gflops(table, None, None, None, depth=19, base=OFFICIAL_BASE_GFLOPS_T2T, batch_size=1).item()
    # Dense T2T-ViT-19: 8.5 G (T2T-ViT README; its paper says 8.9 G).
    assert 8.4 < full < 8.95 and full == pytest.approx(8.5198, abs=1e-4)
    # With every head, token and branch kept, the table is the dense count (proj is w x w = C x C there): vitadapt's
    # MACs of T2T-ViT-19 plus its LayerNorms, with the counted base instead of 0.33.
    tokenizer = T2TModule(224, "performer", 3, 448, 64).macs(224)
    blocks = 19 * int(block_macs(torch.tensor(197), torch.tensor(197), 448, 1344))
    norms = 19 * 2 * 5 * 197 * 448
    dense = (tokenizer + blocks + 448 * 1000) / 1e9
    assert dense == pytest.approx(8.48, abs=0.01)
    other_norms = 5 * (3136 * 211 + 784 * 640) + 5 * 197 * 448  # the tokenizer's and the final LayerNorm
    counted = full - OFFICIAL_BASE_GFLOPS_T2T + exact_t2t_base_gflops()
    assert counted == pytest.approx(dense + (norms + other_norms) / 1e9, rel=1e-6)

    def gflops(heads, tokens, attn, mlp):
        """Blocks 1-18 keep `heads` heads and the branches, every block keeps `tokens` tokens."""
        h = torch.zeros(1, 18, 7)
        h[..., :heads] = 1
        layer = torch.tensor([float(attn), float(mlp)]).expand(1, 18, 2)
        t = torch.zeros(1, 19, 197)
        t[..., :tokens] = 1
        return official_gflops(table, h, layer, t, depth=19, base=OFFICIAL_BASE_GFLOPS_T2T).item()

    assert gflops(7, 197, 1, 1) == pytest.approx(full, abs=1e-5)
    # README: 3.9 G (46% of the dense 8.52 G, the abstract's "more than 2x"). The usage losses aim at 0.5: half the
    # tokens with 3 of 7 heads is below it, with all heads above; half the heads with 60% of the tokens is close.
    assert gflops(3, 99, 1, 1) < 3.9 < gflops(7, 99, 1, 1)
    assert gflops(4, 120, 1, 1) == pytest.approx(3.9, abs=0.25)
    assert 3.9 / full < 0.5
