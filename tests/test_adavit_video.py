"""AdaViT on video (vitadapt.models.adavit): AdaViTTimeSformer (joint space-time attention) is the image AdaViT on
the flattened tokens of a clip; AdaViTXViT is the image AdaViT on every frame, with the key/value shift taking only
what the neighbouring frames' blocks compute. Masked (training) equals packed (inference) execution, per-clip results,
fewer MACs when decisions drop parts, keep-everything equals the official XViT golden, usage losses, checkpoints;
other attention types refused. Tiny models (embed 48, 3 heads, depth 4, 64 px, 4 frames)."""

import os
from pathlib import Path

import pytest
import torch

from vitadapt.config import ConfigError, load_config
from vitadapt.models import build_model
from vitadapt.models.synthetic import calibrate_decisions_, sharpen_
from vitadapt.models.video import frames_of

GOLDEN_DIR = Path(os.environ.get("VITADAPT_GOLDEN_DIR") or (Path(__file__).resolve().parents[2] / "shared" / "golden"))
GOLDEN_DIR = GOLDEN_DIR / "video"
T, SIZE, PATCH, DIM, HEADS, DEPTH, CLASSES = 4, 64, 16, 48, 3, 4, 10
N = (SIZE // PATCH) ** 2
ATOL = 1e-5

pytestmark = pytest.mark.usefixtures("one_thread")


def opts(name, *extra):
    return ["NUM_GPUS", "0", "MODEL.NAME", name, "MODEL.NUM_CLASSES", str(CLASSES), "VIT.EMBED_DIM", str(DIM),
            "VIT.DEPTH", str(DEPTH), "VIT.NUM_HEADS", str(HEADS), "VIT.PATCH_SIZE", str(PATCH),
            "DATA.TRAIN_CROP_SIZE", str(SIZE), "DATA.TEST_CROP_SIZE", str(SIZE), "DATA.NUM_FRAMES", str(T),
            "TIMESFORMER.ATTENTION_TYPE", "joint_space_time"] + list(extra)


def clips(batch=3, seed=7):
    return torch.randn(batch, 3, T, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def build(*extra):
    torch.manual_seed(0)
    model = build_model(load_config("", opts("AdaViTTimeSformer", *extra))).eval()
    sharpen_(model, 1)
    calibrate_decisions_(model, clips(batch=6, seed=3), usage=0.75)
    return model


@pytest.mark.parametrize("execution", ["packed", "masked"])
@torch.no_grad()
def test_joint_adavit_is_image_adavit_on_the_flattened_clip(execution):
    video_model = build("VIT.TOKEN_EXECUTION", execution)
    image = build_model(load_config("", opts("AdaViTVisionTransformer", "VIT.TOKEN_EXECUTION", execution))).eval()
    body = {k: v for k, v in video_model.state_dict().items() if k.startswith(("blocks.", "norm.", "head."))}
    missing, unexpected = image.load_state_dict(body, strict=False)
    assert not unexpected and all(not k.startswith("blocks.") for k in missing)
    video = clips()
    logits = video_model(video)
    image.embed = lambda _: video_model.embed(video)  # the clip's 1 + N * T tokens into the image model
    expected = image(video)
    assert (logits - expected).abs().max() <= ATOL
    assert torch.equal(video_model.macs_per_image(), image.macs_per_image())
    kept = video_model.last_token_counts[:, -1, 0]
    assert (kept < 1 + N * T).any()  # the token decisions really dropped some of the clip's tokens


@torch.no_grad()
def test_packed_equals_masked_and_each_clip_alone():
    packed, masked = build("VIT.TOKEN_EXECUTION", "packed"), build("VIT.TOKEN_EXECUTION", "masked")
    video = clips()
    lp = packed(video)
    assert (lp - masked(video)).abs().max() <= ATOL
    alone = torch.cat([packed(video[i:i + 1]) for i in range(video.shape[0])])
    assert (lp - alone).abs().max() <= ATOL
    dense = build_model(load_config("", opts("TimeSformer"))).eval()
    dense(video)
    packed(video)
    assert (packed.macs_per_image() < dense.macs_per_image()).all()


@pytest.mark.parametrize("attention", ["space_only", "divided_space_time"])
def test_other_attention_types_are_refused(attention):
    with pytest.raises(ConfigError, match="TIMESFORMER.ATTENTION_TYPE"):
        load_config("", opts("AdaViTTimeSformer", "TIMESFORMER.ATTENTION_TYPE", attention))


# ============================================================================================ AdaViT on XViT
XVIT = ["XVIT.NUM_SEGMENTS", str(T), "XVIT.NUM_FRAMES_EMBED", str(T), "XVIT.POS_EMBED_IMG_SIZE", str(SIZE),
        "XVIT.LOCATIONS_LIST", "[0, 1, 2, 3]", "XVIT.SHIFT_DIV", "4", "TEMPORAL_HEAD.NUM_ATTENTION_HEADS",
        str(HEADS), "TEMPORAL_HEAD.MLP_DIM", str(DIM)]


@torch.no_grad()
def build_xvit(*extra, calibrate=True):
    torch.manual_seed(0)
    model = build_model(load_config("", opts("AdaViTXViT", *XVIT, *extra))).eval()
    sharpen_(model.base_model, 1)
    if calibrate:  # on frames: every frame is an AdaViT image (6 clips of T frames)
        calibrate_decisions_(model.base_model, torch.randn(6 * T, 3, SIZE, SIZE, generator=torch.Generator()
                                                           .manual_seed(3)), usage=0.75)
    return model


def keep_everything_(model):
    """Every decision head's logits far above its threshold: every head, branch and token runs."""
    from vitadapt.models.adavit import DecisionHead

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, DecisionHead):
                module.mlp_head.weight.zero_()
                module.mlp_head.bias.fill_(1e4)
    return model


@torch.no_grad()
def test_xvit_packed_equals_masked_with_the_shift_and_each_clip_alone():
    """Decisions that drop heads, blocks and tokens of some frames: packed execution (dropped parts never computed,
    the shift finding neighbours by position) equals masked execution (the official computation, with what a
    block does not compute zeroed before the shift), per clip whatever its batch-mates; and costs less."""
    packed, masked = build_xvit("VIT.TOKEN_EXECUTION", "packed"), build_xvit("VIT.TOKEN_EXECUTION", "masked")
    video = clips()
    lp = packed(video)
    assert (lp - masked(video)).abs().max() <= ATOL
    assert torch.equal(packed.macs_per_image(), masked.macs_per_image())
    usage = packed.image_statistics()
    assert usage["head_usage"].shape == (3, DEPTH) and (usage["head_usage"] < 1).any()
    assert (usage["token_usage"] < 1).any() and (usage["attn_usage"] < 1).any()
    alone = torch.cat([packed(video[i:i + 1]) for i in range(video.shape[0])])
    assert (lp - alone).abs().max() <= ATOL
    packed(video)
    saved = packed.macs_per_image()
    dense = keep_everything_(build_xvit(calibrate=False))
    dense(video)
    assert (saved < dense.macs_per_image()).all()


@torch.no_grad()
def test_xvit_without_the_shift_is_image_adavit_per_frame():
    """XVIT.USE_XVIT False: the backbone is the image AdaViT on every frame (its decisions from the frame's CLS)."""
    model = build_xvit("XVIT.USE_XVIT", "False")
    image = build_model(load_config("", opts("AdaViTVisionTransformer"))).eval()
    own = model.base_model.state_dict()
    missing, unexpected = image.load_state_dict({k: v for k, v in own.items() if k != "temp_embed"}, strict=False)
    assert not unexpected and sorted(missing) == ["head.bias", "head.weight"]  # XViT's frames have no classifier
    video = clips()
    features = model.base_model(frames_of(video))
    frames = frames_of(video)
    image.embed = lambda _: model.base_model.embed(frames)  # the same embedding (temporal embedding included)
    image(frames)
    assert (features - image.forward_features(frames).cls_tokens()).abs().max() <= ATOL
    assert torch.equal(model.base_model.macs_per_image(), image.macs_per_image() - DIM * CLASSES)


@pytest.mark.parametrize("execution", ["packed", "masked"])
@torch.no_grad()
def test_xvit_keeping_everything_is_the_official_xvit_golden(execution):
    from vitadapt.parity import _xvit_opts

    path = GOLDEN_DIR / "golden_xvit_dev.pt"
    if not path.is_file():
        pytest.skip(f"golden file {path} not found (set VITADAPT_GOLDEN_DIR to the shared/golden folder)")
    golden = torch.load(path, map_location="cpu", weights_only=False)
    o = _xvit_opts(golden["config"], golden["state_dict"])
    o[o.index("MODEL.NAME") + 1] = "AdaViTXViT"
    model = build_model(load_config("", o + ["NUM_GPUS", "0", "VIT.TOKEN_EXECUTION", execution])).eval()
    own = model.state_dict()
    own.update({k: v for k, v in golden["state_dict"].items() if not k.startswith("new_fc.")})
    model.load_state_dict(own, strict=True)
    keep_everything_(model)
    torch.testing.assert_close(model(golden["input"]), golden["logits"], atol=ATOL, rtol=ATOL)


@torch.no_grad()
def test_xvit_decisions_calibrate_through_the_video_model():
    """calibrate_decisions_ on the video model (as tools/benchmark.py --init sharpened calls it) reaches the decision
    heads of its per-frame backbone: about the asked share of heads, branches and tokens is kept."""
    model = build_xvit(calibrate=False)
    inputs = clips(batch=6, seed=3)
    calibrate_decisions_(model, inputs, usage=0.75)
    model(inputs)
    usage = model.image_statistics()
    for name in ("head_usage", "attn_usage", "mlp_usage"):  # block 0 keeps everything (ADAVIT.KEEP_LAYERS 1)
        assert abs(usage[name][:, 1:].mean().item() - 0.75) < 0.1, (name, usage[name].mean(0))
    assert 0.3 < usage["token_usage"].mean().item() < 0.9  # tokens compound over the blocks


def test_xvit_usage_losses_train_the_decision_heads():
    model = build_xvit().train()
    video = clips(batch=2)
    logits = model(video)
    losses = model.auxiliary_losses()
    assert {"head", "layer", "token"} <= set(losses) and all(torch.isfinite(v) for v in losses.values())
    (torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1])) + sum(losses.values())).backward()
    block = model.base_model.blocks[1]
    for head in (block.head_select, block.layer_select, block.attn.token_select):
        assert head.mlp_head.weight.grad is not None and head.mlp_head.weight.grad.abs().sum() > 0


def test_xvit_file_into_adavit_xvit(tmp_path):
    """An XViT checkpoint (official layout, with its unused new_fc) fine-tunes AdaViTXViT: decision heads newly
    initialised and reported; evaluating from it is refused, naming the missing decision heads."""
    from vitadapt.models.convert import CheckpointMismatchError
    from vitadapt.utils.checkpoint import load_weights

    torch.manual_seed(1)
    xvit = build_model(load_config("", opts("XViT", *XVIT)))
    sd = dict(xvit.state_dict(), **{"new_fc.weight": torch.zeros(CLASSES, DIM), "new_fc.bias": torch.zeros(CLASSES)})
    path = tmp_path / "xvit.pyth"
    torch.save({"model_state": sd}, path)
    model = build_xvit(calibrate=False)
    report = load_weights(model, str(path), reset_head_on_mismatch=True)
    assert any("decision heads newly initialised" in line for line in report.converted)
    assert torch.equal(model.base_model.blocks[0].attn.qkv.weight, xvit.base_model.blocks[0].attn.qkv.weight)
    with pytest.raises(CheckpointMismatchError, match="head_select"):
        load_weights(build_xvit(calibrate=False), str(path))
