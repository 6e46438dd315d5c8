"""T2T-ViT backbone (vitadapt/models/t2t.py): parity with the official DVT T2T code, loading, token grids, training,
MACs and the config node."""

import os
from pathlib import Path

import pytest
import torch

from helpers_e2e import load_golden_or_skip
from vitadapt.config import ConfigError, get_cfg, load_config, validate
from vitadapt.models import MODEL_REGISTRY, build_model
from vitadapt.models.convert import CheckpointMismatchError, LoadReport, load_into_model
from vitadapt.models.flops import FlopCountAnalysis, _sdpa_macs, fvcore_macs
from vitadapt.models.t2t import T2TViT
from vitadapt.models.vit import sinusoid_table as sinusoid_encoding

REPO = Path(__file__).resolve().parents[1]
GOLDEN_ROOT = Path(os.environ.get("VITADAPT_GOLDEN_DIR") or (REPO.parent / "shared" / "golden"))
GOLDEN_T2T = GOLDEN_ROOT / "dvt" / "golden_t2t_dev.pt"
EXIT1 = "less_less_token."
TINY = dict(embed_dim=48, depth=2, num_heads=3, mlp_ratio=2.0, token_dim=16, num_classes=5)


def model_from_ctor(ctor: dict) -> T2TViT:
    """The official T2T_ViT constructor arguments (golden config['ctor'][stage]) -> T2TViT."""
    assert ctor["norm_layer"] == "nn.LayerNorm (eps=1e-5)"
    assert not ctor["feature_reuse"] and not ctor["relation_reuse"]
    return T2TViT(img_size=ctor["img_size"], tokens_type=ctor["tokens_type"], in_chans=ctor["in_chans"],
                  num_classes=ctor["num_classes"], embed_dim=ctor["embed_dim"], depth=ctor["depth"],
                  num_heads=ctor["num_heads"], mlp_ratio=ctor["mlp_ratio"], qkv_bias=ctor["qkv_bias"],
                  qk_scale=ctor["qk_scale"], drop_rate=ctor["drop_rate"], attn_drop_rate=ctor["attn_drop_rate"],
                  drop_path_rate=ctor["drop_path_rate"], token_dim=ctor["token_dim"], norm_eps=1e-5)


def exit1_state_dict(golden: dict) -> dict:
    return {k[len(EXIT1):]: v for k, v in golden["state_dict"].items() if k.startswith(EXIT1)}


@pytest.fixture(scope="module")
def golden():
    return load_golden_or_skip(GOLDEN_T2T)


def test_registered():
    assert MODEL_REGISTRY.get("T2TViT") is T2TViT


def test_exit1_of_the_official_dvt_t2t_is_reproduced(golden):
    model = model_from_ctor(dict(golden["config"]["ctor"]["less_less_token"]))
    sd = exit1_state_dict(golden)
    # The fixed tensors are the official ones even before loading: same sinusoid table.
    torch.testing.assert_close(model.pos_embed, sd["pos_embed"], atol=0, rtol=0)
    report = load_into_model(model, sd, LoadReport(source="golden_t2t_dev.pt"))
    assert not report.missing and not report.unexpected
    model.eval()
    inter = golden["intermediates"]
    assert inter["token_grid"][0] == model.patch_grid[0] == 7
    with torch.no_grad():
        tokens = model.embed(golden["input"])
        for block in model.blocks:
            tokens = block(tokens)
        features = tokens.x
        torch.testing.assert_close(features, inter["stage_features"][0], atol=1e-5, rtol=1e-5)
        pre_logits = model.norm(features)[:, 0]
        torch.testing.assert_close(pre_logits, inter["pre_logits"][0], atol=1e-5, rtol=1e-5)
        logits = model(golden["input"])
    torch.testing.assert_close(logits, golden["logits"][0], atol=1e-5, rtol=1e-5)


def test_other_exits_have_the_official_tokenizer_shapes(golden):
    """Exits 2/3 add reuse modules (not a plain T2T-ViT), but their tokenizer and pos_embed keys/shapes are ours."""
    for stage in ("less_token", "normal_token"):
        ctor = dict(golden["config"]["ctor"][stage])
        ctor.update(feature_reuse=False, relation_reuse=False)
        model = model_from_ctor(ctor)
        ours = model.state_dict()
        prefix = stage + "."
        theirs = {k[len(prefix):]: v for k, v in golden["state_dict"].items()
                  if k.startswith(prefix) and (k[len(prefix):].startswith("tokens_to_token.") or k.endswith("pos_embed"))}
        assert set(theirs) == {k for k in ours if k.startswith("tokens_to_token.") or k == "pos_embed"}
        for key, value in theirs.items():
            assert ours[key].shape == value.shape, key
        torch.testing.assert_close(model.pos_embed, theirs["pos_embed"], atol=0, rtol=0)


def test_strict_load_refuses_a_wrong_file(golden):
    model = model_from_ctor(dict(golden["config"]["ctor"]["less_less_token"]))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # Exit 2 of the cascade: another tokenizer (Unfold 11) and reuse modules.
    stage2 = {k[len("less_token."):]: v for k, v in golden["state_dict"].items() if k.startswith("less_token.")}
    with pytest.raises(CheckpointMismatchError):
        load_into_model(model, stage2, LoadReport(source="exit2"))
    # A DeiT-layout file (no tokenizer).
    sd = exit1_state_dict(golden)
    deit_like = {k: v for k, v in sd.items() if not k.startswith("tokens_to_token.")}
    deit_like["patch_embed.proj.weight"] = torch.zeros(48, 3, 16, 16)
    with pytest.raises(CheckpointMismatchError, match="nothing was loaded"):
        load_into_model(model, deit_like, LoadReport(source="deit"))
    # A missing performer feature buffer.
    missing_w = {k: v for k, v in sd.items() if k != "tokens_to_token.attention1.w"}
    with pytest.raises(CheckpointMismatchError, match="attention1.w"):
        load_into_model(model, missing_w, LoadReport(source="no w"))
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


@pytest.mark.parametrize("tokens_type,grid", [("performer_less_less_token", 7), ("performer_less_token", 10),
                                              ("performer", 14)])
def test_token_grids(tokens_type, grid):
    model = T2TViT(tokens_type=tokens_type, **TINY).eval()
    assert model.patch_grid == (grid, grid)
    assert model.pos_embed.shape == (1, grid * grid + 1, TINY["embed_dim"])
    with torch.no_grad():
        assert model.tokens_to_token(torch.randn(1, 3, 224, 224)).shape == (1, grid * grid, TINY["embed_dim"])
        out = model(torch.randn(2, 3, 224, 224))
    assert out.shape == (2, TINY["num_classes"])
    assert model.last_token_counts.shape == (2, TINY["depth"], 2)
    assert (model.last_token_counts == grid * grid + 1).all()


def test_sinusoid_table_is_the_transformer_formula():
    table = sinusoid_encoding(5, 6)[0].double()
    pos = torch.arange(5, dtype=torch.float64)[:, None]
    rates = torch.tensor([10000 ** (-2 * (j // 2) / 6) for j in range(6)], dtype=torch.float64)
    expected = pos * rates
    expected[:, 0::2], expected[:, 1::2] = expected[:, 0::2].sin(), expected[:, 1::2].cos()
    torch.testing.assert_close(table, expected, atol=1e-7, rtol=0)


def test_t2t_settings_and_shared_blocks():
    from vitadapt.models.vit import Block

    model = T2TViT(tokens_type="performer_less_less_token", **TINY)
    assert all(type(b) is Block for b in model.blocks)
    assert model.blocks[0].attn.qkv.bias is None
    assert model.blocks[0].norm1.eps == model.norm.eps == 1e-5
    names = {n for n, _ in model.named_parameters()}
    assert "pos_embed" not in names and "tokens_to_token.attention1.w" not in names
    assert "pos_embed" in model.state_dict() and "tokens_to_token.attention2.w" in model.state_dict()
    # The shared backbone's defaults are unchanged.
    assert Block(48, 3).norm1.eps == 1e-6


def test_qk_scale_changes_the_attention_scale():
    torch.manual_seed(0)
    model = T2TViT(tokens_type="performer_less_less_token", **TINY).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        ref = model(x)
        for block in model.blocks:
            block.attn.qk_scale = block.attn.scale = TINY["embed_dim"] ** -0.5
        scaled = model(x)
        for block in model.blocks:  # qk_scale == head_dim**-0.5 reproduces the default exactly
            block.attn.qk_scale = block.attn.scale = (TINY["embed_dim"] // TINY["num_heads"]) ** -0.5
        same = model(x)
    assert not torch.allclose(ref, scaled)
    torch.testing.assert_close(same, ref, atol=1e-6, rtol=1e-6)


def test_forward_backward_and_one_optimizer_step():
    torch.manual_seed(0)
    model = T2TViT(tokens_type="performer_less_less_token", drop_path_rate=0.1, **TINY).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    x, y = torch.randn(2, 3, 224, 224), torch.tensor([0, 3])
    w_before = model.tokens_to_token.attention1.w.clone()
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model.tokens_to_token.attention1.kqv.weight.grad.abs().sum() > 0
    opt.step()
    assert torch.equal(model.tokens_to_token.attention1.w, w_before)


def test_trainer_runs_one_epoch_with_t2t(tmp_path):
    import helpers_e2e as h
    from vitadapt.engine.trainer import Trainer

    data = h.make_image_folder(tmp_path / "data", train_counts=(4, 4, 4), val_counts=(2, 1, 1))
    opts = h.tiny_opts(data, tmp_path / "out", SOLVER__MAX_EPOCH=1, MODEL__NAME="T2TViT",
                       T2T__TOKENS_TYPE="performer_less_less_token", T2T__TOKEN_DIM=8, VIT__QKV_BIAS=False,
                       DATA__TRAIN_CROP_SIZE=64, DATA__TEST_CROP_SIZE=64)
    cfg = load_config("", opts, check_files=True)
    trainer = Trainer(cfg)
    model = trainer.run()
    assert isinstance(getattr(model, "module", model), T2TViT)


def test_macs_tokenizer_plus_body_against_fvcore():
    model = T2TViT(tokens_type="performer", embed_dim=64, depth=2, num_heads=2, mlp_ratio=2.0, token_dim=16,
                   num_classes=10).eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        model(x)
    ours = model.macs_per_image()
    assert ours.shape == (2,) and ours[0] == ours[1]
    tokenizer = model.tokens_to_token.macs(224)
    assert 0 < tokenizer < ours[0]
    # fvcore also counts the LayerNorms (5 per element), which the analytic count leaves out like vit_macs does;
    # everything else (linear layers, the performer einsums, attention) agrees to rounding.
    analysis = FlopCountAnalysis(model, x[:1])
    analysis.set_op_handle("aten::scaled_dot_product_attention", _sdpa_macs)
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    by_op = analysis.by_operator()
    # Attention is one fused call, or explicit matrix products where those are faster (small, on the CPU).
    attention = set(by_op) & {"scaled_dot_product_attention", "matmul"}
    assert set(by_op) - attention == {"linear", "einsum", "layer_norm"} and len(attention) == 1
    ref = analysis.total() - by_op["layer_norm"]
    assert abs(ours[0].item() - ref) / ref < 1e-6, (ours[0].item(), ref)
    assert abs(ours[0].item() - fvcore_macs(model, x)) / ours[0].item() < 0.07  # the norms: 6% at this tiny width


def test_macs_full_size_t2t_vit_12():
    """T2T-ViT-12 at 224: 1.76 GMACs (fvcore: 1.77 with the LayerNorms; DVT paper Table 1: 1.78 G)."""
    model = T2TViT(tokens_type="performer", embed_dim=256, depth=12, num_heads=4, mlp_ratio=2.0).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        model(x)
    ours = model.macs_per_image()[0].item()
    assert abs(ours / 1e9 - 1.76) < 0.01
    assert abs(ours - fvcore_macs(model, x)) / ours < 0.02


@pytest.mark.parametrize("name,dim,depth,heads,params_m", [("12", 256, 12, 4, 6.89), ("14", 384, 14, 6, 21.47),
                                                            ("19", 448, 19, 7, 39.09)])
def test_shipped_configs(name, dim, depth, heads, params_m):
    cfg = load_config(str(REPO / "configs" / "ImageNet" / "T2T" / f"T2T_ViT_{name}.yaml"), [])
    assert cfg.MODEL.NAME == "T2TViT" and cfg.T2T.TOKENS_TYPE == "performer"
    assert (cfg.VIT.EMBED_DIM, cfg.VIT.DEPTH, cfg.VIT.NUM_HEADS) == (dim, depth, heads)
    assert cfg.VIT.QKV_BIAS is False
    model = build_model(cfg)
    assert isinstance(model, T2TViT) and model.patch_grid == (14, 14)
    assert abs(sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6 - params_m) < 0.01


def test_config_validator():
    cfg = get_cfg()
    cfg.MODEL.NAME = "T2TViT"
    validate(cfg)
    cfg.T2T.TOKENS_TYPE = "transformer"
    with pytest.raises(ConfigError, match="TOKENS_TYPE"):
        validate(cfg)
    cfg.T2T.TOKENS_TYPE = "performer"
    cfg.T2T.QK_SCALE = -1.0
    with pytest.raises(ConfigError, match="QK_SCALE"):
        validate(cfg)
    cfg.T2T.QK_SCALE = 0.0625
    validate(cfg)
    assert build_model(cfg).blocks[0].attn.scale == 0.0625
