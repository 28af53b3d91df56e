"""Turn a UI-format workflow (what the ComfyUI frontend saves) into the API prompt the server runs.

Covers the subset our workflow files use, the way the frontend's app.graphToPrompt() does it: widget values
are matched to the node's widget inputs in INPUT_TYPES order (required, then optional), seed inputs carry an
extra unsaved control_after_generate value, links become [node_id, slot], frontend-only nodes (Note,
Reroute) are dropped, muted nodes are left out, a node saved before its optional widgets existed gets their
defaults. Anything else (bypassed nodes, primitives, widgets turned into inputs by forceInput) is refused rather
than guessed.
"""
from __future__ import annotations

import copy
from typing import Dict, Optional

WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN")
FRONTEND_ONLY = ("Note", "MarkdownNote")
REROUTE = "Reroute"
MUTED, BYPASSED = 2, 4


class WorkflowError(ValueError):
    """The workflow cannot be converted: a missing node type, a feature outside the subset, a bad link."""


def widget_layout(node_info: dict) -> list:
    """[(name or None, serialized)] for each widget value the frontend stores, in order."""
    inputs = dict(node_info["input"].get("required", {}))
    inputs.update(node_info["input"].get("optional", {}))
    return _layout(node_info, inputs)


def required_widgets(node_info: dict) -> int:
    """How many widget values come from required inputs: a workflow saved before optional widgets were added to a
    node stores only these (and the frontend gives the new ones their defaults)."""
    return len(_layout(node_info, dict(node_info["input"].get("required", {}))))


def widget_default(node_info: dict, name: Optional[str]):
    """The value the frontend gives a new widget: its declared default, or a choice list's first entry."""
    if name is None:
        return None  # a control value, not sent
    spec = {**node_info["input"].get("required", {}), **node_info["input"].get("optional", {})}[name]
    options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if "default" in options:
        return options["default"]
    return spec[0][0] if isinstance(spec[0], list) else None


def _layout(node_info: dict, inputs: dict) -> list:
    layout = []
    for name, spec in inputs.items():
        kind = spec[0]
        options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
        if options.get("forceInput"):
            raise WorkflowError(f"{node_info['name']}.{name}: forceInput widgets are outside this converter's subset")
        if isinstance(kind, list):
            layout.append((name, True))
            if options.get("control_after_generate"):
                layout += [(None, False), (None, False)]  # control value and its filter list
        elif kind == "INT" and (name in ("seed", "noise_seed") or options.get("control_after_generate")):
            layout += [(name, True), (None, False)]  # the seed, then control_after_generate
        elif kind in WIDGET_TYPES:
            layout.append((name, True))
    return layout


def ui_to_api(workflow: dict, object_info: Dict[str, dict], overrides: Optional[Dict[str, dict]] = None) -> dict:
    """The API prompt for a UI workflow.

    overrides: {node type or node title: {input name: value}} applied after conversion (the tests use it to
    pick the generated checkpoint and to shrink sizes); naming an input the node does not have is an error.
    """
    nodes = {node["id"]: node for node in workflow["nodes"]}
    links = {link[0]: link for link in workflow.get("links", [])}
    missing = sorted({n["type"] for n in nodes.values()
                      if n["type"] not in object_info and n["type"] not in FRONTEND_ONLY and n["type"] != REROUTE})
    if missing:
        raise WorkflowError(f"node types not found on the server: {', '.join(missing)}")

    def source(link_id):
        """(node id, slot) feeding a link, through reroutes; None when it comes from a muted node."""
        seen = set()
        while True:
            if link_id not in links:
                raise WorkflowError(f"link {link_id} is not in the workflow's links")
            _, from_id, from_slot, _, _, _ = links[link_id][:6]
            origin = nodes[from_id]
            if origin["type"] != REROUTE:
                return None if origin.get("mode", 0) == MUTED else (from_id, from_slot)
            if from_id in seen:
                raise WorkflowError(f"reroute loop at node {from_id}")
            seen.add(from_id)
            link_id = origin["inputs"][0].get("link")
            if link_id is None:
                return None

    prompt = {}
    for node_id, node in sorted(nodes.items()):
        kind = node["type"]
        if kind in FRONTEND_ONLY or kind == REROUTE or node.get("mode", 0) == MUTED:
            continue
        if node.get("mode", 0) == BYPASSED:
            raise WorkflowError(f"node {node_id} ({kind}) is bypassed; bypass is outside this converter's subset")
        info = object_info[kind]
        layout = widget_layout(info)
        values = list(node.get("widgets_values") or [])
        if required_widgets(info) <= len(values) < len(layout):  # saved before the node's optional widgets existed
            values += [widget_default(info, name) for name, _ in layout[len(values):]]
        if len(values) != len(layout):
            raise WorkflowError(f"node {node_id} ({kind}) has {len(values)} widget values; the server's "
                                f"{kind} has {len(layout)} widgets ({[n for n, _ in layout]})")
        inputs = {name: value for (name, serialized), value in zip(layout, values) if serialized}
        for slot in node.get("inputs") or []:
            if slot.get("link") is None:
                continue
            origin = source(slot["link"])
            if origin is None:
                inputs.pop(slot["name"], None)
            elif nodes[origin[0]]["type"] in FRONTEND_ONLY:
                raise WorkflowError(f"node {node_id} input {slot['name']} comes from a frontend-only node")
            else:
                inputs[slot["name"]] = [str(origin[0]), int(origin[1])]
        prompt[str(node_id)] = {"inputs": inputs, "class_type": kind}

    for changes_for, changes in (overrides or {}).items():
        targets = [(nid, entry) for nid, entry in prompt.items()
                   if entry["class_type"] == changes_for or nodes[int(nid)].get("title") == changes_for]
        if not targets:
            raise WorkflowError(f"override for {changes_for!r}: no such node type or title in the workflow")
        for nid, entry in targets:
            for name, value in changes.items():
                if name not in entry["inputs"] or isinstance(entry["inputs"][name], list):
                    raise WorkflowError(f"override {changes_for}.{name}: node {nid} has no widget input {name!r}")
                entry["inputs"][name] = copy.deepcopy(value)
    return prompt


def with_settings_node(prompt: dict, object_info: Dict[str, dict], last_node_id: int, values: dict,
                       node_type: str = "ErasureTrainingSettings", target: str = "EraseConcept") -> dict:
    """The API prompt with a `node_type` node (`values`, the rest at their defaults) connected to the `settings`
    input of each `target` that has none, numbered as the frontend numbers a node added to the graph."""
    targets = [key for key, node in prompt.items() if node["class_type"] == target and "settings" not in node["inputs"]]
    if not targets:
        return prompt
    spec = object_info[node_type]["input"]["required"]
    unknown = set(values) - set(spec)
    if unknown:
        raise WorkflowError(f"{node_type} has no widget {sorted(unknown)}")
    key = str(last_node_id + 1)
    inputs = {name: values.get(name, widget_default(object_info[node_type], name)) for name in spec}
    prompt = dict(prompt, **{key: {"inputs": inputs, "class_type": node_type}})
    for name in targets:
        prompt[name] = dict(prompt[name], inputs=dict(prompt[name]["inputs"], settings=[key, 0]))
    return prompt
