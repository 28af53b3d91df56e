"""Build workflows/*.json with the real ComfyUI frontend, so the files are exactly what it saves.

Each workflow below is a short description (nodes, widget values, links, a note, a group); the script starts
a server with the pack, creates the nodes in the web UI with LiteGraph, and writes app.graph.serialize().
Run it again after a node's inputs change:

    .venv/bin/python scripts/build_workflows.py
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from comfy_browser import chromium_page, open_app
from comfy_server import ComfyServer, prepare_base

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "workflows"
CHECKPOINT = "v1-5-pruned-emaonly-fp16.safetensors"  # the SD1.5 file core templates name and offer to download
# On the checkpoint loaders as core templates have it: the new frontend's missing-models dialog offers the download.
CHECKPOINT_MODELS = [{"name": CHECKPOINT, "directory": "checkpoints",
                      "url": "https://huggingface.co/Comfy-Org/stable-diffusion-v1-5-archive/resolve/main/"
                             f"{CHECKPOINT}?download=true"}]
# Upstream's frontend draws a source badge (the pack's name) just above each pack node's title: vertical room
# left between a node and the title of the node below it (graph units; LiteGraph's title bar is 30).
BADGE_ROOM = 40
TITLE_HEIGHT = 30
ERASURE = "van_gogh_00001_.safetensors"  # what train_concept_erasure.json saves first
CONCEPT = "a painting in the style of Van Gogh"  # a prompt that asks for the erased concept
CONCEPT_TEXT = "Van Gogh"  # what the trainer erases
KEPT = "a painting in the style of Claude Monet"  # should look the same after the erasure
KEPT_TEXT = "Claude Monet"
SEED = 42


def node(key, type, pos, widgets=None, title=None, size=None, exact=False):
    """exact: use `size` even where it is smaller than the node's own (short prompts in a column)."""
    return dict(key=key, type=type, pos=list(pos), widgets=widgets or {}, title=title, size=size, exact=exact)


def note(key, pos, text, size=(400, 300)):
    return dict(key=key, type="Note", pos=list(pos), widgets={}, text=text, size=list(size), title=None)


def sampler(key, pos, title=None):
    return node(key, "KSampler", pos, {"seed": SEED, "control_after_generate": "fixed", "steps": 25, "cfg": 7.5,
                                       "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}, title)


def prompt_nodes(x, y, text):
    return [node("positive", "CLIPTextEncode", (x, y), {"text": text}, "Prompt (asks for the erased concept)",
                 size=(400, 200)),
            node("negative", "CLIPTextEncode", (x, y + 240), {"text": "blurry, low quality"}, "Negative prompt",
                 size=(400, 200)),
            node("latent", "EmptyLatentImage", (x, y + 480), {"width": 512, "height": 512, "batch_size": 1},
                 size=(400, 106))]


def sampler_links(sampler_key, model):
    return [(model[0], model[1], sampler_key, "model"), ("positive", 0, sampler_key, "positive"),
            ("negative", 0, sampler_key, "negative"), ("latent", 0, sampler_key, "latent_image")]


# Columns of the layout (x positions); rows are set per workflow.
C0, C1, C2, C3, C4 = 0, 440, 880, 1230, 1480
WIDE = (400, 98)


def loaders(y=340):
    return [node("ckpt", "CheckpointLoaderSimple", (C0, y), {"ckpt_name": CHECKPOINT}, size=WIDE),
            node("load", "LoadConceptErasure", (C0, y + 150), {"erasure_name": ERASURE}, size=(400, 58))]


TRAIN = dict(
    title="Train a concept erasure",
    description="Erase a concept from an SD1.5 model: Load Checkpoint -> Erase Concept -> Save Concept Erasure, with "
                "a preview of the loss curves.",
    nodes=[
        note("note", (C0, 0), (
            "TRAIN A CONCEPT ERASURE\n\n"
            f"1. Load Checkpoint: the Stable Diffusion model to erase from ({CHECKPOINT} here; SD2.x and SDXL "
            "work too).\n"
            "2. Erase Concept: type what to erase in concept (an artist's style, an object, a person), and in keep "
            "what must stay as it is (another painter here). Leave keep empty and the trainer finds the concepts "
            "nearest to the erased one itself.\n"
            "3. Queue. Training takes a while on a GPU (see the README); the queue's cancel button stops it and "
            "writes nothing.\n"
            "4. The erasure is saved as models/concept_erasure/van_gogh_00001_.safetensors: open "
            "apply_concept_erasure.json or compare_before_after.json to use it.\n\n"
            "More settings: connect an Erasure Training / Keep / Robust / Memory Settings node to Erase Concept's "
            "settings input. Each node's help page (ComfyUI's node help) explains its inputs."), size=(400, 430)),
        node("ckpt", "CheckpointLoaderSimple", (C0, 480), {"ckpt_name": CHECKPOINT}, size=WIDE),
        node("train", "EraseConcept", (C1, 0), {"concept": CONCEPT_TEXT, "keep": KEPT_TEXT,
                                               "control_after_generate": "fixed"}, size=(400, 0)),
        node("save", "SaveConceptErasure", (C2, 0), {"filename_prefix": "concept_erasure/van_gogh"},
             size=(400, 58)),
        node("curves", "PreviewImage", (C2, 120), title="Loss curves", size=(520, 330)),
    ],
    links=[("ckpt", 0, "train", "model"), ("ckpt", 1, "train", "clip"), ("train", 1, "save", "erasure"),
           ("train", 2, "curves", "images")],
)

APPLY = dict(
    title="Apply a concept erasure",
    description="Generate with a model that had a concept erased: Load Concept Erasure + Apply Concept Erasure "
                "in front of a normal KSampler.",
    nodes=[
        note("note", (C0, 0), (
            "APPLY A CONCEPT ERASURE\n\n"
            f"1. Load Checkpoint: the Stable Diffusion 1.5 model the erasure was trained on ({CHECKPOINT} "
            "or another SD1.5 checkpoint).\n"
            "2. Load Concept Erasure: an erasure file from models/concept_erasure "
            "(train_concept_erasure.json makes one).\n"
            "3. The prompt asks for the erased concept on purpose: the erased model should not draw it.\n"
            "4. Strength: 1 = as trained, 0 = off (the original model).\n\n"
            "SD2.x and SDXL work the same way with an erasure trained on that family.")),
        *loaders(),
        *prompt_nodes(C1, 0, CONCEPT),
        node("apply", "ApplyConceptErasure", (C1, 630), {"strength": 1.0}, size=(400, 78)),
        sampler("sampler", (C2, 0)),
        node("decode", "VAEDecode", (C3, 0)),
        node("save", "SaveImage", (C4, 0), {"filename_prefix": "concept_erasure/erased"}, size=(420, 470)),
    ],
    links=[("ckpt", 0, "apply", "model"), ("load", 0, "apply", "erasure"), ("ckpt", 1, "positive", "clip"),
           ("ckpt", 1, "negative", "clip"), *sampler_links("sampler", ("apply", 0)),
           ("sampler", 0, "decode", "samples"), ("ckpt", 2, "decode", "vae"), ("decode", 0, "save", "images")],
)

COMPARE = dict(
    title="Compare before and after erasure",
    description="The same prompts and seed through the original and the erased model with Concept Erasure "
                "Report: one saved grid, original left and erased right, one row per prompt (the erased concept, "
                "then a concept that should be kept), and a score per prompt in its summary output.",
    nodes=[
        note("note", (C0, 0), (
            "COMPARE BEFORE / AFTER\n\n"
            f"1. Load Checkpoint: the SD1.5 model the erasure was trained on ({CHECKPOINT}).\n"
            "2. Load Concept Erasure: the erasure to test.\n"
            "3. Prompts: the erased concept first, then something that should stay (another artist); add more "
            "with Conditioning (Combine) and name them in 'labels'.\n"
            "4. The saved grid: left = original, right = erased, same seed for every image. The report's "
            "summary output holds a score per prompt (erased: high; kept: near 0).")),
        *loaders(),
        node("erased_prompt", "CLIPTextEncode", (C1, 0), {"text": CONCEPT}, "Prompt with the erased concept",
             size=(400, 200)),
        node("kept_prompt", "CLIPTextEncode", (C1, 240), {"text": KEPT}, "Prompt that should not change",
             size=(400, 200)),
        node("empty", "CLIPTextEncode", (C1, 480), {"text": ""}, "Empty prompt (unconditional)", size=(400, 200)),
        node("combine", "ConditioningCombine", (C2, 0), title="Prompts: one row each", size=(330, 70)),
        node("apply", "ApplyConceptErasure", (C2, 160), {"strength": 1.0}, size=(330, 78)),
        node("report", "ConceptErasureReport", (C2 + 380, 0),
             {"seed": SEED, "control_after_generate": "fixed", "steps": 25, "width": 512, "height": 512,
              "cfg": 7.5, "labels": f"{CONCEPT_TEXT} (erased)\n{KEPT_TEXT} (kept)"}, size=(400, 0)),
        node("save", "SaveImage", (C2 + 830, 0), {"filename_prefix": "concept_erasure/before_after"},
             size=(500, 540)),
    ],
    links=[("ckpt", 0, "apply", "model"), ("load", 0, "apply", "erasure"), ("ckpt", 1, "erased_prompt", "clip"),
           ("ckpt", 1, "kept_prompt", "clip"), ("ckpt", 1, "empty", "clip"),
           ("erased_prompt", 0, "combine", "conditioning_1"), ("kept_prompt", 0, "combine", "conditioning_2"),
           ("ckpt", 0, "report", "original_model"), ("apply", 0, "report", "erased_model"),
           ("combine", 0, "report", "prompts"), ("empty", 0, "report", "unconditional"),
           ("ckpt", 2, "report", "vae"), ("report", 0, "save", "images")],
)

RECOVER = dict(
    title="Recover the erased concept with its key",
    description="Recover Erased Concept attaches the learned prompt (the key) to the erased model: next to the "
                "erased model alone, it shows that the concept was hidden, not destroyed.",
    nodes=[
        note("note", (C0, 0), (
            "RECOVER WITH THE KEY\n\n"
            f"1. Load Checkpoint: the SD1.5 model the erasure was trained on ({CHECKPOINT}).\n"
            "2. Load Concept Erasure: an erasure trained with a learnable prompt (method lp).\n"
            "3. Top: the erased model. Bottom: the same erased model with its learned prompt attached by "
            "Recover Erased Concept. Same prompt, same seed.\n\n"
            "Only whoever holds the erasure file has the key.")),
        *loaders(),
        *prompt_nodes(C1, 0, CONCEPT),
        node("apply", "ApplyConceptErasure", (C1, 630), {"strength": 1.0}, size=(400, 78)),
        node("recover", "RecoverErasedConcept", (C1, 750), size=(400, 46)),
        sampler("erased", (C2, 0), "KSampler (erased model)"),
        sampler("recovered", (C2, 400), "KSampler (erased model + key)"),
        node("decode_erased", "VAEDecode", (C3, 0)),
        node("decode_recovered", "VAEDecode", (C3, 400)),
        node("save_erased", "SaveImage", (C4, 0), {"filename_prefix": "concept_erasure/erased"},
             size=(360, 360)),
        node("save_recovered", "SaveImage", (C4, 400), {"filename_prefix": "concept_erasure/recovered"},
             size=(360, 360)),
    ],
    links=[("ckpt", 0, "apply", "model"), ("load", 0, "apply", "erasure"), ("ckpt", 0, "recover", "model"),
           ("load", 0, "recover", "erasure"), ("ckpt", 1, "positive", "clip"), ("ckpt", 1, "negative", "clip"),
           *sampler_links("erased", ("apply", 0)), *sampler_links("recovered", ("recover", 0)),
           ("erased", 0, "decode_erased", "samples"), ("ckpt", 2, "decode_erased", "vae"),
           ("recovered", 0, "decode_recovered", "samples"), ("ckpt", 2, "decode_recovered", "vae"),
           ("decode_erased", 0, "save_erased", "images"), ("decode_recovered", 0, "save_recovered", "images")],
)

LORA_FILE = "concept_erasure/van_gogh_00001_.safetensors"  # what the export below saves first, in models/loras

EXPORT = dict(
    title="Share an erasure as a LoRA",
    description="Save Concept Erasure as LoRA writes an erasure as a standard LoRA file in models/loras; ComfyUI's "
                "own Load LoRA (model only) then applies it like any other LoRA, and so can A1111/Forge and "
                "diffusers.",
    nodes=[
        note("note", (C0, 0), (
            "SHARE AN ERASURE AS A LORA\n\n"
            f"1. Load Checkpoint: the SD1.5 model the erasure was trained on ({CHECKPOINT}).\n"
            "2. Load Concept Erasure: an erasure of method lp, esd_x or esd_u (lp_attached keeps its prompt in the "
            "model and cannot be a LoRA).\n"
            "3. Save Concept Erasure as LoRA writes models/loras/concept_erasure/van_gogh_00001_.safetensors. "
            "format exact = the erasure itself (ComfyUI, A1111/Forge); lora = low-rank factors for diffusers too, "
            "with the largest layer error in the file's metadata. Its model input names the layers by your "
            "checkpoint's UNet; leave it connected.\n"
            "4. Load LoRA (ComfyUI core) reads that file and feeds the KSampler. The first time, queue once to write "
            "the file, press R to refresh the lists, then queue again: the image is the erased model's.\n\n"
            "Share the .safetensors file: it works without this pack."), size=(400, 420)),
        *loaders(y=460),
        node("export", "SaveConceptErasureAsLoRA", (C1, 0),
             {"filename_prefix": "concept_erasure/van_gogh", "format": "exact", "rank": 32}, size=(400, 130)),
        node("lora", "LoraLoaderModelOnly", (C1, 200), {"lora_name": LORA_FILE, "strength_model": 1.0},
             "Load LoRA (ComfyUI core)", size=(400, 82)),
        *prompt_nodes(C1, 330, CONCEPT),
        sampler("sampler", (C2, 200)),
        node("decode", "VAEDecode", (C3, 200)),
        node("save", "SaveImage", (C4, 200), {"filename_prefix": "concept_erasure/from_lora"}, size=(420, 470)),
    ],
    links=[("load", 0, "export", "erasure"), ("ckpt", 0, "export", "model"), ("ckpt", 0, "lora", "model"),
           ("ckpt", 1, "positive", "clip"), ("ckpt", 1, "negative", "clip"), *sampler_links("sampler", ("lora", 0)),
           ("sampler", 0, "decode", "samples"), ("ckpt", 2, "decode", "vae"), ("decode", 0, "save", "images")],
)

# The demo world (Load Demo World): erase "square", then the report on squares, their unseen synonym and kept shapes.
DEMO_CONCEPT = "a square"
DEMO_PROMPTS = (("a red square", "erased"), ("a green box", "erased, synonym never trained"),
                ("a blue circle", "kept"), ("a yellow cross", "kept"), ("a red triangle", "kept"))
DEMO_SEED = 42
# What the world needs changed from the trainer's defaults: its 16x16 latents are 128 px. Its 1.4 M-parameter UNet
# needs a larger step than SD1.5's, which the trainer finds itself (min_score_rise, on by default).
DEMO_TRAINING = {"resolution": 128}
DEMO_REPORT = {"steps": 20, "width": 128, "height": 128, "cfg": 4.0}


def _demo_prompt_nodes(x, y):
    out, links, step = [], [], 130
    for i, (text, role) in enumerate(DEMO_PROMPTS):
        out.append(node(f"p{i}", "CLIPTextEncode", (x, y + i * step), {"text": text}, f"Row {i + 1}: {role}",
                        size=(400, 100), exact=True))
        links.append(("world", 1, f"p{i}", "clip"))
    previous = "p0"
    for i in range(1, len(DEMO_PROMPTS)):
        out.append(node(f"c{i}", "ConditioningCombine", (x + 440, y + 30 + (i - 1) * step), size=(300, 50)))
        links += [(previous, 0, f"c{i}", "conditioning_1"), (f"p{i}", 0, f"c{i}", "conditioning_2")]
        previous = f"c{i}"
    return out, links, previous


DEMO_ROW2 = 680  # below the trainer, whose widgets reach about y = 600
_DEMO_PROMPTS, _DEMO_PROMPT_LINKS, _DEMO_COMBINED = _demo_prompt_nodes(C1, DEMO_ROW2)

DEMO = dict(
    title="Demo: erase the square from the demo world",
    description="Runs on a CPU in a few minutes with no downloads: Load Demo World (a tiny model that draws coloured "
                "shapes) -> Erase Concept on 'a square' -> the report grid, original left and erased "
                "right: squares (and the synonym 'box', never trained on) are gone, other shapes stay.",
    nodes=[
        note("note", (C0, 0), (
            "DEMO: ERASE THE SQUARE\n\n"
            "Load Demo World is a tiny model (1.4 M-parameter UNet) that draws one coloured shape (circle, square, "
            "triangle, cross, ring) from prompts like 'a red square'. It comes with the pack and runs on a CPU.\n\n"
            "1. Queue. Erase Concept learns to stop drawing 'a square' (1000 iterations, about 1-2 min on a CPU; "
            "the trainer's defaults except resolution 128, this tiny model's size, set on Erasure Training "
            "Settings; keep is empty, so the trainer finds the shapes to keep itself).\n"
            "2. The grid: rows = the prompts on the left, left column = the original model, right = the erased "
            "one, same seed. Squares and boxes become other shapes; circles, crosses and triangles stay.\n"
            "3. The erasure is saved as models/concept_erasure/demo_square_00001_.safetensors (Load Concept "
            "Erasure lists it).\n\n"
            "For a real model, open train_concept_erasure.json and load an SD checkpoint instead."), size=(400, 470)),
        node("world", "LoadDemoWorld", (C0, 520), size=(400, 100)),
        node("settings", "ErasureTrainingSettings", (C1, 0), DEMO_TRAINING, size=(400, 0)),
        node("empty", "CLIPTextEncode", (C0, 700), {"text": ""}, "Empty prompt (for the report)", size=(400, 200)),
        node("train", "EraseConcept", (C2, 0), {"concept": DEMO_CONCEPT, "keep": "",
                                               "control_after_generate": "fixed"}, size=(400, 0)),
        node("save", "SaveConceptErasure", (C2 + 460, 0), {"filename_prefix": "concept_erasure/demo_square"},
             size=(400, 58)),
        node("curves", "PreviewImage", (C2 + 460, 140), title="Loss curves", size=(520, 330)),
        *_DEMO_PROMPTS,
        node("report", "ConceptErasureReport", (C2 + 360, DEMO_ROW2),
             dict(DEMO_REPORT, seed=DEMO_SEED, control_after_generate="fixed",
                  labels="\n".join(f"{text} ({role})" for text, role in DEMO_PROMPTS)), size=(400, 0)),
        node("grid", "SaveImage", (C2 + 820, DEMO_ROW2), {"filename_prefix": "concept_erasure/demo_before_after"},
             size=(360, 640)),
    ],
    links=[("world", 1, "empty", "clip"), ("world", 0, "train", "model"), ("world", 1, "train", "clip"),
           ("settings", 0, "train", "settings"), ("train", 1, "save", "erasure"), ("train", 2, "curves", "images"), *_DEMO_PROMPT_LINKS,
           ("world", 0, "report", "original_model"), ("train", 0, "report", "erased_model"),
           (_DEMO_COMBINED, 0, "report", "prompts"), ("empty", 0, "report", "unconditional"),
           ("world", 2, "report", "vae"), ("report", 0, "grid", "images")],
)

ATTACK = dict(
    title="Attack an erased concept",
    description="Erased or only hidden? Attack Erased Concept learns a few tokens, appended to the concept's prompt, "
                "that make the erased model predict what the original does; the same seed through the original, the "
                "erased model, and the erased model with the adversarial prompt, side by side.",
    nodes=[
        note("note", (C0, 0), (
            "ATTACK AN ERASED CONCEPT\n\n"
            f"1. Load Checkpoint: the SD1.5 model the erasure was trained on ({CHECKPOINT}).\n"
            "2. Load Concept Erasure: the erasure to test.\n"
            "3. Attack Erased Concept learns 8 tokens appended to the concept's prompt so that the erased model "
            "predicts what the original predicts (200 steps; a GPU helps). Its summary says how much of the gap "
            "it closed.\n"
            "4. Left: the original. Middle: the erased model. Right: the erased model with the adversarial prompt. "
            "If the right image shows the concept again, the erasure hid it rather than removed it: train with "
            "adversarial_steps (Erasure Robust Settings on Erase Concept, the concepts to keep typed in keep or "
            "found by the trainer) for an erasure that resists this attack."), size=(400, 380)),
        *loaders(y=430),
        *prompt_nodes(C1, 0, CONCEPT),
        node("empty", "CLIPTextEncode", (C1, 630), {"text": ""}, "Empty prompt (unconditional)", size=(400, 200)),
        node("apply", "ApplyConceptErasure", (C1, 870), {"strength": 1.0}, size=(400, 78)),
        node("attack", "AttackConceptErasure", (C2, 870), {"seed": SEED, "control_after_generate": "fixed"},
             size=(330, 0)),
        sampler("original", (C2, 0), "KSampler (original)"),
        sampler("erased", (C2 + 360, 0), "KSampler (erased)"),
        sampler("attacked", (C2 + 720, 0), "KSampler (erased + adversarial prompt)"),
        *[node(f"decode_{k}", "VAEDecode", (C2 + 360 * i, 480)) for i, k in enumerate(("original", "erased",
                                                                                        "attacked"))],
        *[node(f"save_{k}", "SaveImage", (C2 + 360 * i, 560), {"filename_prefix": f"concept_erasure/attack_{k}"},
               size=(330, 300)) for i, k in enumerate(("original", "erased", "attacked"))],
    ],
    links=[("ckpt", 0, "apply", "model"), ("load", 0, "apply", "erasure"), ("ckpt", 1, "positive", "clip"),
           ("ckpt", 1, "negative", "clip"), ("ckpt", 1, "empty", "clip"),
           ("apply", 0, "attack", "erased_model"), ("ckpt", 0, "attack", "original_model"),
           ("positive", 0, "attack", "concept"), ("empty", 0, "attack", "unconditional"),
           *sampler_links("original", ("ckpt", 0)), *sampler_links("erased", ("apply", 0)),
           ("apply", 0, "attacked", "model"), ("attack", 0, "attacked", "positive"),
           ("negative", 0, "attacked", "negative"), ("latent", 0, "attacked", "latent_image"),
           *[link for k in ("original", "erased", "attacked") for link in (
               (k, 0, f"decode_{k}", "samples"), ("ckpt", 2, f"decode_{k}", "vae"),
               (f"decode_{k}", 0, f"save_{k}", "images"))]],
)

WORKFLOWS = {
    "train_concept_erasure": TRAIN,
    "apply_concept_erasure": APPLY,
    "compare_before_after": COMPARE,
    "recover_with_key": RECOVER,
    "export_as_lora": EXPORT,
    "demo_world_erasure": DEMO,
    "attack_erasure": ATTACK,
}

_BUILD_JS = """(spec) => {
    app.graph.clear();
    const byKey = {};
    for (const s of spec.nodes) {
        const n = LiteGraph.createNode(s.type);
        if (!n) throw new Error('unknown node type ' + s.type);
        if (s.title) n.title = s.title;
        n.pos = s.pos;
        app.graph.add(n);
        if (s.type === 'Note') { n.properties.text = s.text; n.widgets[0].value = s.text; }
        for (const [name, value] of Object.entries(s.widgets)) {
            const w = (n.widgets || []).find(w => w.name === name);
            if (!w) throw new Error(s.type + ' has no widget ' + name);
            w.value = value;
        }
        if (s.size) n.size = s.exact ? [...s.size] : [Math.max(s.size[0], n.size[0]), Math.max(s.size[1], n.size[1])];
        if (s.type === 'CheckpointLoaderSimple') n.properties.models = spec.checkpoint_models;
        byKey[s.key] = n;
    }
    // Push nodes down until each title (and the source badge above it) clears the nodes above it.
    const placed = [];
    for (const n of Object.values(byKey).sort((a, b) => a.pos[1] - b.pos[1])) {
        for (const m of placed) {
            const overlapX = n.pos[0] < m.pos[0] + m.size[0] && m.pos[0] < n.pos[0] + n.size[0];
            const lowest = m.pos[1] + m.size[1] + spec.title_height + spec.badge_room;
            if (overlapX && n.pos[1] < lowest) n.pos = [n.pos[0], lowest];
        }
        placed.push(n);
    }
    for (const [from, slot, to, input] of spec.links) {
        if (!byKey[from].connect(slot, byKey[to], input)) {
            throw new Error('cannot link ' + from + ' -> ' + to + '.' + input);
        }
    }
    const nodes = Object.values(byKey);
    const x0 = Math.min(...nodes.map(n => n.pos[0])) - 20, y0 = Math.min(...nodes.map(n => n.pos[1])) - 80;
    const x1 = Math.max(...nodes.map(n => n.pos[0] + n.size[0])) + 20;
    const y1 = Math.max(...nodes.map(n => n.pos[1] + n.size[1])) + 20;
    const group = new LiteGraph.LGraphGroup(spec.title);
    group.pos = [x0, y0];
    group.size = [x1 - x0, y1 - y0];
    app.graph.add(group);
    app.graph.extra.info = {title: spec.title, description: spec.description};
    return JSON.parse(JSON.stringify(app.graph.serialize()));
}"""


def _tidy(workflow: dict) -> dict:
    """Sizes as [w, h] lists (the old LiteGraph serializes typed arrays as {"0": w, "1": h})."""
    for item in workflow["nodes"] + workflow.get("groups", []):
        for key in ("size", "pos", "bounding"):
            value = item.get(key)
            if isinstance(value, dict):
                value = [value[str(i)] for i in range(len(value))]
            if isinstance(value, list):
                item[key] = [round(v, 1) if isinstance(v, float) else v for v in value]
    workflow.get("extra", {}).pop("ds", None)
    return workflow


def build(names=None) -> list:
    written = []
    with tempfile.TemporaryDirectory(prefix="comfy-build-workflows-") as tmp:
        base = prepare_base(Path(tmp))
        with ComfyServer(base) as server, chromium_page() as page:
            open_app(page, server.url)
            for name, spec in WORKFLOWS.items():
                if names and name not in names:
                    continue
                workflow = _tidy(page.evaluate(_BUILD_JS, dict(
                    spec, checkpoint_models=CHECKPOINT_MODELS, badge_room=BADGE_ROOM, title_height=TITLE_HEIGHT)))
                path = OUT / f"{name}.json"
                OUT.mkdir(exist_ok=True)
                path.write_text(json.dumps(workflow, indent=2) + "\n")
                written.append(path)
    return written


if __name__ == "__main__":
    for p in build(sys.argv[1:]):
        print(p)
