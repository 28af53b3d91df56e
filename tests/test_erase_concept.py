"""Erase Concept, the front door: it encodes its text exactly as CLIP Text Encode does, trains exactly what Train
Concept Erasure (Advanced) trains with the same settings, and takes the settings nodes' values (and only those)."""
import dataclasses

import pytest
import torch

from comfyui_concept_erasure.demo_world.comfy_parts import DemoWorldCLIP
from comfyui_concept_erasure.demo_world.world import load_world
from comfyui_concept_erasure.erasure.concept_erasure import ErasureError
from comfyui_concept_erasure.nodes import erase_node, train_node
from comfyui_concept_erasure.nodes.erase_node import (EraseConcept, ErasureKeepSettings, ErasureMemorySettings,
                                                      ErasureRobustSettings, ErasureTrainingSettings)
from comfyui_concept_erasure.nodes.train_node import TrainConceptErasure
from comfyui_concept_erasure.trainer import TrainSettings
from comfyui_concept_erasure.trainer.setting_fields import FIELDS
from host_nodes import host_nodes
from pack_import import widget_defaults
from tiny_models import build_clip

MAIN = dict(method="lp", iterations=1000, seed=0)
TEXTS = {"sd15": ("a cat", "Van Gogh", "a dog"), "sdxl": ("a cat", "Van Gogh", "a dog"),
         "demo": ("a square", "a triangle", "a circle")}


@pytest.fixture(scope="module")
def world():
    return load_world()


class Stop(Exception):
    pass


def captured(monkeypatch, target, name):
    """Calls of module `target`'s `name`, which then stops the node (nothing is trained)."""
    calls = []

    def capture(*args, **kwargs):
        calls.append((args, kwargs))
        raise Stop

    monkeypatch.setattr(target, name, capture)
    return calls


def same(ours, theirs):
    assert len(ours) == len(theirs)
    for (c1, o1), (c2, o2) in zip(ours, theirs):
        assert torch.equal(c1, c2)
        assert set(o1) == set(o2)
        for key in o1:
            if isinstance(o1[key], torch.Tensor):
                assert torch.equal(o1[key], o2[key]), key


@pytest.mark.parametrize("family", ["sd15", "sdxl", "demo"])
def test_the_text_is_encoded_as_clip_text_encode_encodes_it(family, world, monkeypatch):
    clip = DemoWorldCLIP(world.text_encoder) if family == "demo" else build_clip(family)
    first, second, kept = TEXTS[family]
    calls = captured(monkeypatch, erase_node, "run_training")
    with pytest.raises(Stop):
        EraseConcept().erase("MODEL", clip, f"{first}\n  {second}\n\n", kept, **MAIN)
    (model, concept, unconditional, preserve, values, label, given_clip, _), _ = calls[0]
    encode = host_nodes().CLIPTextEncode().encode
    combined = host_nodes().ConditioningCombine().combine
    (expected,) = combined(encode(clip, first)[0], encode(clip, second)[0])
    same(concept, expected)
    same(unconditional, encode(clip, "")[0])
    same(preserve, encode(clip, kept)[0])
    assert label == f"{first}\n{second}" and model == "MODEL" and given_clip is clip
    if family == "sdxl":
        assert concept[0][1]["pooled_output"].shape == (1, 1280)


def test_an_empty_concept_is_refused_before_anything_runs(world, monkeypatch):
    calls = captured(monkeypatch, erase_node, "run_training")
    with pytest.raises(ErasureError, match="type the concept"):
        EraseConcept().erase("MODEL", DemoWorldCLIP(world.text_encoder), " \n ", "", **MAIN)
    assert calls == []


def test_each_settings_node_reaches_the_trainer_and_what_none_sets_keeps_its_default(world, monkeypatch):
    calls = captured(monkeypatch, train_node, "train_erasure")
    chained = None
    changes = {ErasureTrainingSettings: dict(negative_guidance=3.5, rank=8),
               ErasureKeepSettings: dict(retain_size=3, retain_candidates="a circle\na triangle"),
               ErasureRobustSettings: dict(adversarial_steps=2),
               ErasureMemorySettings: dict(dtype="fp32")}
    for node, change in changes.items():
        (chained,) = node().settings(**{**widget_defaults(node), **change}, settings=chained)
    clip = DemoWorldCLIP(world.text_encoder)
    with pytest.raises(Stop):
        EraseConcept().erase(world.model, clip, "a square", "", method="esd_x", iterations=7, seed=5,
                             settings=chained)
    (_, _, _, preserve, settings, label), kwargs = calls[0]
    expected = dataclasses.replace(TrainSettings(), negative_guidance=3.5, rank=8, retain_size=3, adversarial_steps=2,
                                   dtype="fp32", method="esd_x", iterations=7, seed=5)
    assert settings == expected and preserve is None and label == "a square"
    assert kwargs["candidates"].texts == ["a circle", "a triangle"]  # the keep node's own list, not the world's


def test_every_setting_is_on_exactly_one_of_erase_concept_and_its_settings_nodes():
    nodes = (EraseConcept, ErasureTrainingSettings, ErasureKeepSettings, ErasureRobustSettings, ErasureMemorySettings)
    shown = [name for node in nodes for name in node.INPUT_TYPES()["required"]]
    settings = [f.name for f in FIELDS]
    assert sorted(n for n in shown if n in settings) == sorted(settings)
    assert [f.name for f in dataclasses.fields(TrainSettings)] == settings
    assert {f.name: f.default for f in FIELDS} == dataclasses.asdict(TrainSettings())
    erase = EraseConcept.INPUT_TYPES()["required"]
    assert len([n for n, spec in erase.items() if spec[0] not in ("MODEL", "CLIP")]) <= 7


def test_erase_concept_trains_the_same_erasure_as_the_advanced_node(world):
    clip = DemoWorldCLIP(world.text_encoder)
    fast = dict(resolution=128, sampling_steps=4, trajectory_refresh=4, score_every=2, min_score_rise=0.0)
    (settings,) = ErasureTrainingSettings().settings(**{**widget_defaults(ErasureTrainingSettings), **fast})
    encode = host_nodes().CLIPTextEncode().encode
    with torch.inference_mode():
        _, ours, _ = EraseConcept().erase(world.model, clip, "a square", "a circle", method="lp", iterations=3,
                                          seed=4, settings=settings)
        _, theirs, _ = TrainConceptErasure().train(**{
            **widget_defaults(TrainConceptErasure), **fast, "model": world.model, "concept": encode(clip, "a square")[0],
            "unconditional": encode(clip, "")[0], "preserve": encode(clip, "a circle")[0], "iterations": 3, "seed": 4,
            "concept_label": "a square", "clip": clip})
    assert torch.equal(ours.prompt_k, theirs.prompt_k) and torch.equal(ours.prompt_v, theirs.prompt_v)
    assert ours.deltas.keys() == theirs.deltas.keys()
    for key in ours.deltas:
        a, b = ours.deltas[key], theirs.deltas[key]
        pairs = zip(dataclasses.astuple(a), dataclasses.astuple(b)) if dataclasses.is_dataclass(a) else [(a, b)]
        for x, y in pairs:
            assert torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y, key
    assert ours.concepts == theirs.concepts == ["a square"]
    drop = {"created"}
    assert {k: v for k, v in ours.settings.items() if k not in drop} == \
        {k: v for k, v in theirs.settings.items() if k not in drop}
