"""AdaViT on video (vitadapt.models.adavit.AdaViTTimeSformer, joint space-time attention): the image AdaViT on the
flattened tokens of a clip, in masked (training) and packed (inference) execution; per-clip results; fewer MACs when
decisions drop parts; other attention types refused. Tiny models (embed 48, 3 heads, depth 4, 64 px, 4 frames)."""

import pytest
import torch

from vitadapt.config import ConfigError, load_config
from vitadapt.models import build_model
from vitadapt.models.synthetic import calibrate_decisions_, sharpen_

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
