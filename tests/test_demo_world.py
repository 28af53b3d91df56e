"""Load Demo World's MODEL, CLIP and VAE work with ComfyUI's own nodes: CLIP Text Encode, KSampler, VAE Decode."""
import random

import pytest
import torch

from host_nodes import host_nodes

from comfyui_concept_erasure.demo_world import renderer
from comfyui_concept_erasure.demo_world.comfy_parts import DemoWorldCLIP, DemoWorldError
from comfyui_concept_erasure.demo_world.reading import load_classifier, read_images, read_report_grid
from comfyui_concept_erasure.demo_world.spec import WORLDS
from comfyui_concept_erasure.demo_world.text_encoder import TextEncoder
from comfyui_concept_erasure.demo_world.world import load_world
from comfyui_concept_erasure.nodes.demo_nodes import LoadDemoWorld
from comfyui_concept_erasure.report import compare_models
from comfyui_concept_erasure.report.concept_report import labelled_size


@pytest.fixture(scope="module")
def demo():
    with torch.inference_mode():  # as ComfyUI runs nodes
        return LoadDemoWorld().load()


@pytest.fixture(scope="module")
def classifier():
    return load_classifier()


def encode(clip, text):
    with torch.inference_mode():
        return host_nodes().CLIPTextEncode().encode(clip=clip, text=text)[0]


def ksampler(model, positive, negative, seed, size=128, steps=20, cfg=4.0):
    nodes = host_nodes()
    with torch.inference_mode():
        latent = nodes.EmptyLatentImage().generate(width=size, height=size, batch_size=1)[0]
        return nodes.KSampler().sample(model=model, seed=seed, steps=steps, cfg=cfg, sampler_name="euler",
                                       scheduler="normal", positive=positive, negative=negative,
                                       latent_image=latent, denoise=1.0)[0]


def test_clip_text_encode_gives_the_worlds_conditioning(demo):
    _, clip, _ = demo
    world = load_world()
    cond = encode(clip, "A red Square.")
    reference = world.conditioning("a red square")
    assert len(cond) == 1 and torch.equal(cond[0][0], reference[0][0])
    assert cond[0][0].shape == (1, 8, 768)
    assert not torch.equal(encode(clip, "a red circle")[0][0], cond[0][0])


def test_unknown_words_are_refused_naming_them_and_the_vocabulary(demo):
    _, clip, _ = demo
    with pytest.raises(DemoWorldError, match=r"does not know 'dog'.*knows only: a, red, green"):
        encode(clip, "a red dog")
    with pytest.raises(DemoWorldError, match="at most 6"):
        encode(clip, "a red square a red square a")


def test_ksampler_and_vae_decode_draw_the_prompted_shape(demo, classifier):
    model, clip, vae = demo
    negative = encode(clip, "")
    prompts = [("a red square", "square", "red"), ("a blue circle", "circle", "blue"),
               ("a yellow cross", "cross", "yellow")]
    for text, obj, colour in prompts:
        latent = ksampler(model, encode(clip, text), negative, seed=3)
        assert latent["samples"].shape == (1, 4, 16, 16)
        with torch.inference_mode():
            images = host_nodes().VAEDecode().decode(vae=vae, samples=latent)[0]
        assert images.shape == (1, 128, 128, 3) and 0 <= float(images.min()) and float(images.max()) <= 1
        # Each latent cell is an 8x8 block of the world's own decode.
        assert torch.equal(images[:, ::8, ::8], renderer.decode(latent["samples"]))
        objects, colours = read_images(classifier, images)
        assert (objects[0], colours[0]) == (obj, colour), text


def test_vae_encode_then_decode_gives_the_image_back(demo):
    vae = demo[2]
    small = renderer.render_batch(random.Random(0), [("triangle", "green"), ("ring", "blue")])
    images = small.repeat_interleave(8, 1).repeat_interleave(8, 2)
    nodes = host_nodes()
    with torch.inference_mode():
        latent = nodes.VAEEncode().encode(vae=vae, pixels=images)[0]
        back = nodes.VAEDecode().decode(vae=vae, samples=latent)[0]
    assert latent["samples"].shape == (2, 4, 16, 16)
    assert torch.allclose(back, images, atol=1e-5)


def test_report_grid_reads_back_per_row(demo, classifier):
    model, clip, vae = demo
    prompts = [encode(clip, "a green square")[0], encode(clip, "a red triangle")[0]]
    with torch.inference_mode():
        grid, _, _ = compare_models(model, model, prompts, encode(clip, ""), vae, seed=5, steps=20, width=128,
                                    height=128, cfg=4.0)
    assert grid.shape == (1, *labelled_size(2, 128, 128, 2, ["prompt 1", "prompt 2"]), 3)  # labels right and below
    verdicts = read_report_grid(classifier, grid[0], ["a green square", "a red triangle"], 128)
    assert [(v["before"], v["after"]) for v in verdicts] == [("square", "square"), ("triangle", "triangle")]
    with pytest.raises(ValueError, match="3-row report grid"):
        read_report_grid(classifier, grid[0], ["a", "b", "c"], 128)


def test_the_node_is_in_the_demo_category_with_tooltips():
    from comfyui_concept_erasure import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

    assert NODE_CLASS_MAPPINGS["LoadDemoWorld"] is LoadDemoWorld
    assert NODE_DISPLAY_NAME_MAPPINGS["LoadDemoWorld"] == "Load Demo World"
    assert LoadDemoWorld.CATEGORY == "concept_erasure/demo"
    assert len(LoadDemoWorld.OUTPUT_TOOLTIPS) == len(LoadDemoWorld.RETURN_TYPES) == 3


def test_retain_candidates_are_the_demo_worlds_own_prompts(demo):
    _, clip, _ = demo
    candidates = clip.retain_candidates()
    assert candidates[:8] == ["a circle", "a disc", "a square", "a box", "a triangle", "a cross", "a plus", "a ring"]
    assert candidates[8:12] == ["red", "green", "blue", "yellow"]
    assert candidates[12:] == [f"a {c} {o}" for c in ("red", "green", "blue", "yellow")
                               for o in ("circle", "square", "triangle", "cross", "ring")]
    assert encode(clip, candidates[-1])[0][0].shape == (1, 8, 768)


@pytest.mark.parametrize("name", sorted(WORLDS))
def test_retain_candidates_are_in_each_worlds_words_and_encode(name):
    spec = WORLDS[name]
    v = spec.vocabulary
    clip = DemoWorldCLIP(TextEncoder(spec.text_width, layers=spec.text_layers, vocabulary=v))  # untrained is enough
    candidates = clip.retain_candidates()
    object_words = [w for o in v.objects for w in v.words_for(o)]
    assert len(candidates) == len(set(candidates)) == len(object_words) + len(v.colours) * (1 + len(v.objects))
    assert {f"a {w}" for w in object_words} | set(v.colours) <= set(candidates)
    with torch.no_grad():
        assert all(clip.encode(c).shape == (1, 8, 768) for c in candidates)


def test_a_worlds_clip_knows_only_its_own_words():
    spec = WORLDS["heldout"]
    clip = DemoWorldCLIP(TextEncoder(spec.text_width, layers=spec.text_layers, vocabulary=spec.vocabulary))
    assert "a lozenge" in clip.retain_candidates() and "a square" not in clip.retain_candidates()
    with pytest.raises(DemoWorldError, match=r"does not know 'red', 'square'.*knows only: a, orange.*'a purple kite'"):
        clip.tokenize("a red square")
    assert clip.tokenize("A cyan Rhombus.")["demo_world"].shape == (1, 8)
