from .evaluate import evaluate
from .launch import WorkerError, launch_job
from .trainer import Hook, Trainer, TrainingDiverged, test, train

__all__ = ["evaluate", "launch_job", "WorkerError", "Hook", "Trainer", "TrainingDiverged", "test", "train"]
