"""The retain set the trainer finds (trainer/retain_set.py), on the demo world: which candidates it keeps, that it is
recorded and reproducible, that it holds the kept concepts, and what robust training does with it."""
import pytest
import torch

from comfyui_concept_erasure.demo_world.comfy_parts import DemoWorldCLIP
from comfyui_concept_erasure.demo_world.world import load_world
from comfyui_concept_erasure.erasure import apply_erasure
from comfyui_concept_erasure.erasure.file_format import load_erasure, write_erasure_file
from comfyui_concept_erasure.nodes.train_node import TrainConceptErasure
from comfyui_concept_erasure.report.concept_report import concept_scores, sample_latent
from comfyui_concept_erasure.trainer import Candidates, TrainSettings, encode_candidates, train_erasure
from comfyui_concept_erasure.trainer.conditioning import encode_text
from comfyui_concept_erasure.trainer.retain_set import is_variant, shipped_vocabulary
from host_nodes import host_nodes

FAST = dict(resolution=128, sampling_steps=10, trajectory_refresh=10, score_every=10, min_score_rise=0.0,
            method="esd_x", learning_rate=3e-4, factor_alpha="rank")


@pytest.fixture(scope="module")
def world():
    return load_world()


def candidates(world, texts):
    clip = DemoWorldCLIP(world.text_encoder)
    return Candidates("test", list(texts), [encode_text(clip, t)[0] for t in texts])


def train(world, texts=None, preserve=None, **settings):
    with torch.inference_mode():
        return train_erasure(world.model, world.conditioning("a square"), world.unconditional(), preserve,
                             TrainSettings(**{**FAST, **settings}), "a square",
                             candidates=candidates(world, texts) if texts else None)


def test_encode_text_is_clip_text_encode_on_this_host(world):
    clip = DemoWorldCLIP(world.text_encoder)
    (theirs,) = host_nodes().CLIPTextEncode().encode(clip, "a red circle")
    ours = encode_text(clip, "a red circle")
    assert len(ours) == len(theirs) == 1 and torch.equal(ours[0][0], theirs[0][0])
    assert torch.equal(ours[0][1]["pooled_output"], theirs[0][1]["pooled_output"])


def test_a_synonym_is_erased_not_kept_and_a_far_concept_is_not_chosen(world):
    run = train(world, ["yellow", "a box", "a red square", "a circle", "a disc"], iterations=1, retain_size=2)
    found = run.retain
    assert [t for t, _ in found.synonyms] == ["a box"]  # the world was trained to draw the same for both
    assert found.variants == ["a red square"]  # names the concept: never kept
    assert [t for t, _ in found.kept] == ["a circle", "a disc"]  # the two nearest of the rest, not "yellow"
    assert all(d >= 0.5 for _, d in found.kept) and found.synonyms[0][1] < 0.5
    assert run.erasure.settings["preserve_prompts"] == 2


def test_the_built_set_is_recorded_in_the_file_and_reproducible(world, tmp_path):
    texts = DemoWorldCLIP(world.text_encoder).retain_candidates()
    first, second = (train(world, texts, iterations=10, seed=3) for _ in range(2))
    record = first.erasure.settings["retain_set"]
    assert record == second.erasure.settings["retain_set"] and len(record["kept"]) == 8
    assert record["considered"] == len(texts) and record["source"] == "test"
    assert not {t for t, _ in record["kept"]} & {"a square", "a box", *record["variants"]}
    assert all(torch.equal(first.erasure.deltas[k].up, second.erasure.deltas[k].up) for k in first.erasure.deltas)
    path = tmp_path / "e.safetensors"
    write_erasure_file(first.erasure, str(path))
    assert load_erasure(str(path)).settings["retain_set"] == record
    moved = first.erasure.settings["preserve_moved"]
    assert moved["labels"] == [t for t, _ in record["kept"]] and [m[0] for m in moved["moved"]] == [10]


def _kept_movement(world, erased, texts):
    """The report's 'moved' of each kept prompt, on the original's own sample for it."""
    latent = torch.zeros(1, 4, 16, 16)
    moved = []
    for text in texts:
        cond = world.conditioning(text)
        sample = sample_latent(world.model, cond, world.unconditional(), latent, 0, 20, 4.0)
        moved.append(concept_scores(world.model, erased, [cond], world.unconditional(), [sample], [text], 0)[0].moved)
    return moved


def test_the_built_set_holds_the_kept_concepts_closer_to_the_original(world):
    texts = DemoWorldCLIP(world.text_encoder).retain_candidates()
    steps = dict(iterations=60, seed=1, preserve_weight=3.0)
    with_set, without = train(world, texts, **steps), train(world, texts, retain="off", **steps)
    assert "retain_set" not in without.erasure.settings
    kept = [t for t, _ in with_set.retain.kept]
    with torch.inference_mode():
        held = _kept_movement(world, apply_erasure(world.model, with_set.erasure), kept)
        free = _kept_movement(world, apply_erasure(world.model, without.erasure), kept)
    print(f"kept concepts moved {sum(held) / len(held):.3f} with the set, {sum(free) / len(free):.3f} without")
    assert sum(held) < 0.8 * sum(free)  # measured: see the printout; the margin leaves room for seed noise
    assert with_set.scores[-1][1] > 0.5 * without.scores[-1][1]  # and the concept is still erased


def test_robust_training_uses_the_built_set_instead_of_warning(world, caplog):
    robust = dict(iterations=2, adversarial_steps=1, adversarial_every=1, rank=4)
    with caplog.at_level("WARNING"):
        run = train(world, ["a circle", "a triangle"], **robust)
    assert not any("without a preserve" in r.getMessage() for r in caplog.records)
    assert [t for t, _ in run.retain.kept] == ["a circle", "a triangle"] and "erase_adv" in run.losses
    with caplog.at_level("WARNING"):
        train(world, None, **robust)
    assert any("without a preserve" in r.getMessage() for r in caplog.records)


def test_retain_add_builds_beside_a_connected_preserve_and_auto_does_not(world):
    preserve = world.conditioning("a ring")
    auto = train(world, ["a circle"], preserve=preserve, iterations=1)
    assert auto.retain is None and auto.erasure.settings["preserve_prompts"] == 1
    added = train(world, ["a circle"], preserve=preserve, iterations=1, retain="add")
    assert [t for t, _ in added.retain.kept] == ["a circle"] and added.erasure.settings["preserve_prompts"] == 2
    assert added.erasure.settings["preserve_moved"]["labels"] == ["preserve 1", "a circle"]


def test_retain_watch_raises_the_weight_of_a_kept_concept_that_moves(world):
    run = train(world, ["a circle", "a disc"], iterations=20, retain_watch=1e-6)
    raises = run.erasure.settings["preserve_raises"]
    assert [r[0] for r in raises] == [10, 10, 20, 20] and [r[3] for r in raises] == [2.0, 2.0, 4.0, 4.0]
    assert {r[1] for r in raises} == {"a circle", "a disc"}


def test_the_node_finds_the_set_with_clip_and_not_without(world):
    node = TrainConceptErasure()
    from comfyui_concept_erasure.trainer import TrainSettings as S
    from pack_import import widget_defaults

    kwargs = dict(widget_defaults(TrainConceptErasure), iterations=1, resolution=128, sampling_steps=4, min_score_rise=0.0, score_every=1)
    with torch.inference_mode():
        _, erasure, curves = node.train(world.model, world.conditioning("a square"), world.unconditional(),
                                        clip=DemoWorldCLIP(world.text_encoder), **kwargs)
        _, plain, _ = node.train(world.model, world.conditioning("a square"), world.unconditional(), **kwargs)
    assert erasure.settings["retain_set"]["source"] == "the model's own words" and S().retain == "auto"
    assert "retain_set" not in plain.settings and curves.shape[-1] == 3


def test_candidates_come_from_the_users_list_then_the_models_words_then_the_vocabulary(world):
    clip = DemoWorldCLIP(world.text_encoder)
    mine = encode_candidates(clip, "a circle\n\na ring\n")
    assert mine.source == "your list" and mine.texts == ["a circle", "a ring"]
    own = encode_candidates(clip)
    assert own.source == "the model's own words" and "a box" in own.texts
    vocabulary = shipped_vocabulary()
    assert 250 <= len(vocabulary) == len(set(vocabulary)) and "Claude Monet" in vocabulary

    class Plain:  # a CLIP without words of its own, refusing what it cannot read
        def tokenize(self, text):
            if "'" in text:
                raise ValueError("cannot read")
            return text

        def encode_from_tokens(self, tokens, return_pooled=False):
            return torch.zeros(1, 77, 768), torch.zeros(1, 768)

    shipped = encode_candidates(Plain())
    assert shipped.source == "the pack's vocabulary" and "Georgia O'Keeffe" not in shipped.texts
    assert len(shipped.texts) == len([t for t in vocabulary if "'" not in t])


@pytest.mark.parametrize("candidate,concepts,variant", [
    ("a red square", ["a square"], True), ("Vincent van Gogh", ["Van Gogh"], True),
    ("a Van Gogh painting", ["Van Gogh"], True), ("Claude Monet", ["Van Gogh"], False),
    ("a circle", ["a square"], False), ("an oil painting", ["a painting"], True),
    ("a photograph", ["a painting"], False)])
def test_variants_name_every_word_of_a_concept(candidate, concepts, variant):
    assert is_variant(candidate, concepts) is variant
