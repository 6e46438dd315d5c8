"""vitadapt.models (registry, ViT == timm, token container, adapters, FLOPs) and optimizer / LR / loss."""

import math

import pytest
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer as TimmViT

from vitadapt.config import load_config
from vitadapt.losses import LOSS_REGISTRY, build_loss
from vitadapt.models import MODEL_REGISTRY, TokenAdapter, TokenBatch, VisionTransformer, build_model
from vitadapt.models.flops import block_macs, fvcore_macs, vit_macs
from vitadapt.models.vit import Block
from vitadapt.utils.lr_policy import base_lr, lr_at_epoch
from vitadapt.utils.optimizer import build_optimizer, param_groups

try:
    from helpers_unit import NUM_TOKENS, REPO, TINY, tiny_cfg, tiny_vit
except ImportError:  # tests/ imported as a package
    from tests.helpers_unit import NUM_TOKENS, REPO, TINY, tiny_cfg, tiny_vit


def timm_twin(model_kwargs, **extra):
    """timm's VisionTransformer with the same hyperparameters (DeiT layout: CLS token, token pooling)."""
    return TimmViT(**model_kwargs, **extra)


def hand_vit_macs(num_patches, dim, depth, mlp_hidden, num_classes, in_chans=3, patch=16, counts=None):
    """The ViT multiply-accumulate count written out: patch projection, per block qkv+proj, QK^T+AV, MLP, head."""
    tokens = num_patches + 1
    counts = counts or [(tokens, tokens)] * depth
    total = num_patches * in_chans * patch * patch * dim
    for n_attn, n_mlp in counts:
        total += 3 * n_attn * dim * dim + n_attn * dim * dim  # qkv, proj
        total += n_attn * n_attn * dim * 2  # QK^T and AV
        total += n_mlp * dim * mlp_hidden * 2  # fc1, fc2
    return total + dim * num_classes


# ====================================================================== registry / build


def test_registry_contains_vision_transformer():
    assert "VisionTransformer" in MODEL_REGISTRY
    assert MODEL_REGISTRY.get("VisionTransformer") is VisionTransformer


def test_build_model_follows_the_config():
    cfg = tiny_cfg("VIT.MLP_RATIO", "2.0", "VIT.DROP_PATH_RATE", "0.2", "VIT.QKV_BIAS", "False")
    model = build_model(cfg)
    assert isinstance(model, VisionTransformer)
    assert model.training  # built in train mode, on the CPU
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert len(model.blocks) == 2 and model.embed_dim == 48
    assert model.pos_embed.shape == (1, NUM_TOKENS, 48) and model.cls_token.shape == (1, 1, 48)
    assert tuple(model.patch_grid) == (4, 4)
    assert model.patch_embed.proj.kernel_size == (8, 8) and model.patch_embed.proj.in_channels == 3
    assert model.blocks[0].attn.num_heads == 3
    assert model.blocks[0].attn.qkv.bias is None
    assert model.blocks[0].mlp.fc1.out_features == 96
    assert model.head.out_features == 10 and model.num_classes == 10
    # Stochastic depth rises linearly to DROP_PATH_RATE at the last block.
    assert model.blocks[0].drop_path == 0.0
    assert model.blocks[-1].drop_path == pytest.approx(0.2)


def test_build_model_from_shipped_deit_ti_config():
    model = build_model(load_config(str(REPO / "configs" / "ImageNet" / "DeiT_Ti.yaml")))
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(5.72e6, rel=0.01)  # DeiT-Ti: 5.7M


def test_output_shape_and_last_token_counts():
    model = tiny_vit().eval()
    logits = model(torch.randn(3, 3, 32, 32))
    assert logits.shape == (3, 10)
    counts = model.last_token_counts
    assert counts.shape == (3, 2, 2)
    assert counts.dtype == torch.long
    assert torch.equal(counts, torch.full((3, 2, 2), NUM_TOKENS))


def test_reset_classifier():
    model = tiny_vit()
    model.reset_classifier(4)
    assert model.num_classes == 4 and model(torch.randn(2, 3, 32, 32)).shape == (2, 4)
    assert torch.equal(model.head.bias, torch.zeros(4))


# ====================================================================== equality with timm


@pytest.mark.parametrize("extra", [{}, {"qkv_bias": False}, {"mlp_ratio": 2.0}],
                         ids=["default", "no_qkv_bias", "mlp_ratio_2"])
def test_equals_timm_vision_transformer(extra):
    kwargs = {**TINY, **extra}
    torch.manual_seed(0)
    timm_model = timm_twin(kwargs).eval()
    ours = VisionTransformer(**kwargs).eval()
    assert set(ours.state_dict()) == set(timm_model.state_dict())
    for key, value in timm_model.state_dict().items():
        assert ours.state_dict()[key].shape == value.shape, key
    ours.load_state_dict(timm_model.state_dict(), strict=True)
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        expected, actual = timm_model(images), ours(images)
    assert torch.allclose(actual, expected, atol=1e-5), (actual - expected).abs().max()
    # ... and in the other direction.
    timm_again = timm_twin(kwargs).eval()
    timm_again.load_state_dict(ours.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.allclose(timm_again(images), actual, atol=1e-5)


@pytest.mark.parametrize("size", [(48, 48), (32, 48), (16, 16)], ids=["48x48", "32x48", "16x16"])
def test_other_input_size_interpolates_pos_embed_like_timm(size):
    torch.manual_seed(0)
    timm_model = timm_twin(TINY, dynamic_img_size=True).eval()
    ours = VisionTransformer(**TINY).eval()
    ours.load_state_dict(timm_model.state_dict(), strict=True)
    images = torch.randn(2, 3, *size)
    with torch.no_grad():
        expected, actual = timm_model(images), ours(images)
    assert torch.allclose(actual, expected, atol=1e-5), (actual - expected).abs().max()
    grid = (size[0] // 8, size[1] // 8)
    assert torch.equal(ours.last_token_counts, torch.full((2, 2, 2), grid[0] * grid[1] + 1))
    # The embedding is exactly timm's resampling of pos_embed from the 4x4 grid.
    with torch.no_grad():
        tokens = ours.embed(images)
        pos = resample_abs_pos_embed(ours.pos_embed, list(grid), [4, 4], num_prefix_tokens=1)
        patches = ours.patch_embed(images)
        by_hand = torch.cat([ours.cls_token.expand(2, -1, -1), patches], dim=1) + pos
    assert torch.allclose(tokens.x, by_hand, atol=1e-6)
    assert tokens.keep is None and torch.equal(tokens.ids, torch.arange(by_hand.shape[1]).expand(2, -1))


def test_native_size_does_not_touch_pos_embed():
    model = tiny_vit().eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = model.embed(images)
        expected = torch.cat([model.cls_token.expand(2, -1, -1), model.patch_embed(images)], 1) + model.pos_embed
    assert torch.equal(tokens.x, expected)


# ====================================================================== TokenBatch


def keep_mask_two_images():
    """CLS always live; five live tokens out of nine per image, at different positions."""
    keep = torch.zeros(2, 9, dtype=torch.bool)
    keep[0, [0, 1, 3, 4, 8]] = True
    keep[1, [0, 2, 5, 6, 7]] = True
    return keep


def test_dense_token_batch():
    x = torch.randn(2, 9, 48)
    tokens = TokenBatch.dense(x)
    assert torch.equal(tokens.ids, torch.arange(9).expand(2, 9))
    assert tokens.keep is None and tokens.key_mask() is None and tokens.token_counts == []
    assert torch.equal(tokens.num_live(), torch.tensor([9, 9]))


def test_replace_is_dataclasses_replace():
    """TokenBatch.replace (a copy without dataclasses.replace's __init__) gives what dataclasses.replace gives, for
    every field, leaves the original alone and refuses a field that does not exist."""
    import dataclasses

    tokens = TokenBatch.packed_rows(torch.randn(7, 4), torch.tensor([3, 4]))
    changes = {"x": torch.randn(7, 4), "execution": "masked", "frames": 2, "num_initial": 11}
    mine, reference = tokens.replace(**changes), dataclasses.replace(tokens, **changes)
    assert type(mine) is TokenBatch
    for f in dataclasses.fields(TokenBatch):
        a, b = getattr(mine, f.name), getattr(reference, f.name)
        assert (torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b), f.name
    assert tokens.execution == "packed" and tokens.frames == 1 and tokens.x is not changes["x"]
    with pytest.raises(TypeError, match="kep"):
        tokens.replace(kep=None)


def test_with_keep_intersects_and_counts():
    x = torch.randn(2, 9, 48)
    keep = keep_mask_two_images()
    tokens = TokenBatch.dense(x).with_keep(keep)
    assert torch.equal(tokens.num_live(), torch.tensor([5, 5]))
    assert tokens.key_mask().shape == (2, 1, 1, 9) and torch.equal(tokens.key_mask()[:, 0, 0], keep)
    assert tokens.x is x  # no data moved
    more = torch.ones_like(keep)
    more[:, 1] = False
    both = tokens.with_keep(more)
    assert torch.equal(both.keep, keep & more)
    assert torch.equal(both.num_live(), torch.tensor([4, 5]))
    assert torch.equal(tokens.with_keep(None).num_live(), torch.tensor([9, 9]))


def test_add_residual_skips_dropped_tokens():
    x = torch.randn(2, 9, 48)
    keep = keep_mask_two_images()
    delta = torch.randn(2, 9, 48)
    out = TokenBatch.dense(x).with_keep(keep).add_residual(delta)
    assert torch.equal(out.x[~keep], x[~keep])
    assert torch.allclose(out.x[keep], (x + delta)[keep])
    assert torch.allclose(TokenBatch.dense(x).add_residual(delta).x, x + delta)


def test_gather_keeps_ids_and_keep():
    x = torch.randn(2, 9, 48)
    index = torch.tensor([[0, 4, 2], [0, 8, 7]])
    keep = keep_mask_two_images()
    gathered = TokenBatch.dense(x).with_keep(keep).gather(index)
    assert gathered.x.shape == (2, 3, 48)
    assert torch.equal(gathered.ids, index)
    assert torch.equal(gathered.x, torch.stack([x[b, index[b]] for b in range(2)]))
    assert torch.equal(gathered.keep, keep.gather(1, index))
    # Gathering twice maps back to the original positions, not to positions in the first gather.
    again = gathered.gather(torch.tensor([[0, 2], [0, 1]]))
    assert torch.equal(again.ids, torch.tensor([[0, 2], [0, 8]]))
    assert torch.equal(again.x[1, 1], x[1, 8])


def test_masked_block_equals_block_on_live_tokens():
    torch.manual_seed(0)
    block = Block(48, 3).eval()
    x = torch.randn(2, 9, 48)
    keep = keep_mask_two_images()
    live_index = torch.stack([keep[b].nonzero().squeeze(1) for b in range(2)])  # [2, 5]
    with torch.no_grad():
        masked = block(TokenBatch.dense(x).with_keep(keep))
        removed = block(TokenBatch.dense(x).gather(live_index))
        dense = block(TokenBatch.dense(x))
    # Dropped tokens are no attention keys: the live tokens see exactly what they would without them.
    assert torch.allclose(masked.x.gather(1, live_index[..., None].expand(-1, -1, 48)), removed.x, atol=1e-5)
    # ... which differs from the dense block (the test would not notice a missing mask otherwise).
    assert not torch.allclose(masked.x[keep], dense.x[keep], atol=1e-3)
    # Dropped tokens receive no residual update at all.
    assert torch.equal(masked.x[~keep], x[~keep])
    assert torch.equal(masked.keep, keep) and torch.equal(masked.ids, torch.arange(9).expand(2, 9))
    assert torch.equal(removed.ids, live_index)
    assert len(masked.token_counts) == 1 and torch.equal(masked.token_counts[0], torch.tensor([[5, 5], [5, 5]]))


# ====================================================================== adapters


class Recorder(TokenAdapter):
    """Records what the block hands to its hooks; optionally drops tokens."""

    def __init__(self, needs_cls_attention=True, keep=None, keep_after_attention=None, gather_index=None):
        super().__init__()
        self.needs_cls_attention = needs_cls_attention
        self.keep, self.keep_after_attention, self.gather_index = keep, keep_after_attention, gather_index
        self.calls = []

    def before_block(self, tokens):
        self.calls.append("before_block")
        if self.keep is not None:
            tokens = tokens.with_keep(self.keep)
        self.x_in = tokens.x.clone()
        self.keep_in = tokens.keep
        return tokens

    def after_attention(self, tokens, cls_attention, values):
        self.calls.append("after_attention")
        self.cls_attention, self.values = cls_attention, values
        if self.keep_after_attention is not None:
            tokens = tokens.with_keep(self.keep_after_attention)
        return tokens

    def after_block(self, tokens):
        self.calls.append("after_block")
        if self.gather_index is not None:
            tokens = tokens.gather(self.gather_index)
        self.ids_out = tokens.ids
        return tokens


def cls_attention_by_hand(block, x, keep=None):
    b, n, c = x.shape
    heads = block.attn.num_heads
    q, k, v = block.attn.qkv(block.norm1(x)).reshape(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
    logits = torch.einsum("bhd,bhnd->bhn", q[:, :, 0], k) * (c // heads) ** -0.5
    if keep is not None:
        logits = logits.masked_fill(~keep[:, None, :], float("-inf"))
    return logits.softmax(dim=-1), v


def test_adapter_receives_cls_attention_row():
    model = tiny_vit().eval()
    adapter = Recorder()
    model.blocks[1].adapter = adapter
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
        expected, values = cls_attention_by_hand(model.blocks[1], adapter.x_in)
    assert adapter.calls == ["before_block", "after_attention", "after_block"]
    att = adapter.cls_attention
    assert att.shape == (2, 3, NUM_TOKENS)
    assert torch.allclose(att.sum(-1), torch.ones(2, 3), atol=1e-6)
    assert (att >= 0).all()
    assert torch.allclose(att, expected, atol=1e-6)
    assert values.shape == (2, 3, NUM_TOKENS, 16) and torch.allclose(adapter.values, values, atol=1e-6)


def test_adapter_cls_attention_ignores_dropped_keys():
    model = tiny_vit().eval()
    keep = torch.ones(2, NUM_TOKENS, dtype=torch.bool)
    keep[0, 1:9] = False
    keep[1, 5:7] = False
    adapter = Recorder(keep=keep)
    model.blocks[0].adapter = adapter
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
        expected, _ = cls_attention_by_hand(model.blocks[0], adapter.x_in, keep)
    att = adapter.cls_attention
    assert torch.allclose(att.sum(-1), torch.ones(2, 3), atol=1e-6)
    assert torch.equal(att[~keep[:, None, :].expand_as(att)], torch.zeros(int((~keep).sum()) * 3))
    assert torch.allclose(att, expected, atol=1e-6)
    # Block 0 saw the masked tokens; block 1 still runs masked (keep carried along).
    assert model.last_token_counts[:, 0].tolist() == [[9, 9], [15, 15]]
    assert model.last_token_counts[:, 1].tolist() == [[9, 9], [15, 15]]


def test_adapter_without_cls_attention_gets_none():
    model = tiny_vit().eval()
    adapter = Recorder(needs_cls_attention=False)
    model.blocks[0].adapter = adapter
    with torch.no_grad():
        with_adapter = model(torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)))
        model.blocks[0].adapter = None
        without = model(torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)))
    assert adapter.cls_attention is None and adapter.values is None
    assert torch.equal(with_adapter, without)  # identity hooks change nothing


def test_dropping_after_attention_counts_fewer_mlp_tokens():
    model = tiny_vit().eval()
    keep = torch.ones(2, NUM_TOKENS, dtype=torch.bool)
    keep[:, 9:] = False
    model.blocks[0].adapter = Recorder(needs_cls_attention=False, keep_after_attention=keep)
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    assert model.last_token_counts[:, 0].tolist() == [[17, 9], [17, 9]]
    assert model.last_token_counts[:, 1].tolist() == [[9, 9], [9, 9]]


def test_gathering_adapter_shrinks_the_sequence_and_keeps_ids():
    model = tiny_vit().eval()
    index = torch.tensor([[0, 3, 5, 16], [0, 1, 2, 10]])
    adapter = Recorder(needs_cls_attention=False, gather_index=index)
    model.blocks[0].adapter = adapter
    with torch.no_grad():
        logits = model(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()
    assert torch.equal(adapter.ids_out, index)
    assert model.last_token_counts.tolist() == [[[17, 17], [4, 4]], [[17, 17], [4, 4]]]


# ====================================================================== FLOPs


def test_vit_macs_matches_the_formula_for_the_tiny_model():
    model = tiny_vit().eval()
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    macs = vit_macs(model, model.last_token_counts)
    expected = hand_vit_macs(16, 48, 2, 192, 10, patch=8)
    assert macs.shape == (2,)
    assert macs.tolist() == [expected, expected]


@pytest.mark.parametrize("dim", [192, 48])
def test_vit_macs_agrees_with_fvcore_small(dim):
    model = tiny_vit(embed_dim=dim).eval()
    images = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        model(images)
    analytic = vit_macs(model, model.last_token_counts).item()
    traced = fvcore_macs(model, images)
    # fvcore also counts the LayerNorms (5 per element: 2 per block + the final one); nothing else differs.
    layer_norms = 5 * (2 * 2 + 1) * NUM_TOKENS * dim
    assert traced - analytic == layer_norms
    if dim >= 96:  # below that, the LayerNorms alone are more than 1% of a toy model
        assert traced == pytest.approx(analytic, rel=0.01)


def test_vit_macs_agrees_with_fvcore_deit_s():
    model = VisionTransformer(embed_dim=384, depth=12, num_heads=6).eval()
    images = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        model(images)
    analytic = vit_macs(model, model.last_token_counts).item()
    assert fvcore_macs(model, images) == pytest.approx(analytic, rel=0.01)
    assert round(analytic / 1e9, 1) == 4.6


@pytest.mark.parametrize("name, dim, approx_gmacs", [("Ti", 192, 1.26), ("S", 384, 4.60), ("B", 768, 17.56)])
def test_deit_macs_from_shipped_configs(name, dim, approx_gmacs):
    cfg = load_config(str(REPO / "configs" / "ImageNet" / f"DeiT_{name}.yaml"))
    model = build_model(cfg)
    counts = torch.full((1, 12, 2), 197)
    macs = vit_macs(model, counts).item()
    assert macs == hand_vit_macs(196, dim, 12, 4 * dim, 1000)
    assert macs / 1e9 == pytest.approx(approx_gmacs, rel=0.01)


def test_fewer_tokens_at_a_block_lower_the_macs_accordingly():
    model = tiny_vit().eval()
    full = torch.full((1, 2, 2), NUM_TOKENS)
    half = full.clone()
    half[0, 1] = 9  # CLS + half of the 16 patches at the second block
    saved = vit_macs(model, full) - vit_macs(model, half)
    expected = (block_macs(torch.tensor(17), torch.tensor(17), 48, 192)
                - block_macs(torch.tensor(9), torch.tensor(9), 48, 192))
    assert saved.item() == expected.item() > 0
    assert saved.item() == (4 * 8 * 48 * 48 + 2 * (17 ** 2 - 9 ** 2) * 48 + 2 * 8 * 48 * 192)
    # Per image: a batch mixing both gives both numbers.
    assert vit_macs(model, torch.cat([full, half])).tolist() == [vit_macs(model, full).item(),
                                                                vit_macs(model, half).item()]
    # Fewer MLP tokens only (dropped after attention) lower only the MLP part.
    mlp_only = full.clone()
    mlp_only[0, 1, 1] = 9
    assert (vit_macs(model, full) - vit_macs(model, mlp_only)).item() == 2 * 8 * 48 * 192


def test_macs_of_a_model_run_with_half_the_tokens():
    model = tiny_vit().eval()
    keep = torch.zeros(2, NUM_TOKENS, dtype=torch.bool)
    keep[:, :9] = True
    model.blocks[1].adapter = Recorder(needs_cls_attention=False, keep=keep)
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    assert model.last_token_counts.tolist() == [[[17, 17], [9, 9]]] * 2
    macs = vit_macs(model, model.last_token_counts)
    expected = hand_vit_macs(16, 48, 2, 192, 10, patch=8, counts=[(17, 17), (9, 9)])
    assert macs.tolist() == [expected, expected]
    assert expected < hand_vit_macs(16, 48, 2, 192, 10, patch=8)


# ====================================================================== optimizer


def test_param_groups_no_decay_on_pos_cls_bias_and_norms():
    model = tiny_vit()
    names = {id(p): n for n, p in model.named_parameters()}
    decay, no_decay = param_groups(model, 0.05, True)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    decay_names = {names[id(p)] for p in decay["params"]}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert {"pos_embed", "cls_token"} <= no_decay_names
    for name, p in model.named_parameters():
        if name.endswith(".bias") or ".norm" in name or name.startswith("norm.") or p.ndim <= 1:
            assert name in no_decay_names, name
    assert decay_names == {n for n, p in model.named_parameters()
                           if p.ndim >= 2 and n not in ("pos_embed", "cls_token")}
    assert {"blocks.0.norm1.weight", "blocks.1.norm2.weight", "norm.weight", "head.bias",
            "patch_embed.proj.bias", "blocks.0.attn.qkv.bias"} <= no_decay_names
    assert {"head.weight", "patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "blocks.1.mlp.fc2.weight"} \
        <= decay_names
    # Every trainable parameter is in exactly one group.
    ids = [id(p) for g in (decay, no_decay) for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))


def test_param_groups_skip_frozen_and_respect_zero_wd_flag():
    model = tiny_vit()
    model.patch_embed.proj.weight.requires_grad_(False)
    names = {id(p): n for n, p in model.named_parameters()}
    decay, no_decay = param_groups(model, 0.1, False)
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    decay_names = {names[id(p)] for p in decay["params"]}
    assert no_decay_names == {"pos_embed", "cls_token"}
    assert "patch_embed.proj.weight" not in decay_names | no_decay_names
    assert "norm.weight" in decay_names and "head.bias" in decay_names
    assert len(decay_names | no_decay_names) == len(list(model.parameters())) - 1


@pytest.mark.parametrize("method, cls", [("adamw", torch.optim.AdamW), ("sgd", torch.optim.SGD)])
def test_build_optimizer(method, cls):
    cfg = tiny_cfg("SOLVER.OPTIMIZING_METHOD", method, "SOLVER.BASE_LR", "0.01", "SOLVER.WEIGHT_DECAY", "0.1",
                   "SOLVER.BETAS", "[0.8, 0.9]", "SOLVER.MOMENTUM", "0.7")
    model = tiny_vit()
    optimizer = build_optimizer(model, cfg.SOLVER)
    assert type(optimizer) is cls
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]
    assert all(g["lr"] == 0.01 for g in optimizer.param_groups)
    if method == "adamw":
        assert optimizer.param_groups[0]["betas"] == (0.8, 0.9)
    else:
        assert optimizer.param_groups[0]["momentum"] == 0.7


# ====================================================================== learning rate


def lr_cfg(*opts):
    return tiny_cfg("SOLVER.BASE_LR", "1e-3", "SOLVER.WARMUP_START_LR", "1e-6", "SOLVER.WARMUP_EPOCHS", "5",
                    "SOLVER.MAX_EPOCH", "105", "SOLVER.COSINE_END_LR", "1e-5", "TRAIN.BATCH_SIZE", "128", *opts)


@pytest.mark.parametrize("after_warmup", [True, False])
def test_warmup_is_linear_from_start_lr(after_warmup):
    cfg = lr_cfg("SOLVER.COSINE_AFTER_WARMUP", str(after_warmup))
    start = lr_at_epoch(cfg, 0.0)
    assert start == pytest.approx(1e-6)
    end = lr_at_epoch(cfg, 5.0)
    for e in (0.5, 1.0, 2.5, 4.0, 4.99):
        assert lr_at_epoch(cfg, e) == pytest.approx(1e-6 + (end - 1e-6) * e / 5, rel=1e-9)
    # Continuous at the end of the warm-up.
    assert lr_at_epoch(cfg, 5.0 - 1e-9) == pytest.approx(end, rel=1e-6)
    if after_warmup:
        assert end == pytest.approx(1e-3)  # the cosine starts at the peak once the warm-up is over


@pytest.mark.parametrize("after_warmup", [True, False])
def test_cosine_reaches_end_lr_at_max_epoch(after_warmup):
    cfg = lr_cfg("SOLVER.COSINE_AFTER_WARMUP", str(after_warmup))
    assert lr_at_epoch(cfg, 105.0) == pytest.approx(1e-5, rel=1e-9)
    offset = 5.0 if after_warmup else 0.0
    middle = (105.0 + offset) / 2
    assert lr_at_epoch(cfg, middle) == pytest.approx((1e-3 + 1e-5) / 2, rel=1e-9)
    e = 30.0
    expected = 1e-5 + (1e-3 - 1e-5) * (1 + math.cos(math.pi * (e - offset) / (105.0 - offset))) / 2
    assert lr_at_epoch(cfg, e) == pytest.approx(expected, rel=1e-9)
    after = [lr_at_epoch(cfg, 5.0 + i) for i in range(101)]
    assert all(a >= b for a, b in zip(after, after[1:]))


def test_steps_with_relative_lrs():
    cfg = lr_cfg("SOLVER.LR_POLICY", "steps_with_relative_lrs", "SOLVER.STEPS", "[0, 30, 60]",
                 "SOLVER.LRS", "[1.0, 0.1, 0.01]", "SOLVER.WARMUP_EPOCHS", "0.0")
    assert lr_at_epoch(cfg, 0.0) == pytest.approx(1e-3)
    assert lr_at_epoch(cfg, 29.99) == pytest.approx(1e-3)
    assert lr_at_epoch(cfg, 30.0) == pytest.approx(1e-4)
    assert lr_at_epoch(cfg, 59.5) == pytest.approx(1e-4)
    assert lr_at_epoch(cfg, 60.0) == pytest.approx(1e-5)
    assert lr_at_epoch(cfg, 104.9) == pytest.approx(1e-5)


def test_steps_with_warmup_ends_at_first_step_lr():
    cfg = lr_cfg("SOLVER.LR_POLICY", "steps_with_relative_lrs", "SOLVER.STEPS", "[0, 30]",
                 "SOLVER.LRS", "[1.0, 0.1]")
    assert lr_at_epoch(cfg, 2.5) == pytest.approx((1e-6 + 1e-3) / 2)


def test_constant_policy():
    cfg = lr_cfg("SOLVER.LR_POLICY", "constant")
    assert lr_at_epoch(cfg, 5.0) == lr_at_epoch(cfg, 100.0) == pytest.approx(1e-3)


def test_lr_scale_ref_batch():
    cfg = lr_cfg("SOLVER.LR_SCALE_REF_BATCH", "512", "TRAIN.BATCH_SIZE", "1024", "SOLVER.LR_POLICY", "constant")
    assert base_lr(cfg) == pytest.approx(2e-3)
    assert lr_at_epoch(cfg, 50.0) == pytest.approx(2e-3)
    assert lr_at_epoch(cfg, 2.5) == pytest.approx((1e-6 + 2e-3) / 2)
    assert base_lr(lr_cfg("SOLVER.LR_SCALE_REF_BATCH", "512", "TRAIN.BATCH_SIZE", "256")) == pytest.approx(5e-4)
    assert base_lr(lr_cfg("TRAIN.BATCH_SIZE", "1024")) == pytest.approx(1e-3)  # 0: no scaling
    deit_s = load_config(str(REPO / "configs" / "ImageNet" / "DeiT_S.yaml"))
    assert base_lr(deit_s) == pytest.approx(5e-4 * 1024 / 512)
    assert lr_at_epoch(deit_s, 300.0) == pytest.approx(1e-5)


# ====================================================================== loss


def test_loss_registry_and_hard_labels_with_smoothing():
    assert "cross_entropy" in LOSS_REGISTRY
    cfg = tiny_cfg("TRAIN.LABEL_SMOOTHING", "0.1")
    loss = build_loss(cfg)
    torch.manual_seed(0)
    logits, labels = torch.randn(6, 10), torch.randint(0, 10, (6,))
    value = loss(logits, labels)
    assert torch.allclose(value, F.cross_entropy(logits, labels, label_smoothing=0.1))
    logp = logits.log_softmax(-1)
    by_hand = (0.9 * -logp.gather(1, labels[:, None]).squeeze(1) + 0.1 * -logp.mean(-1)).mean()
    assert torch.allclose(value, by_hand, atol=1e-6)
    assert not torch.allclose(value, F.cross_entropy(logits, labels))


def test_loss_hard_labels_without_smoothing():
    loss = build_loss(tiny_cfg())
    logits, labels = torch.randn(4, 10), torch.tensor([1, 2, 3, 9])
    assert torch.allclose(loss(logits, labels), F.cross_entropy(logits, labels))


def test_loss_soft_targets_are_not_smoothed_again():
    loss = build_loss(tiny_cfg("TRAIN.LABEL_SMOOTHING", "0.1"))
    torch.manual_seed(0)
    logits = torch.randn(5, 10, requires_grad=True)
    targets = torch.softmax(torch.randn(5, 10), dim=-1)
    value = loss(logits, targets)
    assert torch.allclose(value, -(targets * logits.log_softmax(-1)).sum(-1).mean(), atol=1e-6)
    value.backward()
    assert torch.allclose(logits.grad, (logits.softmax(-1) - targets).detach() / 5, atol=1e-6)
    # One-hot soft targets equal hard labels without smoothing.
    labels = torch.tensor([0, 3, 3, 7, 9])
    one_hot = F.one_hot(labels, 10).float()
    assert torch.allclose(loss(logits, one_hot), F.cross_entropy(logits, labels), atol=1e-6)


def test_attention_heads_hook_sees_and_changes_per_head_outputs():
    """A method can gate heads inside attention: zeroing every head leaves only the projection bias."""
    from vitadapt.models.tokens import TokenAdapter, TokenBatch
    from vitadapt.models.vit import Block

    class ZeroHeads(TokenAdapter):
        def attention_heads(self, tokens, heads):
            self.shape = tuple(heads.shape)
            return heads * 0

    torch.manual_seed(0)
    block = Block(48, 3).eval()
    block.adapter = ZeroHeads()
    x = torch.randn(2, 5, 48)
    out, _, _ = block.attn(block.norm1(x), TokenBatch.dense(x), False, block.adapter)
    assert block.adapter.shape == (2, 3, 5, 16)
    assert torch.allclose(out, block.attn.proj.bias.expand(2, 5, 48))


def test_packed_tokens_of_equal_lengths_are_their_own_padded_layout():
    """Packed images that all keep the same number of tokens (always at batch 1) pad and unpad without a copy and
    need no key mask; unequal ones get zero padding and a mask. Both round-trip exactly."""
    from vitadapt.models import TokenBatch

    x = torch.randn(3, 6, 4)
    index = torch.tensor([[0, 2, 3, 5], [0, 1, 4, 5], [0, 3, 4, 2]])
    for valid, uniform in ((torch.ones(3, 4, dtype=torch.bool), True),
                           (torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 1, 1]], dtype=torch.bool), False)):
        tokens = TokenBatch.dense(x).select(index, valid)
        assert tokens.is_packed and tokens.uniform == uniform
        padded = tokens.padded(tokens.x)
        assert padded.shape == (3, 4, 4)
        live = tokens.live_mask()  # the kept tokens of each image, moved to its front
        assert torch.equal(live.sum(1), valid.sum(1))
        assert torch.equal(padded[live], x.gather(1, index[..., None].expand(-1, -1, 4))[valid])
        assert torch.equal(tokens.unpadded(padded), tokens.x)
        if uniform:
            assert padded.data_ptr() == tokens.x.data_ptr() and tokens.key_mask() is None
        else:
            assert not padded[~live].any() and torch.equal(tokens.key_mask()[:, 0, 0], live)
