// The feature page's cross-width relatives: per other level, the features this one fires together with on the
// most indexed tokens, with P(relative | this), P(this | relative), decoder cosine and co-active tokens.
import { featurePath } from "./api.js";
import { h } from "./dom.js";
import { featureId, formatInt, formatValue } from "./format.js";
import { featureName, levelDot, probBar } from "./widgets.js";

/** Cross-width relatives: the features of each other level this one co-fires with most. */
export function relativesCard(run, d) {
  if (!d.relatives.length) return null;
  const byLevel = new Map();
  for (const r of d.relatives) {
    if (!byLevel.has(r.feature.level)) byLevel.set(r.feature.level, []);
    byLevel.get(r.feature.level).push(r);
  }
  const rows = [];
  for (const [level, relatives] of byLevel) {
    rows.push(h("tr", { class: "group" }, h("th", { colspan: 6, scope: "rowgroup", class: "faint" },
      `Level ${level} · ${level < d.level ? "coarser" : "finer"}`)));
    for (const r of relatives) {
      rows.push(h("tr", { dataset: { level: r.feature.level, index: r.feature.index } },
        h("td", { class: "mono" }, levelDot(r.feature.level), " ",
          h("a", { href: featurePath(run, r.feature.level, r.feature.index) }, featureId(r.feature.level, r.feature.index))),
        h("td", { class: "name" }, featureName({ label: r.feature.label, top_tokens: [] })),
        h("td", { class: "num" }, probBar(r.p_relative_given_feature, "P(relative | this feature)")),
        h("td", { class: "num" }, probBar(r.p_feature_given_relative, "P(this feature | relative)")),
        h("td", { class: "num" }, formatValue(r.decoder_cosine)),
        h("td", { class: "num" }, formatInt(r.coactive_count))));
    }
  }
  return h("section", { class: "card", id: "relatives" },
    h("header", {}, h("h2", {}, "Cross-width relatives"), h("span", { class: "spacer" }),
      h("span", { class: "faint" }, "most co-firing features of the other levels")),
    h("table", { class: "edges" },
      h("thead", {}, h("tr", {}, h("th", {}, "Feature"), h("th", {}, ""),
        h("th", { class: "num", title: "P(relative active | this feature active)" }, "P(rel|this)"),
        h("th", { class: "num", title: "P(this feature active | relative active)" }, "P(this|rel)"),
        h("th", { class: "num", title: "cosine of the decoder directions" }, "cos"),
        h("th", { class: "num", title: "tokens where both are active" }, "co-active"))),
      h("tbody", {}, rows)));
}
