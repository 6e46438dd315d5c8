#!/usr/bin/env python3
"""Inference cost of one model, or of two side by side in the same run.

    python tools/benchmark.py --cfg A.yaml [--compare B.yaml] [--data] [--out FILE.json] [--plot FILE.png]
                              [KEY VALUE ...]

For every batch size in BENCHMARK.BATCH_SIZES: images/s, or clips/s for a video model (median over
BENCHMARK.NUM_REPEATS timed repeats of BENCHMARK.ITERS_PER_REPEAT forward passes, after BENCHMARK.WARMUP_ITERS
warm-up passes; the models are interleaved repeat by repeat so that both see the same machine load; a speed-up is
the median over the repeats of the two models' ratio within each repeat), and the peak memory one forward pass
adds. Per model: parameters, GMACs per image (per clip: one test view) counted analytically from the tokens each
image kept (mean over the inputs) and by fvcore on the first image. KEY VALUE overrides apply to both configs.
Weights come from TEST.CHECKPOINT_FILE_PATH when set; inputs are random unless --data takes them from the config's
TEST.SPLIT. --plot draws throughput vs batch size, one line per config. On a CPU, the C allocator keeps freed memory
first (KEEP_FREED_CPU_MEMORY; the JSON's cpu_allocator says what it did) and subnormal floats are flushed to zero
(FLUSH_DENORMAL; the JSON's flush_denormal).
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The CPU peak-memory measurement runs torch.profiler, whose kineto backend logs lines that read like failures on
# a machine without a GPU ("gpuGetDeviceCount failed", "USDT ... profiler_start"), and c10 warns that blocks
# allocated before profiling ("of unknown size") are not tracked; none concerns the measurement. Both variables
# are read when torch and kineto initialise, hence set before importing torch; a user's own setting wins.
os.environ.setdefault("KINETO_LOG_LEVEL", "6")  # above ERROR (4) and USDT (5): silent
os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from vitadapt.config import ConfigError, check_paths, load_config  # noqa: E402
from vitadapt.datasets import build_dataset  # noqa: E402
from vitadapt.errors import VitadaptError  # noqa: E402
from vitadapt.engine.exits import calibrate_on_inputs  # noqa: E402
from vitadapt.engine.output_dir import ensure_writable_file  # noqa: E402
from vitadapt.engine.trainer import amp_dtype, select_device, training_loss  # noqa: E402
from vitadapt.models import build_model, input_shape  # noqa: E402
from vitadapt.models.flops import fvcore_macs  # noqa: E402
from vitadapt.models.synthetic import add_halting_drift_, calibrate_decisions_, sharpen_  # noqa: E402
from vitadapt.utils.checkpoint import load_weights  # noqa: E402
from vitadapt.utils.cpu_memory import configure_cpu_allocator  # noqa: E402
from vitadapt.utils.denormals import configure_denormals  # noqa: E402
from vitadapt.visualization.plots import plot_throughput  # noqa: E402


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cfg", required=True, help="YAML config of the model to measure")
    parser.add_argument("--compare", default="", help="a second config, measured side by side")
    parser.add_argument("--data", action="store_true", help="use images of the config's TEST.SPLIT, not noise")
    parser.add_argument("--out", default="", help="JSON output (default: OUTPUT_DIR of --cfg / benchmark.json)")
    parser.add_argument("--train", action="store_true",
                        help="time training steps (forward in training mode, the task and method losses, backward, "
                             "an optimizer step with learning rate 0 so that every step sees the same weights) "
                             "instead of inference forwards")
    parser.add_argument("--plot", default="", help="PNG figure of throughput vs batch size, one line per config")
    parser.add_argument("--init", choices=("default", "sharpened", "halting"), default="default",
                        help="weights when no TEST.CHECKPOINT_FILE_PATH is set: the model's own init, or synthetic "
                             "weights (vitadapt.models.synthetic), the same for both configs: 'sharpened' has "
                             "peaked attention, under which token-sampling methods drop tokens as with trained "
                             "weights; 'halting' adds a channel-0 drift to it, under which A-ViT tokens halt. "
                             "With either, AdaViT's decision heads are calibrated on the inputs to keep about 3/4 of "
                             "the heads, branches and tokens, differently per image")
    args, opts = parser.parse_known_args(argv)
    flags = [o for o in opts if o.startswith("--")]
    if flags:  # a mistyped option would otherwise reach the config as a key
        parser.error(f"unrecognized argument: {flags[0]}")
    return args, opts


def cpu_peak_mib(fn) -> float:
    """Peak bytes held by tensors allocated while `fn` runs, from the profiler's allocation events."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    held = peak = 0
    for e in events:
        held += e.nbytes()
        peak = max(peak, held)
    return peak / 2**20


def check_files(cfg, use_data: bool) -> None:
    """What the run will read exists, with the messages of a test job (vitadapt.config.check_paths, naming the
    key): the data folder with --data, TEST.CHECKPOINT_FILE_PATH when set."""
    cfg = cfg.clone()
    cfg.defrost()
    cfg.TRAIN.ENABLE, cfg.TRAIN.CHECKPOINT_FILE_PATH, cfg.TEST.ENABLE = False, "", use_data
    check_paths(cfg)
    path = cfg.TEST.CHECKPOINT_FILE_PATH
    if path and not os.path.isfile(path):  # without --data, check_paths skips the test keys
        raise ConfigError(f"TEST.CHECKPOINT_FILE_PATH does not exist: {path}")


def make_inputs(cfg, batch: int, use_data: bool) -> torch.Tensor:
    """A batch of images [B, C, H, W], or of clips [B, C, T, H, W] (one test view each) for a video model."""
    if not use_data:
        return torch.randn(input_shape(cfg, batch), generator=torch.Generator().manual_seed(0))
    dataset = build_dataset(cfg.TEST.DATASET, cfg, cfg.TEST.SPLIT)
    # The first decodable images (an undecodable one is skipped with the data set's warning, up to 20), repeated
    # to fill the batch when the split is smaller: every batch size runs the number of images it says.
    items = [dataset[i] for i in range(min(len(dataset), batch + 20))]
    images = [it[0] for it in items if it is not None]
    if not images:
        where = getattr(dataset, "folder", None) or "the data set"
        raise ConfigError(f"--data: no image of TEST.SPLIT '{cfg.TEST.SPLIT}' could be decoded: {len(items)} "
                          f"tried in {where}, all failed (see the warnings above)")
    return torch.stack([images[i % len(images)] for i in range(batch)])


class Subject:
    """One model under test, with its inputs per batch size."""

    def __init__(self, cfg_file: str, opts, use_data: bool, init: str, batch_sizes=None, train: bool = False):
        self.name = cfg_file
        self.cfg = load_config(cfg_file, opts)
        self.device = select_device(self.cfg)
        self.dtype = amp_dtype(self.cfg, self.device)
        torch.manual_seed(self.cfg.RNG_SEED)  # the same weights run to run (DVT: the same exits)
        self.model = build_model(self.cfg).to(self.device).eval()
        if self.cfg.TEST.CHECKPOINT_FILE_PATH:
            load_weights(self.model, self.cfg.TEST.CHECKPOINT_FILE_PATH)
        elif init in ("sharpened", "halting"):
            sharpen_(self.model)
            if init == "halting":
                add_halting_drift_(self.model)
        self.params = sum(p.numel() for p in self.model.parameters())
        batch_sizes = batch_sizes or self.cfg.BENCHMARK.BATCH_SIZES
        largest = make_inputs(self.cfg, max(batch_sizes), use_data)
        self.inputs = {b: largest[:b].to(self.device) for b in batch_sizes}
        if not self.cfg.TEST.CHECKPOINT_FILE_PATH and init in ("sharpened", "halting"):
            calibrate_decisions_(self.model, largest.to(self.device), usage=0.75)
        # A multi-exit model (DVT) exits early under the thresholds of its config (exits.calibrate_on_inputs).
        self.thresholds = (calibrate_on_inputs(self.cfg, self.model, largest.to(self.device),
                                               self.cfg.TEST.CHECKPOINT_FILE_PATH)
                           if getattr(self.model, "num_exits", 1) > 1 else None)
        self.results = {}
        self.train = train
        if train:
            self.labels = {b: torch.arange(b, device=self.device) % self.cfg.MODEL.NUM_CLASSES for b in batch_sizes}
            self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.0)

    def forward(self, batch: int):
        """One inference forward, or with --train one training step."""
        return self.train_step(batch) if self.train else self.infer(batch)

    @torch.inference_mode()
    def infer(self, batch: int):
        self.model.eval()
        with torch.autocast(self.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
            return self.model(self.inputs[batch])

    def train_step(self, batch: int):
        self.model.train()
        with torch.autocast(self.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
            logits = self.model(self.inputs[batch])
            loss, _, _ = training_loss(self.model, logits, self.labels[batch], F.cross_entropy)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return logits.detach()

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def timed(self, batch: int, iters: int) -> float:
        self.sync()
        start = time.perf_counter()
        for _ in range(iters):
            self.forward(batch)
        self.sync()
        return time.perf_counter() - start

    def memory_mib(self, batch: int):
        """Peak memory one forward pass allocates on top of the weights and inputs."""
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            self.forward(batch)
            self.sync()
            return (torch.cuda.max_memory_allocated() - base) / 2**20
        return cpu_peak_mib(lambda: self.forward(batch))

    @torch.inference_mode()
    def gmacs(self):
        """Inference costs (also with --train: the training forwards' own costs are in the per-batch results)."""
        largest = max(self.inputs)
        self.infer(largest)
        per_image = self.model.macs_per_image() / 1e9
        exits = {}
        if self.thresholds is not None:  # where the images of the largest batch left
            counts = torch.bincount(self.model.last_exit.cpu(), minlength=self.model.num_exits)
            exits = {"exit_thresholds": self.thresholds,
                     "exit_fractions": (counts.double() / counts.sum()).tolist(),
                     "exit_gmacs": (self.model.exit_macs() / 1e9).tolist()}
        first = self.inputs[largest][:1]
        with torch.autocast(self.device.type, enabled=False):
            fv = fvcore_macs(self.model, first.float()) / 1e9
            self.model(first.float())
            first_analytic = self.model.macs_per_image()[0].item() / 1e9
        return {**exits, "gmacs_mean": per_image.mean().item(), "gmacs_min": per_image.min().item(),
                "gmacs_max": per_image.max().item(), "gmacs_first_image": first_analytic,
                "gmacs_fvcore_first_image": fv}


def run(argv=None) -> dict:
    args, opts = parse(argv)
    # Every config, the files they point to, and where the report goes, checked before any measurement (minutes).
    cfgs = [load_config(cfg_file, opts) for cfg_file in [args.cfg] + ([args.compare] if args.compare else [])]
    for cfg in cfgs:
        check_files(cfg, args.data)
    out = args.out or os.path.join(cfgs[0].OUTPUT_DIR, "benchmark.json")
    ensure_writable_file(out, f"--out {out}" if args.out else f"OUTPUT_DIR's report file {out}")
    if os.path.exists(out) and not os.access(out, os.W_OK):
        raise ConfigError(f"cannot overwrite {out}: the file is read-only")
    if args.plot:
        ensure_writable_file(args.plot, f"--plot {args.plot}")
    # Before any model exists: every subject's tensors then come from an allocator that keeps freed memory, and every
    # thread flushes subnormal floats (FLUSH_DENORMAL; OpenMP's threads copy the setting when they start).
    allocator = configure_cpu_allocator(cfgs[0])
    flush_denormal = configure_denormals(cfgs[0])
    subjects = [Subject(args.cfg, opts, args.data, args.init, train=args.train)]
    if args.compare:
        # Measured on the first config's BENCHMARK settings, so that both see the same work.
        subjects.append(Subject(args.compare, opts, args.data, args.init, subjects[0].cfg.BENCHMARK.BATCH_SIZES,
                                train=args.train))
    bench = subjects[0].cfg.BENCHMARK
    if bench.NUM_THREADS > 0:
        torch.set_num_threads(bench.NUM_THREADS)
    report = {"device": str(subjects[0].device), "init": args.init, "mode": "train" if args.train else "inference", "threads": torch.get_num_threads(), "torch": torch.__version__,
              "cpu_allocator": allocator, "flush_denormal": flush_denormal,
              "cpu": platform.processor() or platform.machine(), "warmup_iters": bench.WARMUP_ITERS,
              "repeats": bench.NUM_REPEATS, "iters_per_repeat": bench.ITERS_PER_REPEAT, "models": []}
    for s in subjects:
        s.costs = s.gmacs()
    for batch in bench.BATCH_SIZES:
        for s in subjects:
            s.timed(batch, bench.WARMUP_ITERS)
        samples = {id(s): [] for s in subjects}
        for _ in range(bench.NUM_REPEATS):  # interleaved: A, B, A, B, ...
            for s in subjects:
                images = s.inputs[batch].shape[0] * bench.ITERS_PER_REPEAT
                samples[id(s)].append(images / s.timed(batch, bench.ITERS_PER_REPEAT))
        for s in subjects:
            rates = samples[id(s)]
            s.forward(batch)  # an adaptive model's cost depends on the batch's images
            s.results[batch] = {"batch": batch, "gmacs_mean": s.model.macs_per_image().mean().item() / 1e9,
                                "images_per_s": statistics.median(rates),
                                "images_per_s_min": min(rates), "images_per_s_max": max(rates),
                                "images_per_s_repeats": rates,
                                "peak_mem_mib": s.memory_mib(batch)}
    for s in subjects:
        report["models"].append({"cfg": s.name, "model": s.cfg.MODEL.NAME, "params_m": s.params / 1e6,
                                 "input": "clip" if len(input_shape(s.cfg)) == 5 else "image",
                                 **s.costs, "results": list(s.results.values())})
    if len(subjects) == 2:
        a, b = subjects
        report["compare"] = {"gmacs_ratio": a.costs["gmacs_mean"] / b.costs["gmacs_mean"],
                             "gmacs_ratio_per_batch": {str(k): a.results[k]["gmacs_mean"] / b.results[k]["gmacs_mean"]
                                                       for k in bench.BATCH_SIZES},
                             "speedup": {str(k): paired_ratio(b.results[k]["images_per_s_repeats"],
                                                              a.results[k]["images_per_s_repeats"])
                                         for k in bench.BATCH_SIZES}}
        # The first's speed-up over the second divided by its GMACs reduction (1.0: the whole saving is speed).
        report["compare"]["efficiency"] = {k: report["compare"]["gmacs_ratio_per_batch"][k] / v
                                           for k, v in report["compare"]["speedup"].items()}
    print_table(report)
    try:
        with open(out, "w") as f:
            json.dump(report, f, indent=2)
    except OSError as e:  # e.g. the disk filled up during the measurement
        raise ConfigError(f"cannot write {out}: {e.strerror or e}") from None
    print(f"written to {out}")
    if args.plot:
        plot_throughput(report, args.plot)
        print(f"plot written to {args.plot}")
    return report


def paired_ratio(rates: list, reference_rates: list) -> float:
    """The median over the repeats of rates[i] / reference_rates[i]: each repeat times the two models back to back,
    so a change of machine speed between repeats, which moves both, cancels in its ratio (a ratio of the two
    medians would keep it whenever the two medians come from repeats of different speed)."""
    return statistics.median(r / ref for r, ref in zip(rates, reference_rates))


def print_table(report: dict) -> None:
    print(f"{'training steps' if report.get('mode') == 'train' else 'inference'}: "
          f"device {report['device']}, {report['threads']} threads, torch {report['torch']}, "
          + (f"CPU allocator {report['cpu_allocator']}, " if report.get("cpu_allocator") and report["device"] == "cpu"
             else "")
          + ("subnormal floats flushed, " if report.get("flush_denormal") else "")
          + f"median of {report['repeats']} x {report['iters_per_repeat']} iterations after {report['warmup_iters']} warm-up")
    width = max(len("config"), *(len(m["cfg"]) for m in report["models"]))  # full names: two may share a tail
    rate = "clips/s" if report["models"][0].get("input") == "clip" else "img/s"
    print(f"{'config':<{width}} {'params(M)':>9} {'GMACs':>7} {'fvcore':>7} {'batch':>5} {rate:>9} {'peak MiB':>9}")
    for m in report["models"]:
        for r in m["results"]:
            mem = f"{r['peak_mem_mib']:.1f}"
            print(f"{m['cfg']:<{width}} {m['params_m']:>9.2f} {r['gmacs_mean']:>7.3f} "
                  f"{m['gmacs_fvcore_first_image']:>7.3f} {r['batch']:>5} {r['images_per_s']:>9.1f} {mem:>9}")
    for m in report["models"]:
        if "exit_fractions" in m:
            print(f"{m['cfg']}: exit thresholds {[round(t, 4) for t in m['exit_thresholds']]}, images per exit "
                  f"{' / '.join(f'{f:.1%}' for f in m['exit_fractions'])}, cumulative GMACs per exit "
                  f"{' / '.join(f'{g:.3f}' for g in m['exit_gmacs'])}")
    if "compare" in report:
        c = report["compare"]
        # The first config against the second: how much of its GMACs reduction turns into speed (1.0: all of it).
        speed = ", ".join(f"batch {k}: {1 / v:.2f}x the speed for {1 / c['gmacs_ratio_per_batch'][k]:.2f}x fewer "
                          f"GMACs, efficiency {c['efficiency'][k]:.2f}" for k, v in c["speedup"].items())
        print(f"first vs second config: {speed}")


def main(argv=None) -> int:
    try:
        run(argv)
    except VitadaptError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
