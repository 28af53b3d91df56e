"""Drive the ComfyUI web UI in headless Chromium (Debian's /usr/bin/chromium through Playwright).

Works with both UIs the tests meet: the PyPI fork's 2024 UI (floating queue menu, .comfy-modal dialogs) and the
frontend upstream ComfyUI serves (comfyui-frontend-package: Vue, PrimeVue .p-dialog dialogs, data-testid hooks).
Both keep the app API used here (window.app, LiteGraph, app.graphToPrompt, app.runningNodeId, app.progress).
Playwright's own browser download cannot run here, so the system Chromium is launched with a fresh profile
and no background network traffic.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]
VIEWPORT = {"width": 1920, "height": 1080}
MENU_WIDTH = 240  # the fork's floating queue menu sits at the right edge
NEW_UI_MARGINS = (64, 80, 0)  # the new frontend's side bar (left) and menu bars (top) lie over the canvas
# Run button and cancel controls: the new frontend's first (its #queue-button is there but hidden), then the fork's.
RUN_BUTTONS = ('[data-testid="queue-button"]', "#queue-button")
CANCEL_CURRENT = 'button[aria-label="Cancel current run"]'  # the new frontend's action bar
DIALOGS = ".comfy-modal, .p-dialog"
# Frontend 1.4x-1.5x: what the workflow lacks (missing models among it) is an error overlay with a details panel.
ERROR_OVERLAY = '[data-testid="error-overlay"]'


@contextmanager
def chromium_page(viewport=VIEWPORT):
    """A page in a fresh headless Chromium; browser and profile are removed afterwards."""
    from playwright.sync_api import sync_playwright

    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    try:
        with sync_playwright() as playwright:
            context = playwright.chromium.launch_persistent_context(
                profile, executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS, viewport=viewport)
            try:
                page = context.pages[0] if context.pages else context.new_page()
                page.errors = []
                page.on("pageerror", lambda error: page.errors.append(str(error)))
                yield page
            finally:
                context.close()
    finally:
        shutil.rmtree(profile, ignore_errors=True)


def open_app(page, url: str, wait_for_node: str = "LoadConceptErasure", timeout_ms: int = 60000) -> None:
    """Open the UI and wait until the app has registered the server's node types (ours included)."""
    page.goto(url)
    page.wait_for_function(
        "(t) => window.app && window.app.graph && window.LiteGraph && (t in LiteGraph.registered_node_types)",
        arg=wait_for_node, timeout=timeout_ms)


def new_frontend(page) -> bool:
    """True for the frontend upstream serves (comfyui-frontend-package), False for the fork's 2024 UI."""
    return page.evaluate("() => !!(window.app && window.app.extensionManager && window.app.extensionManager.command)")


def dialog_text(page):
    """Text of the dialogs the UI is showing (error, missing nodes or models), or None."""
    return page.evaluate("""(selector) => {
        const shown = [...document.querySelectorAll(selector)]
            .filter(d => getComputedStyle(d).display !== 'none' && d.getClientRects().length);
        return shown.length ? shown.map(d => d.innerText).join(' / ') : null;
    }""", DIALOGS)


def missing_models_notice(page, wait_ms: int = 5000):
    """Text where the UI names the models a loaded workflow lacks: the Missing Models dialog (frontend 1.27), or the
    error overlay's details panel (newer frontends), which this opens; None when the UI shows neither within
    wait_ms (the overlay can appear a moment after the graph on a busy machine)."""
    def overlay_shown():
        return page.locator(ERROR_OVERLAY).count() and page.locator(ERROR_OVERLAY).first.is_visible()

    for _ in range(wait_ms // 250):
        if overlay_shown() or dialog_text(page) is not None:
            break
        page.wait_for_timeout(250)
    if overlay_shown():
        page.click('[data-testid="error-overlay-see-errors"]')
        for _ in range(max(2, wait_ms // 250)):
            page.wait_for_timeout(250)
            body = page.evaluate("() => document.body.innerText")
            if "Missing Models" in body:
                break
        start = body.find("Missing Models")
        return body[start:] if start >= 0 else body
    return dialog_text(page)


def close_dialogs(page) -> None:
    """Close what dialog_text sees, as a user would (Escape, then the close buttons)."""
    for _ in range(3):
        if dialog_text(page) is None:
            return
        page.keyboard.press("Escape")
        page.wait_for_timeout(200)
        page.evaluate("""() => document.querySelectorAll(
            '.p-dialog-close-button, .p-dialog-header-close, .comfy-modal .comfy-modal-close, .comfy-modal button')
            .forEach(b => b.getClientRects().length && b.click())""")
        page.wait_for_timeout(200)
    if dialog_text(page) is not None:
        raise AssertionError(f"the UI's dialog does not close: {dialog_text(page)}")


def load_workflow(page, workflow: dict) -> list:
    """Load a UI workflow as dropping the file does; returns the node types the UI does not know."""
    return page.evaluate("""async (wf) => {
        const missing = wf.nodes.map(n => n.type).filter(t => !(t in LiteGraph.registered_node_types));
        await app.loadGraphData(wf);
        return [...new Set(missing)];
    }""", workflow)


def set_widgets(page, overrides: dict) -> None:
    """Set widget values as a user would in the graph: {node type or title: {widget name: value}}."""
    unknown = page.evaluate("""(overrides) => {
        const unknown = [];
        for (const [target, values] of Object.entries(overrides)) {
            const nodes = app.graph._nodes.filter(n => n.type === target || n.title === target);
            if (!nodes.length) unknown.push(target);
            for (const node of nodes) for (const [name, value] of Object.entries(values)) {
                const w = (node.widgets || []).find(w => w.name === name);
                if (!w) { unknown.push(target + '.' + name); continue; }
                w.value = value;
                w.callback?.(w.value, app.canvas, node);
            }
        }
        app.graph.setDirtyCanvas(true, true);
        return unknown;
    }""", overrides)
    if unknown:
        raise ValueError(f"no such node or widget in the loaded graph: {unknown}")


def add_connected_node(page, node_type: str, widgets: dict, target_type: str, target_input: str) -> int:
    """Add a node to the loaded graph as a user would (widgets set, output 0 linked to `target_input` of every node
    of `target_type`); returns the new node's id."""
    return page.evaluate("""([type, widgets, targetType, input]) => {
        const n = LiteGraph.createNode(type);
        if (!n) throw new Error('unknown node type ' + type);
        app.graph.add(n);
        for (const [name, value] of Object.entries(widgets)) {
            const w = (n.widgets || []).find(w => w.name === name);
            if (!w) throw new Error(type + ' has no widget ' + name);
            w.value = value;
        }
        const targets = app.graph._nodes.filter(t => t.type === targetType);
        if (!targets.length) throw new Error('no ' + targetType + ' in the graph');
        n.pos = [targets[0].pos[0], targets[0].pos[1] + targets[0].size[1] + 80];  // below it, clear of the rest
        for (const t of targets) if (!n.connect(0, t, input)) throw new Error('cannot link to ' + input);
        app.graph.setDirtyCanvas(true, true);
        return n.id;
    }""", [node_type, widgets, target_type, target_input])


def graph_to_prompt(page) -> dict:
    """What the frontend would send for the loaded graph (app.graphToPrompt().output)."""
    return page.evaluate("async () => JSON.parse(JSON.stringify((await app.graphToPrompt()).output))")


def _click_first_visible(page, selectors) -> None:
    for selector in selectors:
        button = page.locator(selector).first
        if button.count() and button.is_visible():
            button.click()
            return
    raise AssertionError(f"none of {selectors} is visible in the page")


def queue_from_page(page) -> None:
    """Press the UI's Run (new frontend) / Queue Prompt (fork) button."""
    _click_first_visible(page, RUN_BUTTONS)


def cancel_from_page(page) -> None:
    """Cancel the running prompt as a user would: the action bar's cancel button in the new frontend, the queue
    list's Cancel in the fork's menu."""
    if new_frontend(page):
        page.locator(CANCEL_CURRENT).first.click()
        return
    page.click("#comfy-view-queue-button")
    page.click(".comfy-list button:text-is('Cancel')")
    page.click("#comfy-view-queue-button")  # close the queue list again


def canvas_area(page) -> tuple:
    """(left, top, right) margins of the window that the UI's own panels cover over the graph canvas."""
    return NEW_UI_MARGINS if new_frontend(page) else (0, 0, MENU_WIDTH)


def fit_graph(page) -> None:
    """Zoom and pan so every node and group is visible inside canvas_area."""
    page.evaluate("""([left, top, right]) => {
        const c = app.canvas, boxes = [];
        for (const n of app.graph._nodes) boxes.push([n.pos[0], n.pos[1] - LiteGraph.NODE_TITLE_HEIGHT,
                                                   n.pos[0] + n.size[0], n.pos[1] + n.size[1]]);
        for (const g of app.graph._groups || []) {
            boxes.push([g.pos[0], g.pos[1], g.pos[0] + g.size[0], g.pos[1] + g.size[1]]);
        }
        if (!boxes.length) return;
        const x0 = Math.min(...boxes.map(b => b[0])) - 20, y0 = Math.min(...boxes.map(b => b[1])) - 20;
        const x1 = Math.max(...boxes.map(b => b[2])) + 20, y1 = Math.max(...boxes.map(b => b[3])) + 20;
        const ratio = window.devicePixelRatio || 1;
        const w = c.canvas.width / ratio - left - right, h = c.canvas.height / ratio - top;
        const scale = Math.min(w / (x1 - x0), h / (y1 - y0), 1.2);
        c.ds.scale = scale;
        c.ds.offset[0] = -x0 + (w / scale - (x1 - x0)) / 2 + left / scale;
        c.ds.offset[1] = -y0 + (h / scale - (y1 - y0)) / 2 + top / scale;
        c.setDirty(true, true);
        c.draw(true, true);
    }""", list(canvas_area(page)))


def screenshot_graph(page, path: str) -> None:
    page.mouse.move(VIEWPORT["width"] // 2, VIEWPORT["height"] - 10)  # no tooltip of the last button pressed
    fit_graph(page)
    page.wait_for_timeout(300)
    page.screenshot(path=path)
