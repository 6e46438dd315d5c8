from .evaluate import evaluate
from .launch import launch_job
from .trainer import Hook, Trainer, TrainingDiverged, test, train

__all__ = ["evaluate", "launch_job", "Hook", "Trainer", "TrainingDiverged", "test", "train"]
