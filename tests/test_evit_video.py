"""EViT on video (vitadapt.models.evit: EViTTimeSformer, EViTFrameViT, EViTXViT): joint space-time EViT is the image
EViT on the flattened 1 + N * T tokens of a clip; space only and XViT keep the top keep-rate of every frame; keep
rate 1 is the dense backbone; each clip's result does not depend on its batch-mates; fewer MACs per clip; the
keep-rate warm-up reaches XViT's backbone; config errors. Tiny models (embed 48, 3 heads, depth 4, 64 px, 4 frames).
"""

import math

import pytest
import torch

from vitadapt.config import ConfigError, load_config
from vitadapt.models import build_model
from vitadapt.models.synthetic import sharpen_

T, SIZE, PATCH, DIM, HEADS, DEPTH, CLASSES = 4, 64, 16, 48, 3, 4, 10
N = (SIZE // PATCH) ** 2
ATOL = 1e-5
KINDS = {"joint": ("EViTTimeSformer", "TimeSformer", ["TIMESFORMER.ATTENTION_TYPE", "joint_space_time"]),
         "space_only": ("EViTTimeSformer", "TimeSformer", ["TIMESFORMER.ATTENTION_TYPE", "space_only"]),
         "xvit": ("EViTXViT", "XViT", ["XVIT.NUM_SEGMENTS", "4", "XVIT.NUM_FRAMES_EMBED", "4",
                                       "XVIT.POS_EMBED_IMG_SIZE", str(SIZE), "XVIT.LOCATIONS_LIST", "[0, 1, 2, 3]",
                                       "TEMPORAL_HEAD.NUM_ATTENTION_HEADS", str(HEADS),
                                       "TEMPORAL_HEAD.MLP_DIM", str(DIM)])}

pytestmark = pytest.mark.usefixtures("one_thread")


def opts(name, *extra):
    return ["NUM_GPUS", "0", "MODEL.NAME", name, "MODEL.NUM_CLASSES", str(CLASSES), "VIT.EMBED_DIM", str(DIM),
            "VIT.DEPTH", str(DEPTH), "VIT.NUM_HEADS", str(HEADS), "VIT.PATCH_SIZE", str(PATCH),
            "DATA.TRAIN_CROP_SIZE", str(SIZE), "DATA.TEST_CROP_SIZE", str(SIZE), "DATA.NUM_FRAMES", str(T),
            "EVIT.LOCATIONS", "[1, 2]", "EVIT.SHRINK_START_EPOCH", "0", "EVIT.SHRINK_EPOCHS", "0"] + list(extra)


@torch.no_grad()
def build(kind, *extra, evit=True):
    name, dense, kopts = KINDS[kind]
    torch.manual_seed(0)
    model = build_model(load_config("", opts(name if evit else dense, *kopts, *extra))).eval()
    sharpen_(model, 1)  # the same weights for the EViT model and its dense backbone (EViT has no parameters)
    return model


def clips(batch=3, seed=7):
    return torch.randn(batch, 3, T, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_joint_evit_is_image_evit_on_the_flattened_clip():
    video_model = build("joint", "EVIT.KEEP_RATE", "0.5")
    image = build_model(load_config("", opts("EViTVisionTransformer", "EVIT.KEEP_RATE", "0.5"))).eval()
    body = {k: v for k, v in video_model.state_dict().items() if k.startswith(("blocks.", "norm.", "head."))}
    image.load_state_dict(body, strict=False)
    video = clips()
    tokens = video_model.embed(video)
    for block in image.blocks:
        tokens = block(tokens)
    expected = image.head(image.norm(tokens.x)[:, 0])
    assert (video_model(video) - expected).abs().max() <= ATOL
    # The top half of all N * T patches, then the fused token, over the whole clip: 1 + ceil(0.5 * 64) + 1 = 34.
    k1 = math.ceil(0.5 * N * T)
    assert video_model.last_token_counts[0, 1].tolist() == [1 + N * T, 1 + k1 + 1]
    frames_kept = {(int(i) - 1) % T for i in video_model.reorganizers()[0].last_index[0] + 1}
    assert len(frames_kept) > 1


@torch.no_grad()
@pytest.mark.parametrize("kind", ["space_only", "xvit"])
def test_per_frame_evit_keeps_the_rate_of_every_frame(kind):
    model = build(kind, "EVIT.KEEP_RATE", "0.5")
    dense = build(kind, evit=False)
    video = clips()
    model(video)
    dense(video)
    k1 = math.ceil(0.5 * N)  # per frame, then the fused token
    k2 = math.ceil(0.5 * (k1 + 1))
    per_frame = [1 + N, 1 + k1 + 1, 1 + k2 + 1, 1 + k2 + 1]
    assert model.last_token_counts[:, :, 1].tolist() == [[T * n for n in per_frame]] * 3
    assert (model.macs_per_image() < dense.macs_per_image()).all()


@torch.no_grad()
@pytest.mark.parametrize("kind", list(KINDS))
def test_keep_rate_one_is_the_dense_backbone(kind):
    model, dense = build(kind, "EVIT.KEEP_RATE", "1.0"), build(kind, evit=False)
    video = clips()
    assert (model(video) - dense(video)).abs().max() <= ATOL
    assert torch.equal(model.macs_per_image(), dense.macs_per_image())


@torch.no_grad()
@pytest.mark.parametrize("kind", list(KINDS))
def test_each_clip_alone_as_in_a_batch(kind):
    model = build(kind, "EVIT.KEEP_RATE", "0.6")
    video = clips()
    batched = model(video)
    alone = torch.cat([model(video[i:i + 1]) for i in range(video.shape[0])])
    assert (batched - alone).abs().max() <= ATOL


@torch.no_grad()
def test_xvit_fused_token_gets_no_neighbour_channels():
    """The fused token stands for no patch: XViT's shift gives it zeros from the next / previous frame, so its
    keys' shifted channels are zero in every block after the first reduction."""
    model = build("xvit", "EVIT.KEEP_RATE", "0.5")
    shift = model.base_model.blocks[2].attn.kv_mixing
    seen = []
    original = shift.forward

    def record(x, tokens=None):
        out = original(x, tokens)
        seen.append((out, tokens))
        return out

    shift.forward = record
    model(clips(batch=1))
    keys, tokens = seen[0]  # block 2's keys, after block 1's reduction
    fused = tokens.ids == -2
    assert fused.any()
    fold = DIM // shift.fold_div
    shifted = keys.transpose(1, 2).reshape(keys.shape[0], keys.shape[2], -1)[..., :2 * fold]
    assert shifted[fused].abs().max() == 0
    assert shifted[~fused].abs().max() > 0


def test_warm_up_reaches_the_xvit_backbone():
    model = build("xvit", "EVIT.KEEP_RATE", "0.5", "EVIT.SHRINK_START_EPOCH", "1", "EVIT.SHRINK_EPOCHS", "2")
    model.set_progress(0, 0, 10)
    assert model.base_model.current_keep_rate == 1.0
    model.set_progress(3, 30, 10)
    assert model.base_model.current_keep_rate == 0.5


def test_divided_attention_is_refused_naming_the_key():
    with pytest.raises(ConfigError, match="TIMESFORMER.ATTENTION_TYPE"):
        load_config("", opts("EViTTimeSformer", "TIMESFORMER.ATTENTION_TYPE", "divided_space_time"))
