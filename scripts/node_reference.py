"""Writes the node reference, docs/nodes.md, from the nodes' own descriptions and tooltips.

Usage: .venv/bin/python scripts/node_reference.py [--check]
It replaces what lies between the begin and end markers in docs/nodes.md; the rest of the page is left alone.
--check exits 1 when docs/nodes.md is out of date (tests/test_readme.py runs the same comparison).
"""
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "docs" / "nodes.md"
BEGIN, END = "<!-- node-reference:begin -->", "<!-- node-reference:end -->"


def load_pack():
    from comfy.cli_args import args
    args.cpu = True
    sys.path.insert(0, str(ROOT / "scripts"))
    from pack_import import import_pack

    return import_pack()


def _input_type(spec):
    kind = spec[0]
    return "choice" if isinstance(kind, (list, tuple)) else kind


def _default(options):
    if "default" not in options:
        return ""
    value = options["default"]
    return f" (default `{value!r}`)" if isinstance(value, str) else f" (default `{value}`)"


def render(pack) -> str:
    lines = []
    for node_id, cls in pack.NODE_CLASS_MAPPINGS.items():
        name = pack.NODE_DISPLAY_NAME_MAPPINGS.get(node_id, node_id)
        lines += [f"### {name} (`{node_id}`)", "", cls.DESCRIPTION, ""]
        inputs = cls.INPUT_TYPES()
        if any(inputs.get(section) for section in ("required", "optional")):
            lines += ["| input | type | what it does |", "|---|---|---|"]
        else:
            lines.append("No inputs.")
        for section in ("required", "optional"):
            for input_name, spec in inputs.get(section, {}).items():
                options = spec[1] if len(spec) > 1 else {}
                optional = " (optional)" if section == "optional" else ""
                tip = options.get("tooltip", "").replace("|", "\\|")
                lines.append(f"| `{input_name}`{optional} | {_input_type(spec)} | {tip}{_default(options)} |")
        outputs = getattr(cls, "OUTPUT_TOOLTIPS", ())
        names = getattr(cls, "RETURN_NAMES", cls.RETURN_TYPES)
        if cls.RETURN_TYPES:
            lines += ["", "| output | type | what it is |", "|---|---|---|"]
            for out_name, out_type, tip in zip(names, cls.RETURN_TYPES, outputs):
                lines.append(f"| `{out_name}` | {out_type} | {tip} |")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def updated_reference(text: str, reference: str) -> str:
    """text (docs/nodes.md) with the generated reference between its markers."""
    pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END), re.S)
    if not pattern.search(text):
        raise SystemExit(f"{REFERENCE.relative_to(ROOT)} has no {BEGIN} ... {END} section")
    return pattern.sub(lambda _: f"{BEGIN}\n{reference}{END}", text)


def main():
    text = REFERENCE.read_text()
    new = updated_reference(text, render(load_pack()))
    if "--check" in sys.argv:
        if new != text:
            print("docs/nodes.md is out of date: run .venv/bin/python scripts/node_reference.py")
            sys.exit(1)
        return
    REFERENCE.write_text(new)


if __name__ == "__main__":
    main()
