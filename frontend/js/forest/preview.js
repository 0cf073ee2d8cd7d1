// The preview pane beside the tree: the active feature's stats, links, top tokens and top activations, and the
// place where the forest's errors are shown.
import { api, ApiError, featurePath } from "../api.js";
import { debounce, h, replace } from "../dom.js";
import { featureId, formatDensity, formatInt, formatValue, tokenLabel } from "../format.js";
import { tokenStrip } from "../tokens.js";
import { autoLabelLine, featureName, levelDot, probBar, stat, tagList } from "../widgets.js";
import { RUN, TreeNode, els, state } from "./state.js";

export function showError(err) {
  const message = err instanceof ApiError && err.status === 404 ? `Run “${RUN}” not found.` : `Could not load the forest: ${err.message}`;
  replace(els.preview, h("div", { class: "error-box" }, message));
}

let previewAbort = null;

/** Preview the active row once the user stops moving (arrow keys repeat fast). */
export const schedulePreview = debounce(() => {
  const row = state.rows[state.active];
  if (row instanceof TreeNode) showPreview(row);
}, 140);

export async function showPreview(node) {
  previewAbort?.abort();
  const abort = new AbortController();
  previewAbort = abort;
  try {
    const [detail, examples] = await Promise.all([
      api.feature(RUN, node.level, node.index, abort.signal),
      api.examples(RUN, node.level, node.index, { kind: "top", limit: 4 }, abort.signal),
    ]);
    if (abort.signal.aborted) return;
    renderPreview(detail, examples.items);
  } catch (err) {
    if (err.name !== "AbortError") replace(els.preview, h("div", { class: "error-box" }, err.message));
  }
}

function renderPreview(d, examples) {
  const pos = d.top_positive.slice(0, 8);
  replace(els.preview,
    h("div", { class: "muted mono" }, levelDot(d.level), " ", featureId(d.level, d.index),
      d.parent ? h("span", { class: "faint" }, " · child of ",
        h("a", { href: featurePath(RUN, d.parent.level, d.parent.index), title: d.parent.label ?? "" },
          featureId(d.parent.level, d.parent.index))) : null),
    h("h1", { class: d.label ? "" : "unlabelled" }, d.label || "Unlabelled feature"),
    autoLabelLine(d),
    tagList(d.tags),
    h("div", { class: "stats" },
      stat("density", formatDensity(d.stats.density)),
      stat("max act", formatValue(d.stats.max_act)),
      stat("mean act", formatValue(d.stats.mean_act)),
      stat("children", formatInt(d.child_count))),
    h("div", { class: "row", style: { display: "flex", gap: "8px" } },
      h("a", { class: "btn primary", href: featurePath(RUN, d.level, d.index) }, "Open feature page")),
    hierarchyCard(d),
    h("section", { class: "card" },
      h("header", {}, h("h2", {}, "Top output tokens")),
      h("div", { class: "body" }, pos.length
        ? pos.map((t) => h("span", { class: "tok-chip", title: `logit ${formatValue(t.logit)}` }, tokenLabel(t.token)))
        : h("p", { class: "empty" }, "none recorded"))),
    h("section", { class: "card" },
      h("header", {}, h("h2", {}, "Top activations")),
      h("div", { class: "body contexts" }, examples.length
        ? examples.map((ex) => h("div", { class: "ctx" },
            h("span", { class: "ctx-val" }, formatValue(ex.max_value)),
            tokenStrip(ex.tokens, ex.values, { max: d.stats.max_act, focus: ex.max_position, window: [10, 4] })))
        : h("p", { class: "empty" }, "no examples"))));
}

/** The node's links: how it co-fires with its parent, and its strongest children. */
function hierarchyCard(d) {
  const rows = [];
  if (d.parent_edge) {
    rows.push(h("tr", {},
      h("td", {}, "parent ", h("a", { href: featurePath(RUN, d.parent.level, d.parent.index) }, featureId(d.parent.level, d.parent.index))),
      h("td", { class: "num" }, probBar(d.parent_edge.p_parent_given_child, "P(parent | this)")),
      h("td", { class: "num" }, probBar(d.parent_edge.p_child_given_parent, "P(this | parent)"))));
  }
  const children = [...d.children]
    .sort((a, b) => (b.edge?.p_child_given_parent ?? -1) - (a.edge?.p_child_given_parent ?? -1))
    .slice(0, 6);
  for (const c of children) {
    rows.push(h("tr", {},
      h("td", { class: "name" }, h("a", { class: "mono", href: featurePath(RUN, c.level, c.index) }, featureId(c.level, c.index)), " ", featureName(c, { maxTokens: 3 })),
      h("td", { class: "num" }, probBar(c.edge?.p_parent_given_child, "P(this | child)")),
      h("td", { class: "num" }, probBar(c.edge?.p_child_given_parent, "P(child | this)"))));
  }
  if (!rows.length) return null;
  return h("section", { class: "card" },
    h("header", {}, h("h2", {}, "Hierarchy")),
    h("table", { class: "edges" },
      h("thead", {}, h("tr", {}, h("th", {}, ""), h("th", { class: "num", title: "P(parent active | child active)" }, "P(parent|child)"),
        h("th", { class: "num", title: "P(child active | parent active)" }, "P(child|parent)"))),
      h("tbody", {}, rows)));
}
