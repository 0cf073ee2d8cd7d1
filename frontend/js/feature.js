// `/runs/{run}/features/{level}/{index}`: one feature with its place in the forest first (ancestors, parent
// edge, children with their edge statistics), then what it responds to (contexts) and does (output tokens),
// its activation histogram, annotations and the subtree export.
import { api, ApiError, auth, featurePath, forestFocusPath, runPath } from "./api.js";
import { mountAuthBar } from "./authbar.js";
import { h, replace } from "./dom.js";
import { histogramChart, topTokensChart } from "./charts.js";
import { featureId, formatDensity, formatInt, formatValue } from "./format.js";
import { relativesCard } from "./relatives.js";
import { tokenStrip } from "./tokens.js";
import { autoLabelLine, densityBar, featureName, levelDot, probBar, stat, tagList } from "./widgets.js";

mountAuthBar(document.getElementById("auth"));

const RUN = document.body.dataset.run;
const LEVEL = Number(document.body.dataset.level);
const INDEX = Number(document.body.dataset.index);
const root = document.getElementById("feature");
const CONTEXT_WINDOW = [28, 10]; // tokens shown before and after the strongest one until a context is opened

let feature = null; // FeatureDetail, kept current after annotation saves
let quantileBuckets = null; // from the run's index settings

// ---- header: breadcrumb, title, stats, actions -----------------------------------------------------------
async function ancestors(detail) {
  const chain = [];
  for (let ref = detail.parent; ref; ) {
    chain.unshift(ref);
    if (chain.length > 64) break;
    const up = await api.feature(RUN, ref.level, ref.index);
    ref = up.parent;
  }
  return chain;
}

function breadcrumb(chain) {
  const sep = () => h("span", { class: "sep", "aria-hidden": "true" }, "/");
  return h("nav", { class: "breadcrumb", "aria-label": "Ancestors", id: "breadcrumb" },
    h("a", { href: "/" }, "Runs"), sep(), h("a", { href: runPath(RUN) }, RUN),
    chain.map((ref) => [sep(), h("a", { href: featurePath(RUN, ref.level, ref.index), title: featureId(ref.level, ref.index) },
      `${featureId(ref.level, ref.index)}${ref.label ? ` ${ref.label}` : ""}`)]),
    sep(), h("span", { "aria-current": "page" }, featureId(LEVEL, INDEX)));
}

function titleBlock(d) {
  return h("div", { class: "titles" },
    h("div", { class: "muted mono" }, levelDot(d.level), " ", featureId(d.level, d.index),
      d.level === 0 ? " · root" : d.parent ? null : " · no parent (unassigned)"),
    h("h1", { id: "feature-title", class: d.label ? "" : "unlabelled" }, d.label || "Unlabelled feature"),
    autoLabelLine(d),
    h("div", { id: "feature-tags" }, tagList(d.tags)),
    d.note ? h("p", { class: "feature-note", id: "feature-note" }, d.note) : h("p", { id: "feature-note", hidden: true }),
    h("div", { class: "stats" },
      stat("density", formatDensity(d.stats.density), "fraction of indexed tokens on which it is active"),
      stat("fires", formatInt(d.stats.fire_count), "tokens on which it is active"),
      stat("max act", formatValue(d.stats.max_act)),
      stat("mean act", formatValue(d.stats.mean_act), "mean over active tokens"),
      stat("children", formatInt(d.child_count)),
      d.parent_edge ? stat("P(parent | this)", formatValue(d.parent_edge.p_parent_given_child), "how often the parent is active when this feature is") : null));
}

function actions(d) {
  const depth = h("select", { class: "input", id: "export-depth", "aria-label": "Export depth" },
    h("option", { value: "" }, "whole subtree"), h("option", { value: "0" }, "this feature only"),
    h("option", { value: "1" }, "1 level down"), h("option", { value: "2" }, "2 levels down"));
  const status = h("span", { class: "status", role: "status" });
  const button = h("button", { class: "btn", type: "button", id: "export" }, "Export JSON");
  button.addEventListener("click", async () => {
    button.disabled = true;
    status.textContent = "Exporting…";
    try {
      const doc = await api.exportSubtree(RUN, d.level, d.index, { depth: depth.value });
      download(`${RUN}-L${d.level}-${d.index}.hsae-subtree.json`, JSON.stringify(doc, null, 2));
      status.textContent = "";
    } catch (err) {
      status.textContent = err.message;
      status.className = "status error";
    } finally {
      button.disabled = false;
    }
  });
  return h("div", { class: "actions" },
    h("a", { class: "btn", href: forestFocusPath(RUN, d.level, d.index), id: "show-in-forest" }, "Show in forest"),
    h("a", { class: "btn", href: `${runPath(RUN)}/prompt?steer=${d.level}:${d.index}`, id: "steer-with",
      title: "open the prompt view with this feature picked for steering" }, "Steer with it"),
    depth, button, status);
}

function download(filename, text) {
  const url = URL.createObjectURL(new Blob([text], { type: "application/json" }));
  const a = h("a", { href: url, download: filename, hidden: true });
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10_000);
}

// ---- hierarchy: parent edge and children -----------------------------------------------------------------
function parentCard(d) {
  if (!d.parent) return null;
  const e = d.parent_edge;
  return h("section", { class: "card", id: "parent" },
    h("header", {}, h("h2", {}, "Parent")),
    h("table", { class: "edges" },
      h("thead", {}, h("tr", {}, h("th", {}, "Feature"), h("th", {}, ""),
        h("th", { class: "num", title: "P(parent active | this feature active)" }, "P(parent|child)"),
        h("th", { class: "num", title: "P(this feature active | parent active)" }, "P(child|parent)"),
        h("th", { class: "num", title: "cosine of the decoder directions" }, "cos"),
        h("th", { class: "num", title: "tokens where both are active" }, "co-active"))),
      h("tbody", {}, h("tr", {},
        h("td", { class: "mono" }, levelDot(d.parent.level), " ", h("a", { href: featurePath(RUN, d.parent.level, d.parent.index) }, featureId(d.parent.level, d.parent.index))),
        h("td", { class: "name" }, featureName({ label: d.parent.label, top_tokens: [] })),
        h("td", { class: "num" }, e ? probBar(e.p_parent_given_child) : "–"),
        h("td", { class: "num" }, e ? probBar(e.p_child_given_parent) : "–"),
        h("td", { class: "num" }, e ? formatValue(e.decoder_cosine) : "–"),
        h("td", { class: "num" }, e ? formatInt(e.coactive_count) : "–")))));
}

const CHILD_COLUMNS = [
  { key: "index", label: "Feature", value: (c) => c.index },
  { key: "name", label: "", value: (c) => c.label ?? "" },
  { key: "density", label: "density", num: true, value: (c) => c.density },
  { key: "pc", label: "P(parent|child)", num: true, title: "P(parent active | child active): does the child fire only with its parent?", value: (c) => c.edge?.p_parent_given_child ?? -1 },
  { key: "cp", label: "P(child|parent)", num: true, title: "P(child active | parent active): how much of the parent the child covers", value: (c) => c.edge?.p_child_given_parent ?? -1 },
  { key: "cos", label: "cos", num: true, title: "cosine of the decoder directions", value: (c) => c.edge?.decoder_cosine ?? -2 },
];

function childrenCard(d) {
  const body = h("div", {});
  const card = h("section", { class: "card", id: "children" },
    h("header", {}, h("h2", {}, "Children"), h("span", { class: "muted" }, formatInt(d.child_count)), h("span", { class: "spacer" })),
    body);
  if (d.child_count === 0) {
    replace(body, h("p", { class: "body empty" }, d.level === 0 || d.parent ? "No children: a leaf of the forest." : "No children."));
    return card;
  }
  let children = d.children;
  let sortKey = "cp";
  let descending = true;
  const draw = () => {
    const column = CHILD_COLUMNS.find((c) => c.key === sortKey);
    const sorted = [...children].sort((a, b) => {
      const x = column.value(a);
      const y = column.value(b);
      const order = x < y ? -1 : x > y ? 1 : a.index - b.index;
      return descending ? -order : order;
    });
    const head = h("tr", {}, CHILD_COLUMNS.map((col) => h("th", {
      class: col.num ? "num" : "", title: col.title, scope: "col",
      "aria-sort": col.key === sortKey ? (descending ? "descending" : "ascending") : null,
      style: { cursor: col.label ? "pointer" : "default" },
      onclick: () => {
        if (!col.label) return;
        descending = col.key === sortKey ? !descending : col.num;
        sortKey = col.key;
        draw();
      },
    }, col.label + (col.key === sortKey ? (descending ? " ↓" : " ↑") : ""))));
    const rows = sorted.map((c) => h("tr", { dataset: { level: c.level, index: c.index } },
      h("td", { class: "mono" }, levelDot(c.level), " ", h("a", { href: featurePath(RUN, c.level, c.index) }, featureId(c.level, c.index)),
        c.child_count ? h("span", { class: "faint", title: `${c.child_count} children` }, ` ▸${c.child_count}`) : null),
      h("td", { class: "name" }, featureName(c)),
      h("td", { class: "num" }, densityBar(c.density)),
      h("td", { class: "num" }, probBar(c.edge?.p_parent_given_child, "P(parent|child)")),
      h("td", { class: "num" }, probBar(c.edge?.p_child_given_parent, "P(child|parent)")),
      h("td", { class: "num" }, formatValue(c.edge?.decoder_cosine))));
    const more = children.length < d.child_count
      ? h("div", { class: "body" }, h("button", {
          class: "btn small", type: "button",
          onclick: async (event) => {
            event.target.disabled = true;
            children = await allChildren();
            draw();
          },
        }, `Show all ${formatInt(d.child_count)} children`))
      : null;
    replace(body, h("table", { class: "edges" }, h("thead", {}, head), h("tbody", {}, rows)), more);
  };
  draw();
  return card;
}

async function allChildren() {
  const items = [];
  for (let offset = 0; ; offset += 500) {
    const page = await api.children(RUN, LEVEL, INDEX, { offset, limit: 500 });
    items.push(...page.items);
    if (items.length >= page.total || !page.items.length) return items;
  }
}

// ---- contexts -------------------------------------------------------------------------------------------
function contextRow(ex, maxAct) {
  const row = h("div", { class: "ctx", dataset: { context: ex.context_id } },
    h("span", { class: "ctx-val", title: `max ${ex.max_value} at token ${ex.max_position} · ${ex.doc_id} @ ${ex.start}` }, formatValue(ex.max_value)));
  const draw = (full) => {
    const strip = tokenStrip(ex.tokens, ex.values, { max: maxAct, focus: ex.max_position, window: full ? null : CONTEXT_WINDOW });
    strip.title = full ? "click to shorten" : "click to show the whole context";
    strip.addEventListener("click", () => {
      row.classList.toggle("expanded", !full);
      strip.replaceWith(draw(!full));
    });
    return strip;
  };
  row.append(draw(false));
  return row;
}

/** The cards at once; their contexts when the examples arrive. */
function contextsCards(d) {
  const top = h("div", { class: "body contexts", id: "top-contexts" }, h("span", { class: "spinner" }));
  const quantiles = h("div", { class: "body contexts", id: "quantile-contexts" }, h("span", { class: "spinner" }));
  const cards = [
    h("section", { class: "card" }, h("header", {}, h("h2", {}, "Top activations"),
      h("span", { class: "spacer" }), h("span", { class: "faint" }, "hover a token for its value · click a context to open it")), top),
    h("section", { class: "card" }, h("header", {}, h("h2", {}, "Lower activations"),
      h("span", { class: "spacer" }), h("span", { class: "faint" }, "sampled by quantile of the max activation")), quantiles),
  ];
  Promise.all([
    api.examples(RUN, d.level, d.index, { kind: "top", limit: 50 }),
    api.examples(RUN, d.level, d.index, { kind: "quantile", limit: 200 }),
  ]).then(([topPage, quantilePage]) => {
    const maxAct = d.stats.max_act;
    replace(top, topPage.items.length ? topPage.items.map((ex) => contextRow(ex, maxAct)) : h("p", { class: "empty" }, "This feature never fired on the indexed corpus."));
    const buckets = new Map();
    for (const ex of quantilePage.items) {
      if (!buckets.has(ex.bucket)) buckets.set(ex.bucket, []);
      buckets.get(ex.bucket).push(ex);
    }
    const n = quantileBuckets ?? Math.max(0, ...buckets.keys()) + 1;
    const order = [...buckets.keys()].sort((a, b) => b - a);
    replace(quantiles, order.length
      ? order.map((b) => [
          h("div", { class: "bucket-title" }, `max activation in the ${bucketName(b, n)} of [0, ${formatValue(maxAct)}]`),
          buckets.get(b).map((ex) => contextRow(ex, maxAct)),
        ])
      : h("p", { class: "empty" }, "No lower-activation samples."));
  }).catch((err) => replace(top, h("div", { class: "error-box" }, err.message)));
  return cards;
}

function bucketName(b, n) {
  return `${Math.round((b / n) * 100)}–${Math.round(((b + 1) / n) * 100)}% band`;
}

// ---- side: annotation, output tokens, histogram ----------------------------------------------------------
function annotationCard(d) {
  const label = h("input", { class: "input", id: "annot-label", maxlength: "500", value: d.label ?? "", placeholder: "a short name" });
  const note = h("textarea", { class: "input", id: "annot-note", rows: "3", maxlength: "20000", placeholder: "what it responds to, caveats, evidence" });
  note.value = d.note ?? "";
  const tags = h("input", { class: "input", id: "annot-tags", value: (d.tags ?? []).join(", "), placeholder: "comma-separated" });
  const save = h("button", { class: "btn primary", type: "submit", id: "annot-save" }, "Save");
  const status = h("span", { class: "status", role: "status", id: "annot-status" });
  const hint = h("p", { class: "readonly-hint" }, auth.mode === "off"
    ? "Read-only: this server takes no annotation writes (start it with --local, or set HSAE_WRITE_TOKEN)."
    : "Read-only: paste the server's write token (top right) to edit annotations.");
  const history = h("details", { class: "history" }, h("summary", { class: "muted" }, "History"), h("div", { class: "history-body" }));
  const form = h("form", { class: "body annot", id: "annotation" },
    h("label", { class: "field" }, "Label", label),
    h("label", { class: "field" }, "Note", note),
    h("label", { class: "field" }, "Tags", tags),
    hint,
    h("div", { class: "row" }, save, status, h("span", { class: "spacer" })),
    history);

  const syncWritable = () => {
    const writable = auth.canWrite();
    for (const el of [label, note, tags, save]) el.disabled = !writable;
    hint.hidden = writable;
  };
  syncWritable();
  window.addEventListener("hsae:auth", syncWritable);

  const submit = async (event) => {
    event?.preventDefault();
    save.disabled = true;
    status.className = "status";
    status.textContent = "Saving…";
    const body = {
      label: label.value.trim() || null,
      note: note.value.trim() || null,
      tags: [...new Set(tags.value.split(",").map((t) => t.trim()).filter(Boolean))],
    };
    try {
      const saved = await api.annotate(RUN, d.level, d.index, body);
      Object.assign(feature, { label: saved.label, note: saved.note, tags: saved.tags });
      showAnnotation(feature);
      status.className = "status ok";
      status.textContent = saved.changed ? "Saved" : "No change";
      if (history.open) loadHistory(history);
    } catch (err) {
      status.className = "status error";
      status.textContent = err instanceof ApiError && (err.status === 401 || err.status === 403)
        ? "The server refused the write token." : err.message;
    } finally {
      save.disabled = !auth.canWrite();
    }
  };
  form.addEventListener("submit", submit);
  form.addEventListener("keydown", (e) => { if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) submit(e); });
  history.addEventListener("toggle", () => { if (history.open) loadHistory(history); });
  return h("section", { class: "card", id: "annotation-card" }, h("header", {}, h("h2", {}, "Annotation")), form);
}

async function loadHistory(details) {
  const body = details.querySelector(".history-body");
  try {
    const page = await api.history(RUN, LEVEL, INDEX, { limit: 20 });
    replace(body, page.items.length
      ? h("ul", { class: "muted", style: { paddingLeft: "18px", margin: "6px 0 0" } }, page.items.map((e) => h("li", {},
          `${new Date(e.changed_at).toLocaleString()} · ${e.author}: `,
          e.old_label !== e.new_label ? `label “${e.old_label ?? ""}” → “${e.new_label ?? ""}”` : "note/tags changed")))
      : h("p", { class: "empty" }, "No changes yet."));
  } catch (err) {
    replace(body, h("p", { class: "status error" }, err.message));
  }
}

/** Title, tags and note in the header after an annotation change. */
function showAnnotation(d) {
  const title = document.getElementById("feature-title");
  title.textContent = d.label || "Unlabelled feature";
  title.className = d.label ? "" : "unlabelled";
  replace(document.getElementById("feature-tags"), tagList(d.tags));
  const note = document.getElementById("feature-note");
  note.textContent = d.note ?? "";
  note.className = "feature-note";
  note.hidden = !d.note;
  document.title = `${d.label ? `${d.label} · ` : ""}${RUN} · ${featureId(d.level, d.index)} · HSAE Forest`;
}

function chartsCards(d) {
  const tokens = h("div", { class: "chart", id: "top-tokens-chart" });
  const histogram = h("div", { class: "chart", id: "histogram-chart" });
  const cards = [
    h("section", { class: "card" }, h("header", {}, h("h2", {}, "Output tokens")), h("div", { class: "body" }, tokens)),
    h("section", { class: "card" }, h("header", {}, h("h2", {}, "Activation histogram"),
      h("span", { class: "spacer" }), h("span", { class: "faint" }, "non-zero activations")), h("div", { class: "body" }, histogram)),
  ];
  queueMicrotask(() => {
    if (d.top_positive.length || d.top_negative.length) topTokensChart(tokens, d.top_positive, d.top_negative);
    else replace(tokens, h("p", { class: "empty" }, "No output tokens recorded for this run."));
    if (d.histogram.counts.length) histogramChart(histogram, d.histogram, { maxAct: d.stats.max_act });
    else replace(histogram, h("p", { class: "empty" }, "Never active on the indexed corpus."));
  });
  return cards;
}

// ---- page -----------------------------------------------------------------------------------------------
async function init() {
  let d;
  try {
    const [detail, run] = await Promise.all([api.feature(RUN, LEVEL, INDEX), api.run(RUN).catch(() => null)]);
    d = detail;
    quantileBuckets = run?.index_settings?.quantile_buckets ?? null;
  } catch (err) {
    const message = err instanceof ApiError && err.status === 404 ? `${err.message}` : `Could not load the feature: ${err.message}`;
    replace(root, breadcrumb([]), h("div", { class: "error-box" }, message));
    return;
  }
  feature = d;
  document.title = `${d.label ? `${d.label} · ` : ""}${RUN} · ${featureId(d.level, d.index)} · HSAE Forest`;
  const crumb = breadcrumb(d.parent ? [d.parent] : []);
  const main = h("div", { class: "main" }, parentCard(d), childrenCard(d), relativesCard(RUN, d), ...contextsCards(d));
  const side = h("div", { class: "side" }, annotationCard(d), ...chartsCards(d));
  replace(root, crumb, h("div", { class: "feature-head" }, titleBlock(d), actions(d)), h("div", { class: "feature-grid" }, main, side));
  if (d.parent) ancestors(d).then((chain) => crumb.replaceWith(breadcrumb(chain))).catch(() => {});
}

init();
