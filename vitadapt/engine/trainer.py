"""The train and test jobs: a thin loop with hooks (LR schedule, EMA, method schedules) around one step."""

import csv
import json
import logging
import os
import random
import time
from datetime import timedelta
from typing import List, Optional

import numpy as np
import torch
from iopath.common.file_io import g_pathmgr
from timm.data import Mixup
from timm.utils import ModelEmaV3
from torch.nn.parallel import DistributedDataParallel

from vitadapt.config import ConfigError
from vitadapt.datasets import construct_loader
from vitadapt.errors import VitadaptError
from vitadapt.losses import build_loss
from vitadapt.models import build_model, input_shape
from vitadapt.utils import checkpoint as cu
from vitadapt.utils import distributed as du
from vitadapt.utils.cpu_memory import configure_cpu_allocator
from vitadapt.utils.denormals import configure_denormals
from vitadapt.utils.logging import log_json_stats, setup_logging, supersede_epoch_records
from vitadapt.utils.lr_policy import lr_at_epoch
from vitadapt.utils.optimizer import build_optimizer

from .exits import prepare_exits
from .evaluate import NoUsableImages, evaluate, report_nonfinite, reports, token_depth, topk_correct
from .output_dir import claim_for_training, ensure_writable_dir, ensure_writable_file

logger = logging.getLogger(__name__)


class TrainingDiverged(VitadaptError, FloatingPointError):
    """The loss or the weights became NaN or infinite; the checkpoints already written are left as they were."""


class Hook:
    """Called by the loop; `epoch` is fractional (epoch + iter / iters_per_epoch) in before_step."""

    def before_step(self, trainer: "Trainer", epoch: float) -> None:
        pass

    def after_step(self, trainer: "Trainer") -> None:
        pass


class LRSchedule(Hook):
    def before_step(self, trainer, epoch):
        trainer.lr = lr_at_epoch(trainer.cfg, epoch)
        for group in trainer.optimizer.param_groups:
            group["lr"] = trainer.lr


class EMAUpdate(Hook):
    def after_step(self, trainer):
        trainer.ema.update(cu.unwrap(trainer.model), step=trainer.global_step)


class ModelSchedule(Hook):
    """Lets a method follow training progress (e.g. a keep-rate warm-up) through
    `model.set_progress(epoch, global iteration, iterations per epoch)`."""

    def before_step(self, trainer, epoch):
        iters = len(trainer.train_loader)
        cu.unwrap(trainer.model).set_progress(int(epoch), round(epoch * iters), iters)


def training_loss(model, logits: torch.Tensor, targets: torch.Tensor, loss_fn):
    """(loss, task losses by exit, the method's own losses by name) of one training forward: the task loss (DVT:
    the unweighted sum over its exits) plus the method's auxiliary losses (A-ViT ponder and prior, AdaViT usage)."""
    inner = cu.unwrap(model)
    if getattr(inner, "num_exits", 1) > 1:  # every exit learns the task
        task = {f"exit{k + 1}": loss_fn(exit_logits.float(), targets)
                for k, exit_logits in enumerate(inner.last_exit_logits)}
        loss = sum(task.values())
    else:
        task, loss = {}, loss_fn(logits.float(), targets)
    aux = {k: v.float() for k, v in inner.auxiliary_losses().items()} if hasattr(inner, "auxiliary_losses") else {}
    return (loss + sum(aux.values()) if aux else loss), task, aux


def select_device(cfg) -> torch.device:
    if cfg.NUM_GPUS == 0:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError(f"NUM_GPUS is {cfg.NUM_GPUS} but CUDA is not available here; set NUM_GPUS 0 to run on the CPU")
    return torch.device("cuda", torch.cuda.current_device())


def amp_dtype(cfg, device: torch.device) -> Optional[torch.dtype]:
    if cfg.TRAIN.AMP == "off":
        return None
    if device.type != "cuda":
        logger.warning("TRAIN.AMP %s is ignored on the CPU", cfg.TRAIN.AMP)
        return None
    return torch.float16 if cfg.TRAIN.AMP == "fp16" else torch.bfloat16


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def prepare(cfg, job: str):
    """Logging, the resolved config, seeds, device, and the model on it. Called once the job is accepted: the
    training job has claimed OUTPUT_DIR (output_dir.claim_for_training)."""
    rank = du.get_rank()
    if rank == 0:
        ensure_writable_dir(cfg.OUTPUT_DIR, "OUTPUT_DIR")
    setup_logging(cfg.OUTPUT_DIR, rank)
    if rank == 0:
        config_file = os.path.join(cfg.OUTPUT_DIR, "config.yaml")
        # config.yaml describes the run in OUTPUT_DIR: written by training, by a test job only where there is none.
        if job == "train" or not g_pathmgr.isfile(config_file):
            with g_pathmgr.open(config_file, "w") as f:
                f.write(cfg.dump())
        logger.info("%s job, %d process(es), output in %s", job, du.get_world_size(), cfg.OUTPUT_DIR)
    device = select_device(cfg)
    allocator = configure_cpu_allocator(cfg)
    flushed = configure_denormals(cfg)
    if rank == 0 and device.type == "cpu":
        logger.info("CPU allocator: %s (KEEP_FREED_CPU_MEMORY %s); subnormal floats %s (FLUSH_DENORMAL %s)", allocator,
                    cfg.KEEP_FREED_CPU_MEMORY, "flushed to zero" if flushed else "kept", cfg.FLUSH_DENORMAL)
    # Same initial weights on every rank (so DDP and each rank's EMA copy start equal), then per-rank streams
    # for augmentation and dropout.
    seed_everything(cfg.RNG_SEED)
    model = build_model(cfg).to(device)
    seed_everything(cfg.RNG_SEED + rank)
    if cfg.LOG_MODEL_INFO and rank == 0:
        log_model_info(model, cfg, device)
    return model, device


@torch.no_grad()
def log_model_info(model, cfg, device) -> None:
    params = sum(p.numel() for p in model.parameters())
    was_training = model.training
    model.eval()
    model(torch.zeros(input_shape(cfg), device=device))
    gmacs = model.macs_per_image().item() / 1e9
    model.train(was_training)
    adaptive = (" for a blank image (adaptive: the cost depends on the image)"
                if model.token_statistics or getattr(model, "num_exits", 1) > 1 else "")
    if getattr(model, "num_exits", 1) > 1:
        logger.info("GMACs per image leaving at each exit (cumulative): %s",
                    " / ".join(f"{g:.4f}" for g in (model.exit_macs(cfg.DATA.TEST_CROP_SIZE) / 1e9).tolist()))
    shape = input_shape(cfg)
    unit = f"clip ({shape[2]} frames of {shape[-1]}px)" if len(shape) == 5 else f"image at {shape[-1]}px"
    logger.info("model %s: %.2fM parameters, %.3f GMACs per %s%s", cfg.MODEL.NAME, params / 1e6, gmacs, unit,
                adaptive)


def wrap_ddp(model, device):
    if du.get_world_size() == 1:
        return model
    # A model whose blocks can all be skipped for a batch (every token halted) leaves parameters without
    # gradient on that process; DDP must then look for them.
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                   find_unused_parameters=getattr(model, "has_unused_parameters", False))


class Trainer:
    def __init__(self, cfg):
        self.cfg = cfg
        rank, world = du.get_rank(), du.get_world_size()
        # Everything that can refuse the run comes before anything in OUTPUT_DIR changes (logs go to the console
        # until then): the run directory, then the data.
        setup_logging("", rank)
        resume_from = claim_for_training(cfg)
        self.train_loader = construct_loader(cfg, "train", rank, world, is_train=True)
        self.val_loader = construct_loader(cfg, "val", rank, world, is_train=False)
        model, self.device = prepare(cfg, "train")
        self.amp_dtype = amp_dtype(cfg, self.device)
        self.optimizer = build_optimizer(model, cfg.SOLVER)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.ema = ModelEmaV3(model, decay=cfg.MODEL_EMA.DECAY) if cfg.MODEL_EMA.ENABLE else None
        self.loss_fn = build_loss(cfg)
        self.start_epoch = self.restore(model, resume_from)
        if du.is_master():
            moved = supersede_epoch_records(cfg.OUTPUT_DIR, self.start_epoch)
            if moved:
                logger.info("json_stats.log: %d record(s) of epochs after %d, which run again now, moved to "
                            "json_stats.superseded.log", moved, self.start_epoch)
        self.model = wrap_ddp(model, self.device)
        self.mixup = Mixup(mixup_alpha=cfg.MIXUP.ALPHA, cutmix_alpha=cfg.MIXUP.CUTMIX_ALPHA, prob=cfg.MIXUP.PROB,
                           switch_prob=cfg.MIXUP.SWITCH_PROB, label_smoothing=cfg.TRAIN.LABEL_SMOOTHING,
                           num_classes=cfg.MODEL.NUM_CLASSES) if cfg.MIXUP.ENABLE else None
        self.hooks: List[Hook] = [LRSchedule()]
        if self.ema is not None:
            self.hooks.append(EMAUpdate())
        if hasattr(model, "set_progress"):
            self.hooks.append(ModelSchedule())
        self.writer = None
        if cfg.TENSORBOARD.ENABLE and du.is_master():
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(cfg.TENSORBOARD.LOG_DIR or os.path.join(cfg.OUTPUT_DIR, "tensorboard"))
        self.global_step = self.start_epoch * len(self.train_loader)
        # What is known of each checkpoint this process wrote or resumed from, by epoch (describe_checkpoints).
        self.health = {self.start_epoch: {"good": None, "val_loss": None, "step": self.global_step}} if resume_from else {}
        self.lr = 0.0

    def restore(self, model, resume_from) -> int:
        """`resume_from`: (path, content) of the checkpoint to continue from (claim_for_training), or None."""
        cfg = self.cfg
        if resume_from:
            path, state = resume_from
            epoch = cu.resume(path, model, self.optimizer, self.scaler, self.ema, du.get_rank(), du.get_world_size(),
                              state=state)
            logger.info("resumed from %s: %d epoch(s) done", path, epoch)
            return epoch
        if cfg.TRAIN.CHECKPOINT_FILE_PATH:
            cu.load_weights(model, cfg.TRAIN.CHECKPOINT_FILE_PATH, reset_head_on_mismatch=True)
            if self.ema is not None:
                self.ema.module.load_state_dict(model.state_dict())
        return 0

    def scalars(self, stats: dict, step: int) -> None:
        if self.writer is not None:
            for key, value in stats.items():
                if isinstance(value, (int, float)) and key not in ("epoch", "iter"):
                    self.writer.add_scalar(f"{stats['_type']}/{key}", value, step)
                elif isinstance(value, list):  # per-block statistics
                    for i, v in enumerate(value):
                        self.writer.add_scalar(f"{stats['_type']}/{key}/{i}", v, step)

    def run(self):
        cfg = self.cfg
        max_epoch = cfg.SOLVER.MAX_EPOCH
        for epoch in range(self.start_epoch, max_epoch):
            self.train_loader.sampler.set_epoch(epoch)
            self.train_one_epoch(epoch)
            last = epoch + 1 == max_epoch
            val_loss = None
            if (epoch + 1) % cfg.TRAIN.EVAL_PERIOD == 0 or last:
                val_loss = self.validate(epoch)["loss"]
            # Saved after evaluation: the RNG state stored is the one the next epoch starts from.
            if (epoch + 1) % cfg.TRAIN.CHECKPOINT_PERIOD == 0 or last:
                self.save(epoch + 1, val_loss)
            du.barrier()
        if self.start_epoch >= max_epoch:
            logger.info("training already finished (%d epochs)", max_epoch)
        if self.writer is not None:
            self.writer.close()
        return cu.unwrap(self.model)

    def save(self, epoch: int, val_loss: Optional[float]) -> None:
        """Writes the epoch's checkpoint, unless its weights are no longer finite (then training stops)."""
        model = cu.unwrap(self.model)
        finite = all(bool(torch.isfinite(p).all()) for p in model.state_dict().values() if p.is_floating_point())
        if not finite:
            raise TrainingDiverged(f"the weights became NaN or infinite during epoch {epoch}; training stopped "
                                   f"without saving them. {self.describe_checkpoints()}; {self.advice()}")
        evaluated = val_loss is not None
        # Known good: finite weights whose own validation loss was finite (the loss of the last step was computed
        # before its update, so it says nothing about the weights saved).
        self.health[epoch] = {"good": evaluated and bool(np.isfinite(val_loss)), "val_loss": val_loss,
                              "step": self.global_step}
        rng_states = du.all_gather_objects(cu.rng_state())  # every rank's stream, for an exact resume
        if du.is_master():
            path = cu.save_checkpoint(self.cfg.OUTPUT_DIR, epoch, self.model, self.optimizer, self.scaler,
                                      self.ema, self.cfg, self.cfg.TRAIN.KEEP_LAST_K, rng_states)
            logger.info("saved %s", path)

    def describe_checkpoints(self) -> str:
        """What is known of the checkpoints this run can fall back on, for a divergence message."""
        found = cu.list_checkpoints(self.cfg.OUTPUT_DIR)
        if not found:
            return "No checkpoint was written (no epoch finished)"
        lines = []
        for epoch, path in reversed(found):
            health = self.health.get(epoch)
            if health is None:
                lines.append(f"{path} was written before this process started; check it before resuming")
                break
            if health["step"] == self.global_step:
                lines.append(f"{path} holds exactly the weights on which the loss became non-finite: do not "
                             "resume from it")
            elif health["good"]:
                lines.append(f"the last good checkpoint is {path} (finite weights, val loss {health['val_loss']:.4g})")
                break
            elif health["good"] is None:
                lines.append(f"{path}, which this run resumed from, has finite weights; its validation was not "
                             "checked by this process")
                break
            elif health["val_loss"] is None:
                lines.append(f"{path} has finite weights but was not validated (TRAIN.EVAL_PERIOD), so it is not "
                             "known to be good")
            else:
                lines.append(f"{path} gives a non-finite val loss ({health['val_loss']}): not good")
        return "; ".join(lines)

    def advice(self) -> str:
        return "lower SOLVER.BASE_LR or enable SOLVER.CLIP_GRAD_L2NORM"

    def validate(self, epoch: int) -> dict:
        # Unwrapped: evaluation shards are uneven, and DDP's forward would expect the same steps on every rank.
        model = self.ema.module if self.ema is not None and self.cfg.MODEL_EMA.EVAL else cu.unwrap(self.model)
        stats = evaluate(model, self.val_loader, self.device, self.amp_dtype, label=f"val epoch {epoch + 1}",
                         log_period=self.cfg.LOG_PERIOD)
        stats.update(_type="val", epoch=epoch + 1)
        logger.info("val epoch %d: top1 %.2f%% top5 %.2f%% loss %.4f (%d images)", epoch + 1, stats["top1_acc"],
                    stats["top5_acc"], stats["loss"], stats["num_images"])
        if du.is_master():
            report_nonfinite(stats, f"val epoch {epoch + 1}")
            log_json_stats(stats)
            self.scalars(stats, epoch + 1)
        return stats

    def train_one_epoch(self, epoch: int) -> dict:
        cfg, model, device = self.cfg, self.model, self.device
        model.train()
        iters = len(self.train_loader)
        sums = torch.zeros(4, dtype=torch.float64, device=device)  # n, loss*n, top1 correct, skipped
        halting = reports(model, "token_depth")
        aux_sums: dict = {}  # name -> loss*n over the epoch; "token_depth" -> mean blocks per token * n
        start = tick = time.perf_counter()
        for it, batch in enumerate(self.train_loader):
            progress = epoch + it / iters
            for hook in self.hooks:
                hook.before_step(self, progress)
            sums[3] += batch["skipped"]
            inputs, labels = batch["inputs"], batch["labels"]
            if self.mixup is not None and inputs is not None and inputs.shape[0] % 2:
                # timm's mixup pairs images; a skipped image can leave an odd batch
                inputs, labels = inputs[:-1], labels[:-1]
            # A batch whose images all failed to decode is skipped, by every process together (DDP steps in lockstep).
            if not self.on_all_ranks(inputs is not None and inputs.shape[0] > 0):
                continue
            inputs, labels = inputs.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            targets = labels
            if self.mixup is not None:
                inputs, targets = self.mixup(inputs, labels)
            with torch.autocast(device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None):
                logits = model(inputs)
                loss, task, aux = training_loss(model, logits, targets, self.loss_fn)
            if not self.on_all_ranks(bool(torch.isfinite(loss))):
                raise TrainingDiverged(
                    f"loss is {loss.item()} (on at least one process) at epoch {epoch + 1}, iteration {it + 1}; "
                    f"training stopped. {self.describe_checkpoints()}; {self.advice()}")
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            if cfg.SOLVER.CLIP_GRAD_L2NORM > 0:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.SOLVER.CLIP_GRAD_L2NORM)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.global_step += 1
            for hook in self.hooks:
                hook.after_step(self)

            n = labels.numel()
            sums[0] += n
            sums[1] += loss.detach() * n
            sums[2] += topk_correct(logits.detach(), labels, 1)
            parts = {name: value.detach() for name, value in {**task, **aux}.items()}
            if halting:
                parts["token_depth"] = token_depth(cu.unwrap(model).last_token_counts).mean()
            for name, value in parts.items():
                aux_sums[name] = aux_sums.get(name, 0.0) + value * n
            if (it + 1) % cfg.LOG_PERIOD == 0 or it + 1 == iters:
                self.log_progress(epoch, it, iters, loss.item(), start, tick,
                                  {name: value.item() for name, value in parts.items()})
                tick = time.perf_counter()
        sums = du.all_reduce_sum(sums).cpu()
        if sums[0] == 0:
            raise NoUsableImages(f"epoch {epoch + 1}: no training image could be used ({int(sums[3])} skipped as "
                                 "undecodable; the warnings above name the files), so nothing was trained; training "
                                 "stopped")
        n = sums[0].item()
        stats = {"_type": "train_epoch", "epoch": epoch + 1, "loss": sums[1].item() / n,
                 "top1_acc": 100.0 * sums[2].item() / n, "lr": self.lr, "skipped_images": int(sums[3].item()),
                 "epoch_time_s": time.perf_counter() - start}
        # Every process has the same names (auxiliary_losses always returns the same keys): one all-reduce.
        names = sorted(aux_sums)
        if names:
            totals = du.all_reduce_sum(torch.stack([torch.as_tensor(aux_sums[k], dtype=torch.float64, device=device)
                                                    for k in names])).cpu()
            for name, total in zip(names, totals.tolist()):
                stats[name if name == "token_depth" else f"loss_{name}"] = total / n
        keep_rate = getattr(cu.unwrap(model), "current_keep_rate", None)
        if keep_rate is not None:
            stats["keep_rate"] = keep_rate
        if stats["skipped_images"]:
            logger.warning("epoch %d: skipped %d undecodable image(s)", epoch + 1, stats["skipped_images"])
        if du.is_master():
            log_json_stats(stats)
            self.scalars(stats, epoch + 1)
        return stats

    def on_all_ranks(self, flag: bool) -> bool:
        """True when `flag` holds on every process (one tiny all-reduce when there are several)."""
        if du.get_world_size() == 1:
            return flag
        agreed = du.all_reduce_sum(torch.tensor([float(flag)], device=self.device))
        return int(agreed.item()) == du.get_world_size()

    def log_progress(self, epoch, it, iters, loss, start, tick, parts: dict):
        elapsed = time.perf_counter() - start
        per_iter = elapsed / (it + 1)
        remaining = per_iter * ((iters - it - 1) + (self.cfg.SOLVER.MAX_EPOCH - epoch - 1) * iters)
        keep_rate = getattr(cu.unwrap(self.model), "current_keep_rate", None)
        extra = "".join(f"{name} {value:.4g} " for name, value in parts.items())
        logger.info("epoch %d/%d iter %d/%d loss %.4f %slr %.3e %s%.3fs/iter eta %s", epoch + 1,
                    self.cfg.SOLVER.MAX_EPOCH, it + 1, iters, loss, extra, self.lr,
                    "" if keep_rate is None else f"keep_rate {keep_rate:.4f} ", per_iter,
                    timedelta(seconds=int(remaining)))
        if du.is_master():
            self.scalars({"_type": "train", "loss": loss, "lr": self.lr, **parts}, self.global_step)


def train(cfg):
    """Trains per cfg (resuming if possible); returns the trained, unwrapped model."""
    return Trainer(cfg).run()


def test_checkpoint(cfg) -> str:
    """TEST.CHECKPOINT_FILE_PATH, else the newest checkpoint in OUTPUT_DIR, else TRAIN.CHECKPOINT_FILE_PATH."""
    path = cfg.TEST.CHECKPOINT_FILE_PATH or cu.last_checkpoint(cfg.OUTPUT_DIR) or cfg.TRAIN.CHECKPOINT_FILE_PATH
    if not path:
        raise ConfigError("nothing to test: TEST.CHECKPOINT_FILE_PATH is empty, OUTPUT_DIR "
                          f"({cfg.OUTPUT_DIR}) has no checkpoint and TRAIN.CHECKPOINT_FILE_PATH is empty; "
                          "refusing to evaluate random weights")
    return path


def results_path(cfg) -> str:
    """Where TEST.SAVE_RESULTS_PATH writes (relative to OUTPUT_DIR), or "" when nothing is saved."""
    return os.path.join(cfg.OUTPUT_DIR, cfg.TEST.SAVE_RESULTS_PATH) if cfg.TEST.SAVE_RESULTS_PATH else ""


def log_test_accuracy(cfg, stats: dict) -> None:
    """The test's accuracy and GMACs lines; for videos per video (ensembled views) and per view, named as such."""
    where = f"test on {cfg.TEST.SPLIT}"
    if "video_top1_acc" not in stats:
        logger.info("%s (%d images): top1 %.2f%% top5 %.2f%%", where, stats["num_images"], stats["top1_acc"],
                    stats["top5_acc"])
        if "gmacs_mean" in stats:
            logger.info("GMACs per image: mean %.4f, p50 %.4f, p95 %.4f", stats["gmacs_mean"], stats["gmacs_p50"],
                        stats["gmacs_p95"])
        return
    logger.info("%s (%d videos, %d views each): video top1 %.2f%% top5 %.2f%% (%s of %s; per view: top1 %.2f%% "
                "top5 %.2f%% over %d views)", where, stats["num_videos"], stats["views_per_video"],
                stats["video_top1_acc"], stats["video_top5_acc"], cfg.DATA.ENSEMBLE_METHOD, cfg.TEST.ENSEMBLE_SCORES,
                stats["top1_acc"], stats["top5_acc"], stats["num_images"])
    if stats["excluded_videos"] or stats["partial_videos"]:
        logger.warning("%s: %d video(s) excluded (no decodable view), %d partial (ensembled over the views that "
                       "decoded)", where, stats["excluded_videos"], stats["partial_videos"])
    logger.info("GMACs per view: mean %.4f, p50 %.4f, p95 %.4f; per video: mean %.4f", stats["gmacs_per_view_mean"],
                stats["gmacs_p50"], stats["gmacs_p95"], stats["gmacs_per_video_mean"])


def prediction_rows(predictions: dict, videos: Optional[dict]) -> List[dict]:
    """One row per video (ensembled scores) for a video data set, else one per image: its label, predicted class
    and top-5 classes (fewer with fewer classes); video rows also carry their path and ensembled scores, image
    rows the image's kept_tokens per block and token_depth where the model reports them (evaluate)."""
    per_image = {}
    if videos is not None:
        keys, scores = {"video": videos["video"].tolist(), "path": videos["path"]}, videos["scores"]
        labels = videos["labels"]
    else:
        keys, scores, labels = {"index": predictions["index"].tolist()}, predictions["logits"], predictions["labels"]
        per_image = {k: predictions[k].tolist() for k in ("kept_tokens", "token_depth") if k in predictions}
    top5 = scores.topk(min(5, scores.shape[1]), dim=1).indices.tolist()
    rows = [dict(zip(keys, values)) for values in zip(*keys.values())]
    for i, row in enumerate(rows):
        row.update(label=int(labels[i]), pred=top5[i][0], top5=top5[i])
        row.update({k: values[i] for k, values in per_image.items()})
        if videos is not None:
            row["scores"] = scores[i].tolist()
    return rows


def save_results(out: str, predictions: dict, videos: Optional[dict]) -> None:
    """TEST.SAVE_RESULTS_PATH, written atomically. .json: {"rows": [...]} (see prediction_rows), with the ensemble
    settings for videos. .csv: the same rows; lists (top5, kept_tokens) space-separated, a video's scores as columns
    score_0 ... score_{C-1}. Anything else: the torch file of per-item index/logits/labels (and kept_tokens /
    token_depth where reported; plus "videos": the per-video ensemble, for a video data set)."""
    tmp = out + ".tmp"
    if out.endswith((".json", ".csv")):
        rows = prediction_rows(predictions, videos)
        with g_pathmgr.open(tmp, "w", newline="") as f:
            if out.endswith(".json"):
                settings = {k: videos[k] for k in ("ensemble_method", "ensemble_scores")} if videos else {}
                json.dump({**settings, "rows": rows}, f)
            else:  # rows is not empty: evaluate fails when nothing decoded
                writer = csv.writer(f)
                columns = [k for k in rows[0] if k != "scores"]
                writer.writerow(columns + [f"score_{c}" for c in range(len(rows[0].get("scores", ())))])
                for row in rows:
                    writer.writerow([" ".join(map(str, row[k])) if isinstance(row[k], list) else row[k]
                                     for k in columns] + row.get("scores", []))
    else:
        with g_pathmgr.open(tmp, "wb") as f:
            torch.save({**predictions, "videos": videos} if videos is not None else predictions, f)
    os.replace(tmp, out)
    logger.info("predictions saved to %s", out)


def test(cfg) -> dict:
    """Evaluates the test checkpoint on TEST.SPLIT; logs and returns top-1/top-5 and per-image GMACs."""
    setup_logging("", du.get_rank())  # the console only, until the job is accepted
    path = test_checkpoint(cfg)
    loader = construct_loader(cfg, cfg.TEST.SPLIT, du.get_rank(), du.get_world_size(), is_train=False)
    model, device = prepare(cfg, "test")
    out = results_path(cfg)
    if out and du.is_master():  # checked before the evaluation, which may take hours
        ensure_writable_file(out, "TEST.SAVE_RESULTS_PATH")
    if cfg.TRAIN.ENABLE and cfg.TEST.CHECKPOINT_FILE_PATH:
        logger.warning("TEST.CHECKPOINT_FILE_PATH is set: the test job evaluates %s, not the checkpoint this run "
                       "trained", path)
    cu.load_weights(model, path, prefer_ema=cfg.MODEL_EMA.ENABLE and cfg.MODEL_EMA.EVAL)
    # A multi-exit model (DVT): its curves, then the thresholds its early-exit evaluation runs with.
    exit_stats = prepare_exits(cfg, model, device, path, amp_dtype(cfg, device)) if getattr(model, "num_exits", 1) > 1 else {}
    stats = evaluate(model, loader, device, amp_dtype(cfg, device), keep_predictions=bool(out),
                     label=f"test on {cfg.TEST.SPLIT}", log_period=cfg.LOG_PERIOD,
                     ensemble_method=cfg.DATA.ENSEMBLE_METHOD, ensemble_scores=cfg.TEST.ENSEMBLE_SCORES)
    stats.update(exit_stats)
    predictions, videos = stats.pop("predictions", None), stats.pop("video_predictions", None)
    stats.update(_type="test_final", checkpoint=path, split=cfg.TEST.SPLIT)
    if du.is_master():
        log_test_accuracy(cfg, stats)
        report_nonfinite(stats, f"test on {cfg.TEST.SPLIT}")
        if "exit_counts" in stats:
            logger.info("images per exit: %s (exit GMACs, cumulative: %s)", " / ".join(map(str, stats["exit_counts"])),
                        " / ".join(f"{g:.4f}" for g in stats.get("exit_gmacs", [])))
        if "top1_acc_per_exit" in stats:
            logger.info("top-1 per exit (every exit on every image): %s",
                        " / ".join(f"{a:.2f}%" for a in stats["top1_acc_per_exit"]))
        if "token_depth_mean" in stats:
            logger.info("mean token depth %.2f of %d blocks", stats["token_depth_mean"],
                        len(stats["tokens_per_block_mean"]))
        if "gflops_official_mean" in stats:
            logger.info("GFLOPs per image by the official flops table: mean %.4f", stats["gflops_official_mean"])
        for key in sorted(k for k in stats if k.endswith("_per_block")):  # a method's usage per block
            name = key[: -len("_per_block")]
            logger.info("%s: mean %.3f, per block %s", name, stats[f"{name}_mean"],
                        " ".join(f"{v:.2f}" for v in stats[key]))
        if "tokens_per_block_mean" in stats:
            logger.info("kept tokens per block (mean [min, max]): %s",
                        " ".join(f"{m:.1f}[{lo},{hi}]" for m, lo, hi in zip(stats["tokens_per_block_mean"],
                                 stats["tokens_per_block_min"], stats["tokens_per_block_max"])))
        log_json_stats(stats)
        if cfg.TENSORBOARD.ENABLE:
            from torch.utils.tensorboard import SummaryWriter

            with SummaryWriter(cfg.TENSORBOARD.LOG_DIR or os.path.join(cfg.OUTPUT_DIR, "tensorboard")) as writer:
                for key, value in stats.items():
                    for i, v in enumerate(value if isinstance(value, list) else [value]):
                        if isinstance(v, (int, float)):
                            writer.add_scalar(f"test/{key}" + (f"/{i}" if isinstance(value, list) else ""), v)
        if predictions is not None:
            save_results(out, predictions, videos)
    return stats
