"""tools/visualize.py on AdaViT: per image one picture with, for every block, the patch tokens that took part, a
title (tokens, heads, attention / MLP branch), a strip of head and branch marks, a crossed-out panel for a skipped
block, and a legend. Tiny models on the built-in digits data (no data folder); a few seconds."""

import copy

import numpy as np
import pytest
import torch
from PIL import Image

import helpers_e2e as h

DEMO = str(h.REPO / "configs" / "demo" / "AdaViT_DeiT_Ti_digits.yaml")


@pytest.fixture(scope="module")
def vis():
    return h.load_tool("visualize")


def red(region: np.ndarray) -> int:
    return int(((region[..., 0] > 180) & (region[..., 1] < 80) & (region[..., 2] < 80)).sum())


def test_layout_titles_marks_and_legend(vis):
    """Block 0 without head / layer decisions ('fixed' marks), block 1 with 1 of 3 heads dropped and the MLP off,
    block 2 skipped: titles count the patch tokens that took part (CLS not counted) and say what ran."""
    tokens = torch.tensor([True, False, True, True])
    uses = [vis.BlockUse(0, tokens=tokens),
            vis.BlockUse(1, tokens=torch.tensor([True, False, False, False]), heads=torch.tensor([True, False, True]),
                         attn=True, mlp=False),
            vis.BlockUse(2, tokens=tokens, heads=torch.tensor([True, True, True]), attn=False, mlp=False)]
    titles, marks, legend = vis.adavit_layout(uses, 4, 3, gmacs=0.0123)
    assert titles == [["input", "4 patches, 3 heads", "0.0123 GMACs"],
                      ["block 0: 3/4 tokens", "heads 3/3", "attn on, MLP on"],
                      ["block 1: 1/4 tokens", "heads 2/3", "attn on, MLP off"],
                      ["block 2: skipped", "attn off, MLP off", "nothing computed"]]
    assert marks == [(("fixed",) * 3, "fixed", "fixed"), (("on", "off", "on"), "on", "off"),
                     (("off",) * 3, "off", "off")]  # nothing ran in a skipped block, whatever its heads said
    assert [text for _, text in legend] == ["token took part: as in the input", "token skipped the block",
                                            "block skipped", "head / branch ran", "dropped / off",
                                            "ran, no decision in this block"]
    # Only what the picture shows is explained: no skipped block, no undecided block, every token kept.
    plain = [vis.BlockUse(1, heads=torch.tensor([True, False, True]), attn=True, mlp=True)]
    assert [text for _, text in vis.adavit_layout(plain, 4, 3)[2]] == [
        "token took part: as in the input", "head / branch ran", "dropped / off"]
    # Only the MLP ran and dropped tokens still run it (ADAVIT.TOKEN_WITH_MLP False): every token took part.
    mlp_only = vis.BlockUse(3, tokens=tokens, attn=False, mlp=True)
    assert vis.adavit_layout([mlp_only], 4, 3, token_with_mlp=False)[0][1][0] == "block 3: 4/4 tokens"
    # The panels: kept patches untouched, the others faded; a skipped block entirely faded, with a red cross.
    image = torch.rand(3, 8, 8)
    panels = vis.render_adavit(image, uses, (2, 2), 4)
    assert len(panels) == 4 and torch.equal(panels[0], image)
    assert torch.equal(panels[1][:, :4, :4], image[:, :4, :4])  # patch 1 kept in block 0
    assert not torch.equal(panels[1][:, :4, 4:], image[:, :4, 4:])  # patch 2 dropped
    assert not (panels[3] == image).all(dim=0).any()
    assert (panels[3][0] > 0.8).sum() > 0 and red(np.asarray(vis.to_pil_image(panels[3]))) > 0


@pytest.fixture(scope="module")
def demo(vis):
    """The digits demo model on synthetic weights as `--init sharpened` makes them, and the val images it was
    calibrated on (the first CALIBRATION_IMAGES)."""
    from vitadapt.config import load_config
    from vitadapt.datasets import build_dataset
    from vitadapt.models import build_model
    from vitadapt.models.synthetic import calibrate_decisions_, sharpen_

    cfg = load_config(DEMO, [])
    dataset = build_dataset("digits", cfg, "val")
    images = torch.stack([dataset[i][0] for i in range(vis.CALIBRATION_IMAGES)])
    model = calibrate_decisions_(sharpen_(build_model(cfg).eval()), images, vis.SYNTHETIC_USAGE)
    return model, images


def test_sharpened_decisions_vary_between_images(demo):
    """--init sharpened on AdaViT: the calibrated decision heads keep about SYNTHETIC_USAGE of the tokens, heads
    and branches, and the decisions differ between images (untrained CLS tokens are nearly all alike)."""
    model, images = demo
    with torch.no_grad():
        model(images)
    usage = {k: v.mean().item() for k, v in model.usage_per_block().items()}
    assert 0.5 < usage["token_usage"] < 0.75  # CLS always kept, block 0 has no head / layer decisions
    assert 0.7 <= usage["head_usage"] < 0.85 and 0.7 <= usage["attn_usage"] < 0.85
    decided = model.last_decisions[1:]
    assert all(bool((d.heads.std(0) > 0).all() and (d.layer.std(0) > 0).all()) for d in decided)
    assert len({tuple(tuple(d.heads[i].tolist()) for d in decided) for i in range(len(images))}) > 4


def test_visualize_draws_a_forced_off_block_as_skipped(vis, demo, tmp_path, monkeypatch):
    """The real tool on the digits demo model (4 blocks, 3 heads, 8x8 patches) with a checkpoint whose block 2
    has both branches off for every image: 5 panels of 160 px in one row, titles that match the model's
    decisions, block 2 crossed out, strips and a legend below."""
    model, images = copy.deepcopy(demo[0]), demo[1][:2]
    with torch.no_grad():
        model.blocks[2].layer_select.mlp_head.weight.zero_()
        model.blocks[2].layer_select.mlp_head.bias.fill_(-20.0)
    weights = tmp_path / "weights.pyth"
    torch.save({"model": model.state_dict()}, weights)
    drawn = []
    compose = vis.compose_blocks
    monkeypatch.setattr(vis, "compose_blocks", lambda panels, titles, marks, legend:
                        drawn.append((titles, marks, legend)) or compose(panels, titles, marks, legend))
    opts = ["OUTPUT_DIR", str(tmp_path / "out"), "TEST.CHECKPOINT_FILE_PATH", str(weights)]
    assert vis.main(["--cfg", DEMO, "--num-images", "2"] + opts) == 0
    with torch.no_grad():
        model(images)  # the first 2 val images, which the tool draws
    assert len(drawn) == 2
    for i, (titles, marks, legend) in enumerate(drawn):
        d = model.last_decisions
        tokens = [int((d[b].tokens[i, 1:] > 0.5).sum()) for b in range(4)]
        assert titles[1] == [f"block 0: {tokens[0]}/64 tokens", "heads 3/3", "attn on, MLP on"]
        assert titles[3] == ["block 2: skipped", "attn off, MLP off", "nothing computed"]
        assert marks[2] == (("off",) * 3, "off", "off") and marks[0] == (("fixed",) * 3, "fixed", "fixed")
        for b in (1, 3):
            attn, mlp = ("on" if v > 0.5 else "off" for v in d[b].layer[i])
            heads = int((d[b].heads[i] > 0.5).sum())
            expected = [f"block {b}: {tokens[b]}/64 tokens", f"heads {heads}/3", f"attn {attn}, MLP {mlp}"]
            assert titles[b + 1] == ([f"block {b}: skipped", "attn off, MLP off", "nothing computed"]
                                     if attn == mlp == "off" else expected)
        assert "block skipped" in [text for _, text in legend]
        picture = np.asarray(Image.open(tmp_path / "out" / "visualization" / f"image_000{i}.png").convert("RGB"))
        origins = vis.grid_origins([160] * 5, [160] * 5, 3, vis.strip_height(vis.font(11)))
        assert [y for _, y in origins] == [origins[0][1]] * 5  # one row
        (x3, y3), (x4, _) = origins[3], origins[4]
        assert picture.shape[1] == x4 + 160 + vis.PAD
        assert picture.shape[0] > y3 + 160 + vis.strip_height(vis.font(11)) + 10  # strips, then the legend
        assert red(picture[y3:y3 + 160, x3:x3 + 160]) > 300  # block 2 crossed out...
        assert red(picture[y3:y3 + 160, origins[2][0]:origins[2][0] + 160]) == 0  # ...block 1 not
        assert (picture[:y3 - 40, x3:x3 + 160].min(axis=-1) < 128).sum() > 30  # its title above it


def test_twelve_blocks_wrap_into_two_rows(vis, tmp_path):
    """12 blocks: the input and blocks 0-5 in one row, blocks 6-11 in a second; 64 px inputs enlarged to 128."""
    opts = ["OUTPUT_DIR", str(tmp_path / "out"), "VIT.DEPTH", "12", "VIT.PATCH_SIZE", "16", "VIT.EMBED_DIM", "48",
            "DATA.TRAIN_CROP_SIZE", "64", "DATA.TEST_CROP_SIZE", "64"]
    assert vis.main(["--cfg", DEMO, "--init", "sharpened", "--num-images", "1"] + opts) == 0
    picture = Image.open(tmp_path / "out" / "visualization" / "image_0000.png")
    origins = vis.grid_origins([128] * 13, [128] * 13, 3, vis.strip_height(vis.font(11)))
    assert vis.COLUMNS == 7 and origins[7][0] == origins[0][0] and origins[7][1] > origins[6][1] + 128
    assert picture.size[0] == origins[6][0] + 128 + vis.PAD
    assert picture.size[1] > origins[12][1] + 128 + vis.strip_height(vis.font(11))
