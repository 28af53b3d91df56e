"""Erasure on every synthetic world, several training seeds: do the defaults hold beyond the world they were tuned on?

    .venv/bin/python benchmarks/erasure_worlds.py                 # every world, lp and esd_x, seeds 0,1,2
    .venv/bin/python benchmarks/erasure_worlds.py --worlds large --methods lp --seeds 0 --samples 8
    .venv/bin/python benchmarks/erasure_worlds.py --worlds large --concept square --strengths 1,0.7 \
        --set output_strength=1      # one training per seed, measured with all of its deltas and with 0.7 of them

The worlds (demo_world/spec.py) share the vocabulary (heldout aside) and the renderer's scenes and differ in latent
size, UNet shape and text-encoder depth; each has its own classifier and its own concept to erase (WORLD_CONCEPTS):

  demo    16x16 latents, cross-attention at 8x8 only, 1 text layer      (demo_world/world.safetensors)   "a square"
  deep    16x16, two transformer blocks per attention site, 3 text layers (benchmarks/worlds/deep.safetensors)  "red"
  large   32x32 latents, 3 levels, attention at 8x8 only, 2 text layers (benchmarks/worlds/large.safetensors) "a cross"
  heldout 32x32, attention at 16x16 and 8x8, 128-wide text encoder, its own words and shapes
          (benchmarks/worlds/heldout.safetensors) "a diamond"; kept out of tuning, so not run unless named

Every erasure goes through Train Concept Erasure's own function with the node's widget defaults and the world's
resolution, one per training seed (`--recipe world`: erasure_quality.py's fixed recipe instead, learning_rate
3e-4 with factor_alpha rank, the settings of the tables measured before the defaults changed). Columns:

  erased     share of the samples for the concept's prompts that do NOT show it: "a {colour} square" and
             "a square" for an object; "a red {object}" for the colour, where showing it means a red image
  synonyms   the same for the object's synonym ("a {colour} box", "a box"), which the trainer never sees
             (a colour has none here)
  kept obj / kept col  share of the samples for every other prompt ("a blue circle", ...; for the colour, every
             object in the other colours) showing the prompted object / colour
  kept → erased  share of those samples that show the erased concept instead
  recovered  (--recover, lp rows) share of the erased prompts' samples that show the concept again with the
             erasure's key attached (Recover Erased Concept's model), per seed
  held-out score  the trainer's own concept score at the end, per seed (Train Concept Erasure's score_every: the
             Concept Erasure Report's 'toward ESD target' on held-out x_t; 0 = unchanged, 1 = ESD's target)
  rate used  the learning rate each seed's run ended with (min_score_rise doubles it while the score barely moves)
  ceiling    how much 'erased' this world can show for the row's erasure (mean over seeds): an erasure turns the
             concept into something else (a square into rings and crosses), and the original model's own samples
             of those replacements are read as the concept now and then (on demo a cross prompt gives a square
             ~3% of the time). ceiling = 1 - sum over replacements r of share(r) x P(original's samples for r are
             read as the concept), with share(r) from the erased prompts' samples and P measured once per world on
             the other prompts with --floor-samples per prompt. A row at its ceiling erases all the world resolves.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_host as host  # noqa: E402

# an object, a colour, an object at 32x32; heldout's is measured only when named (--worlds heldout): kept out of tuning
WORLD_CONCEPTS = {"demo": "square", "deep": "red", "large": "cross", "heldout": "diamond"}
SAMPLES = 16
FLOOR_SAMPLES = 48  # per prompt, for the original model's confusion (the ceiling); 16 gives +-2 points on one object


def concept_sets(concept: str, vocabulary=None) -> dict:
    """The concept's prompt sets in the world's words (`vocabulary`: World.vocabulary; default the demo world's)."""
    from comfyui_concept_erasure.demo_world.vocabulary import DEFAULT

    from erasure_quality import prompt_sets

    v = vocabulary or DEFAULT
    if concept in v.colours:
        return {"erased": [(f"a {concept} {o}", concept, o) for o in v.objects], "synonyms": [],
                "kept": [(f"a {c} {o}", c, o) for c in v.colours if c != concept for o in v.objects]}
    return prompt_sets([concept], v)


def rates(r: dict) -> dict:
    """The row's figures (0..1): erased and synonyms are 1 - the share showing the concept."""
    def hidden(name):
        shown = r[name]["as_erased"]
        return None if shown is None else 1 - shown

    return {"erased": hidden("erased"), "synonyms": hidden("synonyms"), "kept_obj": r["kept"]["object"],
            "kept_col": r["kept"]["colour"], "kept_as_erased": r["kept"]["as_erased"], "drawn": r["erased"]["drawn"],
            "kept_per_object": r["kept"]["per_object"], "kept_drawn": r["kept"]["drawn"]}


def confusion(world, sets, samples: int, colour) -> dict:
    """The original model, on the prompts of everything but the concept: per prompted object (or colour), the share
    of its samples read as the concept."""
    from erasure_quality import measure

    concept = set() if colour else {obj for _, _, obj in sets["erased"]}
    kept = measure(world, world.model, {"kept": sets["kept"]}, samples, with_scores=False, erased_colour=colour,
                   erased_objects=concept)["kept"]
    return kept["as_erased_by_key"]


def ceiling(drawn: dict, concept: str, confused: dict):
    """The share of the erased prompts' samples that would not read as the concept if every replacement were drawn
    as the original model draws it for its own prompt (see the module's docstring)."""
    others = {k: n for k, n in drawn.items() if k != concept}
    total = sum(others.values())
    if not confused or not total:
        return None
    return 1 - sum(n * confused.get(k, 0.0) for k, n in others.items()) / total


def cell(values) -> str:
    from erasure_quality import pct

    return " / ".join(pct(v) for v in values)


def mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def final_scores(seeds) -> str:
    """The trainer's held-out concept score at its last measurement, per seed (the report's 'toward' figure),
    with the iteration where a run stopped early at stop_at_score."""
    def one(s):
        stopped = s.get("stopped") or {}
        early = f" @{stopped['iteration']}" if stopped.get("reason", "iterations") != "iterations" else ""
        return f"{s['scores'][-1][1]:.2f}{early}"

    return " / ".join(one(s) for s in seeds if s.get("scores")) or "–"


def rates_used(seeds) -> str:
    """The learning rate each seed's run ended with (min_score_rise raises it from learning_rate)."""
    return " / ".join(f"{s['learning_rate_used']:.1e}" for s in seeds if s.get("learning_rate_used")) or "–"


def worst(row) -> tuple:
    """The row's worst case: the lowest seed's erased share, and the least-kept object over every seed, named."""
    from erasure_quality import pct

    seeds, names = row["seeds"], row.get("seed_names") or list(range(len(row["seeds"])))
    erased = [(s["erased"], n) for s, n in zip(seeds, names) if s.get("erased") is not None]
    low = min(erased, key=lambda pair: pair[0]) if erased else None
    objects = [(share, obj, n) for s, n in zip(seeds, names) for obj, share in (s.get("kept_per_object") or {}).items()]
    least = min(objects) if objects else None
    seed = (lambda n: "" if row["model"] == "original" else f" (seed {n})")
    return (f"{pct(low[0])}{seed(low[1])}" if low else "–",
            f"{least[1]} {pct(least[0])}{seed(least[2])}" if least else "–")


def table(rows) -> str:
    from erasure_quality import pct

    recovered = any("recovered" in s for row in rows for s in row["seeds"])
    lines = ["| world | concept | model | erased ↑ (per seed) | mean erased | mean synonyms | kept obj ↑ (per seed) | "
             "mean kept obj | least-kept object ↑ | mean kept col | kept → erased ↓ | ceiling | held-out score | "
             "rate used | train s |" + (" recovered by the key (per seed) |" if recovered else ""),
             "|" + "---|" * (15 + recovered)]
    for row in rows:
        seeds, seconds = row["seeds"], row["train_s"]
        back = [s["recovered"] for s in seeds if "recovered" in s]
        low, least = worst(row)
        lines.append(
            f"| {row['world']} | {row['concept']} | {row['model']} | {cell(s['erased'] for s in seeds)} | "
            f"**{pct(mean(s['erased'] for s in seeds))}** (lowest {low}) | {pct(mean(s['synonyms'] for s in seeds))} | "
            f"{cell(s['kept_obj'] for s in seeds)} | **{pct(mean(s['kept_obj'] for s in seeds))}** | {least} | "
            f"{pct(mean(s['kept_col'] for s in seeds))} | {pct(mean(s['kept_as_erased'] for s in seeds))} | "
            f"{pct(mean(s.get('ceiling') for s in seeds))} | "
            f"{final_scores(seeds)} | {rates_used(seeds)} | "
            f"{'–' if seconds is None else f'{seconds:.0f}'} |"
            + ((f" {cell(back)} |" if back else " – |") if recovered else ""))
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worlds", default=",".join(w for w in WORLD_CONCEPTS if w != "heldout"))
    parser.add_argument("--methods", default="lp,esd_x")
    parser.add_argument("--seeds", default="0,1,2", help="training seeds (the node's seed input)")
    parser.add_argument("--samples", type=int, default=SAMPLES, help="samples per prompt")
    parser.add_argument("--iterations", type=int, help="override the node's default")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="node inputs for every run")
    parser.add_argument("--concept", help="erase this object or colour on every world instead of its own")
    parser.add_argument("--preserve", default="",
                        help="objects whose prompts ('a circle', ...) are every run's preserve set")
    parser.add_argument("--recover", action="store_true",
                        help="lp rows: also sample the erased prompts with the key attached (Recover Erased Concept)")
    parser.add_argument("--strengths", default="1",
                        help="Apply Concept Erasure strengths to measure each trained erasure at (1 = as trained)")
    parser.add_argument("--no-original", action="store_true")
    parser.add_argument("--floor-samples", type=int, default=FLOOR_SAMPLES,
                        help="samples per prompt for the original's confusion (the ceiling column); 0 = no ceiling")
    parser.add_argument("--json", type=Path, help="also write the measurements here (with the kept share per object "
                        "and what the kept prompts drew)")
    parser.add_argument("--threads", type=int, default=host.threads_from_env())
    parser.add_argument("--recipe", choices=("defaults", "world"), default="defaults",
                        help="defaults: the node's; world: erasure_quality.py's WORLD_SETTINGS (lr 3e-4, alpha rank)")
    opts = parser.parse_args(argv)
    host.setup(opts.threads)
    import torch

    from comfyui_concept_erasure.demo_world.world import load_world
    from comfyui_concept_erasure.erasure import apply_erasure

    from erasure_quality import WORLD_SETTINGS, measure, parse_overrides, recover, train

    recipe = WORLD_SETTINGS if opts.recipe == "world" else {}
    common = parse_overrides(opts.set)
    if opts.iterations:
        common["iterations"] = opts.iterations
    seeds = [int(s) for s in opts.seeds.split(",") if s]
    preserve = tuple(o for o in opts.preserve.split(",") if o)
    strengths = [float(v) for v in opts.strengths.split(",") if v]
    started, rows, confusions = time.time(), [], {}

    def add(row):
        rows.append(row)
        print(table([row]).splitlines()[-1], flush=True)
        if opts.json:
            opts.json.write_text(json.dumps({"samples": opts.samples, "common": common, "confusion": confusions,
                                             "rows": rows}, indent=1, default=str))

    for name in [w for w in opts.worlds.split(",") if w]:
        world = load_world(host.world_file(name))
        concept = opts.concept or WORLD_CONCEPTS[name]
        sets = concept_sets(concept, world.vocabulary)
        colour = concept if concept in world.vocabulary.colours else None
        print(f"world {name} ({world.spec.notes}): {world.metadata.get('command', '?')}; concept {concept!r}; "
              f"node inputs: defaults and {dict(recipe, resolution=world.resolution, **common)}; "
              f"torch threads {torch.get_num_threads()}", flush=True)
        confused = confusions[name] = confusion(world, sets, opts.floor_samples, colour) if opts.floor_samples else {}
        if confused:
            print(f"original, share read as {concept!r}: " + ", ".join(f"{k} {v:.3f}" for k, v in confused.items()),
                  flush=True)
        if not opts.no_original:
            r = rates(measure(world, world.model, sets, opts.samples, with_scores=False, erased_colour=colour))
            add({"world": name, "concept": concept, "model": "original", "seeds": [r], "train_s": None})
        for method in [m for m in opts.methods.split(",") if m]:
            per_seed, seconds = {st: [] for st in strengths}, []
            for seed in seeds:
                trained, erasure, took, used = train(world, dict(common, method=method, seed=seed), [concept],
                                                     preserve=preserve, recipe=recipe)
                for strength in strengths:
                    model = trained if strength == 1 else apply_erasure(world.model, erasure, strength)
                    r = rates(measure(world, model, sets, opts.samples, with_scores=False, erased_colour=colour))
                    r["ceiling"] = ceiling(r["drawn"], concept, confused)
                    r["scores"] = erasure.settings.get("concept_scores", [])
                    r["stopped"] = erasure.settings.get("stopped")
                    r["learning_rate_used"] = erasure.settings.get("learning_rate_used")
                    r["retain_set"] = erasure.settings.get("retain_set")
                    r["preserve_raises"] = erasure.settings.get("preserve_raises")
                    r["preserve_moved"] = erasure.settings.get("preserve_moved")
                    if opts.recover and erasure.has_prompt and not erasure.prompt_at_inference:
                        back = measure(world, recover(world, erasure, strength), {"erased": sets["erased"]},
                                       opts.samples, with_scores=False, erased_colour=colour)["erased"]
                        r["recovered"] = back["as_erased"]
                    per_seed[strength].append(r)
                    del model
                seconds.append(took)
                del trained
            label = f"{method}, preserve {{{', '.join(preserve)}}}" if preserve else method
            for strength in strengths:
                add({"world": name, "concept": concept, "seeds": per_seed[strength], "seed_names": seeds,
                     "model": label if strength == 1 else f"{label}, strength {strength:g}",
                     "train_s": sum(seconds) / len(seconds), "settings": used, "strength": strength})
    print()
    print(table(rows))
    print(f"\n{len(rows)} rows, seeds {seeds}, {opts.samples} samples per prompt, "
          f"{(time.time() - started) / 60:.1f} min in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
