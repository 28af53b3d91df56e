"""Writes the inputs and outputs tables of each node's help page, web/docs/<NodeId>.md (the page ComfyUI's frontend
shows for the node), from the node's own tooltips. The rest of each page is written by hand.

Usage: .venv/bin/python scripts/help_pages.py [--check]
--check exits 1 when a page is missing or out of date (tests/test_node_docs.py runs the same comparison).
"""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "web" / "docs"
BEGIN, END = "<!-- inputs:begin -->", "<!-- inputs:end -->"
sys.path.insert(0, str(ROOT / "scripts"))
from node_reference import _input_type as _type, load_pack  # noqa: E402


def _default(spec):
    options = spec[1] if len(spec) > 1 else {}
    if "default" not in options or options["default"] == "":
        return ""
    return f"`{options['default']}`"


def _cell(text):
    return " ".join(str(text).split()).replace("|", "\\|")


def tables(node_class) -> str:
    """The generated block: one row per input (required first) and per output."""
    rows = ["| input | type | default | what it does |", "|---|---|---|---|"]
    spec = node_class.INPUT_TYPES()
    for group in ("required", "optional"):
        for name, item in spec.get(group, {}).items():
            tip = item[1].get("tooltip", "") if len(item) > 1 else ""
            label = f"`{name}`" + (" (optional)" if group == "optional" else "")
            rows.append(f"| {label} | {_type(item)} | {_default(item)} | {_cell(tip)} |")
    rows += ["", "| output | type | what it is |", "|---|---|---|"]
    names = getattr(node_class, "RETURN_NAMES", node_class.RETURN_TYPES)
    tips = getattr(node_class, "OUTPUT_TOOLTIPS", ("",) * len(names))
    for name, kind, tip in zip(names, node_class.RETURN_TYPES, tips):
        rows.append(f"| `{name}` | {kind} | {_cell(tip)} |")
    if not node_class.RETURN_TYPES:
        rows = rows[:-3]
    return "\n".join(rows)


def updated(text: str, block: str) -> str:
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{block}\n{END}{tail}"


def check_or_write(pack, write: bool) -> list:
    """The problems found (missing page, no markers, stale table); with write, stale tables are rewritten."""
    problems = []
    for node_id, node_class in pack.NODE_CLASS_MAPPINGS.items():
        page = DOCS / f"{node_id}.md"
        if not page.exists():
            problems.append(f"{page.relative_to(ROOT)} is missing")
            continue
        text = page.read_text(encoding="utf-8")
        if BEGIN not in text or END not in text:
            problems.append(f"{page.relative_to(ROOT)} has no {BEGIN} ... {END} block")
            continue
        new = updated(text, tables(node_class))
        if new != text:
            if write:
                page.write_text(new, encoding="utf-8")
            else:
                problems.append(f"{page.relative_to(ROOT)} is out of date")
    return problems


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    problems = check_or_write(load_pack(), write="--check" not in argv)
    for problem in problems:
        print(problem, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
