"""vitadapt from Python: models by name, a timm ViT turned into any method, and the cost of the last forward.

    import vitadapt
    model = vitadapt.create_model("evit_deit_small_patch16_224_keep0.7", checkpoint="evit-0.7.pth")
    logits = model(images)
    vitadapt.cost(model)["gmacs"]            # [B] GMACs of each image of that forward

    deit = timm.create_model("deit_small_patch16_224", pretrained=True)
    evit = vitadapt.adapt(deit, "evit", keep_rate=0.7)

Names come from the shipped configs (configs/ImageNet, configs/Kinetics): a model's name is its config file's
name in lower case, with the DeiT sizes spelled as timm spells them (DeiT_S -> deit_small_patch16_224), so
configs/ImageNet/ATS_DeiT_S.yaml is "ats_deit_small_patch16_224". The configs are read from the source checkout
this package is installed from (pip install -e .).

Nothing here is a second implementation: models are built by `build_model` from `load_config`, weights are loaded
by `load_weights` (the test job's loader, official layouts included), a timm model's weights by `load_into_model`
(the conversion official DeiT files go through), and costs are what the test job logs.
"""

import difflib
import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Optional

from vitadapt.errors import VitadaptError

if TYPE_CHECKING:  # torch is imported by the functions that need it: `import vitadapt` stays light
    from torch import Tensor

logger = logging.getLogger(__name__)

CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"
ZOO_FOLDERS = ("ImageNet", "Kinetics")
# Config file names spell the DeiT sizes short; model names use timm's names for the same backbones.
BACKBONE_NAMES = {"DeiT_Ti": "deit_tiny_patch16_224", "DeiT_S": "deit_small_patch16_224",
                  "DeiT_B": "deit_base_patch16_224"}

# adapt(): method -> (MODEL.NAME, the config node of its options).
METHODS = {"deit": ("VisionTransformer", None), "none": ("VisionTransformer", None),
           "ats": ("ATSVisionTransformer", "ATS"), "evit": ("EViTVisionTransformer", "EVIT"),
           "avit": ("AViTVisionTransformer", "AVIT"), "adavit": ("AdaViTVisionTransformer", "ADAVIT")}
LAYER_NORM_EPS = 1e-6  # the backbone's LayerNorm eps (DeiT / timm)
# What the forward of each model family records, and cost() reads: image ViTs their live tokens per block, video
# models the clip shape, DVT the exit of each image.
FORWARD_RECORDS = ("last_token_counts", "last_clip_shape", "last_exit")
# adapt(): the timm pretrained_cfg entries of the eval preprocessing -> the config keys of vitadapt's eval transform.
TIMM_DATA_KEYS = {"mean": "DATA.MEAN", "std": "DATA.STD", "crop_pct": "DATA.IN_VAL_CROP_RATIO",
                  "interpolation": "DATA.INTERPOLATION"}


class UnsupportedModelError(VitadaptError, ValueError):
    """adapt() was given a model that vitadapt cannot run exactly; the message says why."""


# ------------------------------------------------------------------ names


def model_name(config_stem: str) -> str:
    """The model name of a config file name (without .yaml): lower case, DeiT sizes as timm names them."""
    for short, full in BACKBONE_NAMES.items():
        config_stem = re.sub(rf"(?<![^_]){short}(?![^_])", full, config_stem)
    return config_stem.lower()


def config_files() -> Dict[str, Path]:
    """{model name: config file} for every config in configs/ImageNet and configs/Kinetics."""
    if not CONFIGS_DIR.is_dir():
        raise VitadaptError(f"vitadapt's configs folder is not at {CONFIGS_DIR}: model names are read from the YAML "
                            "configs of the source checkout; install vitadapt from it with `pip install -e .`")
    found: Dict[str, Path] = {}
    for folder in ZOO_FOLDERS:
        for path in sorted((CONFIGS_DIR / folder).rglob("*.yaml")):
            name = model_name(path.stem)
            if name in found:
                raise VitadaptError(f"{found[name]} and {path} both give the model name '{name}'; rename one")
            found[name] = path
    return found


def list_models() -> List[str]:
    """Every model name create_model accepts, sorted."""
    return sorted(config_files())


def config_file(name: str) -> Path:
    """The config file of model `name`; an unknown name is refused with the closest names."""
    files = config_files()
    if name not in files:
        close = difflib.get_close_matches(name, list(files), n=5, cutoff=0.6)
        hint = f"; closest: {', '.join(close)}" if close else ""
        raise _config_error(f"unknown model name '{name}'{hint} (vitadapt.list_models() lists all {len(files)})")
    return files[name]


# ------------------------------------------------------------------ create_model


def create_model(name: str, checkpoint: Optional[str] = None, **overrides):
    """The model `name` (see list_models), built from its config, in eval mode on the CPU.

    overrides: config keys as on tools/run_net.py's command line, with Python values, e.g.
        create_model("deit_small_patch16_224", **{"MODEL.NUM_CLASSES": 10, "VIT.DEPTH": 6});
    an unknown key or a value of the wrong type is refused, naming the key.
    checkpoint: a weights file (vitadapt, DeiT, timm, or a method's official layout), loaded as the test job
    (tools/run_net.py with TEST.CHECKPOINT_FILE_PATH) loads it, EMA weights included where the config evaluates
    them; its report is `model.load_report`. Without it the weights are the config's seeded random initialisation.
    A DVT model exits early at DVT.THRESHOLDS, or at DVT.BUDGET_POINT's thresholds stored in an official
    checkpoint (DVT.THRESHOLD_SOURCE checkpoint); otherwise every exit runs and the last one answers (with a
    warning where the config's thresholds come from the test job's search on data).

    The model's forward gives logits; `cost(model)` the per-image GMACs and token counts of that forward;
    `model.cfg` is the config it was built from (input size, mean and std of the inputs)."""
    from vitadapt.config import load_config
    from vitadapt.utils.checkpoint import load_weights

    path = config_file(name)
    _refuse_option_style_keys(overrides)
    opts = [x for item in overrides.items() for x in item]
    if checkpoint is not None:
        if "TEST.CHECKPOINT_FILE_PATH" in overrides:
            raise _config_error("give the weights either as checkpoint= or as TEST.CHECKPOINT_FILE_PATH, not both")
        opts += ["TEST.CHECKPOINT_FILE_PATH", str(checkpoint)]
    cfg = load_config(str(path), opts)
    model = _build(cfg)
    if cfg.TEST.CHECKPOINT_FILE_PATH:
        model.load_report = load_weights(model, cfg.TEST.CHECKPOINT_FILE_PATH,
                                         prefer_ema=cfg.MODEL_EMA.ENABLE and cfg.MODEL_EMA.EVAL)
    if getattr(model, "num_exits", 1) > 1:
        _set_exit_thresholds(cfg, model)
    model.cfg = cfg
    return model.eval()


def _set_exit_thresholds(cfg, model) -> None:
    """A multi-exit model's (DVT) thresholds that need no data: DVT.THRESHOLDS (already set by the model's config),
    or DVT.BUDGET_POINT's as stored in the checkpoint. Those the test job searches on data are left unset, said."""
    from vitadapt.engine.exits import calibrate_on_inputs, needs_threshold_search

    d = cfg.DVT
    if needs_threshold_search(cfg):
        logger.warning("%s: DVT.BUDGET_POINT %d / DVT.BUDGET_GMACS %g choose the exit thresholds by a search on "
                       "training images, which create_model does not run: every exit runs and the last one answers. "
                       "Give DVT.THRESHOLDS (or call model.set_thresholds), or evaluate with tools/run_net.py",
                       cfg.MODEL.NAME, d.BUDGET_POINT, d.BUDGET_GMACS)
    elif d.THRESHOLD_SOURCE == "checkpoint":  # with a DVT.BUDGET_POINT, as the config requires
        if not cfg.TEST.CHECKPOINT_FILE_PATH:
            raise _config_error(f"DVT.THRESHOLD_SOURCE checkpoint reads the thresholds of DVT.BUDGET_POINT "
                                f"{d.BUDGET_POINT} from an official DVT checkpoint, and no checkpoint was given: "
                                "pass it as create_model(..., checkpoint=PATH)")
        calibrate_on_inputs(cfg, model, None, cfg.TEST.CHECKPOINT_FILE_PATH)  # no images: they serve a search only


# ------------------------------------------------------------------ cost


def cost(model) -> Dict[str, "Tensor"]:
    """The per-image cost of the model's last forward, as the test job logs it (tensors with one row per input):
    - "gmacs" [B]: GMACs per image (per clip for a video model), from the tokens, heads and blocks it really ran;
    - "kept_tokens" [B, depth]: live tokens (CLS included) after each block's attention, for methods that change
      which tokens exist (ATS, EViT, A-ViT, AdaViT; a video model's counts are summed over its frames);
    - "token_depth" [B]: blocks a token runs on average, for token halting (A-ViT);
    - the method's own statistics: AdaViT's official GFLOPs and head / branch / token usage per block, DVT's exit."""
    from vitadapt.engine.evaluate import reports, token_depth
    from vitadapt.utils.checkpoint import unwrap

    model = unwrap(model)
    if all(getattr(model, name, None) is None for name in FORWARD_RECORDS):
        raise RuntimeError(f"cost() reads the last forward of the model; run one first (this "
                           f"{type(model).__name__} has recorded none of {', '.join(FORWARD_RECORDS)})")
    out = {"gmacs": model.macs_per_image().double() / 1e9}
    counts = getattr(model, "last_token_counts", None)
    if counts is not None and reports(model, "kept_tokens"):
        out["kept_tokens"] = counts[..., 1]
    if counts is not None and reports(model, "token_depth"):
        out["token_depth"] = token_depth(counts)
    image_statistics = getattr(model, "image_statistics", None)
    if image_statistics is not None:
        out.update(image_statistics())
    return out


# ------------------------------------------------------------------ adapt a timm model


def adapt(timm_model, method: str, **method_options):
    """The vitadapt model of `method` with the weights and dimensions of `timm_model`, a timm VisionTransformer
    (DeiT / ViT with a CLS token), in eval mode on the timm model's device (float32); the timm model is not changed.

    method: "deit" or "none" (the plain backbone), "ats", "evit", "avit" or "adavit". DVT is refused: it is a
    cascade of three ViTs trained together. method_options: the method's config keys in lower case, e.g.
    keep_rate=0.7 (EVIT.KEEP_RATE), locations=[3, 6, 9] (EVIT.LOCATIONS), blocks / budgets (ATS.BLOCKS /
    ATS.BUDGETS), gate_scale / gate_center (AVIT.*), head / layer / token / token_threshold (ADAVIT.*); the
    config's defaults otherwise. `model.cfg` holds the timm model's preprocessing, from its `pretrained_cfg`
    (mean, std, crop_pct, interpolation: DATA.MEAN, DATA.STD, DATA.IN_VAL_CROP_RATIO, DATA.INTERPOLATION), so that
    vitadapt's eval transform is timm's; a model built without timm.create_model has no pretrained_cfg, and
    `model.cfg` keeps vitadapt's defaults (ImageNet mean / std, bicubic, crop ratio 0.875), with a warning.
    The weights go through the conversion official DeiT checkpoints go through
    (`model.load_report`). Parameters the timm model does not have (AdaViT's decision heads) start from the
    method's fine-tuning initialisation and are named in `model.new_parameters`; A-ViT has none (it halts on
    channel 0 of the tokens). A-ViT and AdaViT decide well only once fine-tuned.

    Models whose logits vitadapt would not reproduce are refused with the reasons (UnsupportedModelError):
    other classes than timm's VisionTransformer, no CLS token or another pooling, register tokens, LayerScale,
    qk-norm, pre-norm, fc_norm, no_embed_class, other norms, activations or MLPs, and the like."""
    from vitadapt.config import ConfigError, get_cfg, load_config
    from vitadapt.models.convert import LoadReport, load_into_model

    key = method.lower()
    if key == "dvt":
        raise UnsupportedModelError("adapt(..., 'dvt'): DVT is a cascade of three ViTs (7x7, 10x10 and 14x14 "
                                    "tokens) whose feature- and relation-reuse layers are trained with them; one timm "
                                    "model is not one. Train it from configs/ImageNet/DVT")
    if key not in METHODS:
        raise _config_error(f"unknown method '{method}': expected one of {', '.join(METHODS)} (dvt is refused)")
    model_class, node = METHODS[key]
    options = {k.lower(): f"{node}.{k}" for k in get_cfg()[node]} if node else {}
    unknown = sorted(set(method_options) - set(options))
    if unknown:
        valid = ", ".join(f"{k} ({v})" for k, v in options.items()) or "none"
        raise _config_error(f"adapt(..., '{method}'): unknown option(s) {', '.join(unknown)}; valid options: {valid}")
    preprocessing = timm_data_config(timm_model)
    opts = ["MODEL.NAME", model_class]
    for config_key, value in {**timm_backbone_config(timm_model), **preprocessing,
                              **{options[k]: v for k, v in method_options.items()}}.items():
        opts += [config_key, value]
    # Where each key that is not the architecture's comes from, to name it when the config refuses its value.
    origins = {**{v: f"option {k}" for k, v in options.items()},
               **{v: f"timm_model.pretrained_cfg['{k}']" for k, v in TIMM_DATA_KEYS.items() if v in preprocessing}}
    try:
        cfg = load_config("", opts)
    except ConfigError as e:
        named = [f"{origin} is {key}" for key, origin in origins.items() if re.search(rf"\b{re.escape(key)}\b", str(e))]
        raise ConfigError(f"adapt(..., '{method}'): {e}" + (f" ({'; '.join(named)})" if named else "")) from None
    model = _build(cfg)
    weights = timm_model.state_dict()
    report = LoadReport(f"timm {type(timm_model).__name__}", "state_dict()")
    # As fine-tuning from a DeiT file: a method's parameters that the weights lack start from its initialisation.
    model.load_report = load_into_model(model, weights, report, reset_head_on_mismatch=True)
    model.new_parameters = sorted(k for k in model.state_dict() if k not in weights)
    for line in report.lines():
        logger.info(line)
    if model.new_parameters:
        logger.info("  new parameters (not in the timm model): %s", ", ".join(model.new_parameters))
    model.cfg = cfg
    return model.to(_device_of(timm_model)).eval()


def timm_data_config(model) -> dict:
    """{config key: value} of the preprocessing `model`'s timm `pretrained_cfg` names (TIMM_DATA_KEYS); empty, with a
    warning, for a model without one (built directly, not by timm.create_model)."""
    pretrained_cfg = getattr(model, "pretrained_cfg", None)
    if not pretrained_cfg:
        logger.warning("the timm model has no pretrained_cfg (built without timm.create_model): model.cfg keeps "
                       "vitadapt's default preprocessing (DATA.MEAN, DATA.STD, DATA.IN_VAL_CROP_RATIO, "
                       "DATA.INTERPOLATION); set them to the model's own")
        return {}
    if pretrained_cfg.get("crop_mode", "center") != "center":
        logger.warning("the timm model's pretrained_cfg crop_mode is '%s': vitadapt's eval transform crops the "
                       "center", pretrained_cfg["crop_mode"])
    out = {}
    for name, key in TIMM_DATA_KEYS.items():
        value = pretrained_cfg.get(name)
        if value is not None:
            out[key] = list(value) if isinstance(value, tuple) else value  # timm's tuples, the config's lists
    return out


def timm_backbone_config(model) -> dict:
    """{config key: value} of the vitadapt backbone that computes what `model`, a timm VisionTransformer, computes.
    Raises UnsupportedModelError with every reason it would compute something else."""
    from timm.layers import LayerNorm as TimmLayerNorm  # nn.LayerNorm, optionally through fused kernels
    from timm.layers import Mlp, PatchEmbed
    from timm.models.vision_transformer import Attention, Block, VisionTransformer
    from torch import nn

    kind = _describe(model)
    if type(model) is not VisionTransformer:
        raise UnsupportedModelError(f"adapt() converts timm's VisionTransformer (DeiT, ViT); {kind} is another class "
                                    "(other ViT families and subclasses such as the distilled DeiT add tokens or "
                                    "change the forward)")
    problems: Dict[str, List[int]] = {}  # reason -> the blocks it applies to (none: the model)

    def require(ok: bool, why: str, block: Optional[int] = None) -> None:
        if not ok:
            problems.setdefault(why, []).extend([] if block is None else [block])

    def absent(module) -> bool:  # a layer timm leaves out as Identity (or, in older timm, does not have)
        return module is None or isinstance(module, nn.Identity)

    def layer_norm(module, where: str, block: Optional[int] = None) -> None:
        require(type(module) in (nn.LayerNorm, TimmLayerNorm) and module.elementwise_affine
                and module.bias is not None and module.eps == LAYER_NORM_EPS,
                f"{where} is {_describe(module)}" + (f" with eps {module.eps:g}" if hasattr(module, "eps") else "")
                + f", not a LayerNorm with eps {LAYER_NORM_EPS:g} (vitadapt's norm)", block)

    dim = model.embed_dim
    require(model.cls_token is not None, "no CLS token (class_token=False): vitadapt's methods classify from the CLS "
                                         "token and score the other tokens by its attention")
    require(model.global_pool == "token" and getattr(model, "attn_pool", None) is None,
            f"global_pool '{model.global_pool}': vitadapt classifies from the CLS token (global_pool 'token')")
    require(getattr(model, "num_reg_tokens", 0) == 0, f"{getattr(model, 'num_reg_tokens', 0)} register tokens "
                                                     "(reg_tokens): vitadapt's tokens are the CLS token and the patches")
    require(not model.no_embed_class, "no_embed_class=True: its position embedding skips the CLS token (DeiT III), "
                                      "vitadapt's covers CLS and patches")
    require(model.pos_embed is not None, "no position embedding (pos_embed='none')")
    require(absent(model.norm_pre), "pre-norm (norm_pre, pre_norm=True): vitadapt has no norm before the blocks")
    require(absent(model.fc_norm), "fc_norm: vitadapt normalises the tokens before pooling (norm), not the pooled "
                                   "feature")
    require(absent(model.patch_drop), "patch dropout (patch_drop_rate > 0): vitadapt has none")
    require(model.num_classes > 0 and type(model.head) is nn.Linear and model.head.bias is not None,
            "no classifier (num_classes=0): vitadapt's models end in one; give the timm model one "
            "(reset_classifier) first")
    layer_norm(model.norm, "norm (the final norm; final_norm=False removes it)")

    embed = model.patch_embed
    proj = getattr(embed, "proj", None)
    if type(embed) is not PatchEmbed or not isinstance(proj, nn.Conv2d):
        require(False, f"patch embedding {_describe(embed)}: vitadapt's is timm's PatchEmbed")
    else:
        require(proj.kernel_size == proj.stride and proj.kernel_size[0] == proj.kernel_size[1]
                and proj.padding == (0, 0) and proj.bias is not None and absent(embed.norm),
                f"patch embedding: kernel {proj.kernel_size}, stride {proj.stride}, padding {proj.padding}, bias "
                f"{proj.bias is not None}, norm {_describe(embed.norm)}; vitadapt's is one square, non-overlapping "
                "convolution with a bias and no norm")
        require(not getattr(embed, "dynamic_img_pad", False), "dynamic_img_pad=True: vitadapt does not pad images "
                                                              "to a multiple of the patch size")
        require(embed.img_size is not None and embed.img_size[0] == embed.img_size[1],
                f"image size {embed.img_size}: vitadapt's models take square images")

    first = model.blocks[0]
    for i, block in enumerate(model.blocks):
        if type(block) is not Block:
            require(False, f"{_describe(block)} blocks, not timm's Block", i)
            continue
        require(absent(block.ls1) and absent(block.ls2), "LayerScale (ls1 / ls2, init_values): vitadapt's blocks "
                                                         "have none", i)
        layer_norm(block.norm1, "norm1", i)
        layer_norm(block.norm2, "norm2", i)
        attn, mlp = block.attn, block.mlp
        if type(attn) is not Attention:
            require(False, f"attention {_describe(attn)}, not timm's Attention", i)
        else:
            require(absent(attn.q_norm) and absent(attn.k_norm), "qk-norm (attn.q_norm / k_norm, qk_norm=True): "
                                                                 "vitadapt's attention has none", i)
            require(absent(getattr(attn, "norm", None)), "a norm before the attention projection (attn.norm, "
                                                         "scale_attn_norm): vitadapt has none", i)
            require(getattr(attn, "gate", None) is None, "a gated attention output: vitadapt has none", i)
            require(attn.qkv.out_features == 3 * dim, f"q, k, v {attn.qkv.out_features // 3} wide, not the "
                                                      f"embedding width {dim}", i)
            require(attn.proj.bias is not None, "no bias in attn.proj (proj_bias=False)", i)
            require(attn.num_heads == first.attn.num_heads and (attn.qkv.bias is None) == (first.attn.qkv.bias is None),
                    "heads or qkv bias differ from block 0", i)
        if type(mlp) is not Mlp or not isinstance(mlp.fc1, nn.Linear):
            require(False, f"MLP {_describe(mlp)}, not timm's Mlp of two Linear layers", i)
        else:
            require(type(mlp.act) is nn.GELU and mlp.act.approximate == "none",
                    f"MLP activation {_describe(mlp.act)}"
                    + (f" (approximate '{mlp.act.approximate}')" if isinstance(mlp.act, nn.GELU) else "")
                    + ": vitadapt's is the exact GELU", i)
            require(absent(mlp.norm), "a norm inside the MLP (mlp.norm, scale_mlp_norm): vitadapt has none", i)
            require(mlp.fc1.bias is not None and mlp.fc2.bias is not None, "an MLP layer without bias", i)
            require(mlp.fc1.out_features == first.mlp.fc1.out_features, "MLP hidden width differs from block 0", i)
    if not problems:
        # What only training sees: vitadapt has one dropout rate for the embedding, the projections and the MLP,
        # and stochastic depth rising linearly from 0.
        hidden, drop = first.mlp.fc1.out_features, _rate(model.pos_drop)
        others = {"attention projection": _rate(first.attn.proj_drop), "MLP": _rate(first.mlp.drop1)}
        path_rates = [_rate(b.drop_path1) for b in model.blocks]
        require(int(dim * (hidden / dim)) == hidden, f"MLP hidden width {hidden} is not int({dim} x a ratio)")
        require(all(r == drop for r in others.values()), f"in training: dropout rates differ, position embedding "
                f"{drop}, " + ", ".join(f"{k} {v}" for k, v in others.items()) + " (vitadapt: one VIT.DROP_RATE)")
        require(_is_linear_from_zero(path_rates), f"in training: stochastic depth rates {path_rates} do not rise "
                                                  "linearly from 0 (vitadapt: VIT.DROP_PATH_RATE)")
    if problems:
        reasons = [why + (f" (blocks {', '.join(map(str, blocks))})" if blocks else "") for why, blocks in problems.items()]
        raise UnsupportedModelError(f"adapt() refuses this {kind}; vitadapt would not compute what it computes:\n"
                                    "  - " + "\n  - ".join(reasons))
    return {"MODEL.NUM_CLASSES": model.num_classes, "VIT.PATCH_SIZE": proj.kernel_size[0],
            "VIT.IN_CHANS": proj.in_channels, "VIT.EMBED_DIM": dim, "VIT.DEPTH": len(model.blocks),
            "VIT.NUM_HEADS": first.attn.num_heads, "VIT.MLP_RATIO": hidden / dim,
            "VIT.QKV_BIAS": first.attn.qkv.bias is not None, "VIT.DROP_RATE": drop,
            "VIT.ATTN_DROP_RATE": _rate(first.attn.attn_drop), "VIT.DROP_PATH_RATE": path_rates[-1],
            "VIT.HEAD_DROP_RATE": _rate(model.head_drop),
            "DATA.TRAIN_CROP_SIZE": embed.img_size[0], "DATA.TEST_CROP_SIZE": embed.img_size[0]}


# ------------------------------------------------------------------ helpers


def _build(cfg):
    """build_model(cfg) with the initialisation of run_net's jobs (the torch RNG seeded with RNG_SEED), without
    touching the caller's RNG."""
    import torch

    from vitadapt.models import build_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.RNG_SEED)
        return build_model(cfg)


def _config_error(message: str):
    from vitadapt.config import ConfigError

    return ConfigError(message)


def _refuse_option_style_keys(overrides: dict) -> None:
    """`num_classes=10` is not a config key: name the key it probably means (MODEL.NUM_CLASSES)."""
    from vitadapt.config import get_cfg

    leaves = _leaf_keys(get_cfg())
    for key in overrides:
        if key != key.upper():
            meant = [k for k in leaves if k.rsplit(".", 1)[-1] == key.upper()]
            hint = f" (did you mean {' or '.join(meant)}?)" if meant else ""
            raise _config_error(f"unknown override '{key}': overrides are config keys such as MODEL.NUM_CLASSES, "
                                f"passed as **{{'MODEL.NUM_CLASSES': 10}}{hint}")


def _leaf_keys(node, prefix: str = "") -> List[str]:
    out = []
    for key, value in node.items():
        out += _leaf_keys(value, f"{prefix}{key}.") if isinstance(value, dict) else [prefix + key]
    return out


def _rate(module) -> float:
    """The drop probability of a Dropout / DropPath, 0 for Identity."""
    return float(getattr(module, "p", getattr(module, "drop_prob", 0.0)))


def _is_linear_from_zero(rates: List[float]) -> bool:
    import torch

    return torch.allclose(torch.tensor(rates), torch.linspace(0, rates[-1], len(rates)), rtol=1e-6, atol=0)


def _describe(module) -> str:
    return f"{type(module).__module__}.{type(module).__name__}"


def _device_of(model):
    import torch

    return next(model.parameters(), torch.empty(0)).device
