"""The benchmark's other synthetic worlds (benchmarks/worlds/): committed small, loaded in the shape they were
trained in, with a classifier that reads their own renders and a UNet the pack patches. The heldout world is
checked here as a world only: no erasure runs on it (it is kept out of tuning)."""
import json
import random
from pathlib import Path

import pytest
import torch

from comfyui_concept_erasure.demo_world import renderer
from comfyui_concept_erasure.demo_world.spec import DEMO, WORLDS, WorldSpec
from comfyui_concept_erasure.demo_world.vocabulary import COLOURS, DEFAULT, OBJECTS
from comfyui_concept_erasure.demo_world.world import WORLD_FILE, load_world, sample
from comfyui_concept_erasure.erasure.concept_erasure import cross_attention_layers, model_context_dim

ROOT = Path(__file__).resolve().parents[1]
OTHER = ("deep", "large", "heldout")
ATTENTION = {  # where each world's cross-attention sits (its spec's transformer depths)
    "deep": [f"{block}.1.transformer_blocks.{i}" for block in ("input_blocks.3", "middle_block", "output_blocks.0",
                                                               "output_blocks.1") for i in (0, 1)],
    "large": [f"{block}.1.transformer_blocks.0" for block in ("input_blocks.5", "middle_block", "output_blocks.0",
                                                              "output_blocks.1")],
    "heldout": [f"{block}.1.transformer_blocks.0" for block in ("input_blocks.3", "input_blocks.5", "middle_block",
                                                                "output_blocks.0", "output_blocks.1")],
}
DRAWN = {  # (colour, object) prompts each world must draw; heldout's: its concept and its two lookalikes
    "deep": [("blue", "triangle")], "large": [("blue", "triangle")],
    "heldout": [("cyan", "diamond"), ("white", "kite"), ("purple", "hexagon")],
}


def world_path(name):
    return ROOT / "benchmarks" / "worlds" / f"{name}.safetensors"


@pytest.fixture(scope="module", params=OTHER)
def world(request):
    return request.param, load_world(world_path(request.param))


def test_specs_differ_in_what_could_matter_and_round_trip_through_json():
    deep, large = WORLDS["deep"], WORLDS["large"]
    assert large.size == 2 * DEMO.size and len(large.channel_mult) == len(DEMO.channel_mult) + 1
    assert deep.transformer_depth_middle == 2 and deep.text_layers == 3 and large.text_layers == 2
    for spec in WORLDS.values():
        assert WorldSpec.from_json(spec.to_json()) == spec


def test_heldout_world_has_its_own_words_a_wider_text_encoder_and_attention_at_16x16():
    heldout, v = WORLDS["heldout"], WORLDS["heldout"].vocabulary
    for name in ("demo", "deep", "large"):  # the three share today's vocabulary and text width
        assert WORLDS[name].vocabulary == DEFAULT and WORLDS[name].text_width == 64
    assert heldout.size == 32 and heldout.text_width == 128 and heldout.text_layers == 2
    assert heldout.transformer_depth[1] == 1  # 16x16, where the other worlds have none
    assert not set(v.known_words[1:]) & set(DEFAULT.known_words)  # 'a' is the only word shared
    assert len(v.objects) == 6 and len(v.colours) == 4 and all(w.isalpha() and w.islower() for w in v.known_words)
    assert v.synonyms_of("diamond") == ("rhombus", "lozenge")


def test_heldout_concepts_lookalikes_overlap_it_more_than_its_other_shapes():
    from comfyui_concept_erasure.demo_world.renderer import Scene, render

    def overlap(a, b):  # intersection over union of the coverage of two shapes in the same scene
        cover = [render(Scene(o, "white", 16, 16, 10, 0.0, (0.0, 0.0, 0.0)), 32)[..., 0] for o in (a, b)]
        return float(torch.minimum(*cover).sum() / torch.maximum(*cover).sum())

    lookalikes = [overlap("diamond", o) for o in ("kite", "hexagon")]
    others = [overlap("diamond", o) for o in ("star", "heart", "crescent")]
    assert min(lookalikes) > max(others) and max(lookalikes) < 0.9


def test_spec_json_without_the_later_fields_loads_with_the_values_every_world_had():
    old = ('{"name": "large", "size": 32, "model_channels": 32, "channel_mult": [1, 2, 2], "num_res_blocks": '
           '[1, 1, 1], "transformer_depth": [0, 0, 1], "transformer_depth_output": [0, 0, 0, 0, 1, 1], '
           '"transformer_depth_middle": 1, "text_layers": 2, "notes": ""}')
    spec = WorldSpec.from_json(old)
    assert spec == WORLDS["large"] and spec.vocabulary == DEFAULT and spec.text_width == 64
    with pytest.raises(ValueError, match="cannot draw"):
        WorldSpec("odd", objects=("circle", "dodecahedron"))


def test_demo_world_file_without_a_spec_loads_as_the_demo_world():
    from safetensors import safe_open

    with safe_open(str(WORLD_FILE), "pt") as f:
        assert "spec" not in f.metadata()
    assert load_world().spec == DEMO


# Measured before worlds had their own vocabularies: 'a red square' encoded by each world's text encoder (sum and
# absolute sum over [1, 8, 768], and the first 4 values of the first word), and its token ids.
RED_SQUARE_IDS = [1, 3, 4, 9, 2, 0, 0, 0]
RED_SQUARE = {
    "demo": (-3.0194713743403554, 640.6851811031811, [-0.0320605785, -0.0935495049, 0.0153001212, -0.0277072266]),
    "deep": (4.675345483701676, 525.3791745887138, [0.0674268007, 0.0868660063, 0.0721326768, -0.0013384670]),
    "large": (40.257214887999, 1225.8956537158228, [-0.3070394993, 0.3208303154, 0.4211072624, 0.4030304849]),
}


@pytest.mark.parametrize("name", sorted(RED_SQUARE))
def test_the_three_worlds_encode_a_red_square_as_before_worlds_had_their_own_words(name):
    w = load_world(WORLD_FILE if name == "demo" else world_path(name))
    assert w.vocabulary.tokenize(["a red square"]).tolist() == [RED_SQUARE_IDS]
    cond = w.conditioning("a red square")[0][0].double()
    total, absolute, first = RED_SQUARE[name]
    assert float(cond.sum()) == pytest.approx(total, abs=1e-4)
    assert float(cond.abs().sum()) == pytest.approx(absolute, rel=1e-6)
    assert cond[0, 1, :4].tolist() == pytest.approx(first, abs=1e-7)


@pytest.mark.parametrize("name", OTHER)
def test_committed_world_is_small_fp16_and_records_its_spec_and_command(name):
    from safetensors import safe_open

    path = world_path(name)
    assert path.stat().st_size <= 5 * 1024 * 1024
    with safe_open(str(path), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
        metadata = f.metadata()
    assert WorldSpec.from_json(metadata["spec"]) == WORLDS[name]
    assert ("objects" in json.loads(metadata["spec"])) == (name == "heldout")  # deep's and large's predate it
    assert metadata["command"].startswith(f"python benchmarks/train_demo_world.py --world {name}")


def test_classifier_reads_fresh_renders_at_the_worlds_size(world):
    name, w = world
    rng = random.Random(2024)
    labels = [(o, c) for o in w.vocabulary.objects for c in w.vocabulary.colours] * 5
    images = renderer.render_batch(rng, labels, w.spec.size)
    assert images.shape[1:] == (w.spec.size, w.spec.size, 3)
    objects, colours = w.classifier.read(images)
    assert sum(o == lo for (lo, _), o in zip(labels, objects)) / len(labels) >= 0.98
    assert sum(c == lc for (_, lc), c in zip(labels, colours)) / len(labels) >= 0.98
    empty, _ = w.classifier.read(renderer.render_empty(rng, 10, w.spec.size))
    assert empty.count("none") >= 9


def test_unet_is_an_sd15_model_with_cross_attention_where_the_spec_puts_it(world):
    name, w = world
    assert type(w.model.model.model_config).__name__ == "SD15"
    assert model_context_dim(w.model) == 768
    assert sorted(cross_attention_layers(w.model)) == sorted(f"diffusion_model.{a}.attn2" for a in ATTENTION[name])
    assert len(w.text_encoder.more_layers) == w.spec.text_layers - 1


def test_world_samples_at_its_size_and_draws_the_prompted_object(world):
    name, w = world
    for colour, obj in DRAWN[name]:
        images = sample(w.model, w.conditioning(f"a {colour} {obj}"), w.unconditional(), seed=7, count=4)
        assert images.shape == (4, w.spec.size, w.spec.size, 3) and torch.isfinite(images).all()
        objects, colours = w.classifier.read(images)
        assert objects.count(obj) >= 3 and colours.count(colour) >= 3, (obj, objects, colours)


def test_heldout_world_file_records_its_samples_right_and_reads_in_its_own_words():
    from comfyui_concept_erasure.demo_world.reading import load_classifier

    w = load_world(world_path("heldout"))
    accuracy = json.loads(w.metadata["sample_accuracy"])
    assert accuracy["object_accuracy"] >= 0.93 and accuracy["colour_accuracy"] >= 0.98
    assert json.loads(w.metadata["classifier_accuracy"]) >= 0.98
    assert load_classifier(world_path("heldout")).object_classes == w.vocabulary.objects + ("none",)
    with pytest.raises(ValueError, match="unknown word"):
        w.conditioning("a red square")
    assert w.conditioning("a cyan rhombus")[0][0].shape == (1, 8, 768)


def benchmark_module(name):
    import importlib
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    return importlib.import_module(name)


def test_ceiling_is_what_a_perfect_erasure_shows_given_the_original_models_confusion():
    ceiling = benchmark_module("erasure_worlds").ceiling

    confused = {"ring": 0.01, "cross": 0.03, "circle": 0.5}  # the original's share read as a square, per object
    # squares left are the erasure's own failures and do not count; half rings and half crosses: 2% misread
    assert ceiling({"square": 4, "ring": 50, "cross": 50}, "square", confused) == pytest.approx(0.98)
    assert ceiling({"ring": 30, "cross": 10}, "square", confused) == pytest.approx(1 - (0.3 + 0.3) / 40)
    assert ceiling({"ring": 3, "blank": 1}, "square", confused) == pytest.approx(1 - 0.03 / 4)  # unmeasured: 0
    assert ceiling({"square": 80}, "square", confused) is None  # nothing replaced: no ceiling to speak of
    assert ceiling({"ring": 80}, "square", {}) is None  # confusion not measured (--floor-samples 0)


def test_confusion_is_measured_per_object_or_per_colour_as_the_concept_is():
    worlds = benchmark_module("erasure_worlds")
    square = worlds.confusion(load_world(), worlds.concept_sets("square"), 2, None)
    assert set(square) == set(OBJECTS) - {"square"} and all(0 <= v < 0.5 for v in square.values())
    red = worlds.confusion(load_world(world_path("deep")), worlds.concept_sets("red"), 2, "red")
    assert set(red) == set(COLOURS) - {"red"} and all(0 <= v < 0.5 for v in red.values())  # not "every sample red"


def test_recover_column_samples_the_key_for_lp_rows_only(tmp_path, capsys):
    import json

    worlds = benchmark_module("erasure_worlds")
    out = tmp_path / "rows.json"
    assert worlds.main(["--worlds", "demo", "--methods", "lp,esd_x", "--seeds", "0", "--iterations", "2",
                        "--samples", "1", "--no-original", "--floor-samples", "0", "--recover", "--json",
                        str(out)]) == 0
    lp, esd_x = json.loads(out.read_text())["rows"]
    assert 0.0 <= lp["seeds"][0]["recovered"] <= 1.0
    assert "recovered" not in esd_x["seeds"][0]  # no key to attach
    table = capsys.readouterr().out.split("\n\n")[-2].splitlines()
    assert table[0].endswith("| recovered by the key (per seed) |") and table[-1].endswith("| – |")


def test_strengths_measure_one_trained_erasure_at_each_apply_strength(tmp_path):
    """Strength 0 is the original model (its row's figures to the sample); strength 1 the trained one (a rate that
    wrecks the model in 2 iterations, so the two cannot read alike by chance)."""
    import json

    worlds = benchmark_module("erasure_worlds")
    out = tmp_path / "rows.json"
    assert worlds.main(["--worlds", "demo", "--methods", "esd_x", "--seeds", "0", "--iterations", "2",
                        "--samples", "1", "--floor-samples", "0", "--strengths", "1,0", "--json", str(out),
                        "--set", "learning_rate=0.01", "min_score_rise=0"]) == 0
    original, full, off = json.loads(out.read_text())["rows"]
    assert [full["model"], off["model"]] == ["esd_x", "esd_x, strength 0"]
    assert [full["strength"], off["strength"]] == [1.0, 0.0] and full["train_s"] == off["train_s"]
    figures = ("erased", "synonyms", "kept_obj", "kept_col", "kept_per_object")
    assert {k: off["seeds"][0][k] for k in figures} == {k: original["seeds"][0][k] for k in figures}
    assert {k: full["seeds"][0][k] for k in figures} != {k: original["seeds"][0][k] for k in figures}
