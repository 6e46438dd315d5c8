"""Shared helpers of the end-to-end engine tests (test_engine.py, test_engine_distributed.py).

Kept free of pytest imports: spawned worker processes import this module to find `distributed_job`.
"""

import argparse
import hashlib
import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
RUN_NET_PATH = REPO / "tools" / "run_net.py"

# Arbitrary (non-ImageNet) class folder names; sorted order is the class index.
CLASSES = ("cat", "dog", "zebra")
# One dominant colour per class, so that a two-block ViT learns the task in a few steps.
COLOURS = {"cat": (220, 40, 40), "dog": (40, 200, 60), "zebra": (50, 60, 230)}
MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)

# The tiny model every test uses (unless a test overrides a key).
TINY_VIT = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, mlp_ratio=4.0)


def load_tool(name: str):
    """tools/<name>.py as a module (tools/ is not a package); in-process, so no seconds of imports per call."""
    spec = importlib.util.spec_from_file_location(f"vitadapt_tools_{name}", RUN_NET_PATH.parent / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_run_net():
    return load_tool("run_net")


def check_parity_cli(*paths) -> subprocess.CompletedProcess:
    """tools/check_parity.py PATH... in a subprocess, as a user runs it."""
    return subprocess.run([sys.executable, str(RUN_NET_PATH.parent / "check_parity.py"), *map(str, paths)],
                          capture_output=True, text=True, timeout=300, cwd=str(RUN_NET_PATH.parents[1]))


def make_image_folder(root, train_counts=(8, 8, 8), val_counts=(3, 2, 2), size=40, seed=0,
                      classes: Sequence[str] = CLASSES) -> Path:
    """root/{train,val}/<class>/img_XX.png: small RGB images, one noisy colour per class."""
    from PIL import Image

    root = Path(root)
    rng = np.random.RandomState(seed)
    for split, counts in (("train", train_counts), ("val", val_counts)):
        for name, count in zip(classes, counts):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            base = np.array(COLOURS.get(name, (128, 128, 128)), dtype=np.float64)
            for i in range(count):
                pixels = base + rng.normal(0, 25, size=(size, size, 3))
                Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"img_{i:02d}.png")
    return root


def list_split(root, split: str = "val") -> List[Tuple[Path, int]]:
    """(path, label) of every image of a split, in the order of an ImageNet-style folder data set
    (class folders sorted by name, files sorted by name), computed independently of vitadapt."""
    root = Path(root)
    classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
    out = []
    for label, name in enumerate(classes):
        folder = root / split / name
        if folder.is_dir():
            out += [(folder / f, label) for f in sorted(os.listdir(folder)) if f.lower().endswith((".png", ".jpg"))]
    return out


def tiny_opts(data_dir, output_dir, **overrides) -> List[str]:
    """KEY VALUE overrides for a tiny CPU run; overrides use '__' for '.', e.g. SOLVER__MAX_EPOCH=3."""
    opts: Dict[str, object] = {
        "OUTPUT_DIR": str(output_dir),
        "DATA.PATH_TO_DATA_DIR": str(data_dir),
        "MODEL.NUM_CLASSES": len(CLASSES),
        "VIT.PATCH_SIZE": TINY_VIT["patch_size"],
        "VIT.EMBED_DIM": TINY_VIT["embed_dim"],
        "VIT.DEPTH": TINY_VIT["depth"],
        "VIT.NUM_HEADS": TINY_VIT["num_heads"],
        "DATA.TRAIN_CROP_SIZE": 32,
        "DATA.TEST_CROP_SIZE": 32,
        "DATA.MEAN": list(MEAN),
        "DATA.STD": list(STD),
        "NUM_GPUS": 0,
        "DATA_LOADER.NUM_WORKERS": 0,
        "DATA_LOADER.PIN_MEMORY": False,
        "LOG_MODEL_INFO": False,
        "LOG_PERIOD": 1,
        "TRAIN.BATCH_SIZE": 8,
        "TEST.BATCH_SIZE": 4,
        "SOLVER.BASE_LR": 2e-3,
        "SOLVER.MAX_EPOCH": 2,
        "SOLVER.WARMUP_EPOCHS": 0.0,
        "SOLVER.WEIGHT_DECAY": 0.0,
        "AUG.SCALE": [0.6, 1.0],
    }
    for key, value in overrides.items():
        opts[key.replace("__", ".")] = value
    out: List[str] = []
    for key, value in opts.items():
        out += [key, value if isinstance(value, str) else repr(value)]
    return out


def flatten_opts(opts: Sequence[str]) -> Dict[str, str]:
    return dict(zip(opts[0::2], opts[1::2]))


def read_stats(output_dir) -> List[dict]:
    path = Path(output_dir) / "json_stats.log"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def records(output_dir, kind: str) -> List[dict]:
    return [r for r in read_stats(output_dir) if r.get("_type") == kind]


def sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def ckpt_path(output_dir, epoch: int) -> Path:
    return Path(output_dir) / "checkpoints" / f"checkpoint_epoch_{epoch:05d}.pyth"


def load_ckpt(path) -> dict:
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location="cpu", weights_only=True)


def timm_vit(num_classes: int = len(CLASSES), **kwargs):
    """timm's own VisionTransformer with the tiny hyperparameters (the independent reference model)."""
    from timm.models.vision_transformer import VisionTransformer

    args = dict(TINY_VIT, num_classes=num_classes, qkv_bias=True)
    args.update(kwargs)
    return VisionTransformer(**args).eval()


def timm_eval_transform(crop: int = 32, crop_pct: float = 0.875):
    from timm.data import create_transform

    return create_transform(input_size=crop, is_training=False, interpolation="bicubic", crop_pct=crop_pct,
                            mean=MEAN, std=STD)


@torch.no_grad()
def reference_logits(state_dict, images: Sequence[Path], num_classes: int = len(CLASSES)) -> torch.Tensor:
    """Logits of timm's VisionTransformer holding `state_dict` on `images`, with timm's eval transform."""
    from PIL import Image

    model = timm_vit(num_classes)
    model.load_state_dict(state_dict, strict=True)
    tf = timm_eval_transform()
    batch = torch.stack([tf(Image.open(p).convert("RGB")) for p in images])
    return model(batch)


def top1(logits: torch.Tensor, labels: Sequence[int]) -> float:
    labels = torch.as_tensor(list(labels))
    return 100.0 * (logits.argmax(dim=1) == labels).double().mean().item()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- jobs for vitadapt.engine.launch_job
class Interrupt(Exception):
    """Stands for a crash or a pre-emption in the middle of training."""


def stop_at(epoch: float):
    """A trainer hook that raises Interrupt once training reaches the fractional `epoch`."""
    from vitadapt.engine import Hook

    class StopAt(Hook):
        def before_step(self, trainer, progress):
            if progress >= epoch:
                raise Interrupt(f"interrupted at epoch {progress}")

    return StopAt()


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0


def distributed_job(cfg, ema_cfg=None, resume_cfgs=None, stop_epoch: float = 1.5):
    """In every process: trains per cfg, saves this rank's final parameters (rank{r}.pt), tests, saves this
    rank's test stats. Then, optionally:
    - ema_cfg: a short run with EMA; each rank saves its model and EMA weights (ema_rank{r}.pt);
    - resume_cfgs (uninterrupted, interrupted): the first trains in one go; the second is interrupted at
      `stop_epoch` on every rank, then restarted (resuming from its last checkpoint); each rank saves both
      final states (resume_rank{r}.pt)."""
    from vitadapt.engine import Trainer, test, train

    rank = _rank()
    model = train(cfg)
    torch.save(model.state_dict(), os.path.join(cfg.OUTPUT_DIR, f"rank{rank}.pt"))
    stats = test(cfg)
    torch.save(stats, os.path.join(cfg.OUTPUT_DIR, f"test_stats_rank{rank}.pt"))
    if ema_cfg is not None:
        trainer = Trainer(ema_cfg)
        model = trainer.run()
        torch.save({"model": model.state_dict(), "ema": trainer.ema.module.state_dict()},
                   os.path.join(ema_cfg.OUTPUT_DIR, f"ema_rank{rank}.pt"))
    if resume_cfgs is not None:
        cfg_a, cfg_b = resume_cfgs
        state_a = train(cfg_a).state_dict()
        trainer = Trainer(cfg_b)
        trainer.hooks.append(stop_at(stop_epoch))
        try:
            trainer.run()
        except Interrupt:
            pass
        else:
            raise AssertionError("the interrupting hook did not fire")
        del trainer
        resumed = Trainer(cfg_b)
        start_epoch = resumed.start_epoch
        state_b = resumed.run().state_dict()
        torch.save({"uninterrupted": state_a, "resumed": state_b, "start_epoch": start_epoch},
                   os.path.join(cfg_b.OUTPUT_DIR, f"resume_rank{rank}.pt"))


def load_golden_or_skip(path):
    """A golden file of the official code (shared/golden), or a skip naming where it was looked for."""
    import pytest

    if not Path(path).is_file():
        pytest.skip(f"golden file {path} not found (set VITADAPT_GOLDEN_DIR to the shared/golden folder)")
    return torch.load(path, map_location="cpu", weights_only=True)
