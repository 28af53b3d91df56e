"""Training concept erasures inside ComfyUI: plain logic over comfy's model management, no node code.

settings.py       every setting, validated before anything is loaded
conditioning.py   CONDITIONING -> apply_model keyword tensors, width checks
prediction.py     eps / v parameterisation and the sampling schedule
host_autograd.py  inference-mode escape and the in-place residual shim (only when the host needs it)
deltas.py         trainable weight deltas (full or LoRA) added by forward hooks
denoiser.py       teacher / student / student-with-prompt views of one UNet
trajectories.py   x_t sampled by the student, reused for trajectory_refresh iterations
erasure_loop.py   the loop, producing a ConceptErasure
loss_plot.py      loss curves as a ComfyUI IMAGE
"""
from .erasure_loop import TrainingError, TrainingResult, train_erasure
from .loss_plot import draw_loss_curves
from .settings import DTYPES, METHODS, TrainSettings

__all__ = ["TrainingError", "TrainingResult", "train_erasure", "draw_loss_curves", "DTYPES", "METHODS",
           "TrainSettings"]
