"""A-ViT on video (vitadapt.models.avit: AViTTimeSformer with joint space-time attention, AViTXViT): joint A-ViT is
the image A-ViT on the flattened tokens of a clip; with a gate that never fires it is the dense backbone; tokens
halt per clip independently of batch-mates; the ponder / prior losses train the backbone; config errors.
Tiny models (embed 48, 3 heads, depth 4, 64 px, 4 frames) on synthetic weights that make tokens halt."""

import pytest
import torch

from vitadapt.config import ConfigError, load_config
from vitadapt.models import build_model
from vitadapt.models.synthetic import add_halting_drift_, sharpen_

T, SIZE, PATCH, DIM, HEADS, DEPTH, CLASSES = 4, 64, 16, 48, 3, 4, 10
N = (SIZE // PATCH) ** 2
ATOL = 1e-5
XVIT = ["XVIT.NUM_SEGMENTS", "4", "XVIT.NUM_FRAMES_EMBED", "4", "XVIT.POS_EMBED_IMG_SIZE", str(SIZE),
        "XVIT.LOCATIONS_LIST", "[0, 1, 2, 3]", "TEMPORAL_HEAD.NUM_ATTENTION_HEADS", str(HEADS),
        "TEMPORAL_HEAD.MLP_DIM", str(DIM)]
JOINT = ["TIMESFORMER.ATTENTION_TYPE", "joint_space_time"]

pytestmark = pytest.mark.usefixtures("one_thread")


def opts(name, *extra):
    return ["NUM_GPUS", "0", "MODEL.NAME", name, "MODEL.NUM_CLASSES", str(CLASSES), "VIT.EMBED_DIM", str(DIM),
            "VIT.DEPTH", str(DEPTH), "VIT.NUM_HEADS", str(HEADS), "VIT.PATCH_SIZE", str(PATCH),
            "DATA.TRAIN_CROP_SIZE", str(SIZE), "DATA.TEST_CROP_SIZE", str(SIZE), "DATA.NUM_FRAMES", str(T),
            "AVIT.GATE_SCALE", "5", "AVIT.GATE_CENTER", "10", "AVIT.PRIOR_TARGET_DEPTH", "2"] + list(extra)


@torch.no_grad()
def halting_weights(model):
    """sharpen_ + A-ViT's channel-0 drift (vitadapt.models.synthetic) on the backbone that holds the blocks."""
    backbone = getattr(model, "base_model", model)
    sharpen_(backbone, 1)
    add_halting_drift_(backbone, drift=2.0, spread=3.0)
    if hasattr(model, "consensus"):
        sharpen_(model.consensus, 2)
    return model


def build(name, *extra, train=False):
    torch.manual_seed(0)
    model = build_model(load_config("", opts(name, *extra)))
    return halting_weights(model).train(train)


def clips(batch=3, seed=7):
    return torch.randn(batch, 3, T, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_joint_avit_is_image_avit_on_the_flattened_clip():
    video_model = build("AViTTimeSformer", *JOINT)
    image = build_model(load_config("", opts("AViTVisionTransformer"))).eval()
    body = {k: v for k, v in video_model.state_dict().items() if k.startswith(("blocks.", "norm.", "head."))}
    image.load_state_dict(body, strict=False)
    video = clips()
    logits = video_model(video)
    image.embed = lambda _: video_model.embed(video)  # the clip's 1 + N * T tokens into the image halting loop
    expected = image.forward_head(image.forward_features(video))
    assert (logits - expected).abs().max() <= ATOL
    assert torch.equal(video_model.last_depth, image.last_depth)
    depth = video_model.last_depth
    assert depth.shape == (3, 1 + N * T) and depth.min() < DEPTH and len(set(depth.flatten().tolist())) > 1


@torch.no_grad()
@pytest.mark.parametrize("name, extra, dense", [("AViTTimeSformer", JOINT, "TimeSformer"),
                                                ("AViTXViT", XVIT, "XViT")])
def test_a_gate_that_never_fires_is_the_dense_backbone(name, extra, dense):
    model = build(name, *extra, "AVIT.GATE_CENTER", "1000", "AVIT.GATE_SCALE", "0.001")
    plain = build(dense, *extra)
    video = clips()
    assert (model(video) - plain(video)).abs().max() <= ATOL
    assert torch.equal(model.macs_per_image(), plain.macs_per_image())


@torch.no_grad()
@pytest.mark.parametrize("name, extra", [("AViTTimeSformer", JOINT), ("AViTXViT", XVIT)])
def test_halting_per_clip_saves_macs_and_ignores_batch_mates(name, extra):
    model = build(name, *extra)
    dense = build(name, *extra, "AVIT.GATE_CENTER", "1000", "AVIT.GATE_SCALE", "0.001")
    video = clips()
    batched = model(video)
    counts, macs = model.last_token_counts.clone(), model.macs_per_image()
    dense(video)
    assert (macs < dense.macs_per_image()).all()
    assert (counts[:, -1, 0] < counts[:, 0, 0]).all()  # tokens halted before the last block, in every clip
    alone = torch.cat([model(video[i:i + 1]) for i in range(video.shape[0])])
    assert (batched - alone).abs().max() <= ATOL


@pytest.mark.parametrize("name, extra", [("AViTTimeSformer", JOINT), ("AViTXViT", XVIT)])
def test_ponder_and_prior_losses_train_the_backbone(name, extra):
    model = build(name, *extra, "AVIT.OFFICIAL_PRIOR", "False", train=True)
    logits = model(clips(batch=2))
    losses = model.auxiliary_losses()
    assert set(losses) == {"ponder", "halting_prior"} and losses["halting_prior"] != 0, losses
    total = logits.logsumexp(dim=1).mean() + sum(losses.values())
    total.backward()
    backbone = getattr(model, "base_model", model)
    assert backbone.blocks[0].mlp.fc2.weight.grad is not None
    assert backbone.blocks[0].mlp.fc2.weight.grad.abs().sum() > 0
    assert all(torch.isfinite(v) for v in losses.values())


@pytest.mark.parametrize("attention", ["space_only", "divided_space_time"])
def test_other_timesformer_attention_types_are_refused(attention):
    with pytest.raises(ConfigError, match="TIMESFORMER.ATTENTION_TYPE"):
        load_config("", opts("AViTTimeSformer", "TIMESFORMER.ATTENTION_TYPE", attention))


@torch.no_grad()
def test_halting_drift_reaches_the_xvit_backbone():
    """tools/benchmark.py --init halting calls add_halting_drift_ on the whole model: on XViT it must reach the
    per-frame backbone (patch embedding channel 0 scaled, every block's fc2 bias channel 0 raised)."""
    torch.manual_seed(0)
    model = build_model(load_config("", opts("AViTXViT", *XVIT)))
    before = model.base_model.patch_embed.proj.weight[0].clone(), model.base_model.blocks[0].mlp.fc2.bias[0].item()
    add_halting_drift_(model, drift=0.85, spread=5.0)
    assert torch.allclose(model.base_model.patch_embed.proj.weight[0], 5.0 * before[0])
    assert model.base_model.blocks[0].mlp.fc2.bias[0].item() == pytest.approx(before[1] + 0.85)
