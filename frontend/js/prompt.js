// `/runs/{run}/prompt`: run a prompt through the model and the HSAE. The token strip is shaded by activation
// (the strongest top-level feature per token, or one chosen feature); clicking a token shows its active
// features as a small forest: active parents with their active children, each linked to its feature page and
// to its place in the forest. The steering panel generates a continuation of the prompt with a feature's
// direction added, next to the unsteered one (a token's features have a "steer" button that picks them;
// `?steer=level:index` picks one from a link).
import { api, featurePath, forestFocusPath } from "./api.js";
import { mountAuthBar } from "./authbar.js";
import { h, replace } from "./dom.js";
import { activationColor, featureId, formatInt, formatValue, tokenText } from "./format.js";
import { featureName, levelDot } from "./widgets.js";

mountAuthBar(document.getElementById("auth"));

const RUN = document.body.dataset.run;
const form = document.getElementById("prompt-form");
const textBox = document.getElementById("prompt-text");
const runButton = document.getElementById("prompt-run");
const status = document.getElementById("prompt-status");
const result = document.getElementById("prompt-result");
const liveInfo = document.getElementById("live-info");

const keyOf = (level, index) => `${level}:${index}`;

const view = {
  data: null, // ActivationsOut
  selected: -1, // token position
  shadeBy: null, // {level, index} or null: strongest top-level feature
  strip: null,
  tokenPanel: null,
  legend: null,
};

// ---- feature names: from the answer's summary, else fetched once per feature -----------------------------
const names = new Map(); // key -> {label, top_tokens} | Promise
function rememberSummary(nodes) {
  for (const node of nodes) {
    if (node.label) names.set(keyOf(node.level, node.index), { label: node.label, top_tokens: [] });
    rememberSummary(node.children);
  }
}

function nameSlot(level, index) {
  const slot = h("span", { class: "fname faint" }, "…");
  const key = keyOf(level, index);
  let known = names.get(key);
  if (!known) {
    known = api.feature(RUN, level, index).then(
      (d) => ({ label: d.label, top_tokens: d.top_positive.map((t) => t.token) }),
      () => ({ label: null, top_tokens: [] }));
    names.set(key, known);
  }
  Promise.resolve(known).then((summary) => {
    names.set(key, summary);
    slot.replaceWith(featureName(summary, { maxTokens: 4 }));
  });
  return slot;
}

// ---- shading --------------------------------------------------------------------------------------------
function valueOf(token, level, index) {
  return token.levels[level]?.find((f) => f.index === index)?.value ?? 0;
}

function shadeValues() {
  const { tokens } = view.data;
  if (view.shadeBy) return tokens.map((t) => valueOf(t, view.shadeBy.level, view.shadeBy.index));
  return tokens.map((t) => t.levels[0]?.[0]?.value ?? 0);
}

function paintStrip() {
  const values = shadeValues();
  const max = Math.max(0, ...values);
  const what = view.shadeBy ? featureId(view.shadeBy.level, view.shadeBy.index) : "strongest level-0 feature";
  [...view.strip.children].forEach((span, t) => {
    span.style.background = activationColor(values[t], max);
    span.title = `${JSON.stringify(view.data.tokens[t].text)}  ${what}: ${formatValue(values[t])}`;
    span.dataset.value = String(values[t]);
  });
  replace(view.legend,
    h("span", {}, "Shaded by ", h("strong", {}, what)),
    h("span", { class: "legend-ramp", "aria-hidden": "true" }),
    h("span", { class: "mono" }, `0 – ${formatValue(max)}`),
    view.shadeBy ? h("button", { class: "btn small", type: "button", onclick: () => shade(null) }, "Reset") : null);
}

function shade(feature) {
  view.shadeBy = feature;
  paintStrip();
  for (const el of result.querySelectorAll(".fnode")) {
    el.classList.toggle("shading", Boolean(feature) && el.dataset.key === keyOf(feature.level, feature.index));
  }
}

// ---- the clicked token's features -----------------------------------------------------------------------
function featureNode(level, index, value, { extra = null, max = 1 } = {}) {
  const shadeButton = h("button", { class: "btn small ghost", type: "button", title: "shade the prompt by this feature" }, "shade");
  shadeButton.addEventListener("click", () => shade({ level, index }));
  const steerButton = h("button", { class: "btn small ghost", type: "button", title: "steer the prompt's continuation with this feature" }, "steer");
  steerButton.addEventListener("click", () => pickSteerFeature(level, index));
  const node = h("div", { class: "fnode", dataset: { key: keyOf(level, index), level, index } },
    h("span", { class: "act-val", style: { background: activationColor(value, max) }, title: "activation" }, formatValue(value)),
    levelDot(level),
    h("a", { class: "fid", href: featurePath(RUN, level, index) }, featureId(level, index)),
    nameSlot(level, index),
    extra,
    h("span", { class: "links" },
      shadeButton,
      steerButton,
      h("a", { href: forestFocusPath(RUN, level, index), title: "show this feature's path in the forest" }, "in forest")));
  if (view.shadeBy && view.shadeBy.level === level && view.shadeBy.index === index) node.classList.add("shading");
  return node;
}

/** Active features of one token as a forest: each active feature under its active parent. */
function tokenForest(token) {
  const levels = token.levels;
  const max = Math.max(1e-9, ...levels.flat().map((f) => f.value));
  const childrenOf = (level, index) => (levels[level + 1] ?? []).filter((f) => f.parent === index && f.parent_active);
  const item = (level, f) => {
    const kids = childrenOf(level, f.index);
    return h("li", { role: "treeitem", aria: { level: level + 1, ...(kids.length ? { expanded: "true" } : {}) } },
      featureNode(level, f.index, f.value, { max }),
      kids.length ? h("ul", { role: "group" }, kids.map((k) => item(level + 1, k))) : null);
  };
  const roots = levels[0] ?? [];
  const unparented = levels.slice(1).flatMap((features, i) =>
    features.filter((f) => !f.parent_active).map((f) => ({ level: i + 1, f })));
  return h("div", {},
    roots.length
      ? h("ul", { class: "ftree", role: "tree", "aria-label": "Active features of the token" }, roots.map((f) => item(0, f)))
      : h("p", { class: "empty" }, "No top-level feature is active on this token."),
    unparented.length ? [
      h("div", { class: "orphans-title" }, "Active without an active parent"),
      h("ul", { class: "ftree", role: "tree", "aria-label": "Features active without their parent" },
        unparented.map(({ level, f }) => h("li", { role: "treeitem", aria: { level: 1 } },
          featureNode(level, f.index, f.value, {
            max,
            extra: h("span", { class: "faint", title: "its parent in the level above" },
              f.parent === null ? "no parent" : `parent ${featureId(level - 1, f.parent)} silent`),
          }))))]
      : null);
}

function selectToken(position) {
  const { tokens } = view.data;
  if (position < 0 || position >= tokens.length) return;
  view.selected = position;
  [...view.strip.children].forEach((span, t) => {
    span.classList.toggle("selected", t === position);
    span.setAttribute("aria-selected", String(t === position));
  });
  view.strip.setAttribute("aria-activedescendant", `tok-${position}`);
  const token = tokens[position];
  const count = token.levels.reduce((n, features) => n + features.length, 0);
  replace(view.tokenPanel,
    h("header", {}, h("h2", {}, "Token"), h("code", { class: "tok-chip", id: "selected-token" }, tokenText(token.text)),
      h("span", { class: "faint" }, `position ${position} · ${formatInt(count)} active features`)),
    h("div", { class: "body", id: "token-features" }, tokenForest(token)));
}

// ---- the prompt summary ---------------------------------------------------------------------------------
function summaryTree(nodes, depth = 0) {
  const max = Math.max(1e-9, ...view.data.summary.map((n) => n.max_value));
  return h("ul", depth ? { role: "group" } : { class: "ftree", role: "tree", "aria-label": "Strongest features on the prompt" },
    nodes.map((n) => h("li", { role: "treeitem", aria: { level: depth + 1 } },
      featureNode(n.level, n.index, n.max_value, {
        max,
        extra: h("span", { class: "faint", title: "tokens active · summed activation" }, `${n.token_count} tok · Σ ${formatValue(n.total_value)}`),
      }),
      n.children.length ? summaryTree(n.children, depth + 1) : null)));
}

// ---- running a prompt -----------------------------------------------------------------------------------
function renderResult(data) {
  view.data = data;
  view.shadeBy = null;
  names.clear();
  rememberSummary(data.summary);
  view.strip = h("div", {
    class: "strip prompt-strip", id: "token-strip", role: "listbox", tabindex: "0", "aria-label": "Prompt tokens",
  }, data.tokens.map((t) => h("span", {
    class: "tok", id: `tok-${t.position}`, role: "option", dataset: { position: t.position }, text: tokenText(t.text),
  })));
  view.strip.addEventListener("click", (event) => {
    const span = event.target.closest(".tok");
    if (span) selectToken(Number(span.dataset.position));
  });
  view.strip.addEventListener("keydown", (event) => {
    const step = { ArrowRight: 1, ArrowLeft: -1, Home: -Infinity, End: Infinity }[event.key];
    if (step === undefined) return;
    event.preventDefault();
    const next = Number.isFinite(step) ? view.selected + step : step < 0 ? 0 : data.tokens.length - 1;
    selectToken(Math.max(0, Math.min(next, data.tokens.length - 1)));
  });
  view.legend = h("div", { class: "shade-legend" });
  view.tokenPanel = h("section", { class: "card", id: "token-card" },
    h("header", {}, h("h2", {}, "Token")), h("p", { class: "body empty" }, "Click a token to see its active features."));
  replace(result,
    h("section", { class: "card", style: { marginTop: "14px" } },
      h("header", {}, h("h2", {}, "Tokens"), h("span", { class: "spacer" }), view.legend),
      h("div", { class: "body" }, data.tokens.length ? view.strip : h("p", { class: "empty" }, "The prompt has no tokens."))),
    h("div", { class: "prompt-grid" },
      view.tokenPanel,
      h("section", { class: "card", id: "summary-card" },
        h("header", {}, h("h2", {}, "Strongest features on the prompt")),
        h("div", { class: "body" }, data.summary.length ? summaryTree(data.summary) : h("p", { class: "empty" }, "Nothing active.")))));
  paintStrip();
  if (data.tokens.length) {
    const strongest = data.tokens.reduce((best, t) => ((t.levels[0]?.[0]?.value ?? 0) > (best.levels[0]?.[0]?.value ?? 0) ? t : best));
    selectToken(strongest.position);
  }
}

async function submit(event) {
  event?.preventDefault();
  const text = textBox.value;
  if (!text.trim()) return;
  runButton.disabled = true;
  status.className = "status";
  replace(status, h("span", { class: "spinner" }), " Running (the first prompt loads the model)…");
  const started = performance.now();
  try {
    const data = await api.activations(RUN, text);
    renderResult(data);
    status.textContent = `${formatInt(data.tokens.length)} tokens · ${Math.round(data.elapsed_ms)} ms on the server · ${Math.round(performance.now() - started)} ms total`;
    liveInfo.textContent = `${data.model} · layer ${data.layer} · ${data.device}`;
  } catch (err) {
    status.className = "status error";
    status.textContent = err.message;
  } finally {
    runButton.disabled = false;
  }
}

// ---- steering -------------------------------------------------------------------------------------------
const steer = {
  form: document.getElementById("steer-form"),
  level: document.getElementById("steer-level"),
  index: document.getElementById("steer-index"),
  strength: document.getElementById("steer-strength"),
  tokens: document.getElementById("steer-tokens"),
  children: document.getElementById("steer-children"),
  run: document.getElementById("steer-run"),
  status: document.getElementById("steer-status"),
  result: document.getElementById("steer-result"),
  steered: document.getElementById("steer-steered"),
  unsteered: document.getElementById("steer-unsteered"),
  steeredTitle: document.getElementById("steer-steered-title"),
};

function pickSteerFeature(level, index) {
  steer.level.value = String(level);
  steer.index.value = String(index);
  steer.form.scrollIntoView({ block: "nearest" });
  steer.strength.focus();
}

function continuation(target, prompt, text) {
  replace(target, h("span", { class: "prompt-part" }, prompt), h("span", { class: "generated" }, text));
}

async function submitSteer(event) {
  event?.preventDefault();
  const text = textBox.value;
  if (!text.trim()) return;
  const body = {
    text,
    feature: { level: Number(steer.level.value), index: Number(steer.index.value) },
    strength: Number(steer.strength.value),
    max_new_tokens: Number(steer.tokens.value),
    with_children: steer.children.checked,
  };
  steer.run.disabled = true;
  steer.status.className = "status";
  replace(steer.status, h("span", { class: "spinner" }), " Generating…");
  try {
    const data = await api.steer(RUN, body);
    const feature = featureId(data.feature.level, data.feature.index);
    const children = data.children ? ` + ${formatInt(data.children)} children` : "";
    steer.steeredTitle.textContent = `Steered: ${feature}${children} × ${data.strength} (max act ${formatValue(data.max_act)})`;
    continuation(steer.unsteered, text, data.unsteered.text);
    continuation(steer.steered, text, data.steered.text);
    steer.result.hidden = false;
    steer.status.textContent = `${Math.round(data.elapsed_ms)} ms on the server`;
  } catch (err) {
    steer.status.className = "status error";
    steer.status.textContent = err.message;
  } finally {
    steer.run.disabled = false;
  }
}

steer.form.addEventListener("submit", submitSteer);
const steerParam = new URLSearchParams(location.search).get("steer")?.match(/^(\d+):(\d+)$/);
if (steerParam) pickSteerFeature(Number(steerParam[1]), Number(steerParam[2]));

form.addEventListener("submit", submit);
textBox.addEventListener("keydown", (e) => { if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) submit(e); });

api.run(RUN).then((run) => {
  liveInfo.textContent = `${run.model} · layer ${run.layer}`;
  if (!run.live) {
    runButton.disabled = true;
    steer.run.disabled = true;
    status.className = "status error";
    status.textContent = "This run has no checkpoint on this server: live prompts are unavailable.";
  }
}).catch((err) => {
  runButton.disabled = true;
  steer.run.disabled = true;
  status.className = "status error";
  status.textContent = err.message;
});
