"""The trainer's parts against references computed directly on real comfy models: parameterisation, sampling,
training pairs, the in-place residual shim (gradients checked by finite differences), conditioning, the plot."""
import pytest
import torch

import comfy.model_management
from comfyui_concept_erasure.erasure.concept_erasure import PromptPatch
from comfyui_concept_erasure.trainer.conditioning import CondBatch, encode_entries, stack
from comfyui_concept_erasure.trainer.deltas import DeltaSet, target_layers
from comfyui_concept_erasure.trainer.denoiser import Denoiser
from comfyui_concept_erasure.trainer.host_autograd import residuals_break_backward, trainable_model
from comfyui_concept_erasure.report.loss_plot import COLORS, decade_ticks, draw_loss_curves
from comfyui_concept_erasure.trainer.prediction import model_output, prediction_kind, sampling_schedule
from comfyui_concept_erasure.trainer.trajectories import TrajectoryPool, sample_trajectories
from tiny_models import CONTEXT_DIM, build_model, predict


def context(family="sd15", seed=1, tokens=77):
    return torch.randn(1, tokens, CONTEXT_DIM[family], generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family,kind", [("sd15", "eps"), ("sd2v", "v")])
def test_model_output_is_the_unets_raw_prediction(family, kind):
    model = build_model(family)
    base = model.model
    assert prediction_kind(base.model_sampling) == kind
    raw = {}
    handle = base.diffusion_model.register_forward_hook(lambda m, a, out: raw.setdefault("out", out.detach().clone()))
    try:
        x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(3)) * 3.0
        sigma = torch.tensor([3.0, 0.5])
        with torch.no_grad():
            denoised = base.apply_model(x, sigma, c_crossattn=context(family).expand(2, -1, -1))
    finally:
        handle.remove()
    assert torch.allclose(model_output(kind, x, sigma, denoised), raw["out"], atol=1e-4, rtol=1e-4)


def test_schedule_is_evenly_spaced_model_sigmas_ending_at_zero():
    ms = build_model("sd15").model.model_sampling
    timesteps, sigmas, all_sigmas = sampling_schedule(ms, 5)
    assert timesteps.tolist() == [999, 749, 500, 250, 0]
    assert torch.equal(sigmas[:-1], ms.sigmas[timesteps].float()) and sigmas[-1] == 0
    assert torch.equal(all_sigmas, ms.sigmas.float())


def test_training_pairs_lie_on_the_euler_step_of_their_timestep():
    g = torch.Generator().manual_seed(0)
    ms = build_model("sd15").model.model_sampling
    timesteps, sigmas, all_sigmas = sampling_schedule(ms, 4)
    xs = torch.randn(5, 3, 4, 2, 2, generator=g)
    pool = TrajectoryPool(xs, timesteps, sigmas, all_sigmas, [0, 1, 2])
    x_t, sigma, concepts = pool.draw(400, torch.Generator().manual_seed(1))
    matched = 0
    for n in range(400):
        t = int((all_sigmas - sigma[n]).abs().argmin())
        step = int((timesteps >= t).nonzero().max())  # the step whose range (t_{i+1}, t_i] holds t
        low = int(timesteps[step + 1]) if step + 1 < len(timesteps) else -1
        assert low < t <= int(timesteps[step])
        w = (sigmas[step] - sigma[n]) / (sigmas[step] - sigmas[step + 1])
        for j in range(3):  # x_t = x_i + w (x_{i+1} - x_i) of one trajectory
            if torch.allclose(x_t[n], xs[step, j] + w * (xs[step + 1, j] - xs[step, j]), atol=1e-6):
                matched += 1
                assert concepts[n] == j
                break
    assert matched == 400
    assert set(concepts) == {0, 1, 2} and (sigma >= all_sigmas[0]).all() and (sigma <= all_sigmas[-1]).all()


def test_trajectories_are_cfg_euler_steps_of_the_model():
    model = build_model("sd15")
    comfy.model_management.load_models_gpu([model])
    concept, uncond = context(seed=1), context(seed=2)
    layers = target_layers(model.model.diffusion_model, "esd_x")
    deltas = DeltaSet(layers, 0, torch.Generator(), "cpu")
    denoiser = Denoiser(model.model, {}, model.load_device, deltas, None, "eps")
    timesteps, sigmas, all_sigmas = sampling_schedule(model.model.model_sampling, 3)
    cfg = 3.0
    pool = sample_trajectories(denoiser, [{"c_crossattn": concept}], {"c_crossattn": uncond}, [0, 0], (4, 16, 16),
                               timesteps, sigmas, all_sigmas, cfg, torch.Generator().manual_seed(4), prompt=False,
                               check_interrupt=lambda: None)
    noise = torch.randn((2, 4, 16, 16), generator=torch.Generator().manual_seed(4))
    x = noise * sigmas[0]
    assert torch.allclose(pool.xs[0], x)
    for i in range(3):
        positive = predict(model, x, float(sigmas[i]), concept.expand(2, -1, -1))
        negative = predict(model, x, float(sigmas[i]), uncond.expand(2, -1, -1))
        denoised = negative + cfg * (positive - negative)
        x = denoised if sigmas[i + 1] == 0 else x + (x - denoised) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
        assert torch.allclose(pool.xs[i + 1], x, atol=1e-4, rtol=1e-4), i


def _backward_fails(model, x, sigma, ctx):
    base = model.model
    param = base.diffusion_model.middle_block[1].transformer_blocks[0].attn2.to_k.weight
    try:
        param.requires_grad_(True)
        base.apply_model(x, sigma, c_crossattn=ctx).sum().backward()
        return False
    except RuntimeError as e:
        assert "inplace" in str(e)
        return True
    finally:
        param.requires_grad_(False)
        param.grad = None


def test_inplace_shim_is_installed_only_when_needed_and_gives_true_gradients():
    model = build_model("sd15")
    comfy.model_management.load_models_gpu([model])
    base = model.model
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(1, 4, 16, 16, generator=g), context()
    sigma = torch.tensor([2.0])
    base.requires_grad_(False)
    needs_shim = _backward_fails(model, x, sigma, ctx)
    assert residuals_break_backward(base.diffusion_model) == needs_shim

    key = "diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_v.weight"
    layers = {key: base.get_submodule(key[:-len(".weight")])}
    deltas = DeltaSet(layers, 0, g, "cpu")
    direction = torch.randn(deltas.full[key].shape, generator=g)
    loss = lambda: base.apply_model(x, sigma, c_crossattn=ctx).pow(2).sum()  # noqa: E731
    with torch.inference_mode(False), trainable_model(base) as shimmed, deltas.attached():
        assert shimmed == needs_shim
        deltas.enabled = True
        loss().backward()
        analytic = (deltas.full[key].grad * direction).sum()
        eps = 1e-2
        with torch.no_grad():
            deltas.full[key].copy_(eps * direction)
            plus = loss()
            deltas.full[key].copy_(-eps * direction)
            minus = loss()
    numeric = (plus - minus) / (2 * eps)
    assert torch.allclose(analytic, numeric, rtol=2e-3), (analytic, numeric)
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in base.modules())


def prompted_denoiser(model, tokens=3):
    comfy.model_management.load_models_gpu([model])
    g = torch.Generator().manual_seed(11)
    deltas = DeltaSet(target_layers(model.model.diffusion_model, "esd_x"), 0, g, "cpu")
    prompt = PromptPatch(torch.randn(tokens, 768, generator=g), torch.randn(tokens, 768, generator=g), "all")
    return Denoiser(model.model, {}, model.load_device, deltas, prompt, "eps")


def test_concepts_of_different_lengths_are_run_as_they_are_with_the_prompt_appended():
    model = build_model("sd15")
    denoiser = prompted_denoiser(model)
    contexts = [context(seed=1, tokens=77), context(seed=2, tokens=154), context(seed=3, tokens=77)]
    x = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(2))
    sigma = torch.tensor([0.5, 2.0, 7.0])

    def forward(xs, ss, cond, cond_or_uncond):
        return denoiser.output(xs, ss, cond, deltas=False, prompt=True, cond_or_uncond=cond_or_uncond)

    with torch.no_grad():
        batched = CondBatch([{"c_crossattn": c} for c in contexts], [0]).run(forward, x, sigma)
        alone = torch.cat([forward(x[i:i + 1], sigma[i:i + 1], {"c_crossattn": c}, [0])
                           for i, c in enumerate(contexts)])
        # what repeating the short context to 154 tokens used to give: the text outweighs the prompt tokens
        repeated = forward(x[:1], sigma[:1], {"c_crossattn": contexts[0].repeat(1, 2, 1)}, [0])
    difference = (batched - alone).abs().max().item()
    print(f"max difference to single-concept runs {difference:.2e}; repeated to a common length "
          f"{(repeated - alone[:1]).abs().max().item():.2e}")
    assert difference < 1e-5  # batch-size rounding only
    assert not torch.allclose(repeated, alone[:1], atol=1e-4)
    with pytest.raises(ValueError, match="different lengths"):
        stack([{"c_crossattn": c} for c in contexts])


def test_loss_terms_of_mixed_length_concepts_equal_their_single_concept_terms():
    from comfyui_concept_erasure.trainer.iteration import loss_terms as _loss_terms
    from comfyui_concept_erasure.trainer.settings import TrainSettings

    model = build_model("sd15")
    denoiser = prompted_denoiser(model)
    settings = TrainSettings(method="lp", key_weight=1.0)
    uncond = {"c_crossattn": context(seed=9, tokens=77)}
    concepts = [{"c_crossattn": context(seed=1, tokens=77)}, {"c_crossattn": context(seed=2, tokens=154)}]
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(2))
    sigma = torch.tensor([1.0, 3.0])
    with torch.inference_mode(False), trainable_model(model.model), denoiser.deltas.attached():
        both = _loss_terms(denoiser, settings, x, sigma, uncond, concepts, [], lambda loss: None)
        single = [_loss_terms(denoiser, settings, x[i:i + 1], sigma[i:i + 1], uncond, [c], [], lambda loss: None)
                  for i, c in enumerate(concepts)]
        weighted = _loss_terms(denoiser, settings, x, sigma, uncond, concepts, [], lambda loss: None,
                               concept_weights=torch.tensor([0.0, 2.0]))
    for term in ("erase", "key"):
        assert torch.allclose(both[term], (single[0][term] + single[1][term]) / 2, rtol=1e-5), term
        assert torch.allclose(weighted[term], single[1][term], rtol=1e-5), term  # (0 * a + 2 * b) / 2


def test_the_preserve_term_is_evaluated_on_its_own_images_and_the_erase_term_on_the_concepts():
    """preserve_images own: the preserve pairs' x and sigma are their own; everything else is unchanged."""
    from comfyui_concept_erasure.trainer.iteration import loss_terms as _loss_terms
    from comfyui_concept_erasure.trainer.settings import TrainSettings

    model = build_model("sd15")
    denoiser = prompted_denoiser(model)
    settings = TrainSettings(method="esd_x")
    uncond, concept, kept = ({"c_crossattn": context(seed=seed)} for seed in (9, 1, 2))
    g = torch.Generator().manual_seed(4)
    x_t, x_p = torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 4, 16, 16, generator=g)
    sigma, sigma_p = torch.tensor([2.0]), torch.tensor([0.7])
    with torch.inference_mode(False), trainable_model(model.model), denoiser.deltas.attached():
        with torch.no_grad():
            for p in denoiser.deltas.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.01)  # a student that differs from its teacher
        split = _loss_terms(denoiser, settings, x_t, sigma, uncond, [concept], [kept], lambda loss: None,
                            preserve_at=(x_p, sigma_p))
        on_concept = _loss_terms(denoiser, settings, x_t, sigma, uncond, [concept], [kept], lambda loss: None)
        on_own = _loss_terms(denoiser, settings, x_p, sigma_p, uncond, [concept], [kept], lambda loss: None)
    assert torch.allclose(split["erase"], on_concept["erase"], rtol=1e-5)
    assert torch.allclose(split["preserve"], on_own["preserve"], rtol=1e-5)
    assert not torch.allclose(split["preserve"], on_concept["preserve"], rtol=1e-2)


def test_sdxl_conditioning_gets_the_pooled_vector_the_sampler_would_use():
    model = build_model("sdxl")
    pooled = torch.randn(1, 1280, generator=torch.Generator().manual_seed(3))
    (cond,) = encode_entries(model.model, [[context("sdxl"), {"pooled_output": pooled}]], (4, 16, 16), "cpu",
                             "positive", 0)
    expected = model.model.encode_adm(pooled_output=pooled, width=128, height=128)
    assert torch.equal(cond["y"], expected) and torch.equal(cond["c_crossattn"], context("sdxl"))


def test_prompt_patch_on_trainable_tokens_passes_gradients():
    model = build_model("sd15")
    comfy.model_management.load_models_gpu([model])
    base = model.model
    deltas = DeltaSet(target_layers(base.diffusion_model, "esd_x"), 0, torch.Generator(), "cpu")
    p_k = torch.nn.Parameter(torch.randn(2, 768, generator=torch.Generator().manual_seed(1)))
    p_v = torch.nn.Parameter(torch.randn(2, 768, generator=torch.Generator().manual_seed(2)))
    denoiser = Denoiser(base, {}, model.load_device, deltas, PromptPatch(p_k, p_v, "mid"), "eps")
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    sigma = torch.tensor([1.0])
    with torch.inference_mode(False), trainable_model(base), deltas.attached():
        with_prompt = denoiser.output(x, sigma, {"c_crossattn": context()}, deltas=True, prompt=True)
        with_prompt.pow(2).sum().backward()
        without = denoiser.output(x, sigma, {"c_crossattn": context()}, deltas=True, prompt=False)
    assert p_k.grad is not None and p_k.grad.abs().sum() > 0 and p_v.grad.abs().sum() > 0
    assert not torch.allclose(with_prompt, without, atol=1e-5)


def test_loss_plot_is_an_image_with_one_curve_per_term():
    losses = {"erase": [1.0 / (i + 1) for i in range(200)], "key": [0.01 + 0.001 * i for i in range(200)]}
    image = draw_loss_curves(losses, width=400, height=200)
    assert image.shape == (1, 200, 400, 3) and image.dtype == torch.float32
    assert 0.0 <= image.min() and image.max() <= 1.0
    pixels = (image[0] * 255).round().to(torch.int16)
    for term in losses:
        color = torch.tensor(COLORS[term], dtype=torch.int16)
        assert (pixels == color).all(-1).sum() > 100, term
    assert draw_loss_curves({}).shape == (1, 384, 768, 3)


def test_loss_plot_labels_whole_decades():
    assert decade_ticks(-6, -1) == [-1, -2, -3, -4, -5, -6]
    assert decade_ticks(-20, 0) == [0, -3, -6, -9, -12, -15, -18]  # at most 8 labels
    assert decade_ticks(-3, -2) == [-2, -3]


def test_loss_plot_marks_where_the_rate_was_raised_and_where_training_stopped():
    losses = {"erase": [1.0 / (i + 1) for i in range(200)]}
    plain = draw_loss_curves(losses, width=400, height=200, stopped={"iteration": 200, "reason": "iterations"})
    assert torch.equal(plain, draw_loss_curves(losses, width=400, height=200))  # ran to its last iteration: no mark
    left, plot_w = 64, 400 - 64 - 16
    x_of = lambda iteration: round(left + (iteration - 1) / 199 * plot_w)  # noqa: E731
    stopped = draw_loss_curves(losses, width=400, height=200, stopped={"iteration": 120, "reason": "score reached"})
    changed = (stopped != plain).any(-1)[0]  # [H, W]
    assert changed[60:150, x_of(120)].sum() > 30  # a dashed line down the plot at iteration 120
    raised = draw_loss_curves(losses, width=400, height=200, rate_raises=[(20, 2e-5), (30, 4e-5)])
    changed = (raised != plain).any(-1)[0]
    for iteration in (20, 30):  # a mark on the iteration axis at each doubling
        assert changed[150:164, x_of(iteration) - 2:x_of(iteration) + 3].any(), iteration
