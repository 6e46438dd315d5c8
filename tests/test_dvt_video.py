"""DVT on video (vitadapt.models.dvt: DVTTimeSformer with joint or space-only attention, DVTXViT).

There is no official video DVT, so correctness is shown by construction: the frame-by-frame resampling of a
joint space-time sequence is the image resampling of every frame; space-only DVT is the image DVT on every frame
(the same features and attention relations handed from exit to exit); the last exit without reuse is the dense
backbone on the official video goldens (1e-5); early exit is per clip (a clip's answer and cost never depend on its
batch-mates); per-clip MACs are the backbone's own count at the first exit. Tiny models on synthetic weights."""

import os
from pathlib import Path

import pytest
import torch

from vitadapt.config import ConfigError, load_config
from vitadapt.models import build_model
from vitadapt.models.dvt import _pointwise, resample_frames, resample_matrix
from vitadapt.models.video import frames_of, from_frames, to_frames

REPO = Path(__file__).resolve().parents[1]
GOLDEN_DIR = Path(os.environ.get("VITADAPT_GOLDEN_DIR") or (REPO.parent / "shared" / "golden")) / "video"
T, SIZE, DIM, HEADS, DEPTH, CLASSES = 4, 32, 32, 2, 2, 5
PATCHES = ["DVT.PATCH_SIZES", "[16, 11, 8]", "DVT.PATCH_PADDINGS", "[0, 1, 0]"]  # 2x2, 3x3, 4x4 tokens a frame
XVIT = ["XVIT.NUM_SEGMENTS", str(T), "XVIT.NUM_FRAMES_EMBED", str(T), "XVIT.POS_EMBED_IMG_SIZE", str(SIZE),
        "TEMPORAL_HEAD.NUM_ATTENTION_HEADS", str(HEADS), "TEMPORAL_HEAD.MLP_DIM", str(DIM)]
KINDS = {"joint": ("DVTTimeSformer", ["TIMESFORMER.ATTENTION_TYPE", "joint_space_time"]),
         "space_only": ("DVTTimeSformer", ["TIMESFORMER.ATTENTION_TYPE", "space_only"]),
         "xvit": ("DVTXViT", XVIT)}
ATOL = 1e-5

pytestmark = pytest.mark.usefixtures("one_thread")


def opts(name, *extra):
    return ["NUM_GPUS", "0", "MODEL.NAME", name, "MODEL.NUM_CLASSES", str(CLASSES), "VIT.EMBED_DIM", str(DIM),
            "VIT.DEPTH", str(DEPTH), "VIT.NUM_HEADS", str(HEADS), "VIT.MLP_RATIO", "2.0",
            "DATA.TRAIN_CROP_SIZE", str(SIZE), "DATA.TEST_CROP_SIZE", str(SIZE), "DATA.NUM_FRAMES", str(T),
            *PATCHES, *extra]


def build(kind, *extra, seed=0):
    name, kind_opts = KINDS[kind]
    torch.manual_seed(seed)
    return build_model(load_config("", opts(name, *kind_opts, *extra))).eval()


def clips(batch=3, seed=7):
    return torch.randn(batch, 3, T, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def spreading_thresholds(model, video):
    """Thresholds that send a third of the clips to each exit: exit 1 takes its two most confident clips, exit 2
    the two most confident of the rest. Returns every exit's logits (all exits run)."""
    model.set_thresholds(None)
    model(video)
    every_exit = [logits.clone() for logits in model.last_exit_logits]
    first, second = (logits.softmax(-1).amax(-1) for logits in every_exit[:2])
    share = video.shape[0] // 3
    def between(confidence):  # halfway between the share-th and the next most confident: no clip sits on it
        ranked = confidence.sort(descending=True).values
        return (ranked[share - 1] + ranked[share]).item() / 2

    t1 = between(first)
    t2 = between(second[first < t1])
    model.set_thresholds([t1, t2])
    return every_exit


# ============================================================================================ 1. by construction
def test_frame_by_frame_resampling_of_a_space_time_sequence():
    """resample_matrix(src, dst, T) on a clip sequence (patch n of frame t at 1 + n * T + t) resamples each frame
    as the image matrix does, and passes the CLS."""
    x = torch.randn(2, 1 + 9 * T, 6, dtype=torch.float64)
    out = resample_matrix(3, 4, T) @ x
    image = resample_matrix(3, 4)
    per_frame = image[1:, 1:] @ to_frames(x[:, 1:], T)  # [2 * T, 16, 6]
    assert torch.allclose(out[:, 1:], from_frames(per_frame, T))
    assert torch.equal(out[:, 0], x[:, 0])
    assert out.shape == (2, 1 + 16 * T, 6)
    # What the model runs: the image matrix frame by frame, along any dimension.
    fast = resample_frames(x[:, 1:].transpose(1, 2), image[1:, 1:], T).transpose(1, 2)
    assert torch.allclose(fast, out[:, 1:])


@torch.no_grad()
def test_joint_reuse_resamples_relations_and_features_as_the_space_time_matrix():
    """A joint clip's relation bias and reused features (computed frame by frame) equal the space-time resampling
    matrix of the definition applied to the whole sequence."""
    model = build("joint")
    upstream = model.run_stage(0, clips(), None)  # 2x2 tokens a frame
    stage, side = model.stages[1], 3
    mixed = _pointwise(stage.relation_reuse_conv, torch.cat(upstream.relations, dim=1))
    matrix = resample_matrix(2, side, T).to(mixed)
    expected = (matrix @ mixed @ matrix.t()).chunk(DEPTH, dim=1)
    for mine, ref in zip(model._relation_bias(stage, upstream, side), expected):
        assert mine.shape == ref.shape == (3, HEADS, 1 + 9 * T, 1 + 9 * T)
        assert torch.allclose(mine, ref, atol=1e-6)
    features = model._reused_features(stage, upstream, side)
    assert features[0].shape == (3, 1 + 9 * T, 48) and not features[0][:, 0].any()


@torch.no_grad()
def test_space_only_dvt_is_image_dvt_on_every_frame():
    """Every exit of space-only DVT hands the next one what the image DVT hands it on each frame: the same features
    and relations; the clip's logits are the head on the frames' mean CLS."""
    video_model = build("space_only")
    image = build_model(load_config("", opts("DVT"))).eval()
    image.load_state_dict(video_model.state_dict(), strict=True)  # same keys: space only has no time_embed
    video = clips()
    frames = frames_of(video)
    up_video = up_image = None
    for k in range(3):
        up_video = video_model.run_stage(k, video, up_video)
        up_image = image.run_stage(k, frames, up_image)
        assert (up_video.features - up_image.features).abs().max() <= ATOL
        if k < 2:
            for a, b in zip(up_video.relations, up_image.relations):
                assert (a - b).abs().max() <= ATOL
        stage = image.stages[k]
        mean_cls = up_image.features[:, 0].reshape(3, T, DIM).mean(dim=1)
        expected = stage.head(stage.norm(mean_cls))
        assert (up_video.logits - expected).abs().max() <= ATOL


@torch.no_grad()
def test_one_frame_joint_dvt_is_image_dvt():
    """With T = 1 a joint space-time clip is an image: same logits at every exit and the same per-exit MACs."""
    name, kind_opts = KINDS["joint"]
    one = [o if o != str(T) or kind_opts is None else o for o in opts(name, *kind_opts)]
    one[one.index("DATA.NUM_FRAMES") + 1] = "1"
    torch.manual_seed(0)
    video_model = build_model(load_config("", one)).eval()
    image = build_model(load_config("", opts("DVT"))).eval()
    sd = {k: v for k, v in video_model.state_dict().items() if not k.endswith("time_embed")}
    image.load_state_dict(sd, strict=True)
    video = clips(seed=3)[:, :, :1]
    video_model(video)
    image(video[:, :, 0])
    for a, b in zip(video_model.last_exit_logits, image.last_exit_logits):
        assert (a - b).abs().max() <= ATOL
    assert torch.equal(video_model.exit_macs(), image.exit_macs())


# ============================================================================================ 2. goldens
GOLDEN_FILES = {"xvit": "golden_xvit_dev.pt", "joint": "golden_timesformer_jointST_dev.pt",
                "space_only": "golden_timesformer_spaceonly_dev.pt"}


@pytest.mark.parametrize("kind", list(GOLDEN_FILES))
@torch.no_grad()
def test_last_exit_without_reuse_is_the_dense_backbone_on_the_goldens(kind):
    """DVT.FEATURE_REUSE / RELATION_REUSE off: the last exit (patch 16) is the official backbone, whose golden
    weights it takes; thresholds no clip meets send every clip there through the early-exit path too."""
    from vitadapt.parity import _timesformer_opts, _xvit_opts

    path = GOLDEN_DIR / GOLDEN_FILES[kind]
    if not path.is_file():
        pytest.skip(f"golden file {path} not found (set VITADAPT_GOLDEN_DIR to the shared/golden folder)")
    golden = torch.load(path, map_location="cpu", weights_only=False)
    sd = {k: v for k, v in golden["state_dict"].items() if not k.startswith("new_fc.")}  # XViT's unused classifier
    o = _xvit_opts(golden["config"], golden["state_dict"]) if kind == "xvit" else _timesformer_opts(golden["config"])
    o[o.index("MODEL.NAME") + 1] = KINDS[kind][0]
    o += ["NUM_GPUS", "0", "DVT.PATCH_SIZES", "[32, 21, 16]", "DVT.PATCH_PADDINGS", "[0, 1, 0]",
          "DVT.FEATURE_REUSE", "False", "DVT.RELATION_REUSE", "False"]
    model = build_model(load_config("", o)).eval()
    own = model.state_dict()
    own.update({f"normal_token.{k}": v for k, v in sd.items()})
    model.load_state_dict(own, strict=True)
    torch.testing.assert_close(model(golden["input"]), golden["logits"], atol=ATOL, rtol=ATOL)
    model.set_thresholds([1.01, 1.01])
    torch.testing.assert_close(model(golden["input"]), golden["logits"], atol=ATOL, rtol=ATOL)
    assert model.last_exit.tolist() == [2] * golden["input"].shape[0]


# ============================================================================================ 3. early exit per clip
@pytest.mark.parametrize("kind", list(KINDS))
@torch.no_grad()
def test_early_exit_per_clip_is_the_exit_it_stops_at_and_ignores_batch_mates(kind):
    model = build(kind)
    video = clips(batch=6)
    every_exit = spreading_thresholds(model, video)
    logits = model(video)
    exits = model.last_exit.clone()
    assert sorted(exits.tolist()) == [0, 0, 1, 1, 2, 2]  # the clips really spread over the exits
    expected = torch.stack([every_exit[k][i] for i, k in enumerate(exits.tolist())])
    assert (logits - expected).abs().max() <= ATOL
    assert torch.equal(model.macs_per_image(), model.exit_macs()[exits])
    for i in range(video.shape[0]):  # each clip alone: same exit, same logits
        alone = model(video[i:i + 1])
        assert model.last_exit.tolist() == [exits[i].item()]
        assert (alone[0] - logits[i]).abs().max() <= ATOL


@pytest.mark.parametrize("kind", list(KINDS))
@torch.no_grad()
def test_exit_costs_per_clip(kind):
    """Exit 1 reuses nothing: its cost is the backbone's own count of the clip (LayerNorms at fvcore's 5 per
    element, the DVT convention); every later exit costs more, and the cumulative cost is per clip of T frames."""
    model = build(kind)
    video = clips(batch=2)
    model(video)
    first = model.stages[0]
    first(video)  # the backbone's own forward and count
    if kind == "xvit":
        side, c = 2, DIM
        norms = T * (DEPTH * 2 + 1) * (side * side + 1) * c * 5  # norm1, norm2 per block and the final norm
        expected = first.macs_per_image()[0].item() + norms
    else:
        expected = first.macs_per_image(layer_norms=True)[0].item()
    costs = model.exit_macs()
    assert costs[0].item() == pytest.approx(expected, rel=1e-12)
    assert bool((costs[1:] > costs[:-1]).all())
    longer = torch.randn(1, 3, 2 * T, SIZE, SIZE) if kind != "xvit" else None
    if longer is not None:  # a clip twice as long costs more (per clip, from the last forward's length)
        model(longer)
        assert model.exit_macs()[0] > costs[0]


# ============================================================================================ 4. training, config
@pytest.mark.parametrize("kind", list(KINDS))
def test_every_exit_trains(kind):
    """Training runs every exit on every clip (last_exit_logits) and their summed loss reaches every stage,
    reuse modules included."""
    model = build(kind).train()
    video = clips(batch=2)
    model(video)
    loss = sum(torch.nn.functional.cross_entropy(l, torch.tensor([0, 1])) for l in model.last_exit_logits)
    loss.backward()
    for name in ("less_less_token", "less_token", "normal_token"):
        stage = getattr(model, name)
        assert stage.blocks[0].attn.qkv.weight.grad.abs().sum() > 0, name
    assert model.less_token.relation_reuse_conv[0].weight.grad.abs().sum() > 0
    assert model.normal_token.blocks[0].feature_resuse_mlp[1].fc1.weight.grad.abs().sum() > 0


def test_divided_attention_t2t_and_a_patch_that_does_not_fit_are_refused():
    with pytest.raises(ConfigError, match="divided"):
        load_config("", opts("DVTTimeSformer", "TIMESFORMER.ATTENTION_TYPE", "divided_space_time"))
    with pytest.raises(ConfigError, match="DVT.BACKBONE"):
        load_config("", opts("DVTXViT", *XVIT, "DVT.BACKBONE", "T2TViT"))
    with pytest.raises(ConfigError, match=r"DVT.PATCH_SIZES\[1\] = 11 does not divide the 32 px crop"):
        load_config("", opts("DVTXViT", *XVIT, "DVT.PATCH_PADDINGS", "[0, 0, 0]"))


def test_images_are_refused_with_the_shape():
    model = build("xvit")
    with pytest.raises(ValueError, match=r"\[B, C, T, H, W\].*\(2, 3, 32, 32\)"):
        model(torch.randn(2, 3, SIZE, SIZE))


# ============================================================================================ 5. end to end
def test_run_net_trains_a_video_cascade_and_tests_it_with_early_exit_per_view(tmp_path, run_net):
    """tools/run_net.py on rendered videos: a tiny DVTXViT trains one epoch (every exit's loss), then the test job
    searches thresholds on the training clips, writes the curves and tests 3 views per video with real early exit;
    each view's GMACs are the cumulative cost of the exit it left at, and a video's are its views' sum."""
    import json

    import helpers_e2e as h
    from test_video_models import rendered_videos, tiny_video_opts

    data = rendered_videos(tmp_path, classes=2)
    out = tmp_path / "out"
    opts = tiny_video_opts(data, "DVTXViT", 2) + [
        "OUTPUT_DIR", str(out), "XVIT.POS_EMBED_IMG_SIZE", "32", "XVIT.NUM_SEGMENTS", "4",
        "XVIT.NUM_FRAMES_EMBED", "4", "TEMPORAL_HEAD.NUM_ATTENTION_HEADS", "2", "TEMPORAL_HEAD.MLP_DIM", "16",
        *PATCHES, "DVT.BUDGET_POINT", "10", "DVT.THRESHOLD_IMAGES", "4", "SOLVER.MAX_EPOCH", "1",
        "TRAIN.BATCH_SIZE", "2", "TEST.BATCH_SIZE", "3"]
    assert run_net(["--cfg", ""] + opts) == 0
    (train,) = h.records(out, "train_epoch")
    assert {"loss_exit1", "loss_exit2", "loss_exit3"} <= set(train)  # every exit learned
    (rec,) = h.records(out, "test_final")
    assert rec["num_videos"] == 2 and rec["num_images"] == 6 and sum(rec["exit_counts"]) == 6
    assert len(rec["thresholds"]) == 2 and len(rec["anytime_top1_acc"]) == 3
    exit_gmacs = rec["exit_gmacs"]
    expected = sum(c * g for c, g in zip(rec["exit_counts"], exit_gmacs)) / 6
    assert rec["gmacs_mean"] == pytest.approx(expected, rel=1e-4)
    assert rec["gmacs_per_video_mean"] == pytest.approx(3 * rec["gmacs_mean"], rel=1e-4)
    curves = json.loads((out / "dvt_curves.json").read_text())
    assert curves["budgeted (threshold search)"]["anytime"]["gflops"] == pytest.approx(exit_gmacs, abs=1e-6)
