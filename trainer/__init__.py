"""Training concept erasures inside ComfyUI: plain logic over comfy's model management, no node code.

setting_fields.py every setting written once (name, default, range, group, tooltip): nodes and settings built from it
settings.py       TrainSettings, validated before anything is loaded
conditioning.py   CONDITIONING -> apply_model keyword tensors, width checks
prediction.py     eps / v parameterisation and the sampling schedule
precision.py      what the dtype setting means: the one dtype the UNet computes in, and the fp16 loss scaler
host_autograd.py  inference-mode escape, weights in the compute dtype for the run, the in-place residual shim
deltas.py         trainable weight deltas (full or LoRA) added by forward hooks
denoiser.py       teacher / student / student-with-prompt views of one UNet
checkpointing.py  gradient checkpointing of the UNet's transformers
trajectories.py   x_t sampled by the student, reused for trajectory_refresh iterations
attack.py         the attack on an erasure (adversarial tokens appended to the concept)
adversary.py      the adversarial tokens, also robust training's inner attack
iteration.py      the trainables, one iteration's loss terms and the optimizer step
memory_count.py   shape-only models and a live-bytes counter
memory_plan.py    the run's memory, counted before it starts; load whole or refuse with what would fit
retain_set.py     the retain set the trainer finds: concepts near the erased one, kept by the preserve term
learning_rate.py  min_score_rise: the deltas' rate doubled while the concept score barely moves
erasure_loop.py   the loop, producing a ConceptErasure
"""
from .attack import AttackResult, AttackSettings, attack_erasure
from .erasure_loop import TrainingError, TrainingResult, train_erasure
from .memory_plan import MemoryPlan, TrainingMemoryError
from .retain_set import Candidates, RetainSet, encode_candidates
from .settings import CHECKPOINTING, DTYPES, FACTOR_ALPHAS, METHODS, PRESERVE_IMAGES, RETAINS, TrainSettings

__all__ = ["AttackResult", "AttackSettings", "attack_erasure", "TrainingError", "TrainingResult", "train_erasure", "MemoryPlan",
           "TrainingMemoryError", "CHECKPOINTING", "DTYPES", "FACTOR_ALPHAS", "METHODS", "PRESERVE_IMAGES", "RETAINS", "TrainSettings",
           "Candidates", "RetainSet", "encode_candidates"]
