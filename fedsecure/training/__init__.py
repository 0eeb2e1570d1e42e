"""Training at a site: local (non-private) steps and DP-SGD with Opacus."""

from fedsecure.training.dpsgd import train_private
from fedsecure.training.local import TrainResult, evaluate, per_sequence_loss, train_local, trainable_parameters

__all__ = ["TrainResult", "evaluate", "per_sequence_loss", "train_local", "train_private", "trainable_parameters"]
