"""The training recipe (``train``) and the library functions it is built from."""

from lorakit.training.evaluate import evaluate_loss
from lorakit.training.loop import TrainResult, inject_adapters, load_base, train
from lorakit.training.optim import make_optimizer, param_groups
from lorakit.training.schedule import lr_multiplier, make_scheduler

__all__ = ["TrainResult", "evaluate_loss", "inject_adapters", "load_base", "lr_multiplier", "make_optimizer",
           "make_scheduler", "param_groups", "train"]
