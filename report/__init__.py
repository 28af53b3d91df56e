"""Before/after comparison of an erased model: a sample grid and a classifier-free concept score."""
from .concept_report import ConceptScore, ReportError, compare_models, concept_scores, split_prompts

__all__ = ["ConceptScore", "ReportError", "compare_models", "concept_scores", "split_prompts"]
