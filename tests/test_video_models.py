"""Video backbones (vitadapt.models.video): TimeSformer and XViT against the official goldens, the token layouts and
the space-time mixing shift against the spec's definitions (written here independently), checkpoint loading
through the loader every tool uses, FLOPs against fvcore, config validation and one end-to-end Kinetics run."""

import glob
import logging
import os
from pathlib import Path

import pytest
import torch

import helpers_e2e as h
from vitadapt.config import ConfigError, load_config
from vitadapt.models import build_model, input_shape
from vitadapt.models.convert import CheckpointMismatchError
from vitadapt.models.flops import fvcore_macs
from vitadapt.models.video import TemporalShift, TimeSformer, XViT, frames_of
from vitadapt.utils.checkpoint import load_weights

GOLDEN_DIR = Path(os.environ.get("VITADAPT_GOLDEN_DIR") or (h.REPO.parent / "shared" / "golden")) / "video"
GOLDENS = sorted(glob.glob(str(GOLDEN_DIR / "*.pt")))
ATTENTION_TYPES = ("divided_space_time", "joint_space_time", "space_only")
T = 4
DIM, HEADS, CLASSES = 24, 2, 5


def tiny_cfg(name="TimeSformer", *extra, crop=32, frames=T):
    return load_config("", ["NUM_GPUS", "0", "MODEL.NAME", name, "MODEL.NUM_CLASSES", str(CLASSES),
                            "VIT.EMBED_DIM", str(DIM), "VIT.DEPTH", "2", "VIT.NUM_HEADS", str(HEADS),
                            "VIT.PATCH_SIZE", "16", "DATA.TRAIN_CROP_SIZE", str(crop),
                            "DATA.TEST_CROP_SIZE", str(crop), "DATA.NUM_FRAMES", str(frames),
                            "TEMPORAL_HEAD.NUM_ATTENTION_HEADS", str(HEADS), "TEMPORAL_HEAD.MLP_DIM", "16",
                            "XVIT.POS_EMBED_IMG_SIZE", str(crop), *extra])


def timesformer(attention="divided_space_time", *extra, crop=32, seed=0, sharpen=True):
    torch.manual_seed(seed)
    model = build_model(tiny_cfg("TimeSformer", "TIMESFORMER.ATTENTION_TYPE", attention, *extra, crop=crop)).eval()
    if sharpen:
        sharpen_(model, seed)
    return model


def xvit(segments=T, frames_embed=T, *extra, seed=0, sharpen=True):
    torch.manual_seed(seed)
    model = build_model(tiny_cfg("XViT", "XVIT.NUM_SEGMENTS", str(segments), "XVIT.NUM_FRAMES_EMBED",
                                 str(frames_embed), *extra)).eval()
    if sharpen:
        sharpen_(model, seed)
    return model


@torch.no_grad()
def sharpen_(model, seed):
    """Re-draws every parameter (zero-initialised temporal_fc / time_embed included), so that the temporal paths
    matter, as the goldens' sharpen_init does."""
    g = torch.Generator().manual_seed(1000 + seed)
    for name, p in model.named_parameters():
        p.copy_(torch.randn(p.shape, generator=g) * (0.5 if p.dim() > 1 else 0.1) / max(1, p.shape[-1]) ** 0.5
                + (1.0 if name.endswith("norm1.weight") or name.endswith("norm2.weight") else 0.0))
    return model


def clips(batch=2, frames=T, size=32, seed=7):
    return torch.randn(batch, 3, frames, size, size, generator=torch.Generator().manual_seed(seed))


# ============================================================================================ 1. parity with goldens
needs_goldens = pytest.mark.skipif(not GOLDENS, reason=f"no video golden files under {GOLDEN_DIR}")


@needs_goldens
@pytest.mark.parametrize("path", GOLDENS, ids=[os.path.basename(p) for p in GOLDENS])
def test_check_file_video_goldens(path):
    from vitadapt.parity import check_file

    comparisons = check_file(path)
    assert comparisons
    bad = [c.line() for c in comparisons if not c.ok]
    assert not bad, "\n".join(bad)
    assert any("logits" in c.name for c in comparisons)


@needs_goldens
def test_check_parity_cli_on_video_folder():
    proc = h.check_parity_cli(GOLDEN_DIR)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "MISMATCH" not in proc.stdout
    assert "not supported" not in proc.stdout.lower(), proc.stdout
    for path in GOLDENS:
        assert os.path.basename(path) in proc.stdout + proc.stderr


# ============================================================================================ 2. TemporalShift
def reference_shift(x, segments, fold_div):
    """The spec's per-element definition (video.md 2.3), with loops."""
    r, heads, length, d = x.shape
    c_all = heads * d
    fold = c_all // fold_div
    out = torch.zeros_like(x)
    for row in range(r):
        s = row % segments
        for head in range(heads):
            for j in range(d):
                c = head * d + j
                if c < fold:
                    if s + 1 < segments:
                        out[row, head, :, j] = x[row + 1, head, :, j]
                elif c < 2 * fold:
                    if s > 0:
                        out[row, head, :, j] = x[row - 1, head, :, j]
                else:
                    out[row, head, :, j] = x[row, head, :, j]
    return out


@pytest.mark.parametrize("rows, segments, heads, head_dim, fold_div", [
    (8, 4, 3, 8, 8), (8, 2, 3, 8, 4), (6, 3, 2, 5, 2), (4, 4, 4, 6, 8), (6, 1, 2, 4, 4), (9, 3, 3, 4, 3)])
def test_temporal_shift_matches_definition(rows, segments, heads, head_dim, fold_div):
    x = torch.randn(rows, heads, 5, head_dim, generator=torch.Generator().manual_seed(rows * 31 + fold_div))
    out = TemporalShift(segments, fold_div)(x)
    assert out.shape == x.shape
    assert torch.equal(out, reference_shift(x, segments, fold_div))


def test_temporal_shift_refuses_bad_frame_count():
    with pytest.raises(ValueError, match="NUM_SEGMENTS"):
        TemporalShift(4, 8)(torch.randn(6, 2, 3, 8))


# ============================================================================================ 3. XViT grouping, batches
@torch.no_grad()
def test_xvit_segments_are_independent_halves():
    video = clips(batch=1)
    changed = video.clone()
    changed[:, :, T // 2:] = torch.randn_like(changed[:, :, T // 2:])
    half = xvit(T // 2, T // 2)
    a, b = half.base_model(frames_of(video)), half.base_model(frames_of(changed))
    torch.testing.assert_close(a[:T // 2], b[:T // 2], atol=1e-6, rtol=0)
    assert (a[T // 2:] - b[T // 2:]).abs().max() > 1e-3
    whole = xvit(T, T // 2)  # one segment over the clip: frame T/2 - 1 reads keys/values of frame T/2
    a, b = whole.base_model(frames_of(video)), whole.base_model(frames_of(changed))
    assert (a[T // 2 - 1] - b[T // 2 - 1]).abs().max() > 1e-3
    # Two shifted blocks: frame T/2 - 2 reads frame T/2 - 1, which read frame T/2 in block 0.
    assert (a[T // 2 - 2] - b[T // 2 - 2]).abs().max() > 1e-4


@torch.no_grad()
@pytest.mark.parametrize("kind", ATTENTION_TYPES + ("xvit", "xvit_halves"))
def test_each_clip_alone_gives_the_batched_logits(kind):
    model = {"xvit": lambda: xvit(), "xvit_halves": lambda: xvit(T // 2, T // 2)}.get(kind, lambda: timesformer(kind))()
    video = clips(batch=3)
    batched = model(video)
    alone = torch.cat([model(video[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(alone, batched, atol=1e-5, rtol=0)
    assert batched.shape == (3, CLASSES)
    assert (batched[0] - batched[1]).abs().max() > 1e-4  # the clips differ, so must their logits


# ============================================================================================ 4. token order
@torch.no_grad()
def test_timesformer_embed_token_order():
    model = timesformer(crop=64)  # 4 x 4 patches, time_embed re-drawn (non-zero)
    assert model.time_embed.abs().min() > 0
    video = clips(batch=2, size=64)
    x = model.embed(video).x
    n = model.patch_grid[0] * model.patch_grid[1]
    assert x.shape == (2, 1 + n * T, DIM)
    pos, time = model.pos_embed[0], model.time_embed[0]
    torch.testing.assert_close(x[:, 0], (model.cls_token[0, 0] + pos[0]).expand(2, -1), atol=1e-6, rtol=0)
    for t in range(T):
        patches = model.patch_embed(video[:, :, t])  # [B, N, C], patch n = h * Wp + w
        for k in range(n):
            torch.testing.assert_close(x[:, 1 + k * T + t], patches[:, k] + pos[k + 1] + time[t], atol=1e-6, rtol=0)


@torch.no_grad()
def test_divided_block0_with_official_init_is_per_frame():
    """temporal_fc = 0 and time_embed = 0 (the official init): block 0's patch tokens of frame t are those of the
    plain image block on frame t alone (its spatial CLS copy is the input CLS, the same for every clip), so they
    cannot depend on other frames' pixels; the CLS does (the mean over frames)."""
    divided = timesformer()
    for block in divided.blocks:
        block.temporal_fc.weight.zero_()
        block.temporal_fc.bias.zero_()
    divided.time_embed.zero_()
    space = timesformer("space_only", sharpen=False)
    space.load_state_dict({k: v for k, v in divided.state_dict().items() if k in space.state_dict()}, strict=True)

    def after_block0(model, video):
        return model.blocks[0](model.embed(video)).x

    video = clips(batch=2)
    n = divided.patch_grid[0] * divided.patch_grid[1]
    out = after_block0(divided, video)  # [B, 1 + N T, C]
    per_frame = after_block0(space, video).reshape(2, T, 1 + n, DIM)  # rows b * T + t
    expected = per_frame[:, :, 1:].transpose(1, 2).reshape(2, n * T, DIM)  # token 1 + n * T + t
    torch.testing.assert_close(out[:, 1:], expected, atol=1e-5, rtol=1e-5)

    changed = video.clone()
    changed[:, :, T - 1] += torch.randn_like(changed[:, :, T - 1])
    other = after_block0(divided, changed)
    tokens = out[:, 1:].reshape(2, n, T, DIM)
    moved = other[:, 1:].reshape(2, n, T, DIM)
    torch.testing.assert_close(moved[:, :, :T - 1], tokens[:, :, :T - 1], atol=1e-6, rtol=0)
    assert (moved[:, :, T - 1] - tokens[:, :, T - 1]).abs().max() > 1e-3
    assert (other[:, 0] - out[:, 0]).abs().max() > 1e-4

    # The same check fails once the temporal branch is live: it is a check of the official-init property.
    sharpen_(divided, 3)
    live_a, live_b = after_block0(divided, video), after_block0(divided, changed)
    assert (live_a[:, 1:].reshape(2, n, T, DIM)[:, :, 0] - live_b[:, 1:].reshape(2, n, T, DIM)[:, :, 0]).abs().max() > 1e-4


# ============================================================================================ 5. checkpoints
def logits_equal(a, b, video):
    with torch.no_grad():
        return torch.equal(a(video), b(video))


def test_official_timesformer_file_loads_strictly(tmp_path):
    source = timesformer(seed=1)
    path = tmp_path / "TimeSformer_divST_8x224_K400.pyth"
    torch.save({"epoch": 15, "model_state": {"model." + k: v for k, v in source.state_dict().items()},
                "optimizer_state": {}, "cfg": "MODEL:\n  MODEL_NAME: vit_base_patch16_224\n  NUM_CLASSES: 5\n"}, path)
    target = timesformer(seed=2)
    video = clips()
    assert not logits_equal(source, target, video)
    report = load_weights(target, str(path))
    assert report.missing == [] and report.unexpected == [] and not report.head_reset
    assert any("'model.' prefix" in line for line in report.converted)
    assert logits_equal(source, target, video)
    for k, v in source.state_dict().items():
        assert torch.equal(target.state_dict()[k], v), k


def test_official_xvit_file_drops_new_fc(tmp_path, caplog):
    source = xvit(seed=1)
    sd = {k: v for k, v in source.state_dict().items()}
    sd["new_fc.weight"], sd["new_fc.bias"] = torch.randn(CLASSES, DIM), torch.randn(CLASSES)
    path = tmp_path / "xvit.pyth"
    torch.save({"model_state": sd}, path)
    target = xvit(seed=2)
    video = clips()
    assert not logits_equal(source, target, video)
    with caplog.at_level(logging.INFO):
        report = load_weights(target, str(path))
    assert report.missing == [] and report.unexpected == []
    assert any("new_fc" in line and "dropped" in line for line in report.converted)
    assert any("new_fc" in r.getMessage() for r in caplog.records)
    assert logits_equal(source, target, video)


@pytest.mark.parametrize("kind, key", [("timesformer", "blocks.1.mlp.fc1.bias"),
                                       ("timesformer", "blocks.0.temporal_fc.weight"),
                                       ("xvit", "consensus.mlp_head.4.bias"),
                                       ("xvit", "base_model.temp_embed")])
def test_file_missing_a_key_is_refused_and_leaves_the_model(tmp_path, kind, key):
    make = timesformer if kind == "timesformer" else xvit
    sd = dict(make(seed=1).state_dict())
    del sd[key]
    path = tmp_path / "missing.pyth"
    torch.save({"model_state": sd}, path)
    target = make(seed=2)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(CheckpointMismatchError) as info:
        load_weights(target, str(path))
    assert key in str(info.value)
    after = target.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_timesformer_file_missing_time_embed_is_refused(tmp_path):
    """A trained TimeSformer file (it has temporal_attn.*) without time_embed is a broken file, not an image ViT to
    inflate: loading it must not silently put the zero init into time_embed."""
    source = timesformer(seed=1)
    sd = {"model." + k: v for k, v in source.state_dict().items() if k != "time_embed"}
    path = tmp_path / "no_time_embed.pyth"
    torch.save({"model_state": sd}, path)
    target = timesformer(seed=2)
    with pytest.raises(CheckpointMismatchError, match="time_embed"):
        load_weights(target, str(path))


def timm_image_vit(img_size=32, seed=5):
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    model = VisionTransformer(img_size=img_size, patch_size=16, embed_dim=DIM, depth=2, num_heads=HEADS,
                              num_classes=1000, qkv_bias=True)
    sharpen_(model, seed)
    return model.state_dict()


@pytest.mark.parametrize("resize", ["official", "grid"])
def test_image_vit_inflated_into_timesformer(tmp_path, resize):
    image = timm_image_vit(32)  # 2 x 2 patches
    assert {"cls_token", "pos_embed", "patch_embed.proj.weight", "head.weight", "blocks.0.attn.qkv.weight"} <= set(image)
    path = tmp_path / "vit_image.pth"
    torch.save(image, path)
    model = timesformer("divided_space_time", "TIMESFORMER.POS_EMBED_RESIZE", resize, crop=64, sharpen=False)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    report = load_weights(model, str(path), reset_head_on_mismatch=True)
    sd = model.state_dict()
    for i in range(2):
        for part in ("qkv.weight", "qkv.bias", "proj.weight", "proj.bias"):
            assert torch.equal(sd[f"blocks.{i}.temporal_attn.{part}"], image[f"blocks.{i}.attn.{part}"])
            assert torch.equal(sd[f"blocks.{i}.attn.{part}"], image[f"blocks.{i}.attn.{part}"])
        for part in ("weight", "bias"):
            assert torch.equal(sd[f"blocks.{i}.temporal_norm1.{part}"], image[f"blocks.{i}.norm1.{part}"])
            assert not sd[f"blocks.{i}.temporal_fc.{part}"].any()
    assert not sd["time_embed"].any()
    for key in ("cls_token", "patch_embed.proj.weight", "norm.weight", "blocks.1.mlp.fc2.weight"):
        assert torch.equal(sd[key], image[key])
    assert report.head_reset and torch.equal(sd["head.weight"], init["head.weight"])
    assert any("inflated" in line for line in report.converted)
    assert any("pos_embed" in line for line in report.resized)
    pos = image["pos_embed"]  # [1, 1 + 4, C] -> [1, 1 + 16, C]
    if resize == "official":  # 1-D nearest on the flattened patch sequence: patch k <- k * 4 // 16
        expected = torch.cat([pos[:, :1], pos[:, 1:][:, [k * 4 // 16 for k in range(16)]]], dim=1)
        assert "1-D nearest" in " ".join(report.resized)
    else:
        from timm.layers import resample_abs_pos_embed

        expected = resample_abs_pos_embed(pos, [4, 4], [2, 2], num_prefix_tokens=1)
        nearest = torch.cat([pos[:, :1], pos[:, 1:][:, [k * 4 // 16 for k in range(16)]]], dim=1)
        assert not torch.allclose(sd["pos_embed"], nearest)
    torch.testing.assert_close(sd["pos_embed"], expected, atol=1e-6, rtol=0)


def test_image_vit_into_timesformer_for_evaluation_is_refused(tmp_path):
    """Inflation is for fine-tuning: evaluating an image classifier as a video model would run a temporal branch
    and time embedding nobody trained; the test job refuses the file, naming what it lacks, and loads nothing."""
    image = {k: v for k, v in timm_image_vit(64).items() if not k.startswith("head.")}
    path = tmp_path / "vit_image.pth"
    torch.save(image, path)
    model = timesformer("divided_space_time", crop=64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointMismatchError, match="time_embed"):
        load_weights(model, str(path))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_image_vit_into_xvit(tmp_path):
    image = timm_image_vit(32)
    path = tmp_path / "vit_image.pth"
    torch.save(image, path)
    model = xvit(seed=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointMismatchError) as info:
        load_weights(model, str(path), reset_head_on_mismatch=False)
    assert "consensus." in str(info.value)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())

    report = load_weights(model, str(path), reset_head_on_mismatch=True)
    sd = model.state_dict()
    for key, value in image.items():
        if key.startswith("head."):
            assert f"base_model.{key}" not in sd
            continue
        assert torch.equal(sd[f"base_model.{key}"], value), key
    for key in sd:
        if key.startswith("consensus.") or key == "base_model.temp_embed":
            assert torch.equal(sd[key], before[key]), key
    text = " ".join(report.converted)
    assert "base_model" in text and "head.weight" in text
    assert "newly initialised" in text and "consensus.cls_token" in text


# ============================================================================================ 6. FLOPs
def layer_norm_elements_timesformer(attention, n, t, depth=2):
    """Elements through a LayerNorm in one clip (fvcore counts 5 flops per element, the analytic count none)."""
    if attention == "joint_space_time":
        return depth * 2 * (1 + n * t) + (1 + n * t)
    if attention == "space_only":
        return depth * 2 * t * (1 + n) + 1  # the final norm on the frames' mean CLS (it is per token)
    return depth * (n * t + t * (1 + n) + (1 + n * t)) + (1 + n * t)


@torch.no_grad()
@pytest.mark.parametrize("attention", ATTENTION_TYPES)
def test_timesformer_macs_agree_with_fvcore(attention):
    model = timesformer(attention, crop=48)  # 3 x 3 patches
    video = clips(batch=2, size=48)
    model(video)
    analytic = model.macs_per_image(layer_norms=True)
    plain = model.macs_per_image()
    assert analytic.shape == (2,) and analytic[0] == analytic[1]
    traced = fvcore_macs(model, video)  # exact: no rounding anywhere
    assert analytic[0].item() == traced
    assert traced - plain[0].item() == 5 * layer_norm_elements_timesformer(attention, 9, T) * DIM


@torch.no_grad()
@pytest.mark.parametrize("segments", [T, T // 2])
def test_xvit_macs_differ_from_fvcore_by_layer_norms_only(segments):
    model = xvit(segments, segments)
    video = clips(batch=2)
    model(video)
    analytic = model.macs_per_image()
    traced = fvcore_macs(model, video)
    n, depth = 4, 2
    backbone = T * (2 * depth + 1) * (1 + n)  # per frame: norm1 + norm2 per block, the final norm
    head = 2 * (T + 1) + 1  # the temporal block over CLS + T features, then mlp_head's LayerNorm on the CLS
    assert traced - analytic[0].item() == 5 * (backbone + head) * DIM


@torch.no_grad()
def test_xvit_fvcore_with_resized_pos_embed():
    model = build_model(tiny_cfg("XViT", "XVIT.NUM_SEGMENTS", "4", "XVIT.NUM_FRAMES_EMBED", "4",
                                 "XVIT.POS_EMBED_IMG_SIZE", "64")).eval()
    video = clips(batch=1)
    model(video)
    assert fvcore_macs(model, video) > model.macs_per_image()[0].item()


@torch.no_grad()
@pytest.mark.parametrize("attention", ["joint_space_time", "space_only"])
def test_macs_per_image_after_fvcore(attention):
    model = timesformer(attention)
    video = clips(batch=1)
    model(video)
    before = model.macs_per_image()
    fvcore_macs(model, video)
    assert torch.equal(model.macs_per_image(), before)


# ============================================================================================ 7. config validation
@pytest.mark.parametrize("opts, key", [
    (["MODEL.NAME", "TimeSformer", "TIMESFORMER.ATTENTION_TYPE", "divided"], "TIMESFORMER.ATTENTION_TYPE"),
    (["MODEL.NAME", "TimeSformer", "TIMESFORMER.POS_EMBED_RESIZE", "bilinear"], "TIMESFORMER.POS_EMBED_RESIZE"),
    (["MODEL.NAME", "XViT", "DATA.NUM_FRAMES", "8", "XVIT.NUM_SEGMENTS", "3"], "XVIT.NUM_SEGMENTS"),
    (["MODEL.NAME", "XViT", "DATA.NUM_FRAMES", "8", "XVIT.NUM_FRAMES_EMBED", "16"], "XVIT.NUM_FRAMES_EMBED"),
    (["MODEL.NAME", "TimeSformer", "MIXUP.ENABLE", "True", "MIXUP.CUTMIX_ALPHA", "1.0"], "MIXUP.CUTMIX_ALPHA"),
    (["MODEL.NAME", "XViT", "MIXUP.ENABLE", "True", "MIXUP.CUTMIX_ALPHA", "1.0"], "MIXUP.CUTMIX_ALPHA"),
])
def test_bad_video_model_configs_refused(opts, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config("", ["NUM_GPUS", "0", *opts])


def test_mixup_without_cutmix_is_accepted_for_video():
    cfg = load_config("", ["NUM_GPUS", "0", "MODEL.NAME", "XViT", "DATA.NUM_FRAMES", "8", "MIXUP.ENABLE", "True",
                           "MIXUP.ALPHA", "0.4", "MIXUP.CUTMIX_ALPHA", "0.0"])
    assert cfg.MIXUP.ALPHA == 0.4


KINETICS_CONFIGS = sorted(glob.glob(str(h.REPO / "configs" / "Kinetics" / "*.yaml")))


@pytest.mark.parametrize("path", KINETICS_CONFIGS, ids=[os.path.basename(p) for p in KINETICS_CONFIGS])
def test_kinetics_configs_load_and_build(path):
    cfg = load_config(path, ["NUM_GPUS", "0"])
    name = os.path.basename(path)
    method = name.split("_")[0] if name.startswith(("ATS_", "EViT_", "AViT_", "AdaViT_", "DVT_")) else ""
    assert cfg.MODEL.NAME in ("TimeSformer", "XViT") or cfg.MODEL.NAME in (f"{method}TimeSformer", f"{method}XViT")
    shape = input_shape(cfg, batch=2)
    assert len(shape) == 5 and shape == (2, cfg.VIT.IN_CHANS, cfg.DATA.NUM_FRAMES, cfg.DATA.TEST_CROP_SIZE,
                                         cfg.DATA.TEST_CROP_SIZE)
    # Built with one block instead of 12 (about 3 s per ViT-B on 2 CPU cores); every other key is the config's.
    one_block = {"ATS": ["VIT.DEPTH", "1", "ATS.BLOCKS", "[0]"], "EViT": ["VIT.DEPTH", "1", "EVIT.LOCATIONS", "[0]"],
                 "AViT": ["VIT.DEPTH", "2", "AVIT.PRIOR_TARGET_DEPTH", "1"]}.get(method, ["VIT.DEPTH", "1"])
    if method == "AdaViT":
        one_block = ["VIT.DEPTH", "1", "ADAVIT.KEEP_LAYERS", "1"]
    model = build_model(load_config(path, ["NUM_GPUS", "0"] + one_block))
    if method == "DVT":  # three backbones reading each frame as 7x7, 10x10 and 14x14 tokens; the last one checked
        assert [stage.grid_for((cfg.DATA.TEST_CROP_SIZE,) * 2) for stage in model.stages] == [(7, 7), (10, 10),
                                                                                             (14, 14)]
        model = model.stages[-1]
    assert isinstance(model, (TimeSformer, XViT)) and model.num_classes == cfg.MODEL.NUM_CLASSES
    if isinstance(model, TimeSformer):
        assert model.embed_dim == cfg.VIT.EMBED_DIM and model.patch_grid == (cfg.DATA.TEST_CROP_SIZE // 16,) * 2
        if model.attention_type != "space_only":
            assert model.time_embed.shape[1] == cfg.DATA.NUM_FRAMES
        assert ("jointST" in name) == (model.attention_type == "joint_space_time")
        assert ("spaceOnly" in name) == (model.attention_type == "space_only")
    else:
        assert cfg.DATA.NUM_FRAMES % cfg.XVIT.NUM_SEGMENTS == 0
        assert model.base_model.segments == cfg.XVIT.NUM_SEGMENTS


# ============================================================================================ 8. end to end
def rendered_videos(tmp_path, classes: int):
    """A tiny Kinetics-format folder from tools/make_video_demo_data.py: 2 train and 1 test video per class."""
    data = tmp_path / "data"
    data.mkdir()
    h.load_tool("make_video_demo_data").make_dataset(str(data), classes=classes, per_class_train=2,
                                                     per_class_val=1, frames=8, size=32, fps=8)
    return data


def tiny_video_opts(data, model: str, classes: int) -> list:
    """run_net options of a one-block video model on `data`: 4-frame clips at 32 px, 1 x 3 test views."""
    return ["DATA.PATH_TO_DATA_DIR", str(data), "DATA.PATH_PREFIX", str(data), "MODEL.NAME", model,
            "MODEL.NUM_CLASSES", str(classes), "VIT.EMBED_DIM", "24", "VIT.DEPTH", "1", "VIT.NUM_HEADS", "2",
            "VIT.PATCH_SIZE", "16", "DATA.TRAIN_CROP_SIZE", "32", "DATA.TEST_CROP_SIZE", "32",
            "DATA.TRAIN_JITTER_SCALES", "[32, 40]", "DATA.NUM_FRAMES", "4", "DATA.SAMPLING_RATE", "2",
            "DATA.TARGET_FPS", "8", "TRAIN.DATASET", "kinetics", "TEST.DATASET", "kinetics", "TEST.SPLIT", "test",
            "TEST.NUM_ENSEMBLE_VIEWS", "1", "TEST.NUM_SPATIAL_CROPS", "3", "SOLVER.WARMUP_EPOCHS", "0.0",
            "NUM_GPUS", "0", "DATA_LOADER.NUM_WORKERS", "0", "DATA_LOADER.PIN_MEMORY", "False",
            "LOG_MODEL_INFO", "False"]


def test_run_net_trains_and_tests_tiny_timesformer_on_kinetics(tmp_path, run_net):
    data = rendered_videos(tmp_path, classes=2)
    out = tmp_path / "out"
    opts = ["OUTPUT_DIR", str(out)] + tiny_video_opts(data, "TimeSformer", 2) + [
        "DATA.SHORT_VIDEO", "clamp", "SOLVER.MAX_EPOCH", "1", "TRAIN.BATCH_SIZE", "2", "TEST.BATCH_SIZE", "3",
        "LOG_PERIOD", "1"]
    assert run_net(["--cfg", ""] + opts) == 0
    assert h.ckpt_path(out, 1).is_file()
    saved = h.load_ckpt(h.ckpt_path(out, 1))
    assert "time_embed" in saved["model_state"] and "blocks.0.temporal_fc.weight" in saved["model_state"]
    assert h.records(out, "train_epoch")
    final = h.records(out, "test_final")
    assert len(final) == 1, h.read_stats(out)
    stats = final[0]
    assert stats["num_videos"] == 2 and stats["views_per_video"] == 3
    assert 0.0 <= stats["video_top1_acc"] <= 100.0 and stats["video_top1_acc"] in (0.0, 50.0, 100.0)
    assert stats["gmacs_per_view_mean"] > 0
    assert stats["gmacs_per_video_mean"] == pytest.approx(3 * stats["gmacs_per_view_mean"], rel=1e-3)
    # One view of this model, counted independently: fvcore on a clip of the test shape, less its LayerNorms (the
    # engine reports the analytic count, which leaves them out as for the image models).
    model = build_model(load_config("", ["NUM_GPUS", "0"] + opts[4:])).eval()
    traced = fvcore_macs(model, torch.zeros(1, 3, 4, 32, 32))
    expected = (traced - 5 * layer_norm_elements_timesformer("divided_space_time", 4, 4, depth=1) * 24) / 1e9
    assert stats["gmacs_per_view_mean"] == pytest.approx(expected, rel=1e-5)


def test_two_processes_train_resume_and_test_xvit_like_one(tmp_path, run_net):
    """A tiny XViT on rendered videos through tools/run_net.py with 2 CPU processes (gloo): training, a checkpoint,
    auto-resume for a second epoch, then multi-view testing whose per-video predictions (3 videos x 3 views, so
    the views of a video land on both processes) equal those of a single-process test job on the same checkpoint."""
    import json

    data = rendered_videos(tmp_path, classes=3)
    out = tmp_path / "out"
    opts = tiny_video_opts(data, "XViT", 3) + [
        "XVIT.POS_EMBED_IMG_SIZE", "32", "XVIT.NUM_SEGMENTS", "4", "XVIT.NUM_FRAMES_EMBED", "4",
        "TEMPORAL_HEAD.NUM_ATTENTION_HEADS", "2", "TEMPORAL_HEAD.MLP_DIM", "16", "TRAIN.BATCH_SIZE", "4",
        "TEST.BATCH_SIZE", "4", "TEST.SAVE_RESULTS_PATH", "videos.json"]
    two = ["NUM_PROCS", "2", "OUTPUT_DIR", str(out)]
    assert run_net(["--cfg", ""] + opts + two + ["SOLVER.MAX_EPOCH", "1", "TEST.ENABLE", "False"]) == 0
    assert h.ckpt_path(out, 1).is_file() and not h.ckpt_path(out, 2).exists()
    assert run_net(["--cfg", ""] + opts + two + ["SOLVER.MAX_EPOCH", "2"]) == 0  # resumes epoch 2, then tests
    assert [r["epoch"] for r in h.records(out, "train_epoch")] == [1, 2]
    single = tmp_path / "single"
    assert run_net(["--cfg", ""] + opts + ["OUTPUT_DIR", str(single), "TRAIN.ENABLE", "False",
                                           "TEST.CHECKPOINT_FILE_PATH", str(h.ckpt_path(out, 2))]) == 0
    (both,), (alone,) = h.records(out, "test_final"), h.records(single, "test_final")
    assert both["num_videos"] == alone["num_videos"] == 3 and both["num_images"] == alone["num_images"] == 9
    assert both["video_top1_acc"] == alone["video_top1_acc"]
    rows = [json.loads((d / "videos.json").read_text())["rows"] for d in (out, single)]
    assert [r["video"] for r in rows[0]] == [r["video"] for r in rows[1]] == [0, 1, 2]
    for a, b in zip(*rows):
        assert a["pred"] == b["pred"] and a["label"] == b["label"]
        assert a["scores"] == pytest.approx(b["scores"], abs=1e-5)


def test_visualize_draws_kept_patches_per_frame_of_a_clip(tmp_path, capsys):
    """tools/visualize.py on a video method: one picture per frame of each clip (XViT + ATS, synthetic weights under
    which tokens drop); a dense video backbone has nothing to draw and says so."""
    data = rendered_videos(tmp_path, classes=2)
    opts = tiny_video_opts(data, "ATSXViT", 2) + [
        "XVIT.POS_EMBED_IMG_SIZE", "32", "XVIT.NUM_SEGMENTS", "4", "XVIT.NUM_FRAMES_EMBED", "4",
        "TEMPORAL_HEAD.NUM_ATTENTION_HEADS", "2", "TEMPORAL_HEAD.MLP_DIM", "16", "VIT.PATCH_SIZE", "8",
        "ATS.BLOCKS", "[0]", "OUTPUT_DIR", str(tmp_path / "out")]
    main = h.load_tool("visualize").main
    assert main(["--cfg", "", "--init", "sharpened", "--num-images", "1"] + opts) == 0
    pictures = sorted(p.name for p in (tmp_path / "out" / "visualization").iterdir())
    assert pictures == [f"clip_0000_frame_{t:02d}.png" for t in range(4)]
    dense = [o if o != "ATSXViT" else "XViT" for o in opts if o not in ("ATS.BLOCKS", "[0]")]
    assert main(["--cfg", "", "--init", "sharpened", "--num-images", "1"] + dense) == 2
    assert "nothing to draw" in capsys.readouterr().err


@torch.no_grad()
def test_frame_token_ids_of_a_joint_clip():
    """Joint attention keeps clip tokens 1 + n * T + t: per frame they are patch n + 1 of frame t (CLS shared)."""
    cfg = load_config("", ["NUM_GPUS", "0", "MODEL.NAME", "ATSTimeSformer", "TIMESFORMER.ATTENTION_TYPE",
                           "joint_space_time", "VIT.EMBED_DIM", "24", "VIT.DEPTH", "2", "VIT.NUM_HEADS", "2",
                           "DATA.TRAIN_CROP_SIZE", "32", "DATA.TEST_CROP_SIZE", "32", "DATA.NUM_FRAMES", "4",
                           "ATS.BLOCKS", "[0]", "MODEL.NUM_CLASSES", "3"])
    model = build_model(cfg).eval()
    sharpen_(model, 1)
    model.trace_token_ids = True
    model(torch.randn(2, 3, 4, 32, 32))
    clip_ids = model.last_token_ids[0]
    per_frame = model.frame_token_ids()[0]
    assert per_frame.shape[:2] == (2, 4)
    for b in range(2):
        kept = {int(k) for k in clip_ids[b] if k > 0}
        assert kept and len(kept) < 16
        for t in range(4):
            mine = {int(k) for k in per_frame[b, t] if k > 0}
            assert mine == {(k - 1) // 4 + 1 for k in kept if (k - 1) % 4 == t}
            assert int(per_frame[b, t, 0]) == 0
