"""The benchmark's synthetic world: renderer, vocabulary, text encoder, classifier and UNet fit together."""
import random

import pytest
import torch

from comfyui_concept_erasure.demo_world import renderer  # noqa: E402
from comfyui_concept_erasure.demo_world.classifier import OBJECT_CLASSES  # noqa: E402
from comfyui_concept_erasure.demo_world.text_encoder import CONTEXT_DIM, TextEncoder  # noqa: E402
from comfyui_concept_erasure.demo_world.vocabulary import COLOURS, CONTEXT_LENGTH, OBJECTS, SYNONYMS, tokenize  # noqa: E402
from comfyui_concept_erasure.demo_world.world import WORLD_FILE, load_world  # noqa: E402

from comfyui_concept_erasure.erasure.concept_erasure import cross_attention_layers, model_context_dim  # noqa: E402


@pytest.fixture(scope="module")
def world():
    return load_world()


def test_committed_world_is_small_fp16_safetensors():
    from safetensors import safe_open

    assert WORLD_FILE.stat().st_size <= 5 * 1024 * 1024
    with safe_open(str(WORLD_FILE), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
        assert "command" in f.metadata()


def test_classifier_reads_fresh_renders_of_every_object_and_colour(world):
    rng = random.Random(2024)  # not a seed used in training
    labels = [(o, c) for o in OBJECTS for c in COLOURS] * 10
    objects, colours = world.classifier.read(renderer.render_batch(rng, labels))
    object_acc = sum(o == lo for (lo, _), o in zip(labels, objects)) / len(labels)
    colour_acc = sum(c == lc for (_, lc), c in zip(labels, colours)) / len(labels)
    assert object_acc >= 0.98 and colour_acc >= 0.98
    empty, _ = world.classifier.read(renderer.render_empty(rng, 20))
    assert empty.count("none") >= 19
    assert OBJECT_CLASSES[-1] == "none"


def test_fixed_vae_round_trips_and_matches_comfy_latent_scale(world):
    images = renderer.render_batch(random.Random(0), [("ring", "blue"), ("cross", "yellow")])
    samples = renderer.encode(images)
    assert samples.shape == (2, 4, renderer.SIZE, renderer.SIZE)
    assert torch.allclose(renderer.decode(samples), images, atol=1e-5)
    # comfy multiplies LATENT samples by SD1.5's scale before the UNet: that must give the training space x0
    x0 = world.model.model.process_latent_in(samples)
    assert torch.allclose(x0, renderer.images_to_model_latent(images), atol=1e-5)


def test_text_encoder_conditioning_is_sd1_shaped_and_words_are_distinct(world):
    cond = world.conditioning("a red square")
    assert len(cond) == 1 and cond[0][1] == {}
    assert cond[0][0].shape == (1, CONTEXT_LENGTH, CONTEXT_DIM) == (1, 8, 768)
    encoded = world.text_encoder.encode(["a square", "a box", "a circle", ""])
    assert not torch.allclose(encoded[0], encoded[1]) and not torch.allclose(encoded[0], encoded[2])
    assert SYNONYMS["square"] == ("box",)
    with pytest.raises(ValueError, match="unknown word"):
        tokenize(["a purple square"])
    assert TextEncoder()(tokenize(["a blue disc"])).shape == (1, 8, 768)


def test_world_unet_is_a_comfy_sd15_model_the_pack_patches(world):
    import comfy.model_base

    assert isinstance(world.model.model, comfy.model_base.BaseModel)
    assert type(world.model.model.model_config).__name__ == "SD15"
    assert model_context_dim(world.model) == 768
    assert sorted(cross_attention_layers(world.model)) == [
        f"diffusion_model.{name}.1.transformer_blocks.0.attn2"
        for name in ("input_blocks.3", "middle_block", "output_blocks.0", "output_blocks.1")]


def test_default_vocabulary_keeps_the_token_ids_the_committed_worlds_were_trained_with():
    from comfyui_concept_erasure.demo_world.spec import WORLDS
    from comfyui_concept_erasure.demo_world.vocabulary import DEFAULT, WORDS, Vocabulary

    assert WORDS == DEFAULT.words == ("<pad>", "<bos>", "<eos>", "a", "red", "green", "blue", "yellow", "circle",
                                      "square", "triangle", "cross", "ring", "disc", "box", "plus")
    heldout = WORLDS["heldout"].vocabulary
    assert heldout.words[:4] == WORDS[:4] and len(heldout.words) == 4 + 4 + 6 + 3
    ids = heldout.token_ids
    assert heldout.tokenize(["a cyan moon"]).tolist() == [[1, 3, ids["cyan"], ids["moon"], 2, 0, 0, 0]]
    with pytest.raises(ValueError, match="distinct"):
        Vocabulary(("circle", "circle"), ("red",))
    with pytest.raises(ValueError, match="not among the objects"):
        Vocabulary(("circle",), ("red",), (("square", "box"),))
