"""ATS on video (vitadapt.models.ats: ATSTimeSformer, ATSFrameViT, ATSXViT).

Checked against definitions written here: joint space-time ATS is the image ATS on the flattened 1 + N * T tokens;
space-only TimeSformer and XViT without the shift are the image ATS on every frame alone; a sampler forced to keep
every token (reordered) reproduces the official video goldens, which pins the XViT shift's alignment by position;
packed = masked execution; each clip's result does not depend on its batch-mates; MACs per clip; config errors;
official checkpoints. The goldens live in <repo>/../shared/golden/video (VITADAPT_GOLDEN_DIR overrides); the tests
that need them skip when they are absent. Tiny models: embed 48, 3 heads, depth 4, 64 px / patch 16, 4 frames.
"""

import collections
import os
from pathlib import Path

import pytest
import torch

from vitadapt.config import ConfigError, load_config
from vitadapt.models import TokenBatch, build_model
from vitadapt.models.ats import AdaptiveTokenSampler
from vitadapt.models import vit as vit_module
from vitadapt.models.flops import block_macs
from vitadapt.models.synthetic import sharpen_
from vitadapt.models.video import TemporalShift, frames_of
from vitadapt.utils.checkpoint import load_weights

REPO = Path(__file__).resolve().parents[1]
GOLDEN_DIR = Path(os.environ.get("VITADAPT_GOLDEN_DIR") or (REPO.parent / "shared" / "golden")) / "video"
ATOL = 1e-5
T, SIZE, PATCH, DIM, HEADS, DEPTH, CLASSES = 4, 64, 16, 48, 3, 4, 10
N = (SIZE // PATCH) ** 2  # patches per frame
EXECUTIONS = ("packed", "masked")
KINDS = ("joint", "space_only", "xvit")

pytestmark = pytest.mark.usefixtures("one_thread")


# ============================================================================================ helpers
def opts(name, *extra, blocks=(1, 2, 3), execution="packed"):
    base = ["NUM_GPUS", "0", "MODEL.NAME", name, "MODEL.NUM_CLASSES", str(CLASSES), "VIT.EMBED_DIM", str(DIM),
            "VIT.DEPTH", str(DEPTH), "VIT.NUM_HEADS", str(HEADS), "VIT.PATCH_SIZE", str(PATCH),
            "DATA.TRAIN_CROP_SIZE", str(SIZE), "DATA.TEST_CROP_SIZE", str(SIZE), "DATA.NUM_FRAMES", str(T),
            "VIT.TOKEN_EXECUTION", execution]
    if name.startswith("ATS"):
        base += ["ATS.BLOCKS", str(list(blocks))]
    return base + [str(x) for x in extra]


def kind_opts(kind, ats=True):
    """(MODEL.NAME, extra opts) of a kind of video model."""
    if kind in ("joint", "space_only"):
        attention = "joint_space_time" if kind == "joint" else "space_only"
        return ("ATSTimeSformer" if ats else "TimeSformer"), ["TIMESFORMER.ATTENTION_TYPE", attention]
    return ("ATSXViT" if ats else "XViT"), ["XVIT.NUM_SEGMENTS", "4", "XVIT.NUM_FRAMES_EMBED", "4",
                                            "XVIT.POS_EMBED_IMG_SIZE", str(SIZE), "XVIT.LOCATIONS_LIST", "[0, 1, 2, 3]",
                                            "TEMPORAL_HEAD.NUM_ATTENTION_HEADS", str(HEADS),
                                            "TEMPORAL_HEAD.MLP_DIM", str(DIM)]


@torch.no_grad()
def sharpened(model, seed=1):
    """sharpen_ weights (ATS then really drops tokens). XViT: backbone and head separately, so that the backbone's
    cls_token / pos_embed get sharpen_'s large token embeddings (their names carry a base_model. prefix)."""
    if hasattr(model, "base_model"):
        sharpen_(model.base_model, seed)
        sharpen_(model.consensus, seed + 100)
    else:
        sharpen_(model, seed)
    return model


def build(kind, *extra, ats=True, blocks=(1, 2, 3), execution="packed", seed=1, sharpen=True):
    name, kopts = kind_opts(kind, ats)
    torch.manual_seed(0)
    model = build_model(load_config("", opts(name, *kopts, *extra, blocks=blocks, execution=execution))).eval()
    return sharpened(model, seed) if sharpen else model


def image_ats(blocks=(1, 2, 3), execution="packed"):
    """An image ATSVisionTransformer with the video models' depth and dims (its blocks / norm / head get copied)."""
    return build_model(load_config("", opts("ATSVisionTransformer", blocks=blocks, execution=execution))).eval()


def copy_body(image, source):
    """blocks.*, norm.* (and head.* when both have it) of `source` into the image model."""
    src = source.state_dict()
    own = image.state_dict()
    sd = {k: v for k, v in src.items() if k.startswith(("blocks.", "norm.", "head.")) and k in own}
    missing, unexpected = image.load_state_dict(sd, strict=False)
    assert not unexpected
    assert all(not k.startswith("blocks.") for k in missing), missing
    return image


def clips(batch=3, seed=7):
    return torch.randn(batch, 3, T, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def kept_list(ids_row):
    """The kept original ids of one sequence, in the sampler's order."""
    return [int(i) for i in ids_row if i >= 0]


def kept_ids(model):
    """Per ATS stage, the kept ids of every sequence (lists)."""
    samplers = model.base_model.samplers() if hasattr(model, "base_model") else model.samplers()
    return [[kept_list(row) for row in s.last_kept_ids] for s in samplers]


def diff(a, b):
    return (a - b).abs().max().item()


# ============================================================================================ 1. joint = image ATS
@pytest.mark.parametrize("execution", EXECUTIONS)
@torch.no_grad()
def test_joint_ats_is_image_ats_on_flattened_sequence(execution):
    video_model = build("joint", execution=execution)
    image = copy_body(image_ats(execution=execution), video_model)
    video = clips()
    logits = video_model(video)

    tokens = video_model.embed(video)
    assert tokens.x.shape[1] == 1 + N * T and tokens.num_initial == 1 + N * T
    for blk in image.blocks:
        tokens = blk(tokens)
    ref = image.head(tokens.replace(x=image.norm(tokens.x)).cls_tokens())

    assert diff(logits, ref) <= ATOL, diff(logits, ref)
    for sv, si in zip(video_model.samplers(), image.samplers()):
        assert torch.equal(sv.last_num_kept, si.last_num_kept)
        assert torch.equal(sv.last_kept_ids, si.last_kept_ids)
    assert torch.equal(video_model.last_token_counts, tokens.counts_per_block())
    # Tokens really dropped, and sampled over the whole clip (the kept ids span several frames).
    kept = video_model.samplers()[0].last_num_kept
    assert (kept < 1 + N * T).all(), kept
    assert (video_model.last_token_counts[:, -1, 0] < 1 + N * T).all()
    frames_hit = {(i - 1) % T for row in kept_ids(video_model)[0] for i in row[1:]}
    assert len(frames_hit) > 1
    # M = N * T samples: some stage keeps more than N + 1 tokens of a clip (a per-frame M = N could not).
    assert int(video_model.samplers()[0].last_num_kept.max()) > N + 1


# ============================================================================================ 2. per-frame = image ATS
@pytest.mark.parametrize("execution", EXECUTIONS)
@torch.no_grad()
def test_space_only_ats_is_image_ats_per_frame(execution):
    model = build("space_only", execution=execution)
    image = copy_body(image_ats(execution=execution), model)
    video = clips()
    frame_cls = []
    handle = model.blocks[-1].register_forward_hook(lambda m, i, out: frame_cls.append(out.cls_tokens()))
    try:
        logits = model(video)
    finally:
        handle.remove()
    batch_ids = kept_ids(model)

    embedded = model.embed(video).x  # [B * T, 1 + N, C], row b * T + t
    assert embedded.shape == (video.shape[0] * T, 1 + N, DIM)
    alone_cls, alone_counts, alone_ids = [], [], []
    for r in range(embedded.shape[0]):
        tokens = TokenBatch.dense(embedded[r:r + 1], execution)
        for blk in image.blocks:
            tokens = blk(tokens)
        alone_cls.append(tokens.cls_tokens())
        alone_counts.append(tokens.counts_per_block())
        alone_ids.append([kept_list(s.last_kept_ids[0]) for s in image.samplers()])
    alone_cls = torch.cat(alone_cls)
    alone_counts = torch.cat(alone_counts)

    assert diff(frame_cls[0], alone_cls) <= ATOL
    mean = alone_cls.reshape(-1, T, DIM).mean(dim=1)
    ref = model.head(model.norm(mean))
    assert diff(logits, ref) <= ATOL, diff(logits, ref)
    assert torch.equal(model.last_sequence_token_counts, alone_counts)
    assert torch.equal(model.last_token_counts, alone_counts.reshape(-1, T, DEPTH, 2).sum(dim=1))
    for stage in range(len(batch_ids)):
        assert batch_ids[stage] == [ids[stage] for ids in alone_ids]
    # Each frame is sampled on its own (M = N): never more than 1 + N tokens, some frames drop, counts differ.
    assert int(alone_counts.max()) <= 1 + N
    final = alone_counts[:, -1, 0]
    assert (final < 1 + N).any() and len(set(final.tolist())) > 1


@pytest.mark.parametrize("execution", EXECUTIONS)
@torch.no_grad()
def test_xvit_without_shift_is_image_ats_per_frame(execution):
    model = build("xvit", "XVIT.USE_XVIT", "False", execution=execution)
    base = model.base_model
    assert all(b.attn.kv_mixing is None for b in base.blocks)
    image = copy_body(image_ats(execution=execution), base)
    video = clips()
    frames = frames_of(video)
    features = base(frames)  # [B * T, C], norm -> CLS (the head is a Dropout)
    batch_ids = kept_ids(model)

    embedded = base.embed(frames).x  # pos_embed + temp_embed, row b * T + t
    alone, counts, ids = [], [], []
    for r in range(embedded.shape[0]):
        tokens = TokenBatch.dense(embedded[r:r + 1], execution)
        for blk in image.blocks:
            tokens = blk(tokens)
        alone.append(image.norm(tokens.cls_tokens()))
        counts.append(tokens.counts_per_block())
        ids.append([kept_list(s.last_kept_ids[0]) for s in image.samplers()])
    alone, counts = torch.cat(alone), torch.cat(counts)
    assert diff(features, alone) <= ATOL, diff(features, alone)
    assert torch.equal(base.last_token_counts, counts)
    for stage in range(len(batch_ids)):
        assert batch_ids[stage] == [i[stage] for i in ids]
    assert (counts[:, -1, 0] < 1 + N).any()
    logits = model(video)
    assert diff(logits, model.consensus(alone.reshape(video.shape[0], T, DIM))) <= ATOL


# ============================================================================================ 3. keep-all = goldens
GOLDEN_FILES = {"xvit": "golden_xvit_dev.pt", "joint": "golden_timesformer_jointST_dev.pt",
                "space_only": "golden_timesformer_spaceonly_dev.pt"}


def load_golden(kind):
    path = GOLDEN_DIR / GOLDEN_FILES[kind]
    if not path.is_file():
        pytest.skip(f"golden file {path} not found (set VITADAPT_GOLDEN_DIR to the shared/golden folder)")
    return torch.load(path, map_location="cpu", weights_only=False)


def keep_all_reordered(calls):
    """A sampler that keeps every live token, CLS first, then the patches in a random order per sequence."""

    @torch.no_grad()
    def sample(self, tokens, cls_attention, values):
        live = tokens.live_mask()
        b, n = live.shape
        g = torch.Generator().manual_seed(1000 + len(calls))
        calls.append(b)
        keys = torch.rand(b, n - 1, generator=g) + 2.0 * (~live[:, 1:]).float()  # dead slots last
        perm = keys.argsort(dim=1) + 1
        index = torch.cat([torch.zeros_like(perm[:, :1]), perm], dim=1)
        valid = torch.cat([torch.ones_like(live[:, :1]), live.gather(1, perm)], dim=1)
        return index, valid

    return sample


def golden_ats_model(kind, golden, execution):
    from vitadapt.parity import _timesformer_opts, _xvit_opts

    if kind == "xvit":
        o = _xvit_opts(golden["config"], golden["state_dict"])
    else:
        o = _timesformer_opts(golden["config"])
    o[o.index("MODEL.NAME") + 1] = "ATSXViT" if kind == "xvit" else "ATSTimeSformer"
    o += ["NUM_GPUS", "0", "VIT.TOKEN_EXECUTION", execution, "ATS.BLOCKS", str(list(range(DEPTH)))]
    model = build_model(load_config("", o)).eval()
    # The official XViT keeps an unused new_fc classifier (dropped by every checkpoint load, test 8).
    model.load_state_dict({k: v for k, v in golden["state_dict"].items() if not k.startswith("new_fc.")},
                          strict=True)
    return model


@pytest.mark.parametrize("execution", EXECUTIONS)
@pytest.mark.parametrize("kind", KINDS)
@torch.no_grad()
def test_keep_all_reordered_equals_golden(kind, execution, monkeypatch):
    golden = load_golden(kind)
    calls = []
    monkeypatch.setattr(AdaptiveTokenSampler, "sample", keep_all_reordered(calls))
    model = golden_ats_model(kind, golden, execution)
    logits = model(golden["input"])
    assert len(calls) == DEPTH
    torch.testing.assert_close(logits, golden["logits"], atol=ATOL, rtol=ATOL)
    # Nothing dropped, and the order really changed (ids not monotonic) in every stage.
    per_sequence = 1 + N * T if kind == "joint" else 1 + N
    for stage in kept_ids(model):
        assert all(len(row) == per_sequence and row[0] == 0 for row in stage)
        assert all(sorted(row) == list(range(per_sequence)) for row in stage)
        assert any(row != sorted(row) for row in stage)


@torch.no_grad()
def test_xvit_shift_without_position_alignment_would_miss_golden(monkeypatch):
    """The same keep-all reordering with a shift that ignores the token ids (shifts the packed sequence as it is)
    is far from the golden: the alignment the previous test relies on is what makes it pass."""
    golden = load_golden("xvit")
    monkeypatch.setattr(AdaptiveTokenSampler, "sample", keep_all_reordered([]))
    model = golden_ats_model("xvit", golden, "packed")
    monkeypatch.setattr(TemporalShift, "forward", lambda self, x, tokens=None: self.shift(x))
    assert diff(model(golden["input"]), golden["logits"]) > 1e-2


# ============================================================================================ 4. packed = masked
@pytest.mark.parametrize("kind", KINDS)
@torch.no_grad()
def test_packed_equals_masked(kind):
    video = clips()
    runs = {}
    for execution in EXECUTIONS:
        model = build(kind, execution=execution)
        runs[execution] = (model(video), model.last_token_counts.clone(), kept_ids(model))
    (lp, cp, ip), (lm, cm, im) = runs["packed"], runs["masked"]
    assert diff(lp, lm) <= ATOL, diff(lp, lm)
    assert torch.equal(cp, cm)
    assert [[sorted(r) for r in s] for s in ip] == [[sorted(r) for r in s] for s in im]
    assert (cp[:, -1, 0] < cp[:, 0, 0]).all(), cp[:, :, 0]  # tokens dropped in every clip


# ============================================================================================ 5. per clip
@pytest.mark.parametrize("execution", EXECUTIONS)
@pytest.mark.parametrize("kind", KINDS)
@torch.no_grad()
def test_each_clip_alone_equals_batched(kind, execution):
    model = build(kind, execution=execution)
    video = clips()
    logits, counts = model(video), model.last_token_counts.clone()
    assert len(set(counts[:, -1, 0].tolist())) > 1, counts[:, -1, 0]  # clips keep different numbers
    for i in range(video.shape[0]):
        alone = model(video[i:i + 1])
        assert diff(alone, logits[i:i + 1]) <= ATOL, (i, diff(alone, logits[i:i + 1]))
        assert torch.equal(model.last_token_counts, counts[i:i + 1])


# ============================================================================================ 6. MACs
def clip_macs_reference(model, kind, batch, side_rows):
    """MACs per clip written from the token counts: patch embedding, blocks, with side_rows the CLS attention row
    of every ATS block as a side product (N x C; the fused attention path), (temporal) head."""
    c, hidden = DIM, 4 * DIM
    patch = 3 * PATCH * PATCH * c  # per patch token
    ats_blocks = list(getattr(model.base_model if kind == "xvit" else model, "ats_blocks", [])) if side_rows else []
    if kind == "xvit":
        counts = model.base_model.last_token_counts  # [B * T, depth, 2] per frame
        frames = (counts[:, 0, 0] - 1).double() * patch + block_macs(counts[..., 0], counts[..., 1], c, hidden).sum(1)
        frames = frames + counts[:, ats_blocks, 0].double().sum(1) * c
        head = block_macs(torch.tensor(T + 1.0), torch.tensor(T + 1.0), c, 4 * c) + c * DIM + DIM * CLASSES
        return frames.reshape(batch, T).sum(dim=1) + head
    counts = model.last_sequence_token_counts
    seq = (counts[:, 0, 0] - 1).double() * patch + block_macs(counts[..., 0], counts[..., 1], c, hidden).sum(1)
    seq = seq + counts[:, ats_blocks, 0].double().sum(1) * c
    if kind == "space_only":
        seq = seq.reshape(batch, T).sum(dim=1)
    return seq + c * CLASSES


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("kind", KINDS)
@torch.no_grad()
def test_macs_per_clip(kind, fused, monkeypatch):
    """fused: every attention through the fused kernel, so that ATS computes its CLS rows on the side (counted);
    else small attention runs explicitly and the rows are read from its matrix (not counted)."""
    if fused:
        monkeypatch.setattr(vit_module, "SMALL_ATTENTION_LOGITS", 0)
    video = clips()
    b = video.shape[0]
    ats = build(kind)
    dense = build(kind, ats=False)
    dense.load_state_dict(ats.state_dict(), strict=True)
    ats(video)
    dense(video)
    m_ats, m_dense = ats.macs_per_image(), dense.macs_per_image()
    assert m_ats.shape == (b,)
    torch.testing.assert_close(m_ats, clip_macs_reference(ats, kind, b, fused), atol=0.5, rtol=0)
    torch.testing.assert_close(m_dense, clip_macs_reference(dense, kind, b, fused), atol=0.5, rtol=0)
    assert (m_dense == m_dense[0]).all()
    assert (m_ats < m_dense).all(), (m_ats, m_dense)
    # The engine's per-clip statistics sum the clip's frames (T sequences per clip unless joint).
    counts = ats.last_token_counts
    assert counts.shape == (b, DEPTH, 2)
    per_frame = ats.base_model.last_token_counts if kind == "xvit" else ats.last_sequence_token_counts
    if kind == "joint":
        assert torch.equal(counts, per_frame)
        assert int(counts[0, 0, 0]) == 1 + N * T
    else:
        assert torch.equal(counts, per_frame.reshape(b, T, DEPTH, 2).sum(dim=1))
        assert int(counts[0, 0, 0]) == T * (1 + N)

    # Nothing drops: ATS.BLOCKS [] costs exactly the dense model; a keep-everything sampler costs the dense model
    # plus the CLS attention rows it still computes on the side (fused), exactly the dense model otherwise.
    empty = build(kind, blocks=())
    empty.load_state_dict(ats.state_dict(), strict=True)
    empty(video)
    torch.testing.assert_close(empty.macs_per_image(), m_dense, atol=0, rtol=0)
    monkeypatch.setattr(AdaptiveTokenSampler, "sample", keep_all_reordered([]))
    ats(video)
    rows = clip_macs_reference(ats, kind, b, fused) - m_dense
    assert (rows > 0).all() if fused else (rows == 0).all()
    torch.testing.assert_close(ats.macs_per_image(), m_dense + rows, atol=0, rtol=0)
    torch.testing.assert_close(ats.last_token_counts, dense.last_token_counts, atol=0, rtol=0)


# ============================================================================================ 7. config
@pytest.mark.parametrize("name, extra", [("ATSXViT", kind_opts("xvit")[1]),
                                         ("ATSTimeSformer", ["TIMESFORMER.ATTENTION_TYPE", "space_only"])])
def test_space_time_sampling_refused_where_frames_are_separate_sequences(name, extra):
    with pytest.raises(ConfigError, match="ATS.VIDEO_SAMPLING"):
        load_config("", opts(name, *extra, "ATS.VIDEO_SAMPLING", "space_time"))
    with pytest.raises(ConfigError, match="ATS.VIDEO_SAMPLING"):
        load_config("", opts(name, *extra, "ATS.VIDEO_SAMPLING", "per_clip"))
    load_config("", opts(name, *extra, "ATS.VIDEO_SAMPLING", "per_frame"))
    for attention in ("joint_space_time", "divided_space_time"):  # one sequence spans the clip: both are fine
        load_config("", opts("ATSTimeSformer", "TIMESFORMER.ATTENTION_TYPE", attention, "ATS.VIDEO_SAMPLING",
                             "space_time"))


@pytest.mark.parametrize("blocks", [(DEPTH,), (-1,), (1, 1)])
def test_ats_xvit_blocks_out_of_range_refused(blocks):
    _, kopts = kind_opts("xvit")
    with pytest.raises(ConfigError, match="ATS.BLOCKS"):
        load_config("", opts("ATSXViT", *kopts, blocks=blocks))
    load_config("", opts("ATSXViT", *kopts, blocks=(0, DEPTH - 1)))


# ============================================================================================ 8. checkpoints
@pytest.mark.parametrize("blocks", [(), (1, 2, 3)])
@torch.no_grad()
def test_official_timesformer_file_into_ats(tmp_path, blocks):
    source = build("joint", ats=False, seed=3)
    path = tmp_path / "TimeSformer_jointST_8x224_K400.pyth"
    torch.save({"epoch": 15, "model_state": {"model." + k: v for k, v in source.state_dict().items()}}, path)
    target = build("joint", blocks=blocks, seed=4)
    video = clips()
    assert diff(target(video), source(video)) > 1e-3
    report = load_weights(target, str(path))
    assert report.missing == [] and report.unexpected == [] and not report.head_reset
    assert any("'model.' prefix" in line for line in report.converted)
    for k, v in source.state_dict().items():
        assert torch.equal(target.state_dict()[k], v), k
    if not blocks:
        torch.testing.assert_close(target(video), source(video), atol=1e-6, rtol=0)


@pytest.mark.parametrize("blocks", [(), (1, 2, 3)])
@torch.no_grad()
def test_official_xvit_file_into_ats(tmp_path, blocks):
    source = build("xvit", ats=False, seed=3)
    sd = dict(source.state_dict())
    sd["new_fc.weight"], sd["new_fc.bias"] = torch.randn(CLASSES, DIM), torch.randn(CLASSES)
    path = tmp_path / "xvit_k600.pyth"
    torch.save({"model_state": sd}, path)
    target = build("xvit", blocks=blocks, seed=4)
    video = clips()
    assert diff(target(video), source(video)) > 1e-3
    report = load_weights(target, str(path))
    assert report.missing == [] and report.unexpected == []
    assert any("new_fc" in line and "dropped" in line for line in report.converted)
    for k, v in source.state_dict().items():
        assert torch.equal(target.state_dict()[k], v), k
    if not blocks:
        torch.testing.assert_close(target(video), source(video), atol=1e-6, rtol=0)


def test_ats_demo_config_reads_the_dense_demos_last_checkpoint():
    """configs/demo/ATS_XViT_motion.yaml evaluates, off the shelf, the checkpoint `make video-demo` leaves: the dense
    demo's OUTPUT_DIR and last epoch."""
    dense = load_config(str(REPO / "configs" / "demo" / "XViT_motion.yaml"), [])
    ats = load_config(str(REPO / "configs" / "demo" / "ATS_XViT_motion.yaml"), [])
    expected = os.path.join(dense.OUTPUT_DIR, "checkpoints", f"checkpoint_epoch_{dense.SOLVER.MAX_EPOCH:05d}.pyth")
    assert ats.TEST.CHECKPOINT_FILE_PATH == expected
    assert ats.MODEL.NAME == "ATSXViT" and not ats.TRAIN.ENABLE
    model = build_model(ats)
    assert set(model.state_dict()) == set(build_model(dense).state_dict())  # parameter-free: the dense weights fit


# ============================================================================================ 9. divided attention
SAMPLINGS = ("per_frame", "space_time")


def build_divided(sampling, *extra, blocks=(1, 2, 3), execution="packed", sharpen=True):
    torch.manual_seed(0)
    model = build_model(load_config("", opts("ATSTimeSformer", "TIMESFORMER.ATTENTION_TYPE", "divided_space_time",
                                             "ATS.VIDEO_SAMPLING", sampling, *extra, blocks=blocks,
                                             execution=execution))).eval()
    return sharpened(model) if sharpen else model


@pytest.mark.parametrize("execution", EXECUTIONS)
@pytest.mark.parametrize("sampling", SAMPLINGS)
@torch.no_grad()
def test_divided_keep_all_equals_golden(sampling, execution, monkeypatch):
    """A sampler that keeps every token (reordered) turns on the keep-mask path of the divided grid (masked, or
    packed around every sub-layer) in every later block and must still give the official divided TimeSformer's
    logits."""
    from vitadapt.parity import _timesformer_opts

    path = GOLDEN_DIR / "golden_timesformer_dev.pt"
    if not path.is_file():
        pytest.skip(f"golden file {path} not found (set VITADAPT_GOLDEN_DIR to the shared/golden folder)")
    golden = torch.load(path, map_location="cpu", weights_only=False)
    o = _timesformer_opts(golden["config"])
    o[o.index("MODEL.NAME") + 1] = "ATSTimeSformer"
    model = build_model(load_config("", o + ["NUM_GPUS", "0", "ATS.VIDEO_SAMPLING", sampling, "VIT.TOKEN_EXECUTION",
                                             execution, "ATS.BLOCKS", str(list(range(DEPTH)))])).eval()
    model.load_state_dict(golden["state_dict"], strict=True)
    calls, seen = [], []
    monkeypatch.setattr(AdaptiveTokenSampler, "sample", keep_all_reordered(calls))
    model.blocks[1].register_forward_pre_hook(lambda m, args: seen.append(args[0].keep))
    torch.testing.assert_close(model(golden["input"]), golden["logits"], atol=ATOL, rtol=ATOL)
    assert len(calls) == DEPTH and seen[0] is not None and bool(seen[0].all())


@pytest.mark.parametrize("sampling", SAMPLINGS)
@torch.no_grad()
def test_divided_dropped_tokens_are_frozen_and_no_key(sampling):
    """After ATS in block 1, a dropped token: keeps its value through blocks 2 and 3 (no update), never comes back,
    and is no key: noise put on the dropped tokens before block 2 changes neither the live tokens nor the logits."""
    model = build_divided(sampling, blocks=(1,))
    video = clips()
    io = []
    hooks = [model.blocks[i].register_forward_hook(lambda m, args, out: io.append((args[0], out))) for i in (2, 3)]
    logits = model(video)
    for block_in, block_out in io:
        dropped = ~block_in.keep
        assert dropped.any()
        assert torch.equal(block_out.x[dropped], block_in.x[dropped])
        assert not (block_out.keep & dropped).any()
    for h in hooks:
        h.remove()

    def noise(module, args):
        tokens = args[0]
        return (tokens.replace(x=tokens.x + 10.0 * (~tokens.keep)[..., None] * torch.randn_like(tokens.x)),)

    live_out = io[0][1].x[io[0][1].keep]
    after = []
    model.blocks[2].register_forward_pre_hook(noise)
    model.blocks[2].register_forward_hook(lambda m, args, out: after.append(out))
    noisy = model(video)
    assert diff(after[0].x[after[0].keep], live_out) <= ATOL
    assert diff(noisy, logits) <= ATOL


@pytest.mark.parametrize("sampling", SAMPLINGS)
@torch.no_grad()
def test_divided_each_clip_alone_equals_batched(sampling):
    model = build_divided(sampling)
    video = clips()
    batched, counts = model(video), model.last_token_counts.clone()
    alone = torch.cat([model(video[i:i + 1]) for i in range(video.shape[0])])
    assert diff(batched, alone) <= ATOL
    model(video)
    assert torch.equal(model.last_token_counts, counts) and len(set(counts[:, -1, 1].tolist())) > 1


@torch.no_grad()
def test_divided_sampling_scopes():
    """per_frame samples B * T sequences of 1 + N tokens (ids 0..N), each frame at most N patches; space_time samples
    B sequences over the clip's 1 + N * T tokens (M = N * T): its kept patches spread unevenly over the frames."""
    video = clips()
    frame = build_divided("per_frame")
    frame(video)
    s = frame.samplers()[0]
    assert s.last_kept_ids.shape[0] == video.shape[0] * T and int(s.last_kept_ids.max()) <= N
    clip = build_divided("space_time")
    clip(video)
    s = clip.samplers()[0]
    assert s.last_kept_ids.shape[0] == video.shape[0] and int(s.last_kept_ids.max()) > N
    per_frame_counts = [sorted(collections.Counter((int(i) - 1) % T for i in row if i > 0).values())
                        for row in s.last_kept_ids]
    assert any(c[0] != c[-1] for c in per_frame_counts)


@torch.no_grad()
def test_clip_attention_layout():
    """clip_attention against loops: patch n of frame t at 1 + n * T + t, weight = frame t's CLS row / T, its
    values; CLS = the frames' mean."""
    from vitadapt.models.video import clip_attention

    b, h, d = 2, 3, 5
    att = torch.rand(b * T, h, 1 + N)
    val = torch.randn(b * T, h, 1 + N, d)
    row, values = clip_attention(att, val, T)
    assert row.shape == (b, h, 1 + N * T) and values.shape == (b, h, 1 + N * T, d)
    for bi in range(b):
        for t in range(T):
            for n in range(N):
                assert torch.allclose(row[bi, :, 1 + n * T + t], att[bi * T + t, :, 1 + n] / T)
                assert torch.equal(values[bi, :, 1 + n * T + t], val[bi * T + t, :, 1 + n])
        assert torch.allclose(row[bi, :, 0], att[bi * T:(bi + 1) * T, :, 0].mean(dim=0))


@torch.no_grad()
@pytest.mark.parametrize("fused", [False, True])
def test_divided_macs_from_live_tokens(fused, monkeypatch):
    """Without ATS the count is the dense divided formula (timesformer_macs, = fvcore less its norms); with ATS every
    block's cost equals the formula written here from its input keep mask and the tokens left after it, plus each
    frame's CLS row as a side product where attention runs fused (explicit attention hands over its row 0)."""
    from vitadapt.models.video import timesformer_macs

    if fused:
        monkeypatch.setattr(vit_module, "SMALL_ATTENTION_LOGITS", 0)
    video = clips()
    dense = build_divided("per_frame", blocks=())
    dense(video)
    expected = timesformer_macs(dense, N, T)
    assert dense.macs_per_image().tolist() == [expected] * video.shape[0]
    model = build_divided("space_time")
    keeps = []
    for blk in model.blocks:
        blk.register_forward_hook(lambda m, args, out: keeps.append((args[0].live_mask(), out.live_mask())))
    model(video)
    c, hidden = DIM, model.blocks[0].mlp.fc1.out_features
    for blk, (live_in, live_out) in zip(model.blocks, keeps):
        p = live_in[:, 1:].reshape(-1, N, T).double()
        per_loc, per_frame = p.sum(dim=2), 1 + p.sum(dim=1)
        lp = p.sum(dim=(1, 2))
        ref = (5 * lp * c * c + 2 * (per_loc ** 2).sum(dim=1) * c + 4 * per_frame.sum(dim=1) * c * c
               + 2 * (per_frame ** 2).sum(dim=1) * c + 2 * live_out.sum(dim=1).double() * c * hidden)
        if fused and blk.adapter is not None and blk.adapter.needs_cls_attention:
            ref = ref + per_frame.sum(dim=1) * c
        torch.testing.assert_close(blk.last_macs, ref, atol=0, rtol=0)
    assert (model.macs_per_image() < expected).all()


@pytest.mark.parametrize("sampling", SAMPLINGS)
@torch.no_grad()
def test_divided_packed_equals_masked_and_computes_live_tokens_only(sampling):
    """Packed execution keeps the grid but runs every per-token layer (temporal qkv / proj / fc, spatial qkv / proj,
    the MLP) on the live tokens only: the same logits and kept tokens as masked execution (1e-5), fewer rows."""
    video = clips()
    rows = {}
    runs = {}
    for execution in EXECUTIONS:
        model = build_divided(sampling, execution=execution)
        seen = rows[execution] = []
        for layer in (model.blocks[3].temporal_attn.qkv, model.blocks[3].attn.qkv, model.blocks[3].mlp.fc1):
            layer.register_forward_hook(lambda m, args, out, seen=seen: seen.append(args[0].shape[:-1].numel()))
        runs[execution] = (model(video), model.last_token_counts.clone(), [kept_list(i) for i in
                                                                           model.samplers()[-1].last_kept_ids])
    assert diff(runs["packed"][0], runs["masked"][0]) <= ATOL
    assert torch.equal(runs["packed"][1], runs["masked"][1]) and runs["packed"][2] == runs["masked"][2]
    b = video.shape[0]
    assert rows["masked"] == [b * N * T, b * T * (1 + N), b * (1 + N * T)]  # the whole grid
    counts = runs["packed"][1][:, 3]  # block 3's live tokens at its attention and MLP
    live_in = int(counts[:, 0].sum())  # CLS + live patches per clip, before block 3's selection
    assert rows["packed"] == [live_in - b, live_in - b + b * T, int(counts[:, 1].sum())]
    assert rows["packed"][0] < rows["masked"][0]
