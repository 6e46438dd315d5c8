"""The GMACs a model reports per image are what it executes: on one image, fvcore's trace of the real graph
(LayerNorm left out, the analytic convention: vitadapt.models.flops) equals `macs_per_image` exactly, for the
dense backbone and every token method, with tokens really dropped (packed execution). A speed-up can then never
come from a count that changed."""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vitadapt.config import load_config  # noqa: E402
from vitadapt.models import build_model  # noqa: E402
from vitadapt.models import vit as vit_module  # noqa: E402
from vitadapt.models.flops import fvcore_macs  # noqa: E402
from vitadapt.models.synthetic import add_halting_drift_, calibrate_decisions_, sharpen_  # noqa: E402

SMALL = ["NUM_GPUS", "0", "VIT.EMBED_DIM", "96", "VIT.NUM_HEADS", "3", "DATA.TRAIN_CROP_SIZE", "112",
         "DATA.TEST_CROP_SIZE", "112", "MODEL.NUM_CLASSES", "10"]
# AdaViT: without layer decisions, so that no block is skipped whole; fvcore's trace drops the decision heads of
# a skipped block (nothing reaches the output from them), which the analytic count rightly includes.
CASES = {
    "deit": ("configs/ImageNet/DeiT_S.yaml", []),
    "ats": ("configs/ImageNet/ATS_DeiT_S.yaml", []),
    "evit": ("configs/ImageNet/EViT/EViT_DeiT_S_keep0.7.yaml", []),
    "evit_nofuse": ("configs/ImageNet/EViT/EViT_DeiT_S_keep0.5_nofuse.yaml", []),
    "avit": ("configs/ImageNet/AViT/AViT_DeiT_S.yaml", []),
    "adavit": ("configs/ImageNet/AdaViT/AdaViT_DeiT_S.yaml", ["ADAVIT.LAYER", "False"]),
    "adavit_head_v2": ("configs/ImageNet/AdaViT/AdaViT_DeiT_S.yaml", ["ADAVIT.LAYER", "False", "ADAVIT.HEAD_V2", "True"]),
}


def _model(name):
    path, opts = CASES[name]
    torch.manual_seed(0)
    model = build_model(load_config(path, SMALL + opts)).eval()
    sharpen_(model)  # peaked attention: token methods drop tokens, differently per image
    if name == "avit":
        add_halting_drift_(model)
    images = torch.randn(3, 3, 112, 112, generator=torch.Generator().manual_seed(1))
    calibrate_decisions_(model, images, usage=0.75)  # AdaViT: keeps about 3/4 (no-op for the others)
    return model, images


@pytest.mark.parametrize("name", sorted(CASES))
def test_analytic_count_equals_fvcore_on_one_image(name):
    model, images = _model(name)
    counts = []
    for i in range(len(images)):
        image = images[i:i + 1]
        with torch.no_grad():
            model(image)
        analytic = model.macs_per_image()[0].item()
        assert fvcore_macs(model, image, layer_norms=False) == analytic, (name, i)
        # fvcore's default adds LayerNorm, 5 per normalised element: more, never less.
        assert fvcore_macs(model, image) > analytic
        counts.append(analytic)
    if name != "deit":
        deit, _ = _model("deit")
        with torch.no_grad():
            deit(images[:1])
        assert max(counts) < deit.macs_per_image()[0].item(), "nothing dropped: a wrong count would go unseen"


@pytest.mark.parametrize("name", ["ats", "evit"])
def test_cls_row_counted_where_computed_on_the_side(monkeypatch, name):
    """The CLS attention row costs extra MACs only where attention hid it (the fused kernel): then it is a side
    product q_cls K^T, N MACs per channel in each block that reads it, and the count follows the path that ran."""
    model, images = _model(name)
    image = images[:1]
    counts = {}
    for fused in (False, True):
        # 0: no attention is small enough to run explicitly, every CLS row comes from the side product
        monkeypatch.setattr(vit_module, "SMALL_ATTENTION_LOGITS", 0 if fused else vit_module.SMALL_ATTENTION_LOGITS)
        with torch.no_grad():
            model(image)
        counts[fused] = model.macs_per_image()[0].item()
        assert fvcore_macs(model, image, layer_norms=False) == counts[fused], fused
        side = [block.attn.cls_row_on_side for block in model.blocks]
        assert any(side) == fused
    readers = [i for i, block in enumerate(model.blocks)
               if block.adapter is not None and block.adapter.needs_cls_attention]
    live = model.last_token_counts[0, readers, 0].double().sum().item()
    assert counts[True] - counts[False] == live * model.embed_dim


class _Products(torch.nn.Module):
    def __init__(self, op):
        super().__init__()
        self.op = op

    def forward(self, x):
        return self.op(x)


def test_fvcore_counts_the_scaled_logits_product_and_refuses_an_uncounted_product():
    """The scaled attention logits (baddbmm with alpha, as Attention.attend_rows computes them) count as their bmm;
    a matrix product fvcore has no handle for is an error naming it, never a silent 0."""
    x = torch.randn(1, 3, 5, 4)
    scaled = _Products(lambda x: torch.baddbmm(x[0].new_empty(()), x[0], x[0].transpose(1, 2), beta=0, alpha=0.5))
    assert fvcore_macs(scaled, x) == 3 * 5 * 5 * 4
    summed = _Products(lambda x: torch.addbmm(x.new_zeros(5, 5), x[0], x[0].transpose(1, 2)))
    with pytest.raises(RuntimeError, match="aten::addbmm"):
        fvcore_macs(summed, x)
