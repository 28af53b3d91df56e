"""Concept Erasure Report on tiny real comfy models: grid layout, seeds, and the concept score vs references."""
import math

import pytest
import torch

import comfy.sample
import comfy.sd
import comfy.taesd.taesd

from comfyui_concept_erasure.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
from comfyui_concept_erasure.nodes.report_node import ConceptErasureReport
from comfyui_concept_erasure.report import ReportError, compare_models
from comfyui_concept_erasure.erasure.concept_score import ETA
from comfyui_concept_erasure.report.concept_report import labelled_size, score_levels
from tiny_models import CONTEXT_DIM, build_model, init_weights, predict

SIZE = 64  # pixels; latents are 8x8
STEPS = 3


def tiny_vae():
    """comfy's VAE class holding a randomly initialised TAESD (the smallest decoder comfy detects)."""
    taesd = comfy.taesd.taesd.TAESD()
    init_weights(taesd, seed=11)
    return comfy.sd.VAE(sd=taesd.state_dict())


def cond(family, seed, tokens=77, pooled_seed=None):
    g = torch.Generator().manual_seed(seed)
    context = torch.randn(1, tokens, CONTEXT_DIM[family], generator=g)
    pooled = torch.randn(1, 1280, generator=torch.Generator().manual_seed(seed if pooled_seed is None else pooled_seed))
    return [[context, {"pooled_output": pooled} if family == "sdxl" else {}]]


def treat_as(context):
    """An attn2 patch that makes every cross-attention see `context` instead of the prompt."""
    def patch(n, ctx, value, extra_options):
        c = context.to(ctx).expand(ctx.shape[0], -1, -1)
        return n, c, c
    return patch


@pytest.fixture(scope="module")
def vae():
    return tiny_vae()


def test_identical_models_give_equal_columns_and_zero_scores(vae):
    model = build_model("sd15")
    prompts = cond("sd15", 1) + cond("sd15", 2)
    grid, summary, scores = compare_models(model, model.clone(), prompts, cond("sd15", 3), vae, "first\nsecond",
                                           seed=5, steps=STEPS, width=SIZE, height=SIZE, cfg=4.0)
    gap = max(1, SIZE // 64)
    height, width = labelled_size(2, SIZE, SIZE, gap, ["first", "second"])
    assert grid.shape == (1, height, width, 3) and width > 2 * SIZE + gap and height > 2 * SIZE + gap
    for row in range(2):
        y = row * (SIZE + gap)
        assert torch.equal(grid[0, y:y + SIZE, :SIZE], grid[0, y:y + SIZE, SIZE + gap:2 * SIZE + gap])
        assert (grid[0, y:y + SIZE, 2 * SIZE + gap:] < 0.5).any()  # the row's label, right of its images
    assert (grid[0, 2 * SIZE + gap:, :2 * SIZE + gap] < 0.5).any()  # the columns' titles under them
    assert [s.label for s in scores] == ["first", "second"]
    assert all(s.toward == 0 and s.moved == 0 for s in scores)
    assert "first" in summary and "second" in summary


def test_grid_cells_are_comfy_samples_from_the_seed(vae):
    """Left column = KSampler(euler, normal) of the original, right = the erased model, same noise, decoded."""
    original, erased = build_model("sd15", seed=0), build_model("sd15", seed=1)
    prompt, uncond = cond("sd15", 1), cond("sd15", 3)
    grid, _, _ = compare_models(original, erased, prompt, uncond, vae, seed=9, steps=STEPS, width=SIZE, height=SIZE,
                                cfg=4.0)
    latent = torch.zeros(1, 4, SIZE // 8, SIZE // 8)
    for column, model in enumerate((original, erased)):
        samples = comfy.sample.sample(model, comfy.sample.prepare_noise(latent, 9), STEPS, 4.0, "euler", "normal",
                                      prompt, uncond, latent, seed=9)
        expected = vae.decode(samples)[0]
        x = column * (SIZE + 1)
        assert torch.allclose(grid[0, :SIZE, x:x + SIZE], expected, atol=1e-5)
    assert not torch.allclose(grid[0, :SIZE, :SIZE], grid[0, :SIZE, SIZE + 1:2 * SIZE + 1], atol=1e-3)


@pytest.mark.parametrize("family", ["sd15", "sd2v", "sdxl"])
def test_a_model_that_treats_the_prompt_as_empty_scores_one_half(family, vae):
    """eps'(c) = eps(uncond): moved half-way to ESD's target eps_u - (eps_c - eps_u), in eps and v models."""
    original = build_model(family)
    prompt, uncond = cond(family, 1, pooled_seed=3), cond(family, 3)  # SDXL: only the context differs
    erased = original.clone()
    erased.set_model_attn2_patch(treat_as(uncond[0][0]))
    _, summary, scores = compare_models(original, erased, prompt + uncond, uncond, vae, "concept\nempty", seed=2,
                                        steps=STEPS, width=SIZE, height=SIZE, cfg=4.0)
    assert ETA == 1.0
    assert scores[0].toward == pytest.approx(0.5, abs=1e-3)
    assert scores[0].moved == pytest.approx(0.5, abs=1e-3)
    assert math.isnan(scores[1].toward)  # the empty prompt itself has no concept direction
    assert "n/a" in summary.splitlines()[3]


def test_score_equals_a_reference_computed_with_apply_model(vae):
    original, erased = build_model("sd15", seed=0), build_model("sd15", seed=4)
    prompt, uncond = cond("sd15", 1), cond("sd15", 3)
    seed = 6
    _, _, scores = compare_models(original, erased, prompt, uncond, vae, seed=seed, steps=STEPS, width=SIZE,
                                  height=SIZE, cfg=4.0)
    latent = torch.zeros(1, 4, SIZE // 8, SIZE // 8)
    samples = comfy.sample.sample(original, comfy.sample.prepare_noise(latent, seed), STEPS, 4.0, "euler", "normal",
                                  prompt, uncond, latent, seed=seed)
    x0 = original.model.process_latent_in(samples)
    sigmas = score_levels(original)
    noises = torch.randn((len(sigmas), 4, SIZE // 8, SIZE // 8), generator=torch.Generator().manual_seed(seed + 1))
    dot = norm = moved = 0.0
    for sigma, noise in zip(sigmas, noises):
        x = x0 + noise * sigma
        eps = {name: (x - predict(m, x, sigma, c[0][0])) / sigma
               for name, m, c in (("c", original, prompt), ("u", original, uncond), ("e", erased, prompt))}
        direction = 2 * (eps["u"] - eps["c"])
        dot += float(((eps["e"] - eps["c"]) * direction).sum())
        norm += float((direction ** 2).sum())
        moved += float(((eps["e"] - eps["c"]) ** 2).sum())
    assert scores[0].toward == pytest.approx(dot / norm, rel=1e-4, abs=1e-5)
    assert scores[0].moved == pytest.approx(math.sqrt(moved / norm), rel=1e-4)


def test_bad_inputs_are_refused_with_clear_messages(vae):
    model = build_model("sd15")
    prompts, uncond = cond("sd15", 1) + cond("sd15", 2), cond("sd15", 3)
    defaults = dict(original=model, erased=model, prompts=prompts, unconditional=uncond, vae=vae, steps=1,
                    width=SIZE, height=SIZE)
    run = lambda **kw: compare_models(**{**defaults, **kw})  # noqa: E731
    with pytest.raises(ReportError, match="labels has 3 line.*2 prompt"):
        run(labels="a\nb\nc")
    with pytest.raises(ReportError, match="width 1024"):
        run(prompts=cond("sd2v", 1))
    with pytest.raises(ReportError, match="SD1.x.*SD2.x"):
        run(erased=build_model("sd2v"))
    with pytest.raises(ReportError, match="at least one prompt"):
        run(prompts=[])
    with pytest.raises(ReportError, match="batch of 2"):
        run(prompts=[[torch.cat([prompts[0][0], prompts[1][0]]), {}]])
    with pytest.raises(ReportError, match="multiples"):
        run(width=SIZE + 4)


def test_node_interface():
    assert NODE_CLASS_MAPPINGS["ConceptErasureReport"] is ConceptErasureReport
    assert NODE_DISPLAY_NAME_MAPPINGS["ConceptErasureReport"] == "Concept Erasure Report"
    inputs = ConceptErasureReport.INPUT_TYPES()
    names = list(inputs["required"]) + list(inputs["optional"])
    assert names == ["original_model", "erased_model", "prompts", "unconditional", "vae", "seed", "steps", "width",
                     "height", "cfg", "labels"]
    assert all("tooltip" in spec[1] for group in inputs.values() for spec in group.values())
    assert ConceptErasureReport.RETURN_TYPES == ("IMAGE", "STRING")
    assert len(ConceptErasureReport.OUTPUT_TOOLTIPS) == 2


def test_node_runs_under_inference_mode(vae):
    model = build_model("sd15")
    erased = model.clone()
    erased.set_model_attn2_patch(treat_as(cond("sd15", 3)[0][0]))
    with torch.inference_mode():
        out = ConceptErasureReport().report(model, erased, cond("sd15", 1), cond("sd15", 3), vae, seed=0,
                                            steps=STEPS, width=SIZE, height=SIZE, cfg=4.0, labels="cat")
    grid, summary = out["result"]
    assert out["ui"] == {"text": [summary]}
    assert grid.shape == (1, *labelled_size(1, SIZE, SIZE, 1, ["cat"]), 3)
    assert summary.splitlines()[2].split()[:3] == ["cat", "0.50", "0.50"]
