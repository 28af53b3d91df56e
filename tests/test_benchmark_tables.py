"""The benchmark tables' worst-case columns: the lowest seed's erasure and the least-kept object over every seed."""
import importlib
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def benchmark_module(name):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    return importlib.import_module(name)


def test_the_worst_case_is_the_minimum_over_seeds_and_objects():
    worlds = benchmark_module("erasure_worlds")
    row = {"world": "w", "concept": "square", "model": "lp", "train_s": 1.0, "seed_names": [4, 5, 6], "seeds": [
        {"erased": 1.0, "kept_per_object": {"circle": 1.0, "ring": 0.95}},
        {"erased": 0.9, "kept_per_object": {"circle": 0.85, "ring": 1.0}},
        {"erased": 0.95, "kept_per_object": {"circle": 0.9, "ring": 0.8}}]}
    for seed in row["seeds"]:
        seed.update(synonyms=None, kept_obj=0.9, kept_col=1.0, kept_as_erased=0.0)
    assert worlds.worst(row) == ("90.0 (seed 5)", "ring 80.0 (seed 6)")
    original = {"model": "original", "seeds": [{"erased": 0.0, "kept_per_object": {"cross": 0.9, "ring": 0.95}}]}
    assert worlds.worst(original) == ("0.0", "cross 90.0")
    line = worlds.table([row]).splitlines()[-1]
    assert "(lowest 90.0 (seed 5))" in line and "| ring 80.0 (seed 6) |" in line


def test_the_quality_and_attack_tables_name_the_least_kept_object():
    quality = benchmark_module("erasure_quality")
    kept = {"object": 0.9, "colour": 1.0, "as_erased": 0.01, "per_object": {"circle": 0.7, "ring": 1.0}}
    r = {"erased": {"object": 0.0}, "synonyms": {"object": 0.0}, "kept": kept, "scores": {"erased": None,
                                                                                          "kept": None}}
    assert "| circle 70.0 |" in quality.table([("lp", r, 10.0)]).splitlines()[-1]
    attacked = dict(r, attack={"not_shown": 0.5, "loss_before": 1.0, "loss_after": 0.5}, held_out=["ring"])
    line = quality.attack_table([("robust lp", attacked, 10.0)]).splitlines()[-1]
    assert "| circle 70.0 | ring 100.0 |" in line
