"""Every config key of vitadapt, with its default and meaning.

The tree follows PySlowFast's names wherever a PySlowFast user would look for them. Method nodes
(ATS, EVIT, ...) are added by their own modules through `register_config`, so this file only holds
what every run shares.
"""

from fvcore.common.config import CfgNode

_C = CfgNode()

# ---------------------------------------------------------------- run / system
# Where logs, checkpoints and the resolved config go. Empty: ./runs/<config file name>.
_C.OUTPUT_DIR = ""
_C.RNG_SEED = 0
# Log a progress line every LOG_PERIOD iterations.
_C.LOG_PERIOD = 10
# Print the model, its parameter count and GMACs at start-up.
_C.LOG_MODEL_INFO = True
# Processes (one per GPU) per machine on CUDA; 0 runs on the CPU.
_C.NUM_GPUS = 1
# Worker processes per machine when NUM_GPUS is 0 (gloo); >1 makes distributed training testable on CPU.
_C.NUM_PROCS = 1
# Multi-node, as in PySlowFast: every machine runs the same command with its own SHARD_ID.
_C.NUM_SHARDS = 1
_C.SHARD_ID = 0
# "auto": nccl on CUDA, gloo on CPU.
_C.DIST_BACKEND = "auto"
# On the CPU (NUM_GPUS 0, Linux/glibc): malloc keeps the memory a forward frees for the next one instead of handing
# it back to the system, which made every forward fault its activations' pages in again (DeiT-S: 21% of a batch-64
# forward); the process keeps its peak memory. See vitadapt/utils/cpu_memory.py.
_C.KEEP_FREED_CPU_MEMORY = True
# On the CPU (NUM_GPUS 0): subnormal floats (|x| < 1.2e-38) are flushed to zero, which x86 CPUs otherwise compute
# slowly; A-ViT's backward makes them (DeiT-S, batch 16: its training step 21% faster). See vitadapt/utils/denormals.py.
_C.FLUSH_DENORMAL = True

# ---------------------------------------------------------------- model
_C.MODEL = CfgNode()
# Registry key of the model (vitadapt.models.MODEL_REGISTRY).
_C.MODEL.NAME = "VisionTransformer"
_C.MODEL.NUM_CLASSES = 1000
# Registry key of the task loss (vitadapt.losses.LOSS_REGISTRY).
_C.MODEL.LOSS_FUNC = "cross_entropy"

# ---------------------------------------------------------------- ViT backbone
_C.VIT = CfgNode()
_C.VIT.PATCH_SIZE = 16
_C.VIT.EMBED_DIM = 384
_C.VIT.DEPTH = 12
_C.VIT.NUM_HEADS = 6
_C.VIT.MLP_RATIO = 4.0
_C.VIT.QKV_BIAS = True
_C.VIT.IN_CHANS = 3
# Dropout after the positional embedding and inside the MLP (DeiT: 0).
_C.VIT.DROP_RATE = 0.0
_C.VIT.ATTN_DROP_RATE = 0.0
# Stochastic depth, linearly increasing to this rate at the last block (DeiT-S: 0.1).
_C.VIT.DROP_PATH_RATE = 0.0
# Dropout before the classifier.
_C.VIT.HEAD_DROP_RATE = 0.0
# How per-image token selections run: "packed" (per-token layers only on the kept tokens; attention per image)
# or "masked" (dense tensors, dropped tokens masked as keys and frozen). Both give the same results.
_C.VIT.TOKEN_EXECUTION = "packed"
# Attention kernel: True: torch's fused scaled_dot_product_attention; False: softmax(Q K^T * scale) V computed
# explicitly, the order of operations of the official code (closer to it in float32, slower).
_C.VIT.FUSED_ATTENTION = True
# Packed images of different lengths (token methods at batch > 1): True attends without padding to the longest
# image, with torch's variable-length attention where it runs (CUDA, half precision, torch >= 2.10) and one image
# at a time on a CPU (a GPU without the kernel pads); False always pads and masks. Results are the same
# (tests/test_varlen_attention.py).
_C.VIT.VARLEN_ATTENTION = True

# ---------------------------------------------------------------- training
_C.TRAIN = CfgNode()
_C.TRAIN.ENABLE = True
# Registry key of the data set (vitadapt.datasets.DATASET_REGISTRY).
_C.TRAIN.DATASET = "imagenet"
# Global batch size, summed over every process of every shard.
_C.TRAIN.BATCH_SIZE = 256
# Evaluate on the val split every EVAL_PERIOD epochs (and after the last one).
_C.TRAIN.EVAL_PERIOD = 1
# Save a checkpoint every CHECKPOINT_PERIOD epochs (and after the last one).
_C.TRAIN.CHECKPOINT_PERIOD = 1
# Resume from the newest checkpoint in OUTPUT_DIR/checkpoints if there is one.
_C.TRAIN.AUTO_RESUME = True
# Weights to start from (fine-tuning): a vitadapt, DeiT or timm checkpoint. Only the model is loaded.
_C.TRAIN.CHECKPOINT_FILE_PATH = ""
# Keep only the newest K epoch checkpoints (0 keeps all).
_C.TRAIN.KEEP_LAST_K = 0
# Mixed precision on CUDA: "off", "fp16" or "bf16". Ignored (with a warning) on the CPU.
_C.TRAIN.AMP = "off"
# Label smoothing of the target (also applied inside mixup/cutmix).
_C.TRAIN.LABEL_SMOOTHING = 0.0

# ---------------------------------------------------------------- testing
_C.TEST = CfgNode()
_C.TEST.ENABLE = True
_C.TEST.DATASET = "imagenet"
# Global batch size for val/test.
_C.TEST.BATCH_SIZE = 256
# Weights to evaluate. Empty: the newest checkpoint in OUTPUT_DIR, else TRAIN.CHECKPOINT_FILE_PATH, else an error.
_C.TEST.CHECKPOINT_FILE_PATH = ""
# Split evaluated by the test job ("val" for ImageNet, whose test labels are not public).
_C.TEST.SPLIT = "val"
# Save predictions and labels (a torch file) to OUTPUT_DIR/SAVE_RESULTS_PATH; empty saves nothing.
_C.TEST.SAVE_RESULTS_PATH = ""
# Video test: temporal clips per video, and spatial crops (1: centre, 3: left/centre/right) per clip; the
# NUM_ENSEMBLE_VIEWS * NUM_SPATIAL_CROPS views of a video are ensembled.
_C.TEST.NUM_ENSEMBLE_VIEWS = 10
_C.TEST.NUM_SPATIAL_CROPS = 3
# What the views of a video are ensembled on: "logits" (official: the raw outputs) or "softmax" (per-view
# probabilities; with DATA.ENSEMBLE_METHOD "sum" they are averaged).
_C.TEST.ENSEMBLE_SCORES = "logits"

# ---------------------------------------------------------------- data
_C.DATA = CfgNode()
# ImageNet layout: <dir>/train/<class>/*, <dir>/val/<class>/*, any class folder names.
_C.DATA.PATH_TO_DATA_DIR = ""
_C.DATA.TRAIN_CROP_SIZE = 224
_C.DATA.TEST_CROP_SIZE = 224
# Eval resize: the short side goes to TEST_CROP_SIZE / IN_VAL_CROP_RATIO, then a center crop.
_C.DATA.IN_VAL_CROP_RATIO = 0.875
_C.DATA.MEAN = [0.485, 0.456, 0.406]
_C.DATA.STD = [0.229, 0.224, 0.225]
_C.DATA.INTERPOLATION = "bicubic"
# ---- video (Kinetics; PySlowFast / TimeSformer names and defaults)
# Frames per clip, and their spacing in frames at TARGET_FPS (a clip spans NUM_FRAMES * SAMPLING_RATE / TARGET_FPS s).
_C.DATA.NUM_FRAMES = 8
_C.DATA.SAMPLING_RATE = 8
# Frame rate SAMPLING_RATE is counted in; a video at another rate is sampled over the same duration.
_C.DATA.TARGET_FPS = 30
# Joined in front of each path of {train,val,test}.csv; empty: relative paths are relative to PATH_TO_DATA_DIR.
_C.DATA.PATH_PREFIX = ""
# Between the path and the integer label on each line of {train,val,test}.csv.
_C.DATA.PATH_LABEL_SEPARATOR = " "
# Train (and, as PySlowFast does, val) clips: short side scaled to a random size in [min, max] before the crop;
# the min is also the test short side with TEST.NUM_SPATIAL_CROPS 1.
_C.DATA.TRAIN_JITTER_SCALES = [256, 320]
# Video decoder; only "pyav" (torchvision's video reader no longer exists in torchvision 0.29).
_C.DATA.DECODING_BACKEND = "pyav"
# A video with fewer frames than a clip spans: "skip" (not used, warned about and counted with the undecodable
# ones) or "clamp" (the frame indices clamp to its last frame, as PySlowFast / TimeSformer do; the Kinetics
# configs use it so that published numbers compare).
_C.DATA.SHORT_VIDEO = "skip"
# Horizontal flip (p 0.5) of training clips (PySlowFast's DATA.RANDOM_FLIP); off where direction is the label.
_C.DATA.RANDOM_FLIP = True
# How the views of a test video are combined (PySlowFast's TestMeter): "sum" (official) or "max" (elementwise).
_C.DATA.ENSEMBLE_METHOD = "sum"

# ---------------------------------------------------------------- train-time augmentation (timm)
_C.AUG = CfgNode()
# Off: RandomResizedCrop + flip only. On: the DeiT recipe through timm's create_transform.
_C.AUG.ENABLE = False
_C.AUG.SCALE = [0.08, 1.0]
_C.AUG.HFLIP = 0.5
_C.AUG.AA_TYPE = "rand-m9-mstd0.5-inc1"
_C.AUG.COLOR_JITTER = 0.4
_C.AUG.RE_PROB = 0.25
_C.AUG.RE_MODE = "pixel"
_C.AUG.RE_COUNT = 1

# ---------------------------------------------------------------- mixup / cutmix (timm Mixup)
_C.MIXUP = CfgNode()
_C.MIXUP.ENABLE = False
_C.MIXUP.ALPHA = 0.8
_C.MIXUP.CUTMIX_ALPHA = 1.0
_C.MIXUP.PROB = 1.0
_C.MIXUP.SWITCH_PROB = 0.5

# ---------------------------------------------------------------- optimisation
_C.SOLVER = CfgNode()
# Learning rate at TRAIN.BATCH_SIZE; scaled linearly by TRAIN.BATCH_SIZE / LR_SCALE_REF_BATCH if that is > 0
# (DeiT: 5e-4 at 512).
_C.SOLVER.BASE_LR = 5e-4
_C.SOLVER.LR_SCALE_REF_BATCH = 0
# "cosine", "steps_with_relative_lrs" or "constant"; evaluated per iteration.
_C.SOLVER.LR_POLICY = "cosine"
_C.SOLVER.COSINE_END_LR = 1e-5
_C.SOLVER.COSINE_AFTER_WARMUP = True
# steps_with_relative_lrs: the epoch at which each stage starts (rising, from 0) and its LR relative to BASE_LR.
_C.SOLVER.STEPS = []
_C.SOLVER.LRS = []
_C.SOLVER.MAX_EPOCH = 300
_C.SOLVER.WARMUP_EPOCHS = 5.0
_C.SOLVER.WARMUP_START_LR = 1e-6
# "adamw" or "sgd".
_C.SOLVER.OPTIMIZING_METHOD = "adamw"
_C.SOLVER.MOMENTUM = 0.9
_C.SOLVER.NESTEROV = False
_C.SOLVER.BETAS = [0.9, 0.999]
_C.SOLVER.WEIGHT_DECAY = 0.05
# No weight decay on 1-D parameters (norms, biases) and on the model's no_weight_decay() names (pos/cls).
_C.SOLVER.ZERO_WD_1D_PARAM = True
# Clip the global gradient L2 norm to this value; 0 disables clipping.
_C.SOLVER.CLIP_GRAD_L2NORM = 0.0

# ---------------------------------------------------------------- model EMA (timm ModelEmaV3)
_C.MODEL_EMA = CfgNode()
_C.MODEL_EMA.ENABLE = False
_C.MODEL_EMA.DECAY = 0.99996
# Evaluate (and test with) the EMA weights instead of the raw ones.
_C.MODEL_EMA.EVAL = True

# ---------------------------------------------------------------- loading
_C.DATA_LOADER = CfgNode()
# Loader worker processes per training process. -1 (auto): min(4, this machine's CPUs / processes per machine),
# resolved when the config is loaded, so the saved config records the number used; an explicit count is used as
# given (torch warns when it exceeds the CPUs). Worker count changes the augmentation random streams.
_C.DATA_LOADER.NUM_WORKERS = -1
_C.DATA_LOADER.PIN_MEMORY = True

_C.TENSORBOARD = CfgNode()
_C.TENSORBOARD.ENABLE = False
# Empty: OUTPUT_DIR/tensorboard.
_C.TENSORBOARD.LOG_DIR = ""

# ---------------------------------------------------------------- tools/benchmark.py
_C.BENCHMARK = CfgNode()
_C.BENCHMARK.BATCH_SIZES = [1, 16]
_C.BENCHMARK.WARMUP_ITERS = 3
# Timed repeats per batch size; the median is reported.
_C.BENCHMARK.NUM_REPEATS = 5
_C.BENCHMARK.ITERS_PER_REPEAT = 3
# Torch intra-op threads; 0 keeps torch's default.
_C.BENCHMARK.NUM_THREADS = 0


# What the loader cannot read off a default. Every key accepts only the type of its default (ints are accepted
# for floats; floats must be finite and fit in float32), a list key only lists of its default's element type, and
# None nowhere. Two cases need a declaration here (method nodes pass theirs to register_config(types=...)):
# - a list key whose default is empty: its element type, as [type];
# - an optional key, whose default is None (None then stays allowed): its type. There are none at present.
DECLARED_TYPES = {
    "SOLVER.STEPS": [float],  # epochs, may be fractional (the schedule is evaluated per iteration)
    "SOLVER.LRS": [float],
}


def get_defaults() -> CfgNode:
    return _C
