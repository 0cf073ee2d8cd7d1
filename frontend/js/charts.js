// plotly charts of a feature: its activation histogram and its top output tokens. plotly.js comes from the
// installed plotly package (see backend/pages.py). Labels go through plotlyText: tokens show literally.
import { formatValue, plotlyText, tokenLabel } from "./format.js";

const FONT = { family: "system-ui, -apple-system, Segoe UI, Roboto, sans-serif", size: 11, color: "#3c4654" };
const CONFIG = { displaylogo: false, responsive: true, modeBarButtonsToRemove: ["select2d", "lasso2d", "autoScale2d"] };

function plotly() {
  if (window.Plotly) return Promise.resolve(window.Plotly);
  return new Promise((resolve) => window.addEventListener("load", () => resolve(window.Plotly), { once: true }));
}

/** Counts of non-zero activations in log-spaced bins, drawn as a filled step line on a log x axis. */
export async function histogramChart(el, histogram, { maxAct } = {}) {
  const Plotly = await plotly();
  const { edges, counts } = histogram;
  const hover = counts.map((c, i) => `[${formatValue(edges[i])}, ${formatValue(edges[i + 1])}): ${c.toLocaleString()}`);
  const trace = {
    type: "scatter", mode: "lines", x: edges, y: [...counts, counts[counts.length - 1]],
    line: { shape: "hv", color: "#e0701a", width: 1.5 }, fill: "tozeroy", fillcolor: "rgba(234,110,20,0.25)",
    text: [...hover, hover[hover.length - 1]], hovertemplate: "%{text}<extra></extra>",
  };
  const layout = {
    margin: { l: 46, r: 10, t: 8, b: 34 }, font: FONT, showlegend: false,
    xaxis: { type: "log", title: { text: "activation", standoff: 4 }, gridcolor: "#eef1f4", zeroline: false },
    yaxis: { title: { text: "tokens", standoff: 4 }, gridcolor: "#eef1f4", rangemode: "tozero" },
    paper_bgcolor: "rgba(0,0,0,0)", plot_bgcolor: "rgba(0,0,0,0)",
    shapes: maxAct ? [{ type: "line", x0: maxAct, x1: maxAct, yref: "paper", y0: 0, y1: 1, line: { color: "#b23a3a", width: 1, dash: "dot" } }] : [],
  };
  return Plotly.newPlot(el, [trace], layout, CONFIG);
}

/** Diverging bars: row r holds the r-th most suppressed token (left) and the r-th most promoted (right). */
export async function topTokensChart(el, positive, negative) {
  const Plotly = await plotly();
  const rows = Math.max(positive.length, negative.length);
  const bar = (items, color, side) => ({
    type: "bar", orientation: "h", name: side,
    x: items.map((t) => t.logit), y: items.map((_, i) => i),
    marker: { color }, text: items.map((t) => plotlyText(tokenLabel(t.token))),
    textposition: "outside", cliponaxis: false, textfont: { family: "ui-monospace, Menlo, Consolas, monospace", size: 11 },
    hovertemplate: `%{text}<br>logit %{x:.3f}<extra>${side}</extra>`,
  });
  const extent = Math.max(1e-6, ...positive.map((t) => Math.abs(t.logit)), ...negative.map((t) => Math.abs(t.logit)));
  const layout = {
    barmode: "overlay", bargap: 0.25, showlegend: false, font: FONT,
    margin: { l: 8, r: 8, t: 20, b: 26 }, height: Math.max(180, rows * 19 + 50),
    xaxis: { range: [-extent * 1.9, extent * 1.9], zeroline: true, zerolinecolor: "#9aa5b3", gridcolor: "#eef1f4", title: { text: "logit", standoff: 2 } },
    yaxis: { autorange: "reversed", showticklabels: false, showgrid: false, zeroline: false },
    annotations: [
      { text: "suppressed", x: 0, xref: "paper", y: 1, yref: "paper", yanchor: "bottom", showarrow: false, font: { color: "#b23a3a", size: 11 } },
      { text: "promoted", x: 1, xref: "paper", xanchor: "right", y: 1, yref: "paper", yanchor: "bottom", showarrow: false, font: { color: "#1f7a4d", size: 11 } },
    ],
    paper_bgcolor: "rgba(0,0,0,0)", plot_bgcolor: "rgba(0,0,0,0)",
  };
  return Plotly.newPlot(el, [bar(negative, "#d46a6a", "negative"), bar(positive, "#4aa37a", "positive")], layout, CONFIG);
}
