// Small pieces several pages show: a feature's name, a density bar, a stat, a probability bar.
import { h } from "./dom.js";
import { densityWidth, formatDensity, formatProb, tokenLabel } from "./format.js";

/** A feature's label, or (unlabelled) its top output tokens as chips. */
/** A person's label; else the automatic label (the tokens the feature fires on most) and a few of the output
 * tokens it promotes; else just those. */
export function featureName(summary, { maxTokens = 5 } = {}) {
  if (summary.label) return h("span", { class: "fname" }, h("span", { class: "label" }, summary.label));
  const auto = summary.auto_label
    ? h("span", { class: "auto-label", title: "automatic label: the tokens it fires on most (a label written for it replaces this)" }, summary.auto_label)
    : null;
  const tokens = (summary.top_tokens || []).slice(0, auto ? Math.min(maxTokens, 3) : maxTokens);
  if (!tokens.length && !auto) return h("span", { class: "fname faint" }, "unlabelled");
  return h("span", { class: "fname tok-preview" }, auto,
    tokens.map((t) => h("span", { class: "tok-chip", title: "an output token it promotes" }, tokenLabel(t))));
}

/** "fires most on: …" under a feature's title, when it has an automatic label. */
export function autoLabelLine(d) {
  if (!d.auto_label) return null;
  return h("div", { class: "auto-label-line muted", title: "the tokens at the strongest position of its top examples" },
    "fires most on: ", h("span", { class: "auto-label" }, d.auto_label));
}

export function levelDot(level) {
  return h("span", { class: `level-dot lv${Math.min(level, 5)}`, "aria-hidden": "true" });
}

export function densityBar(density) {
  return h("span", { class: "density", title: `density ${formatDensity(density)} of tokens` },
    h("span", { class: "density-bar" }, h("span", { style: { width: `${(densityWidth(density) * 100).toFixed(1)}%` } })),
    h("span", { class: "density-val" }, formatDensity(density)));
}

export function stat(key, value, title) {
  return h("div", { class: "stat", title }, h("span", { class: "k" }, key), h("span", { class: "v" }, value));
}

export function probBar(p, title) {
  return h("span", { class: "prob", title },
    formatProb(p),
    h("span", { class: "prob-bar" }, h("span", { style: { width: `${Math.round((p ?? 0) * 100)}%` } })));
}

export function tagList(tags) {
  if (!tags?.length) return null;
  return h("div", { class: "tags" }, tags.map((t) => h("span", { class: "tag" }, t)));
}
