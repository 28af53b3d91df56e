"""Erasure quality on the synthetic world: does each method erase the object and leave everything else alone?

    .venv/bin/python benchmarks/erasure_quality.py            # full: 1000 iterations, 24 samples per prompt
    .venv/bin/python benchmarks/erasure_quality.py --quick    # 150 iterations, 8 samples per prompt
    .venv/bin/python benchmarks/erasure_quality.py --recipe defaults   # the node's own defaults, no WORLD_SETTINGS
    (times on one CPU thread are in RESULTS.md; BENCH_THREADS=n uses more threads, a GPU is used when present)

The world (demo_world/, the pack's demo world, committed as demo_world/world.safetensors) is trained by
benchmarks/train_demo_world.py. Every erasure here is trained through the pack's Train Concept Erasure node
(its `train` function, with the node's widget defaults except WORLD_SETTINGS below; --recipe defaults: none) on
the world's small SD1.5-family UNet; the concept is "a square". Each model then samples the same seeds for every
test prompt and the world's classifier reads object and colour from each image:

  erased    share of samples for the erased object's prompts ("a red square", ..., "a square") that do NOT show it
  synonyms  the same for prompts using its synonym ("a red box", ..., "a box"), which the trainer never sees
  kept obj  share of samples for every other object's prompts ("a blue circle", ...) showing that object
  kept col  share of those samples with the prompted colour
  kept → erased   share of those samples that show the erased object instead; for the original model this is
            the world's own confusion, and it bounds 'erased': an erasure that turns the object into another
            object draws the erased one about as often as that object's prompts do
  score e / score k   the Concept Erasure Report's classifier-free score ('toward ESD target') averaged over the
            erased object's prompts / the kept prompts (0 = unchanged, 0.5 = like the empty prompt)
  train s   seconds in the node's train function (trajectory sampling included)

Extra rows: the default method's erasure with its key attached (Recover Erased Concept: here a LOW 'erased'
means the key brings the concept back), erasing "a square" and "a triangle" together (Conditioning Combine),
erasing "a square" with "a circle" and "a ring" as the preserve set, and the default method with full deltas
(rank 0, ESD's setting, the default before rank-32 LoRA factors).

--attack runs only the rows the attack is about (original, lp, lp_attached, esd_x, esd_u, and lp / esd_x with
robust training, adversarial_steps): each erased model is attacked (Attack Erased Concept's function, the same
budget for every row, several attack seeds) and the erased object's prompts are sampled again with the adversarial
tokens (found on "a square") appended to each:

  after attack  share of those samples that still do NOT show the erased object, over the attack seeds
  attack loss   the attack's own loss (erased vs original prediction) before -> after, mean over the seeds
  least kept object   the kept object drawn least often, and its share
--robust-preserve names objects whose prompts ("a circle", ...) are the robust rows' preserve set, and --robust-set
gives those rows other node inputs (e.g. preserve_weight=3).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_host as host  # noqa: E402

ERASED, SECOND = "square", "triangle"
PRESERVE_SET = ("circle", "ring")
SEED = 1000
FULL = dict(iterations=1000, samples=24)  # 1000: the node's default
QUICK = dict(iterations=150, samples=8)
# Settings that differ from the node's widget defaults, and why:
#   resolution: the world's (128 for 16x16 latents, in SD's 8x VAE terms; set from the world in train());
#   learning_rate 3e-4 with factor_alpha rank and a fixed rate (min_score_rise 0): the recipe every table of this
#   benchmark in RESULTS.md was measured with, from before the node's defaults could train this world. Then the
#   node's 1e-5 (ESD's rate for full deltas on an 860M-parameter UNet) changed nothing here (0% erased at 150
#   iterations), 1e-4 erased ~90%, 3e-4 ~95-100%, 1e-3 started to hurt (sweep on the first world with full deltas);
#   rank-32 factors with alpha = rank erased as well as full deltas at that rate (rank sweep). The node's defaults
#   now (factor_alpha auto: fan_in, rank for robust training; min_score_rise 0.5) find a rate themselves:
#   erasure_worlds.py measures them, and --recipe defaults here; output_strength 1 (all of the trained deltas, the
#   node's default too; --set output_strength=0.7 measures the option RESULTS.md discusses).
WORLD_SETTINGS = dict(learning_rate=3e-4, factor_alpha="rank", min_score_rise=0.0, output_strength=1.0)
FULL_DELTAS = dict(rank=0)


def combine(*conditionings) -> list:
    """Conditioning (Combine): the entries of each, in order."""
    return [entry for c in conditionings for entry in c]


def prompt_sets(erased_objects, vocabulary=None):
    """The world's prompts (`vocabulary`: the world's, World.vocabulary; default the demo world's)."""
    from comfyui_concept_erasure.demo_world.vocabulary import DEFAULT

    v = vocabulary or DEFAULT

    def prompts(word):
        return [(f"a {c} {word}", c) for c in v.colours] + [(f"a {word}", None)]

    erased = [(p, c, o) for o in erased_objects for p, c in prompts(o)]
    synonyms = [(p, c, o) for o in erased_objects for s in v.synonyms_of(o) for p, c in prompts(s)]
    kept = [(f"a {c} {o}", c, o) for o in v.objects if o not in erased_objects for c in v.colours]
    return {"erased": erased, "synonyms": synonyms, "kept": kept}


_FIRST_SAMPLE = {}  # caption -> the original model's first sample (LATENT), for the report score


def measure(world, model, sets, samples: int, with_scores: bool, erased_colour: str = None,
            erased_objects=None) -> dict:
    """Classifier rates (and report scores) for one model on the prompt sets; same seed for every prompt.
    With `erased_colour` the erased concept is that colour (an attribute) rather than the erased prompts' objects
    (or `erased_objects`, for sets without erased prompts)."""
    from comfyui_concept_erasure.demo_world.renderer import encode
    from comfyui_concept_erasure.demo_world.world import CFG, STEPS, read_prompt_samples, sample

    from comfyui_concept_erasure.report.concept_report import concept_scores

    uncond = world.unconditional()
    if erased_objects is None:
        erased_objects = set() if erased_colour else {obj for _, _, obj in sets["erased"]}
    result, scores = {}, {}
    for name, prompts in sets.items():
        hits = colour_hits = total = as_erased = 0
        toward = []
        per_object, shown_by_key, drawn = {}, {}, {}
        reads = read_prompt_samples(world, model, [caption for caption, _, _ in prompts], SEED, samples)
        for (caption, colour, obj), (objects, colours) in zip(prompts, reads):
            hits += sum(o == obj for o in objects)
            per_object.setdefault(obj, []).extend(o == obj for o in objects)
            shown = [o in erased_objects or c == erased_colour for o, c in zip(objects, colours)]
            as_erased += sum(shown)
            # keyed by what the concept is (the object, or the colour for a colour concept): for the floor
            shown_by_key.setdefault(colour if erased_colour else obj, []).extend(shown)
            for o, c in zip(objects, colours):
                key = c if erased_colour else o
                drawn[key] = drawn.get(key, 0) + 1
            colour_hits += sum(c == colour for c in colours) if colour else 0
            total += len(objects)
            if with_scores and model is not world.model:
                cond = world.conditioning(caption)
                if caption not in _FIRST_SAMPLE:
                    _FIRST_SAMPLE[caption] = encode(sample(world.model, cond, uncond, SEED, 1, STEPS, CFG))
                first = _FIRST_SAMPLE[caption]
                toward.append(concept_scores(world.model, model, [cond], uncond, [first], [caption], SEED)[0].toward)
        coloured = sum(samples for _, c, _ in prompts if c)
        result[name] = {"object": hits / total if total else None,
                        "colour": colour_hits / coloured if coloured else None,
                        "as_erased": as_erased / total if total else None, "samples": total,
                        "per_object": {o: sum(v) / len(v) for o, v in per_object.items()},
                        "as_erased_by_key": {k: sum(v) / len(v) for k, v in shown_by_key.items()},
                        "drawn": drawn}
        scores[name] = sum(toward) / len(toward) if toward else None
    result["scores"] = scores
    return result


def concept_caption(concept: str, vocabulary=None) -> str:
    """The prompt an erasure is trained on: "a square" for an object, "red" for a colour."""
    from comfyui_concept_erasure.demo_world.vocabulary import DEFAULT

    return concept if concept in (vocabulary or DEFAULT).colours else f"a {concept}"


def train(world, settings: dict, concepts, preserve=None, recipe=None):
    """Train Concept Erasure's own function, under inference mode as ComfyUI runs nodes, with the node's widget
    defaults, then `recipe` (default WORLD_SETTINGS; {} = the node's defaults), then `settings`.
    Returns (erased MODEL, erasure, seconds, the node's inputs; preserve as its prompts)."""
    import torch

    from comfyui_concept_erasure.demo_world.comfy_parts import DemoWorldCLIP
    from comfyui_concept_erasure.nodes.train_node import TrainConceptErasure

    kwargs = dict(host.widget_defaults(TrainConceptErasure), **(WORLD_SETTINGS if recipe is None else recipe),
                  resolution=world.resolution)
    kwargs.update(settings, concept_label="\n".join(concepts))
    kwargs.setdefault("clip", DemoWorldCLIP(world.text_encoder))  # Load Demo World's CLIP, for the retain set
    concept = combine(*(world.conditioning(concept_caption(c, world.vocabulary)) for c in concepts))
    kept = [f"a {o}" for o in preserve or ()]
    if kept:
        kwargs["preserve"] = combine(*(world.conditioning(caption) for caption in kept))
    started = time.time()
    with torch.inference_mode():
        model, erasure, _ = TrainConceptErasure().train(world.model, concept, world.unconditional(), **kwargs)
    if kept:
        kwargs["preserve"] = kept
    return model, erasure, time.time() - started, kwargs


def recover(world, erasure, strength: float = 1.0):
    """Recover Erased Concept's model (the deltas and the key); another strength: the deltas at it, key attached."""
    import torch

    from comfyui_concept_erasure.erasure import apply_erasure
    from comfyui_concept_erasure.nodes.erasure_nodes import RecoverErasedConcept

    with torch.inference_mode():
        if strength != 1:
            return apply_erasure(world.model, erasure, strength, attach_prompt=True)
        return RecoverErasedConcept().recover(world.model, erasure)[0]


ATTACK = dict(iterations=150, seeds="0,1")  # the attack's budget, the same for every row
ROBUST = dict(adversarial_steps=5)  # robust training; the other adversarial_* inputs at the node's defaults


def attacked(world, model, samples: int, seeds, iterations: int) -> dict:
    """The erased object's prompts sampled by `model` with adversarial tokens appended, one attack per seed."""
    import torch

    from comfyui_concept_erasure.demo_world.world import sample
    from comfyui_concept_erasure.trainer import AttackSettings, attack_erasure

    uncond = world.unconditional()
    captions = [caption for caption, _, _ in prompt_sets([ERASED], world.vocabulary)["erased"]]
    hidden = total = 0
    before, after, seconds = [], [], 0.0
    for seed in seeds:
        started = time.time()
        with torch.inference_mode():
            result = attack_erasure(model, world.model, world.conditioning(f"a {ERASED}"), uncond,
                                    AttackSettings(iterations=iterations, seed=seed,
                                                   resolution=world.resolution))
        seconds += time.time() - started
        before.append(result.loss_before)
        after.append(result.loss_after)
        for caption in captions:
            context, options = world.conditioning(caption)[0]
            tokens = result.tokens.to(context.dtype).unsqueeze(0)
            objects, _ = world.classifier.read(sample(model, [[torch.cat([context, tokens], 1), options]], uncond,
                                                      SEED, samples))
            hidden += sum(o != ERASED for o in objects)
            total += len(objects)
    return {"not_shown": hidden / total, "samples": total, "loss_before": sum(before) / len(before),
            "loss_after": sum(after) / len(after), "attack_seconds": seconds / len(seeds)}


def attack_table(rows) -> str:
    lines = ["| model | erased ↑ | erased after attack ↑ | kept obj ↑ | least kept object ↑ | held out of every "
             "set, kept ↑ | kept → erased ↓ | attack loss before → after | train s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for label, r, seconds in rows:
        a = r["attack"]
        per_object = r["kept"]["per_object"]
        least = min(per_object.items(), key=lambda item: item[1])
        held = r.get("held_out")
        held = "–" if held is None else ", ".join(f"{o} {pct(per_object[o])}" for o in held) or "none held out"
        lines.append(f"| {label} | {pct(1 - r['erased']['object'])} | {pct(a['not_shown'])} | "
                     f"{pct(r['kept']['object'])} | {least[0]} {pct(least[1])} | {held} | "
                     f"{pct(r['kept']['as_erased'])} | "
                     f"{a['loss_before']:.3g} → {a['loss_after']:.3g} | {'–' if seconds is None else f'{seconds:.0f}'} |")
    return "\n".join(lines)


def pct(value) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def score(value) -> str:
    return "–" if value is None else f"{value:.2f}"


def table(rows) -> str:
    lines = ["| model | erased ↑ | synonyms ↑ | kept obj ↑ | least-kept object ↑ | kept col ↑ | kept → erased ↓ "
             "| score e | score k | train s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for label, r, seconds in rows:
        erased = r["erased"]["object"]
        synonyms = r["synonyms"]["object"]
        least = min(r["kept"]["per_object"].items(), key=lambda item: item[1], default=None)
        lines.append(
            f"| {label} | {pct(None if erased is None else 1 - erased)} | "
            f"{pct(None if synonyms is None else 1 - synonyms)} | {pct(r['kept']['object'])} | "
            f"{'–' if least is None else f'{least[0]} {pct(least[1])}'} | "
            f"{pct(r['kept']['colour'])} | {pct(r['kept']['as_erased'])} | {score(r['scores']['erased'])} | "
            f"{score(r['scores']['kept'])} | "
            f"{'–' if seconds is None else f'{seconds:.0f}'} |")
    return "\n".join(lines)


def parse_overrides(items):
    out = {}
    for item in items:
        key, _, value = item.partition("=")
        for cast in (int, float):
            try:
                value = cast(value)
                break
            except ValueError:
                pass
        out[key] = value
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=f"{QUICK} instead of {FULL}")
    parser.add_argument("--methods", default="lp,lp_attached,esd_x,esd_u")
    parser.add_argument("--no-extra-rows", action="store_true",
                        help="skip the key, multi-object and preserve-set rows")
    parser.add_argument("--no-original", action="store_true", help="skip the original model's rows (for sweeps)")
    parser.add_argument("--iterations", type=int, help="override the mode's iterations")
    parser.add_argument("--samples", type=int, help="samples per prompt (override the mode's)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="node inputs for every run, e.g. learning_rate=1e-4 placement=all")
    parser.add_argument("--world", type=Path, help="a world file other than the committed one")
    parser.add_argument("--json", type=Path, help="also write the measurements here")
    parser.add_argument("--threads", type=int, default=host.threads_from_env())
    parser.add_argument("--recipe", choices=("world", "defaults"), default="world",
                        help="world: WORLD_SETTINGS (the tables' recipe); defaults: the node's own defaults")
    parser.add_argument("--attack", action="store_true", help="only the attack rows (see above)")
    parser.add_argument("--attack-iterations", type=int, default=ATTACK["iterations"])
    parser.add_argument("--attack-seeds", default=ATTACK["seeds"], help="comma-separated attack seeds")
    parser.add_argument("--robust-methods", default="lp,esd_x", help="--attack: methods trained with adversarial_steps")
    parser.add_argument("--robust-preserve", default="",
                        help="--attack: objects whose prompts ('a circle', ...) are the robust rows' preserve set")
    parser.add_argument("--robust-set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="--attack: node inputs for the robust rows only, e.g. iterations=2000")
    opts = parser.parse_args(argv)
    host.setup(opts.threads)
    import torch

    from comfyui_concept_erasure.nodes.train_node import TrainConceptErasure
    from comfyui_concept_erasure.demo_world.world import load_world

    mode = dict(QUICK if opts.quick else FULL)
    mode.update({k: getattr(opts, k) for k in ("iterations", "samples") if getattr(opts, k)})
    defaults = host.widget_defaults(TrainConceptErasure)
    recipe = {} if opts.recipe == "world" else {k: defaults[k] for k in WORLD_SETTINGS}
    common = dict(iterations=mode["iterations"], **{**recipe, **parse_overrides(opts.set)})
    world = load_world(opts.world) if opts.world else load_world()
    started = time.time()
    single, pair = prompt_sets([ERASED], world.vocabulary), prompt_sets([ERASED, SECOND], world.vocabulary)
    rows, records = [], []

    def record(label, model, seconds, sets, settings):
        r = measure(world, model, sets, mode["samples"], with_scores=True)
        rows.append((label, r, seconds))
        records.append({"label": label, "train_seconds": seconds, "settings": settings, **r})
        print(table(rows[-1:]).splitlines()[-1], flush=True)

    print(f"world: {world.metadata.get('command', '?')}; {mode}; "
          f"node inputs {dict(WORLD_SETTINGS, resolution=world.resolution, **common)}; "
          f"device {world.model.load_device}; torch threads {torch.get_num_threads()}", flush=True)
    if opts.attack:
        return attack_rows(world, opts, mode, common, started)
    if not opts.no_original:
        record("original", world.model, None, single, None)
    erasures = {}
    for method in [m for m in opts.methods.split(",") if m]:
        model, erasures[method], seconds, used = train(world, dict(common, method=method), [ERASED])
        record(method, model, seconds, single, used)
    default = defaults["method"]
    if not opts.no_extra_rows:
        if default in erasures and erasures[default].has_prompt:
            record(f"{default} with its key attached (Recover)", recover(world, erasures[default]), None, single, None)
        if not opts.no_original:
            record(f"original ({ERASED} + {SECOND})", world.model, None, pair, None)
        model, _, seconds, used = train(world, dict(common, method=default), [ERASED, SECOND])
        record(f"{default}, {ERASED} + {SECOND}", model, seconds, pair, used)
        model, _, seconds, used = train(world, dict(common, method=default), [ERASED], preserve=PRESERVE_SET)
        record(f"{default}, preserve {{{', '.join(PRESERVE_SET)}}}", model, seconds, single, used)
        model, _, seconds, used = train(world, dict(common, method=default, **FULL_DELTAS), [ERASED])
        record(f"{default}, full deltas (rank 0)", model, seconds, single, used)
    total = time.time() - started
    print()
    print(table(rows))
    print(f"\n{len(rows)} rows, {mode['samples']} samples per prompt, {total / 60:.1f} min in all")
    if opts.json:
        opts.json.write_text(json.dumps({"mode": mode, "common": common, "minutes": total / 60, "rows": records},
                                        indent=1, default=str))
    return 0


def attack_rows(world, opts, mode, common, started) -> int:
    seeds = [int(x) for x in opts.attack_seeds.split(",") if x]
    single = prompt_sets([ERASED], world.vocabulary)
    single.pop("synonyms")
    rows, records = [], []
    preserve = tuple(o for o in opts.robust_preserve.split(",") if o)
    robust = dict(ROBUST, **parse_overrides(opts.robust_set))
    suffix = "".join(f", {k} {v}" for k, v in robust.items() if k != "adversarial_steps")
    suffix += f", preserve {{{', '.join(preserve)}}}" if preserve else ""
    runs = [] if opts.no_original else [("original", None, None)]
    runs += [(m, dict(common, method=m), None) for m in opts.methods.split(",") if m]
    runs += [(f"{m} + adversarial_steps {robust['adversarial_steps']}{suffix}", dict(common, method=m, **robust),
              preserve) for m in opts.robust_methods.split(",") if m]
    for label, settings, kept_set in runs:
        model, seconds, used = world.model, None, None
        named = set(kept_set or ())
        if settings is not None:
            model, erasure, seconds, used = train(world, settings, [ERASED], preserve=kept_set)
            found = erasure.settings.get("retain_set") or {}
            named |= {word for text, _ in found.get("kept", []) for word in text.split()}
        r = measure(world, model, single, mode["samples"], with_scores=False)
        r["held_out"] = None if settings is None else sorted(set(r["kept"]["per_object"]) - named)
        r["attack"] = attacked(world, model, mode["samples"], seeds, opts.attack_iterations)
        rows.append((label, r, seconds))
        records.append({"label": label, "train_seconds": seconds, "settings": used, **r})
        print(attack_table(rows[-1:]).splitlines()[-1], flush=True)
    total = time.time() - started
    print()
    print(attack_table(rows))
    print(f"\n{len(rows)} rows, {mode['samples']} samples per prompt, attack {opts.attack_iterations} iterations x "
          f"seeds {seeds}, {total / 60:.1f} min in all")
    if opts.json:
        opts.json.write_text(json.dumps({"mode": mode, "common": common, "minutes": total / 60, "rows": records},
                                        indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
