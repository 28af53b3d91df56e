// Concept Erasure Report and Attack Erased Concept: after a run, draw the node's summary (the report's scores per
// prompt, the attack's loss before / after) under the node, in the fork's 2024 UI and in upstream's frontend.
// Drawn on the canvas, not kept in a widget, so the workflow file and the prompt the UI sends stay the same.
import { app } from "../../scripts/app.js";

const NODES = ["ConceptErasureReport", "AttackConceptErasure"];
const FONT = 11;
const LINE = 14;
const CHAR = 0.62 * FONT; // monospace advance, close enough for wrapping

function wrap(text, columns) {
  const out = [];
  for (const line of text.split("\n")) {
    if (line.length <= columns || /\s{2}/.test(line)) { out.push(line); continue; } // table rows stay whole
    let rest = line;
    while (rest.length > columns) {
      const cut = rest.lastIndexOf(" ", columns) > 0 ? rest.lastIndexOf(" ", columns) : columns;
      out.push(rest.slice(0, cut));
      rest = rest.slice(cut).trimStart();
    }
    out.push(rest);
  }
  return out;
}

app.registerExtension({
  name: "concept_erasure.summaries",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!NODES.includes(nodeData.name)) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      this.conceptErasureSummary = (message?.text || []).join("\n");
      this.setDirtyCanvas(true, true);
    };
    // Below the node, as a caption: inside it, a multiline widget (the report's labels) would cover the text.
    const onDrawForeground = nodeType.prototype.onDrawForeground;
    nodeType.prototype.onDrawForeground = function (ctx) {
      onDrawForeground?.apply(this, arguments);
      if (!this.conceptErasureSummary || this.flags?.collapsed) return;
      const table = this.conceptErasureSummary.split("\n").filter(l => /\s{2}/.test(l));
      const width = Math.max(this.size[0], ...table.map(l => l.length * CHAR));
      const lines = wrap(this.conceptErasureSummary, Math.floor(width / CHAR));
      ctx.save();
      ctx.font = `${FONT}px monospace`;
      ctx.fillStyle = "#ddd";
      ctx.textAlign = "left";
      lines.forEach((line, i) => ctx.fillText(line, 0, this.size[1] + 6 + (i + 1) * LINE));
      ctx.restore();
    };
  },
});
