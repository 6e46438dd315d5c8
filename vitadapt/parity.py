"""Parity with the official implementations, on golden files recorded from their code (shared/golden).

Each method has one function that maps the file's official constructor arguments to a vitadapt config,
loads the official state_dict through vitadapt's converter, runs the recorded input and compares. A
comparison is a line `name: max |diff| = ...  OK|MISMATCH`; discrete decisions must match exactly,
floats within `FLOAT_ATOL` (golden/README.md).
"""

import os
from dataclasses import dataclass
from typing import Callable, Dict, List

import torch

from vitadapt.config import load_config
from vitadapt.errors import VitadaptError
from vitadapt.models import build_model
from vitadapt.models.convert import LoadReport, load_into_model

FLOAT_ATOL = 1e-4
# Stricter where a golden README asks for it (A-ViT: outputs 1e-5, losses 1e-6, gradients 1e-4 of their scale).
OUTPUT_ATOL = 1e-5
LOSS_ATOL = 1e-6
GRAD_RTOL = 1e-4


@dataclass
class Comparison:
    name: str
    max_diff: float
    ok: bool

    def line(self) -> str:
        return f"{self.name}: max |diff| = {self.max_diff:.3g}  {'OK' if self.ok else 'MISMATCH'}"


def compare_float(name: str, mine: torch.Tensor, ref: torch.Tensor, atol: float = FLOAT_ATOL,
                  rtol: float = 0.0) -> Comparison:
    """OK when every |mine - ref| <= atol + rtol * |ref| (torch.allclose's rule); the line shows max |diff|."""
    if mine.shape != ref.shape:
        return Comparison(f"{name} (shape {tuple(mine.shape)} vs {tuple(ref.shape)})", float("inf"), False)
    if not mine.numel():
        return Comparison(name, 0.0, True)
    diff = (mine.double() - ref.double()).abs()
    return Comparison(name, diff.max().item(), bool((diff <= atol + rtol * ref.double().abs()).all()))


def compare_exact(name: str, mine, ref) -> Comparison:
    equal = mine == ref if not torch.is_tensor(mine) else (mine.shape == ref.shape and torch.equal(mine, ref))
    if torch.is_tensor(mine) and mine.shape == ref.shape and mine.numel():
        diff = (mine.double() - ref.double()).abs().max().item()
    else:
        diff = 0.0 if equal else float("inf")
    return Comparison(name, diff, bool(equal))


def _official_model(opts: List[str], state_dict: dict, execution: str, extra=()):
    cfg = load_config("", list(opts) + ["NUM_GPUS", "0", "VIT.TOKEN_EXECUTION", execution] + list(extra))
    model = build_model(cfg).eval()
    load_into_model(model, state_dict, LoadReport("golden state_dict", "official layout"))
    return model


def _kept_sets(ids: torch.Tensor) -> List[List[int]]:
    return [sorted(i for i in row.tolist() if i >= 0) for row in ids]


@torch.no_grad()
def check_ats(golden: dict) -> List[Comparison]:
    from vitadapt.models.ats import convert_official_state_dict, official_to_config_opts

    opts = official_to_config_opts(golden["config"])
    sd = convert_official_state_dict(golden["state_dict"])
    images = golden["input"]
    official_batched = "batch_max" if golden["config"]["drop_tokens"] else "full"
    out: List[Comparison] = []
    for execution in ("packed", "masked"):
        # 1. The official batched run, replicated exactly (kept sets per stage and image, counts, logits).
        model = _official_model(opts, sd, execution, ["ATS.SCORE_PADDING", official_batched])
        logits = model(images)
        out.append(compare_float(f"[{execution}, {official_batched}] logits", logits, golden["logits"]))
        out.append(compare_exact(f"[{execution}, {official_batched}] num_kept", model.last_num_kept, golden["num_kept"]))
        for sampler, stage in zip(model.samplers(), golden["stages"]):
            out.append(compare_exact(f"[{execution}, {official_batched}] kept ids, block {stage['block']}",
                                     _kept_sets(sampler.last_kept_ids), _kept_sets(stage["kept_orig_ids"])))
        # 2. Per-image semantics: each image as the official code gives it alone (DROP_TOKENS True), whatever
        #    the batch; with DROP_TOKENS False the official run is already batch-independent.
        semantics = "none" if golden["config"]["drop_tokens"] else "full"
        model = _official_model(opts, sd, execution, ["ATS.SCORE_PADDING", semantics])
        batched = model(images)
        batched_kept = model.last_num_kept
        out.append(compare_float(f"[{execution}, {semantics}] logits vs logits_bs1", batched, golden["logits_bs1"]))
        out.append(compare_exact(f"[{execution}, {semantics}] num_kept vs num_kept_bs1", batched_kept,
                                 golden["num_kept_bs1"]))
        reverse = torch.arange(images.shape[0] - 1, -1, -1)
        out.append(compare_float(f"[{execution}, {semantics}] logits, batch reversed", model(images[reverse])[reverse],
                                 golden["logits_bs1"]))
        alone = torch.cat([model(images[i:i + 1]) for i in range(images.shape[0])])
        out.append(compare_float(f"[{execution}, {semantics}] logits, one image at a time", alone, golden["logits_bs1"]))
    return out


@torch.no_grad()
def check_evit(golden: dict) -> List[Comparison]:
    from vitadapt.models.evit import FUSED_ID, keep_rate_at, official_to_config_opts

    inter = golden["intermediates"]
    model = _official_model(official_to_config_opts(golden["config"]), golden["state_dict"], "packed")
    images = golden["input"]
    out = [compare_float("logits", model(images), golden["logits"])]
    counts = model.last_token_counts[0, :, 1] - 1  # non-CLS tokens after each block's reduction
    out.append(compare_exact("tokens left after each block", counts.tolist(), list(inter["left_tokens"])))
    for block, r in zip(model.locations, model.reorganizers()):
        out.append(compare_exact(f"kept ids, block {block} (official order)", r.last_index, inter["idx"][block]))
        if block in inter.get("fused_token", {}):
            out.append(compare_float(f"fused token, block {block}", r.last_fused, inter["fused_token"][block]))
    # Original patch of every kept token (-1: the fused token), through the token ids the container carries.
    model.trace_token_ids = True
    model(images)
    for block in model.locations:
        ids = model.last_token_ids[block][:, 1:]
        ids = ids[:, : inter["provenance_idx"][block].shape[1]]
        provenance = torch.where(ids > 0, ids - 1, torch.where(ids == FUSED_ID, -1, ids))
        out.append(compare_exact(f"kept original patches, block {block}", provenance, inter["provenance_idx"][block]))
    model.trace_token_ids = False
    model.set_keep_rate(inter["keep_rate_override"])
    out.append(compare_float(f"logits, runtime keep rate {inter['keep_rate_override']}", model(images),
                             inter["logits_keep_rate_override"]))
    out.append(compare_exact("tokens left, runtime keep rate", (model.last_token_counts[0, :, 1] - 1).tolist(),
                             list(inter["left_tokens_keep_rate_override"])))
    model.set_keep_rate(1.0)
    out.append(compare_float("logits, runtime keep rate 1 (no reduction)", model(images), inter["logits_keep_rate_1"]))
    a = golden["schedule"]["args"]
    rows = torch.tensor([r[2] for r in golden["schedule"]["rows"]], dtype=torch.float64)
    mine = torch.tensor([keep_rate_at(e, it, a["iters_per_epoch"], a["base_keep_rate"], a["shrink_start_epoch"],
                                      a["shrink_epochs"]) for e, it, _ in golden["schedule"]["rows"]],
                        dtype=torch.float64)
    out.append(compare_float(f"keep-rate warm-up schedule ({len(rows)} rows)", mine, rows, atol=1e-12))
    return out


def compare_gradients(name: str, grads: Dict[str, torch.Tensor], ref: Dict[str, torch.Tensor],
                      ref_none: List[str], rtol: float = GRAD_RTOL) -> List[Comparison]:
    """Every parameter's gradient within rtol of the largest reference gradient of that loss; the parameters the
    official code leaves without gradient must get none (or exactly zero) here too."""
    scale = max(g.abs().max().item() for g in ref.values())
    worst = max((grads[k] - g).abs().max().item() for k, g in ref.items()) if set(ref) <= set(grads) else float("inf")
    leaked = [k for k in ref_none if k in grads and bool(grads[k].abs().max() > 0)]
    # An all-zero reference (the loss reaches no parameter) must be matched exactly.
    relative = f"max |diff| / max |grad| = {worst / scale:.2g}" if scale > 0 else "reference all zero"
    return [Comparison(f"{name} gradients, {len(ref)} parameters ({relative})", worst, worst <= rtol * scale),
            Comparison(f"{name}: no gradient to the {len(ref_none)} parameters the official code leaves out"
                       + (f" (got one: {', '.join(leaked)})" if leaked else ""), float(len(leaked)), not leaked)]


def check_avit(golden: dict) -> List[Comparison]:
    import torch.nn.functional as F

    from vitadapt.models.avit import official_to_config_opts, prior_target

    opts = official_to_config_opts(golden["config"])
    images, labels, train = golden["input"], golden["labels"], golden["train"]
    out: List[Comparison] = []
    for execution in ("masked", "packed"):
        model = _official_model(opts, golden["state_dict"], execution)
        model.trace_token_ids = True
        with torch.no_grad():
            features = model.forward_features(images)
            logits = model.forward_head(features)
        tag = f"[{execution}]"
        out.append(compare_float(f"{tag} logits", logits, golden["logits"], atol=OUTPUT_ATOL))
        out.append(compare_float(f"{tag} ACT output after the final norm", features.x, golden["output_post_norm"],
                                 atol=OUTPUT_ATOL))
        out.append(compare_exact(f"{tag} per-token depth", model.last_depth, golden["counter_token"]))
        out.append(compare_float(f"{tag} rho (depth + remainder)", model.last_rho, golden["rho_token"], atol=OUTPUT_ATOL))
        # Halting masks: which tokens really ran each block (packed: the tokens left in the batch).
        running = torch.zeros_like(golden["mask_in"])
        running[:, 0] = 1
        for block, ids in enumerate(model.last_token_ids[:-1]):
            valid = ids >= 0
            rows = torch.arange(ids.shape[0])[:, None].expand_as(ids)[valid]
            running[rows, block + 1, ids[valid]] = 1
        out.append(compare_exact(f"{tag} halting masks (tokens entering each block)", running, golden["mask_in"]))
        tokens_per_block = features.counts_per_block()[..., 0].to(golden["active_tokens_per_layer"].dtype)
        out.append(compare_exact(f"{tag} live tokens per block", tokens_per_block, golden["active_tokens_per_layer"]))

        target = prior_target(len(model.blocks), model.prior_target_depth, official=True)
        out.append(compare_float(f"{tag} prior target", target, golden["distr_target"], atol=1e-7))
        model.train()  # every drop rate is 0: train mode only switches the losses on
        logits = model(images)
        ce = F.cross_entropy(logits, labels)
        aux = model.auxiliary_losses()
        prior = aux.get("halting_prior", torch.zeros(()))
        out.append(compare_float(f"{tag} train logits", logits, train["logits_train"], atol=OUTPUT_ATOL))
        out.append(compare_float(f"{tag} CE", ce, train["base_ce"], atol=LOSS_ATOL))
        out.append(compare_float(f"{tag} ponder loss", aux["ponder"], train["ponder_loss"], atol=LOSS_ATOL))
        out.append(compare_float(f"{tag} per-block halting scores", model.last_halting_scores,
                                 train["halting_score_layer"], atol=LOSS_ATOL))
        out.append(compare_float(f"{tag} prior loss", model.halting_prior(model.last_halting_scores),
                                 train["distr_prior_loss"], atol=LOSS_ATOL))
        out.append(compare_exact(f"{tag} prior added", bool(prior.requires_grad), bool(train["distr_prior_loss_added"])))
        total = ce + sum(aux.values())
        out.append(compare_float(f"{tag} total loss", total, train["total_loss"], atol=LOSS_ATOL))
        names, params = zip(*model.named_parameters())
        for name, loss in (("total", total), ("ponder", aux["ponder"]), ("distr", prior)):
            # A loss with no graph (e.g. ponder when every token halts at the first block) has zero gradients.
            grads = (torch.autograd.grad(loss, params, allow_unused=True, retain_graph=True) if loss.requires_grad
                     else [None] * len(params))
            grads = {k: torch.zeros_like(p) if g is None else g for k, p, g in zip(names, params, grads)}
            out += compare_gradients(f"{tag} {name}", grads, golden["grads"][name], golden["grads"][name + "_none"])
    return out


def check_adavit(golden: dict) -> List[Comparison]:
    """Eval decisions, logits, per-block outputs, official GFLOPs and usage losses in masked and packed execution;
    train mode (always the masked computation) replaying the recorded Gumbel draws: logits, decisions, both loss
    settings and their gradients."""
    import torch.nn.functional as F

    from vitadapt.models.adavit import official_to_config_opts
    from vitadapt.models.adavit_costs import UsageLossWeights, usage_loss

    config, images, labels = golden["config"], golden["input"], golden["labels"]
    settings = {name: UsageLossWeights.from_adaloss_kwargs(kwargs) for name, kwargs in config["losses"].items()}
    names = ("head_select", "layer_select", "token_select")
    out: List[Comparison] = []

    def compare_decisions(tag: str, mine: dict, ref: dict) -> None:
        for name in names:
            if ref.get(name) is None:
                continue
            out.append(compare_exact(f"{tag} {name}", (mine[name] > 0.5).to(torch.uint8), (ref[name] > 0.5).to(torch.uint8)))
        for name in ("head_select_logits", "layer_select_logits", "token_select_logits"):
            if ref.get(name) is not None:
                out.append(compare_float(f"{tag} {name}", mine[name], ref[name], atol=OUTPUT_ATOL))

    def losses(tag: str, logits: torch.Tensor, decisions: dict, ref: dict) -> Dict[str, torch.Tensor]:
        totals = {}
        for setting, weights in settings.items():
            terms = usage_loss(decisions["head_select"], decisions["layer_select"], decisions["token_select"],
                               decisions["head_select_logits"], decisions["layer_select_logits"], weights)
            ce = F.cross_entropy(logits, labels)
            totals[setting] = ce + terms["head"] + terms["layer"] + terms["token"]
            expected = ref[setting]
            out.append(compare_float(f"{tag} {setting} task loss", ce, expected["base_loss"], atol=LOSS_ATOL))
            for name in ("head", "layer", "token"):  # the golden records each term before its ratio
                ratio = getattr(weights, f"{name}_ratio")
                if ratio > 0:
                    out.append(compare_float(f"{tag} {setting} {name} usage loss", terms[name] / ratio,
                                             expected[f"{name}_loss"], atol=LOSS_ATOL))
            out.append(compare_float(f"{tag} {setting} total loss", totals[setting], expected["total"], atol=LOSS_ATOL))
        return totals

    for execution in ("masked", "packed"):
        tag = f"[{execution}]"
        model = _official_model(official_to_config_opts(config), golden["state_dict"], execution)
        model.trace_hidden = True
        with torch.no_grad():
            logits = model(images)
        out.append(compare_float(f"{tag} logits", logits, golden["logits"], atol=OUTPUT_ATOL))
        decisions = model.stacked_decisions()
        compare_decisions(tag, decisions, golden)
        out.append(compare_float(f"{tag} output of every block", torch.stack(model.last_hidden, dim=1),
                                 golden["hidden"], atol=OUTPUT_ATOL))
        out.append(compare_float(f"{tag} official GFLOPs per image", model.official_gflops(), golden["gflops"],
                                 atol=1e-7))
        losses(f"{tag} eval", logits, decisions, golden["losses_eval"])

        train = golden["train"]
        calls = iter(train["gumbel_calls"])

        def replay(name: str, logits: torch.Tensor):
            call = next(calls)
            if call["module"] != name:
                raise ValueError(f"Gumbel draw for {call['module']} recorded, {name} asked for")
            return call["gumbel1"].reshape(logits.shape), call["gumbel2"].reshape(logits.shape)

        model.noise_source = replay
        model.train()  # every drop rate is 0: train mode switches on the Gumbel noise
        logits = model(images)
        decisions = model.stacked_decisions()
        out.append(compare_float(f"{tag} train logits", logits, train["logits"], atol=OUTPUT_ATOL))
        compare_decisions(f"{tag} train", decisions, train)
        totals = losses(f"{tag} train", logits, decisions, train["losses"])
        params = dict(model.named_parameters())
        for setting, total in totals.items():
            trainable = {k: p for k, p in params.items() if p.requires_grad}
            grads = dict(zip(trainable, torch.autograd.grad(total, list(trainable.values()), retain_graph=True,
                                                            allow_unused=True)))
            grads = {k: torch.zeros_like(params[k]) if g is None else g for k, g in grads.items()}
            reference = model.adapt_official_state_dict(golden["grads"][setting], LoadReport("golden grads"))
            none = [k for k in golden["grads"][setting + "_none"]]
            out += compare_gradients(f"{tag} {setting}", grads, reference, none)
            frozen = [k for k in none if k in params and params[k].requires_grad]  # buffers are frozen
            out.append(Comparison(f"{tag} {setting}: frozen parameters ({', '.join(none)})", float(len(frozen)),
                                  not frozen))
    return out


def _items(per_block):
    """(block, value) pairs of a golden per-block entry, stored as a list or as a dict keyed by block."""
    return per_block.items() if isinstance(per_block, dict) else enumerate(per_block)


def _spread_thresholds(confidences: List[torch.Tensor]) -> List[float]:
    """Thresholds under which about half the images stop at exit 1 and half of the rest at exit 2 (midpoints
    between sorted confidences, so that no image sits on a threshold)."""
    thresholds, waiting = [], torch.ones_like(confidences[0], dtype=torch.bool)
    for conf in confidences[:-1]:
        values = conf[waiting].sort(descending=True).values
        if values.numel() < 2:  # one image left: well under its confidence, which a batch of 1 may round differently
            thresholds.append(float(values.min()) / 2 if values.numel() else 1.0)
        else:
            half = values.numel() // 2
            thresholds.append(float(values[half - 1] + values[half]) / 2)
        waiting &= conf < thresholds[-1]
    return thresholds


@torch.no_grad()
def check_dvt(golden: dict) -> List[Comparison]:
    from vitadapt.engine.budgeted import replay_official
    from vitadapt.models.dvt import official_to_config_opts

    model = _official_model(official_to_config_opts(golden["config"]), golden["state_dict"], "packed")
    model.trace = True
    images, inter = golden["input"], golden["intermediates"]
    model(images)
    exits, traces = model.last_exit_logits, model.last_trace
    out: List[Comparison] = []
    for k, (logits, trace) in enumerate(zip(exits, traces)):
        tag = f"exit {k + 1} ({inter['token_grid'][k]}x{inter['token_grid'][k]})"
        out.append(compare_float(f"{tag} logits", logits, golden["logits"][k], OUTPUT_ATOL))
        out.append(compare_float(f"{tag} pre-logits", trace["pre_logits"], inter["pre_logits"][k], OUTPUT_ATOL))
        out.append(compare_float(f"{tag} stage features", trace["features"], inter["stage_features"][k], OUTPUT_ATOL))
        if k < len(inter["relations_out"]):
            diffs = [compare_float("", mine, ref, OUTPUT_ATOL)
                     for mine, ref in zip(trace["relations"], inter["relations_out"][k])]
            out.append(Comparison(f"{tag} relation logits, {len(diffs)} blocks", max(d.max_diff for d in diffs),
                                  len(diffs) == len(inter["relations_out"][k]) and all(d.ok for d in diffs)))
        if k == 0:
            continue
        for block, ref in _items(inter["relation_bias"][k - 1]):
            out.append(compare_float(f"{tag} relation bias, block {block}", trace["relation_bias"][block], ref,
                                     OUTPUT_ATOL))
        for block, ref in _items(inter["relation_bias_stats"][k - 1]):
            bias = trace["relation_bias"][block].double()
            mine = torch.stack([bias.sum(), bias.abs().sum(), bias.min(), bias.max()])
            # Sums over every element: the tolerance scales with the abs-sum (float32 accumulation).
            scale = torch.tensor([ref[1], ref[1], 1.0, 1.0], dtype=torch.float64)
            diff = ((mine - ref.double()).abs() / scale).max().item()
            out.append(Comparison(f"{tag} relation bias stats (sum, abs-sum, min, max; sums relative), block {block}",
                                  diff, diff <= OUTPUT_ATOL))
        diffs = [compare_float("", trace["reused_features"][block], ref, OUTPUT_ATOL)
                 for block, ref in _items(inter["reused_features"][k - 1])]
        out.append(Comparison(f"{tag} reused features, {len(diffs)} blocks", max(d.max_diff for d in diffs),
                              all(d.ok for d in diffs)))
    # Real early exit: each image's logits and exit equal running every exit and choosing afterwards.
    confidences = [logits.softmax(dim=-1).amax(dim=-1) for logits in exits]
    thresholds = _spread_thresholds(confidences)
    simulated = torch.full_like(confidences[0], len(exits) - 1, dtype=torch.long)
    for k in reversed(range(len(exits) - 1)):
        simulated[confidences[k] >= thresholds[k]] = k
    model.trace = False
    model.set_thresholds(thresholds)
    early = model(images)
    out.append(compare_exact(f"early exit: exit per image at thresholds {[round(t, 4) for t in thresholds]}",
                             model.last_exit, simulated))
    chosen = torch.stack([exits[int(k)][i] for i, k in enumerate(simulated)])
    out.append(compare_float("early exit: logits of the exit each image stopped at", early, chosen, OUTPUT_ATOL))
    if "budgeted_batch" in golden:
        out += _compare_budgeted_batch(golden["budgeted_batch"], replay_official(golden["budgeted_batch"]))
    return out


def _compare_budgeted_batch(ref: dict, mine: dict) -> List[Comparison]:
    """The official threshold search and budgeted evaluation replayed on the golden's stored softmax outputs:
    everything must be equal (pure comparisons and sorts on the same float32 numbers)."""
    # The proportions are float32 exp / log, which an MKL build of torch computes on a CPU-specific code path: the
    # last bits may differ from the golden machine's (bit-for-bit under MKL_CBWR=COMPATIBLE); the decisions below
    # must still be equal.
    ulp = torch.finfo(torch.float32).eps
    out = [compare_float("budgeted batch: exit proportions [59, 3] (float32 exp/log, within 2 ulp)",
                         mine["exit_probs"], ref["exit_probs"], atol=0.0, rtol=2 * ulp),
           compare_exact("budgeted batch: thresholds (dynamic_threshold) [59, 3]", mine["dynamic_threshold"],
                         ref["dynamic_threshold"]),
           compare_exact("budgeted batch: exit of every test sample [59, n]", mine["exit_index"], ref["exit_index"])]
    (flops, acc), (ref_flops, ref_acc) = mine["budgeted_batch_classification"], ref["budgeted_batch_classification"]
    out.append(compare_exact("budgeted batch: expected GFLOPs, 59 points", torch.tensor(flops, dtype=torch.float64),
                             torch.tensor(ref_flops, dtype=torch.float64)))
    out.append(compare_exact("budgeted batch: top-1 accuracy, 59 points", torch.tensor(acc, dtype=torch.float64),
                             torch.tensor(ref_acc, dtype=torch.float64)))
    # The official anytime accuracy is a float32 per-batch average; the counts behind it are exact.
    n = ref["test_targets"].numel()
    counts = torch.tensor([round(a * n / 100) for a in ref["anytime_classification"]])
    out.append(compare_exact("anytime accuracy: correct test samples per exit",
                             torch.tensor(mine["anytime_correct"]), counts))
    return out


# ------------------------------------------------------------------ video backbones (golden/video/README.md)
VIDEO_ATOL = VIDEO_RTOL = 1e-5  # the video goldens' recommended atol = rtol (fp32)
FP64_ATOL = 1e-9


def _timesformer_opts(config: dict) -> List[str]:
    """vitadapt config overrides for the official TimeSformer VisionTransformer arguments of a golden file."""
    if config.get("norm_layer_eps", 1e-6) != 1e-6 or config.get("qk_scale") is not None:
        raise GoldenFileError("a TimeSformer golden with LayerNorm eps != 1e-6 or an explicit qk_scale: the official "
                              "wrappers never build one, vitadapt does not either")
    return ["MODEL.NAME", "TimeSformer", "MODEL.NUM_CLASSES", str(config["num_classes"]),
            "DATA.TRAIN_CROP_SIZE", str(config["img_size"]), "DATA.TEST_CROP_SIZE", str(config["img_size"]),
            "DATA.NUM_FRAMES", str(config["num_frames"]), "VIT.PATCH_SIZE", str(config["patch_size"]),
            "VIT.IN_CHANS", str(config["in_chans"]), "VIT.EMBED_DIM", str(config["embed_dim"]),
            "VIT.DEPTH", str(config["depth"]), "VIT.NUM_HEADS", str(config["num_heads"]),
            "VIT.MLP_RATIO", str(config["mlp_ratio"]), "VIT.QKV_BIAS", str(config["qkv_bias"]),
            "VIT.DROP_PATH_RATE", str(config["drop_path_rate"]),
            "TIMESFORMER.ATTENTION_TYPE", config["attention_type"]]


def _xvit_opts(config: dict, state_dict: dict) -> List[str]:
    """vitadapt config overrides for a golden's official XViT cfg overrides and timm backbone arguments."""
    official = dict(zip(config["cfg_overrides"][::2], config["cfg_overrides"][1::2]))
    backbone = dict(config["backbone_kwargs"])
    unknown = set(backbone) - {"patch_size", "embed_dim", "depth", "num_heads", "num_frames", "mlp_ratio",
                               "qkv_bias"}
    if unknown or official.get("XVIT.CONSENSUS_TYPE", "vit") != "vit":
        raise GoldenFileError(f"an XViT golden with backbone arguments {sorted(unknown)} or a consensus other than "
                              "'vit': not an XViT layout vitadapt builds")
    patch = backbone["patch_size"]
    side = int(round((state_dict["base_model.pos_embed"].shape[1] - 1) ** 0.5))
    opts = {"MODEL.NAME": "XViT", "MODEL.NUM_CLASSES": official["MODEL.NUM_CLASSES"],
            "DATA.NUM_FRAMES": official["DATA.NUM_FRAMES"], "DATA.TRAIN_CROP_SIZE": official["DATA.TRAIN_CROP_SIZE"],
            "DATA.TEST_CROP_SIZE": official["DATA.TEST_CROP_SIZE"], "VIT.PATCH_SIZE": patch,
            "VIT.EMBED_DIM": backbone["embed_dim"], "VIT.DEPTH": backbone["depth"],
            "VIT.NUM_HEADS": backbone["num_heads"], "VIT.MLP_RATIO": backbone.get("mlp_ratio", 4.0),
            "VIT.QKV_BIAS": backbone.get("qkv_bias", True), "XVIT.NUM_FRAMES_EMBED": backbone.get("num_frames", 8),
            "XVIT.POS_EMBED_IMG_SIZE": side * patch, "XVIT.DROPOUT_RATE": official.get("MODEL.DROPOUT_RATE", 0.5)}
    for key in ("XVIT.USE_XVIT", "XVIT.NUM_SEGMENTS", "XVIT.SHIFT_DIV", "XVIT.LOCATIONS_LIST",
                "TEMPORAL_HEAD.NUM_ATTENTION_HEADS", "TEMPORAL_HEAD.NUM_HIDDEN_LAYERS", "TEMPORAL_HEAD.MLP_DIM"):
        if key in official:
            opts[key] = official[key]
    if official.get("TEMPORAL_HEAD.HIDDEN_DIM", backbone["embed_dim"]) != backbone["embed_dim"]:
        raise GoldenFileError("TEMPORAL_HEAD.HIDDEN_DIM differs from the backbone width (the official head needs them "
                              "equal)")
    return [str(v) for kv in opts.items() for v in kv]


def _record_outputs(model, names) -> Dict[str, list]:
    """Forward hooks keeping, per module name, the tensor output of every call (first element of a tuple; the
    tokens of a TokenBatch)."""
    records: Dict[str, list] = {}

    def keep(name):
        def hook(module, inputs, output):
            out = output[0] if isinstance(output, tuple) else getattr(output, "x", output)
            records.setdefault(name, []).append(out.detach())
        return hook

    for name, module in model.named_modules():
        if name in names:
            module.register_forward_hook(keep(name))
    return records


def _video_logits_checks(model, golden: dict) -> List[Comparison]:
    """Logits with the fused kernel (what runs by default), each clip alone, and in float64."""
    clips = golden["input"]
    out = [compare_float("logits", model(clips), golden["logits"], VIDEO_ATOL, VIDEO_RTOL)]
    if "logits_bs1" in golden:
        alone = torch.cat([model(clips[i:i + 1]) for i in range(clips.shape[0])])
        out.append(compare_float("logits, each clip alone", alone, golden["logits_bs1"], VIDEO_ATOL, VIDEO_RTOL))
    if "logits_fp64" in golden:
        model.double()
        out.append(compare_float("logits in float64", model(clips.double()), golden["logits_fp64"], FP64_ATOL))
        model.float()
    return out


def check_timesformer(golden: dict) -> List[Comparison]:
    if "image_state_dict" in golden:
        return check_timesformer_inflation(golden)
    opts = _timesformer_opts(golden["config"])
    model = _official_model(opts, golden["state_dict"], "packed")
    out = _video_logits_checks(model, golden)
    # Per block, with the official order of operations (VIT.FUSED_ATTENTION False): the fused kernel's blocked
    # softmax differs from it by float rounding that sharp attention amplifies (see MODEL_ZOO.md, video parity).
    model = _official_model(opts, golden["state_dict"], "packed", ["VIT.FUSED_ATTENTION", "False"])
    inter = golden["intermediates"]
    depth = len(model.blocks)
    names = [f"blocks.{i}" for i in range(depth)]
    names += [f"blocks.{i}.{part}" for i in range(depth) for part in ("attn", "temporal_attn", "temporal_fc")]
    records = _record_outputs(model, set(names))
    embedded = model.embed(golden["input"]).x
    out.append(compare_float("embed tokens (official token order)", embedded, inter["embed_tokens"], VIDEO_ATOL,
                             VIDEO_RTOL))
    out.append(compare_float("logits, explicit attention", model(golden["input"]), golden["logits"], VIDEO_ATOL,
                             VIDEO_RTOL))
    for key, part in (("temporal_attn_out", "temporal_attn"), ("temporal_fc_out", "temporal_fc"),
                      ("spatial_attn_out", "attn"), ("block_out", None)):
        for i, ref in _items(inter.get(key, [])):
            name = f"blocks.{i}" + (f".{part}" if part else "")
            mine = records[name][0]
            if part == "temporal_fc":  # run per location, [B * N, T, C]: the official [B, N * T, C] in the same order
                mine = mine.reshape(ref.shape)
            out.append(compare_float(f"{key}, block {i}", mine, ref, VIDEO_ATOL, VIDEO_RTOL))
    features = model.forward_features(golden["input"]).cls_tokens()
    out.append(compare_float("features (norm, CLS)", features, inter["features"], VIDEO_ATOL, VIDEO_RTOL))
    layout = golden.get("token_layout")
    if layout is not None:  # (h, w, t) of token k = 1 + (h * Wp + w) * T + t, the order the blocks assume
        t, wp = model.num_frames, model.patch_grid[1]
        k = torch.arange(layout.shape[0])
        mine = torch.stack([k // t // wp, k // t % wp, k % t], dim=1)
        out.append(compare_exact("token layout (h, w, t)", mine, layout.long()))
    zero_at_init = golden.get("official_init_zero", {})
    if zero_at_init:
        fresh = dict(build_model(load_config("", opts + ["NUM_GPUS", "0"])).state_dict())
        mine = {k: bool((fresh[k] == 0).all()) for k in zero_at_init}
        out.append(compare_exact("zero at initialisation (time_embed, every temporal_fc)", mine, dict(zero_at_init)))
    return out


def check_timesformer_inflation(golden: dict) -> List[Comparison]:
    """An ImageNet ViT inflated into TimeSformer through the loader every job uses: each key's source as the
    official load_report records it, then the logits (keys the report keeps at the model's own initialisation
    and that the official init does not zero, i.e. the new classifier, are the golden's)."""
    opts = _timesformer_opts(golden["config"])
    model = build_model(load_config("", opts + ["NUM_GPUS", "0"])).eval()
    init = {k: v.clone() for k, v in model.state_dict().items()}
    report = load_into_model(model, golden["image_state_dict"], LoadReport("image ViT", "golden"),
                             reset_head_on_mismatch=True)
    loaded, image, ref = model.state_dict(), golden["image_state_dict"], golden["state_dict"]
    groups: Dict[str, List[bool]] = {}
    for key, how in golden["load_report"].items():
        if how.startswith("copied "):
            kind, ok = "copied from the image checkpoint", torch.equal(loaded[key], image[how[len("copied "):]])
            if ".temporal_" in key:
                kind = "temporal_attn / temporal_norm1 from attn / norm1"
        elif how.startswith("kept model init"):
            kind = "kept at the model's initialisation"
            ok = torch.equal(loaded[key], init[key]) and (key.startswith("head.") or torch.equal(loaded[key], ref[key]))
        else:  # the resized pos_embed
            kind, ok = f"{key}: {how.split(' [')[0]}", torch.equal(loaded[key], ref[key])
        groups.setdefault(kind, []).append(ok)
    out = [compare_exact(f"load report: {kind} ({sum(oks)} of {len(oks)} keys)", all(oks), True)
           for kind, oks in groups.items()]
    out.append(compare_exact("inflation reported", any("inflated" in line for line in report.converted), True))
    model.head.load_state_dict({"weight": ref["head.weight"], "bias": ref["head.bias"]})
    out.append(compare_float("logits of the inflated model", model(golden["input"]), golden["logits"], VIDEO_ATOL,
                             VIDEO_RTOL))
    return out


def check_xvit(golden: dict) -> List[Comparison]:
    from vitadapt.models.video import TemporalShift, frames_of

    opts = _xvit_opts(golden["config"], golden["state_dict"])
    model = _official_model(opts, golden["state_dict"], "packed")
    out = _video_logits_checks(model, golden)
    model = _official_model(opts, golden["state_dict"], "packed", ["VIT.FUSED_ATTENTION", "False"])
    inter, base = golden["intermediates"], model.base_model
    depth = len(base.blocks)
    records = _record_outputs(model, {f"base_model.blocks.{i}" for i in range(depth)} | {"consensus"})
    features_in = []
    model.consensus.register_forward_pre_hook(lambda module, args: features_in.append(args[0].detach()))
    out.append(compare_float("logits, explicit attention", model(golden["input"]), golden["logits"], VIDEO_ATOL,
                             VIDEO_RTOL))
    frames = frames_of(golden["input"])
    out.append(compare_float("frames (row b * T + t)", frames, inter["frames_flat"], 0.0))
    grid = tuple(s // base.patch_embed.patch_size[0] for s in frames.shape[-2:])
    out.append(compare_float("pos_embed resized in the forward", base.pos_embed_at(grid), golden["pos_embed_used"],
                             VIDEO_ATOL, VIDEO_RTOL))
    out.append(compare_float("patch tokens", base.patch_embed(frames), inter["patch_tokens"], VIDEO_ATOL, VIDEO_RTOL))
    out.append(compare_float("embed tokens (pos + temp_embed)", base.embed(frames).x, inter["embed_tokens"],
                             VIDEO_ATOL, VIDEO_RTOL))
    shift = base.blocks[0].attn.kv_mixing or TemporalShift(1, 2)
    for name in ("k", "v"):
        out.append(compare_float(f"block 0 {name} after the space-time mixing shift",
                                 shift(inter[f"blk0_{name}_in"]), inter[f"blk0_{name}_shifted"], 0.0))
    for i, ref in _items(inter["block_out"]):
        out.append(compare_float(f"block_out, block {i}", records[f"base_model.blocks.{i}"][0], ref, VIDEO_ATOL,
                                 VIDEO_RTOL))
    out.append(compare_float("temporal head input (frame features)", features_in[0], inter["consensus_in"],
                             VIDEO_ATOL, VIDEO_RTOL))
    return out


def check_video(golden: dict) -> List[Comparison]:
    return check_xvit(golden) if "cfg_overrides" in golden["config"] else check_timesformer(golden)


# Which method a golden file belongs to, from its official constructor arguments.
PARITY_CHECKS: Dict[str, Callable[[dict], List[Comparison]]] = {"ats": check_ats, "evit": check_evit,
                                                                "avit": check_avit, "adavit": check_adavit,
                                                                "dvt": check_dvt, "video": check_video}
# Every kind of file in shared/golden, by name; those without an entry in PARITY_CHECKS are "not supported yet".
GOLDEN_KINDS = {"ats": "ATS", "evit": "EViT", "avit": "A-ViT", "adavit": "AdaViT", "dvt": "DVT",
                "video": "video backbone (TimeSformer / XViT)"}
# Entries every golden file has; a file without them was not written by the golden harnesses.
REQUIRED_ENTRIES = ("config", "input", "state_dict")


class GoldenFileError(VitadaptError, ValueError):
    """A file that is not a golden file vitadapt can read (missing, not a torch.save file, entries missing)."""


class NotSupportedYet(VitadaptError):
    """A golden file of a method (or video backbone) that vitadapt has no parity check for yet."""

    def __init__(self, kind: str):
        self.kind = kind
        supported = ", ".join(GOLDEN_KINDS[k] for k in PARITY_CHECKS)
        super().__init__(f"{GOLDEN_KINDS[kind]} golden file; vitadapt has parity checks for {supported} only")


def detect_method(golden: dict) -> str:
    """The GOLDEN_KINDS key of a loaded golden file, from the official constructor arguments in its 'config'."""
    config = golden.get("config")
    if not isinstance(config, dict):
        raise GoldenFileError("not a golden file: no 'config' dict with the official constructor arguments "
                              f"(top-level entries: {', '.join(map(str, golden)) or 'none'})")
    if "ats_blocks" in config:
        return "ats"
    if "fuse_token" in config.get("ctor", {}):
        return "evit"
    if "gate_scale" in config.get("args", {}):
        return "avit"
    if "ada_token" in config.get("constructor", ()):  # MengLcool/AdaViT
        return "adavit"
    if "less_less_token" in config.get("ctor", ()):  # DVT's three cascaded ViTs
        return "dvt"
    if "num_frames" in config or "DATA.NUM_FRAMES" in config.get("cfg_overrides", ()):  # TimeSformer, XViT
        return "video"
    raise GoldenFileError("cannot tell which method this golden file is for (no known constructor arguments in "
                          f"'config'); known: {', '.join(GOLDEN_KINDS.values())}")


def load_golden(path: str) -> dict:
    """The golden file at `path`, or a GoldenFileError that says in one line what is wrong with it."""
    if not os.path.exists(path):
        raise GoldenFileError("no such file")
    if os.path.isdir(path):
        raise GoldenFileError("is a folder, not a .pt file")
    if os.path.getsize(path) == 0:
        raise GoldenFileError("empty file (0 bytes)")
    try:
        golden = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as e:
        raise GoldenFileError(f"cannot read it: {e.strerror or e}") from None
    except Exception as e:  # noqa: BLE001  torch.load turns foreign bytes into pickle, zip, Key or Runtime errors
        reason = str(e).strip().split("\n")[0].split(". ")[0][:120]
        raise GoldenFileError("not a torch.save file of tensors and plain containers (torch.load with "
                              f"weights_only=True: {type(e).__name__}{': ' + reason if reason else ''})") from None
    if not isinstance(golden, dict):
        raise GoldenFileError(f"not a golden file: holds a {type(golden).__name__}, not a dict")
    return golden


def check_file(path: str) -> List[Comparison]:
    """Every comparison for the golden file at `path`. Raises GoldenFileError for a file that is not a (complete)
    golden file and NotSupportedYet for one of a method vitadapt has no parity check for."""
    golden = load_golden(path)
    method = detect_method(golden)
    if method not in PARITY_CHECKS:
        raise NotSupportedYet(method)
    missing = [k for k in REQUIRED_ENTRIES if k not in golden]
    if missing:
        raise GoldenFileError(f"not a complete {GOLDEN_KINDS[method]} golden file: no {', '.join(map(repr, missing))} "
                              "entry")
    try:
        return PARITY_CHECKS[method](golden)
    except VitadaptError:
        raise
    except KeyError as e:  # an entry the harness always writes (nested ones included) is missing
        raise GoldenFileError(f"not a complete {GOLDEN_KINDS[method]} golden file: no {e} entry") from None
    except (AssertionError, AttributeError, IndexError, RuntimeError, TypeError, ValueError) as e:
        # Entries of the wrong type or shape for the file's own config (e.g. an input of another size): one line
        # naming what failed, rather than a traceback from deep inside the model.
        reason = str(e).strip().split("\n")[0][:160]
        raise GoldenFileError(f"its entries do not fit its 'config' ({type(e).__name__}: {reason})") from None
