"""What an erasure did, as pictures and figures: the before/after sample grid with a classifier-free concept score
(concept_report.py), and the trainer's loss curves as a ComfyUI IMAGE (loss_plot.py)."""
from .concept_report import ConceptScore, ReportError, compare_models, concept_scores, split_prompts
from .loss_plot import draw_loss_curves

__all__ = ["ConceptScore", "ReportError", "compare_models", "concept_scores", "split_prompts", "draw_loss_curves"]
