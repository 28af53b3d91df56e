// Concept Erasure Report: after a run, draw the report's summary (its scores per prompt) on the node itself, in the
// fork's 2024 UI and in upstream's frontend alike. Drawn on the canvas, not kept in a widget, so the workflow file
// and the prompt the UI sends stay the same.
import { app } from "../../scripts/app.js";

const NODE = "ConceptErasureReport";
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
  name: "concept_erasure.report_summary",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== NODE) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      this.conceptErasureSummary = (message?.text || []).join("\n");
      const widest = Math.max(...this.conceptErasureSummary.split("\n").filter(l => /\s{2}/.test(l))
        .map(l => l.length), 0);
      const width = Math.max(this.size[0], widest * CHAR + 20);
      const lines = wrap(this.conceptErasureSummary, Math.floor((width - 20) / CHAR));
      const top = this.computeSize()[1];
      this.summaryTop = top;
      this.setSize([width, Math.max(this.size[1], top + lines.length * LINE + 10)]);
      this.setDirtyCanvas(true, true);
    };
    const onDrawForeground = nodeType.prototype.onDrawForeground;
    nodeType.prototype.onDrawForeground = function (ctx) {
      onDrawForeground?.apply(this, arguments);
      if (!this.conceptErasureSummary || this.flags?.collapsed) return;
      const lines = wrap(this.conceptErasureSummary, Math.floor((this.size[0] - 20) / CHAR));
      ctx.save();
      ctx.font = `${FONT}px monospace`;
      ctx.fillStyle = "#ddd";
      ctx.textAlign = "left";
      lines.forEach((line, i) => ctx.fillText(line, 10, this.summaryTop + (i + 1) * LINE));
      ctx.restore();
    };
  },
});
