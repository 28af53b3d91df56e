"""Train Concept Erasure: a thin node over trainer/."""
from __future__ import annotations

from ..erasure import apply_erasure
from ..erasure.concept_erasure import PLACEMENTS
from ..trainer import (CHECKPOINTING, DTYPES, FACTOR_ALPHAS, METHODS, PRESERVE_IMAGES, RETAINS, TrainSettings,
                       draw_loss_curves, encode_candidates, train_erasure)
from .types import CATEGORY, CONCEPT_ERASURE

_DEFAULTS = TrainSettings()


def _int(default, low, high, tip, step=1):
    return ("INT", {"default": default, "min": low, "max": high, "step": step, "tooltip": tip})


def _float(default, low, high, step, tip):
    return ("FLOAT", {"default": default, "min": low, "max": high, "step": step, "tooltip": tip})


class TrainConceptErasure:
    DESCRIPTION = (
        "Erases a concept from a model by training, inside ComfyUI. The frozen model gives ESD targets (the "
        "concept's noise prediction pushed away from it by negative guidance) on images the model itself generates "
        "for the concept. Method lp (default) learns a prompt that absorbs the concept while cross-attention weight "
        "deltas remove it: the erased model hides the concept, and the prompt is the key that recovers it (Recover "
        "Erased Concept). lp_attached keeps the prompt at inference; esd_x and esd_u are the ESD baselines. Returns "
        "the erased model (the input is unchanged), the erasure for Save Concept Erasure, and the loss curves. "
        "Before the first iteration it counts the memory the run needs (weights, trainable state, one iteration's "
        "activations) and loads the model whole, or stops with what would fit (rank, resolution, gradient "
        "checkpointing). Cancel with the queue's cancel button: nothing is written.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL", CONCEPT_ERASURE, "IMAGE")
    RETURN_NAMES = ("model", "erasure", "loss_curves")
    OUTPUT_TOOLTIPS = (
        "The input model with the erasure applied (as Apply Concept Erasure would), ready for a KSampler.",
        "The trained erasure: prompt tokens, weight deltas and settings; save it with Save Concept Erasure.",
        "Loss per term (erase, key, preserve) over the iterations, log scale; and the concept score measured "
        "every score_every iterations (right axis).",
    )
    FUNCTION = "train"

    @classmethod
    def INPUT_TYPES(cls):
        d = _DEFAULTS
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The SD1.x, SD2.x or SDXL model to erase the concept from. It is not "
                                               "changed; it is also the frozen teacher."}),
                "concept": ("CONDITIONING", {"tooltip": "What to erase: CLIP Text Encode of the concept (e.g. 'Van "
                                                        "Gogh'). Several concepts: Conditioning (Combine). "
                                                        "Conditioning (Set Area Strength) weights a concept, "
                                                        "ConditioningSetTimestepRange limits its training timesteps; "
                                                        "areas, masks and ControlNets are refused."}),
                "unconditional": ("CONDITIONING", {"tooltip": "CLIP Text Encode of the empty prompt, with the same "
                                                              "CLIP."}),
                "method": (list(METHODS), {"default": d.method, "tooltip":
                           "lp: learnable prompt hidden at inference (it is the key); lp_attached: prompt kept at "
                           "inference; esd_x: ESD on cross-attention weights; esd_u: ESD on all other weights "
                           "(needs rank > 0)."}),
                "iterations": _int(d.iterations, 1, 100000, "Training iterations (optimizer steps)."),
                "learning_rate": _float(d.learning_rate, 1e-8, 1.0, 1e-7,
                                        "Adam learning rate of the weight deltas where training starts: ESD's 1e-5, "
                                        "its rate for full deltas on SD1.5. With factor_alpha fan_in (auto's choice "
                                        "without adversarial_steps), rank > 0 factors step as full deltas do at the "
                                        "same rate, and min_score_rise raises "
                                        "it on models that need more (the pack's small test models: 4e-5 to "
                                        "1.6e-4)."),
                "prompt_learning_rate": _float(d.prompt_learning_rate, 1e-8, 1.0, 1e-7,
                                               "Adam learning rate of the prompt tokens (lp methods)."),
                "negative_guidance": _float(d.negative_guidance, 0.0, 10.0, 0.1,
                                            "eta in the ESD target e0 - eta (e_c - e0): how far the concept's "
                                            "prediction is pushed away from the concept. 1 is ESD's value; 2 erased "
                                            "more reliably at about the same preservation in the pack's benchmark."),
                "prompt_tokens": _int(d.prompt_tokens, 1, 77, "Number of learnable prompt tokens m (lp methods)."),
                "placement": (list(PLACEMENTS), {"default": d.placement, "tooltip":
                              "Cross-attention blocks that receive the prompt tokens (lp methods): mid (middle "
                              "block), midout (middle and output blocks) or all. In the pack's benchmark all let "
                              "Recover bring back more of the erased concept (89-94% against 71-88% on its larger "
                              "world) and mid left fewer traces of it on the demo world."}),
                "erase_weight": _float(d.erase_weight, 0.0, 100.0, 0.01, "Weight of the erase (ESD) term."),
                "key_weight": _float(d.key_weight, 0.0, 100.0, 0.01,
                                     "Weight of the key term (lp only, must be above 0 there): the erased model "
                                     "with the prompt attached must still produce the concept."),
                "preserve_weight": _float(d.preserve_weight, 0.0, 100.0, 0.01,
                                          "Weight of the preserve term; used only when preserve is connected. "
                                          "With adversarial_steps, 3 kept the other concepts on the pack's "
                                          "benchmark where 1 did not."),
                "sampling_steps": _int(d.sampling_steps, 1, 1000,
                                       "Steps of the Euler (DDIM) schedule used to generate the training images x_t."),
                "sampling_cfg": _float(d.sampling_cfg, 0.0, 30.0, 0.1, "CFG used to generate the training images."),
                "trajectory_refresh": _int(d.trajectory_refresh, 1, 100000,
                                           "Iterations between new training trajectories. 1 samples fresh images "
                                           "every iteration (like ESD, slow); larger reuses them (much faster)."),
                "batch_size": _int(d.batch_size, 1, 64, "Training pairs (x_t, t) per iteration; also the number "
                                                        "of trajectories sampled per refresh."),
                "resolution": _int(d.resolution, 0, 2048, "Image size of the training latents in pixels; 0 = 512 "
                                                          "(SD1.x/SD2.x) or 1024 (SDXL).", step=8),
                "seed": _int(d.seed, 0, 0xFFFFFFFFFFFFFFFF,
                             "Seed of every random draw; same seed, same result on CPU."),
                "rank": _int(d.rank, 0, 1024, "Rank of the LoRA factors the weight deltas are trained as (default 32: "
                                              "files of 6.5 MB for SD1.5 and 51 MB for SDXL, whose training fits "
                                              "11 GiB); 0 = full deltas, as ESD trains them (SD1.5: 88 MB in fp16, "
                                              "SDXL needs 18 GiB; not for esd_u)."),
                "dtype": (list(DTYPES), {"default": d.dtype, "tooltip":
                          "The one dtype the UNet computes in while training (the trained deltas stay fp32). auto = "
                          "the dtype ComfyUI loaded the model in (fp16/bf16 on a GPU, so no copy of the weights is "
                          "made; fp32 on the CPU); fp16 adds a loss scaler; bf16 only where the GPU runs it "
                          "natively; fp32 on a GPU holds an fp32 copy of the weights for the run."}),
                "gradient_checkpointing": (list(CHECKPOINTING), {"default": d.gradient_checkpointing, "tooltip":
                                           "Recompute the UNet's transformer activations in backward instead of "
                                           "keeping them: less memory, one more forward pass of the transformers "
                                           "per iteration. auto = on only when the run would not fit the device's "
                                           "free memory otherwise."}),
                "concept_label": ("STRING", {"default": "", "multiline": False, "tooltip":
                                  "Name of the erased concept, stored in the erasure file (conditioning carries no "
                                  "text). Several concepts: one per line."}),
            },
            "optional": {
                "preserve": ("CONDITIONING", {"tooltip": "Concepts to keep unchanged (Conditioning (Combine) for "
                                                         "several): their predictions are held to the original. "
                                                         "Name the concepts closest to the erased one: an erasure "
                                                         "can take them with it (in the pack's benchmark, 40% of "
                                                         "a neighbouring object on one training seed in six), "
                                                         "and robust training (adversarial_steps) needs them."}),
                "adversarial_steps": _int(d.adversarial_steps, 0, 1000,
                                          "Robust training (0 = off): every adversarial_every iterations, this many "
                                          "steps of the Attack Erased Concept attack against the model being "
                                          "trained find tokens that bring the concept back, and the erase term is "
                                          "applied with them too. Connect preserve with the concepts to keep (the "
                                          "ones closest to the erased concept first) and raise preserve_weight (3 "
                                          "on the pack's benchmark): without them robust training erases those "
                                          "too. factor_alpha auto trains it with rank factors: with fan_in it "
                                          "resisted the attack far less there. Keep output_strength at 1: robust "
                                          "training resisted with all of its deltas saved, less at 0.7 (50% on one "
                                          "run). Costs time (see the pack's benchmark)."),
                "adversarial_every": _int(d.adversarial_every, 1, 100000,
                                          "Iterations between refits of the adversarial tokens (robust training)."),
                "adversarial_tokens": _int(d.adversarial_tokens, 1, 75,
                                           "Adversarial tokens appended to the concept (robust training)."),
                "adversarial_learning_rate": _float(d.adversarial_learning_rate, 1e-6, 10.0, 1e-4,
                                                    "Adam learning rate of the adversarial tokens (robust training)."),
                "score_every": _int(d.score_every, 0, 100000,
                                    "Iterations between measurements of the concept score (Concept Erasure Report's "
                                    "'toward ESD target': 0 = unchanged, 0.5 = like the empty prompt, 1 = ESD's "
                                    "target) on held-out images of the concept; drawn on the loss curves and stored "
                                    "in the file. 0 = not measured."),
                "stop_at_score": _float(d.stop_at_score, 0.0, 5.0, 0.01,
                                        "Train until erased: stop as soon as the measured concept score reaches this "
                                        "(iterations is then the cap); the file records when and why training "
                                        "stopped. 0 = always run every iteration."),
                "min_score_rise": _float(d.min_score_rise, 0.0, 10.0, 0.01,
                                         "Raise a learning rate too small for the model (0 = off, learning_rate "
                                         "fixed): every 10 iterations at the start the concept score is measured on "
                                         "held-out images, and while it rose less than this per 100 iterations the "
                                         "rate is doubled, at most 32x, with the prompt (lp) held still; the first 10 "
                                         "iterations that rise this fast fix it. The rate used is stored in the file. "
                                         "On an SD1.5-sized UNet 1e-5 rises fast enough and is kept."),
                "factor_alpha": (list(FACTOR_ALPHAS), {
                    "default": d.factor_alpha,
                    "tooltip": "How rank > 0 factors are scaled (kohya alpha, stored per layer in the file). fan_in: "
                               "by each layer's fan_in / rank, so that a step of learning_rate changes a layer as "
                               "much as a step on a full delta (rank 0) does, as in ESD. rank: by 1, the usual LoRA "
                               "scale; on an SD1.5-sized UNet such rank-32 factors moved the concept 5-20x slower at "
                               "the same rate. auto: fan_in, and rank with adversarial_steps, where fan_in factors "
                               "resisted the attack far less (52.5% of the concept still erased after it, against "
                               "94.4%; the pack's RESULTS.md)."}),
                "output_strength": _float(d.output_strength, 0.05, 2.0, 0.05,
                                          "Share of the trained weight deltas that the output erasure (and its "
                                          "file) carries; 1 = all of it (default). Lower it when the erasure takes "
                                          "neighbouring concepts with it: training pushes the concept to the ESD "
                                          "target (negative_guidance), past the point where it stops being drawn, "
                                          "and on the pack's benchmark erasing a square with lp or esd_x, 0.7 kept "
                                          "the other objects on every seed (95% against 92%; up to 40% of the "
                                          "circles lost at 1) and erased as much. It shrinks the margin elsewhere: "
                                          "at 0.7 esd_u erased 23-29% instead of 80-95%, full deltas (rank 0) erased "
                                          "an unseen synonym 78% instead of 99% on one seed, two concepts at once "
                                          "96% instead of 99%, and robust training resisted the attack less. Check "
                                          "the erased and the kept prompts with Concept Erasure Report. Apply "
                                          "Concept Erasure's strength multiplies this again."),
                "clip": ("CLIP", {"tooltip": "The model's CLIP: with it the trainer finds the concepts nearest to the "
                                             "erased one and keeps them (retain)."}),
                "retain": (list(RETAINS), {"default": d.retain, "tooltip":
                           "Keep the nearest concepts the trainer finds (needs clip): auto when preserve is not "
                           "connected, add to preserve's, or off."}),
                "retain_candidates": ("STRING", {"default": "", "multiline": True, "tooltip":
                                      "Your own candidate concepts for retain, one per line; empty = the pack's "
                                      "vocabulary."}),
                "retain_size": _int(d.retain_size, 1, 64, "How many of the nearest concepts retain keeps."),
                "retain_watch": _float(d.retain_watch, 0.0, 10.0, 0.01,
                                       "Double a kept concept's preserve weight each time it has moved more than "
                                       "this (the report's 'moved'); 0 = off."),
                "preserve_images": (list(PRESERVE_IMAGES), {"default": d.preserve_images, "tooltip":
                                    "Where kept concepts are held to the original: on their own images (own) or on "
                                    "the erased concept's (concept, as before)."}),
            },
        }

    def train(self, model, concept, unconditional, method, iterations, learning_rate, prompt_learning_rate,
              negative_guidance, prompt_tokens, placement, erase_weight, key_weight, preserve_weight, sampling_steps,
              sampling_cfg, trajectory_refresh, batch_size, resolution, seed, rank, dtype,
              gradient_checkpointing="auto", concept_label="", preserve=None,
              adversarial_steps=_DEFAULTS.adversarial_steps, adversarial_every=_DEFAULTS.adversarial_every,
              adversarial_tokens=_DEFAULTS.adversarial_tokens,
              adversarial_learning_rate=_DEFAULTS.adversarial_learning_rate, score_every=_DEFAULTS.score_every,
              stop_at_score=_DEFAULTS.stop_at_score, min_score_rise=_DEFAULTS.min_score_rise,
              factor_alpha=_DEFAULTS.factor_alpha, output_strength=_DEFAULTS.output_strength, clip=None,
              retain=_DEFAULTS.retain, retain_candidates="", retain_size=_DEFAULTS.retain_size,
              retain_watch=_DEFAULTS.retain_watch, preserve_images=_DEFAULTS.preserve_images):
        settings = TrainSettings(
            method=method, iterations=iterations, learning_rate=learning_rate,
            prompt_learning_rate=prompt_learning_rate, negative_guidance=negative_guidance,
            prompt_tokens=prompt_tokens, placement=placement, erase_weight=erase_weight, key_weight=key_weight,
            preserve_weight=preserve_weight, sampling_steps=sampling_steps, sampling_cfg=sampling_cfg,
            trajectory_refresh=trajectory_refresh, batch_size=batch_size, resolution=resolution, seed=seed,
            rank=rank, dtype=dtype, gradient_checkpointing=gradient_checkpointing,
            adversarial_steps=adversarial_steps, adversarial_every=adversarial_every,
            adversarial_tokens=adversarial_tokens, adversarial_learning_rate=adversarial_learning_rate,
            score_every=score_every, stop_at_score=stop_at_score, min_score_rise=min_score_rise,
            factor_alpha=factor_alpha, output_strength=output_strength, retain=retain, retain_size=retain_size,
            retain_watch=retain_watch, preserve_images=preserve_images)
        settings.validate()
        candidates = encode_candidates(clip, retain_candidates) if clip is not None and retain != "off" else None
        result = train_erasure(model, concept, unconditional, preserve, settings, concept_label,
                               candidates=candidates)
        curves = draw_loss_curves(result.losses, scores=result.scores, stop_at=stop_at_score, moved=result.moved,
                                  retain=result.retain)
        return (apply_erasure(model, result.erasure), result.erasure, curves)


NODE_CLASS_MAPPINGS = {"TrainConceptErasure": TrainConceptErasure}
NODE_DISPLAY_NAME_MAPPINGS = {"TrainConceptErasure": "Train Concept Erasure"}
