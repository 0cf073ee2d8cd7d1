// The tree itself: fetching roots and children, flattening the expanded tree into rows, and rendering only
// the rows in view. Roots come in pages (the API's offset/limit) when their placeholders scroll into view;
// children are fetched when a node is first expanded. ARIA: the container is role=tree and holds focus
// (aria-activedescendant); each row is a treeitem with aria-level/setsize/posinset.
import { api, featurePath } from "../api.js";
import { h } from "../dom.js";
import { featureId, formatInt } from "../format.js";
import { densityBar, featureName, levelDot } from "../widgets.js";
import { schedulePreview, showError } from "./preview.js";
import { CHILD_PAGE, INDENT, OVERSCAN, PAGE, ROW_H, RUN, TreeNode, els, state } from "./state.js";

// ---- data -----------------------------------------------------------------------------------------------
export function loadPage(page) {
  if (state.pending.has(page)) return state.pending.get(page);
  const generation = state.generation;
  const promise = api.forest(RUN, { level: state.level, sort: state.sort, offset: page * PAGE, limit: PAGE })
    .then((data) => {
      if (generation !== state.generation) return;
      state.total = data.total;
      data.items.forEach((item, i) => {
        const offset = data.offset + i;
        if (!state.roots[offset]) state.roots[offset] = new TreeNode(item, 0, null, offset);
      });
      updateCount();
      refresh();
    })
    .catch((err) => {
      state.pending.delete(page);
      if (generation === state.generation) showError(err);
    });
  state.pending.set(page, promise);
  return promise;
}

export async function loadChildren(node, offset = 0) {
  node.loading = true;
  render();
  try {
    const data = await api.children(RUN, node.level, node.index, { offset, limit: CHILD_PAGE, sort: state.sort });
    node.children ??= [];
    data.items.forEach((item, i) => {
      node.children[offset + i] = new TreeNode(item, node.depth + 1, node, offset + i);
    });
    node.childTotal = data.total;
  } catch (err) {
    showError(err);
  } finally {
    node.loading = false;
  }
}

export async function expand(node) {
  if (node.childTotal === 0 || node.expanded) return;
  const started = performance.now();
  if (node.children === null) await loadChildren(node);
  if (node.children === null) return refresh(); // failed
  node.expanded = true;
  refresh();
  performance.measure("forest:expand", { start: started, end: performance.now() });
}

export function collapse(node) {
  node.expanded = false;
  refresh();
}

/** Start over at another level or sort order: drops every loaded row and fetches the first page. */
export function reset({ level = state.level, sort = state.sort } = {}) {
  state.generation += 1;
  Object.assign(state, { level, sort, total: 0, roots: [], pending: new Map(), rows: [], rootRow: [], active: 0 });
  els.level.value = String(level);
  els.sort.value = sort;
  els.tree.scrollTop = 0;
  state.ready = loadPage(0);
  return state.ready;
}

// ---- flattening and rendering ---------------------------------------------------------------------------
function flatten() {
  const rows = [];
  const rootRow = new Array(state.total);
  const push = (node) => {
    rows.push(node);
    if (!node.expanded || !node.children) return;
    for (const child of node.children) if (child) push(child);
    const loaded = node.children.length;
    if (loaded < node.childTotal) rows.push({ more: true, node, loaded, depth: node.depth + 1 });
  };
  for (let offset = 0; offset < state.total; offset++) {
    rootRow[offset] = rows.length;
    const node = state.roots[offset];
    if (node) push(node);
    else rows.push({ placeholder: true, offset, depth: 0 });
  }
  return { rows, rootRow };
}

/** Re-flatten (the shape changed), keep the active row on the same item, then render. */
export function refresh() {
  const before = state.rows[state.active];
  const flat = flatten();
  state.rows = flat.rows;
  state.rootRow = flat.rootRow;
  if (before) {
    let at = -1;
    if (before instanceof TreeNode) at = state.rows.indexOf(before);
    else if (before.placeholder) at = state.rootRow[before.offset] ?? -1;
    if (at < 0 && before instanceof TreeNode) at = nearestVisibleAncestorRow(before);
    state.active = Math.max(0, Math.min(at < 0 ? state.active : at, state.rows.length - 1));
  }
  render();
}

function nearestVisibleAncestorRow(node) {
  for (let p = node.parentNode; p; p = p.parentNode) {
    const at = state.rows.indexOf(p);
    if (at >= 0) return at;
  }
  return -1;
}

let frame = 0;
export function scheduleRender() {
  if (!frame) frame = requestAnimationFrame(() => { frame = 0; render(); });
}

export function render() {
  const { tree: treeEl, spacer } = els;
  spacer.style.height = `${state.rows.length * ROW_H}px`;
  const top = treeEl.scrollTop;
  const height = treeEl.clientHeight || 600;
  const first = Math.max(0, Math.floor(top / ROW_H) - OVERSCAN);
  const last = Math.min(state.rows.length, Math.ceil((top + height) / ROW_H) + OVERSCAN);
  const elements = [];
  const missingPages = new Set();
  for (let i = first; i < last; i++) {
    const row = state.rows[i];
    if (row.placeholder) missingPages.add(Math.floor(row.offset / PAGE));
    elements.push(rowElement(row, i));
  }
  spacer.replaceChildren(...elements);
  const active = state.rows[state.active];
  if (active && state.active >= first && state.active < last) treeEl.setAttribute("aria-activedescendant", rowId(active, state.active));
  else treeEl.removeAttribute("aria-activedescendant");
  for (const page of missingPages) loadPage(page);
  if (!state.firstRowsPainted && elements.some((el) => el.dataset.level !== undefined)) {
    state.firstRowsPainted = true;
    performance.mark("forest:first-rows");
  }
}

function rowId(row, i) {
  if (row instanceof TreeNode) return `tn-${row.level}-${row.index}`;
  return row.placeholder ? `tp-${row.offset}` : `tm-${i}`;
}

function rowElement(row, i) {
  const style = { top: `${i * ROW_H}px`, paddingLeft: `${8 + row.depth * INDENT}px` };
  const isActive = i === state.active;
  if (row.placeholder) {
    return h("div", {
      class: `tree-row placeholder${isActive ? " active" : ""}`, id: rowId(row, i), role: "treeitem", style,
      aria: { level: 1, setsize: state.total, posinset: row.offset + 1, busy: "true" }, dataset: { row: i },
    }, h("span", { class: "twisty", dataset: { state: "leaf" } }), h("span", { class: "skeleton" }));
  }
  if (row.more) {
    return h("div", {
      class: `tree-row more${isActive ? " active" : ""}`, id: rowId(row, i), role: "treeitem", style,
      aria: { level: row.depth + 1 }, dataset: { row: i, more: "1" },
    }, h("span", { class: "twisty", dataset: { state: "leaf" } }),
    h("button", { class: "btn small", type: "button", tabindex: "-1" },
      `Load ${formatInt(Math.min(CHILD_PAGE, row.node.childTotal - row.loaded))} more of ${formatInt(row.node.childTotal)} children`));
  }
  const node = row;
  const hasChildren = node.childTotal > 0;
  const twistyState = node.loading ? "loading" : !hasChildren ? "leaf" : node.expanded ? "open" : "closed";
  const setsize = node.parentNode ? node.parentNode.childTotal : state.total;
  const classes = ["tree-row"];
  if (isActive) classes.push("active");
  if (node.key === state.focusKey) classes.push("focused");
  return h("div", {
    class: classes.join(" "), id: rowId(node, i), role: "treeitem", style,
    aria: {
      level: node.depth + 1, setsize, posinset: node.position + 1, selected: String(isActive),
      ...(hasChildren ? { expanded: String(node.expanded) } : {}),
    },
    dataset: { row: i, level: node.level, index: node.index },
  },
  h("span", { class: "twisty", dataset: { state: twistyState }, "aria-hidden": "true", title: hasChildren ? "expand / collapse" : null }),
  levelDot(node.level),
  h("a", { class: "fid", href: featurePath(RUN, node.level, node.index), tabindex: "-1", title: "open the feature page" },
    featureId(node.level, node.index)),
  featureName(node),
  h("span", { class: "kids", title: `${node.childTotal} children` }, hasChildren ? `${formatInt(node.childTotal)} ▸` : ""),
  densityBar(node.density));
}

function updateCount() {
  const noun = state.level === 0 ? "roots" : `features at level ${state.level}`;
  els.count.textContent = `${formatInt(state.total)} ${noun}`;
}

// ---- the active row -------------------------------------------------------------------------------------
export function setActive(i, { scroll = true } = {}) {
  state.active = Math.max(0, Math.min(i, state.rows.length - 1));
  if (scroll) ensureVisible(state.active);
  render();
  schedulePreview();
}

export function ensureVisible(i, { center = false } = {}) {
  const treeEl = els.tree;
  const top = i * ROW_H;
  const height = treeEl.clientHeight;
  if (center) treeEl.scrollTop = Math.max(0, top - height / 2 + ROW_H / 2);
  else if (top < treeEl.scrollTop) treeEl.scrollTop = top;
  else if (top + ROW_H > treeEl.scrollTop + height) treeEl.scrollTop = top + ROW_H - height;
}
