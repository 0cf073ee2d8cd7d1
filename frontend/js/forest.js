// `/runs/{run}`: the collapsible feature forest.
//
// The tree is a virtual list: the visible rows (loaded roots, placeholders for roots not fetched yet, and the
// children of expanded nodes) are flattened into one array and only the rows in view are in the DOM, so a
// level with 10k+ roots scrolls like a short one. Roots come in pages (the API's offset/limit) when their
// placeholders scroll into view; children are fetched when a node is first expanded. ARIA: the container is
// role=tree and holds focus (aria-activedescendant); each row is a treeitem with aria-level/setsize/posinset.
import { api, ApiError, featurePath, forestFocusPath } from "./api.js";
import { mountAuthBar } from "./authbar.js";
import { debounce, h, replace } from "./dom.js";
import { featureId, formatDensity, formatInt, formatValue, tokenLabel } from "./format.js";
import { tokenStrip } from "./tokens.js";
import { densityBar, featureName, levelDot, probBar, stat, tagList } from "./widgets.js";

mountAuthBar(document.getElementById("auth"));

const RUN = document.body.dataset.run;
const ROW_H = 30;
const PAGE = 200;
const CHILD_PAGE = 500;
const OVERSCAN = 12;
const INDENT = 20;

const treeEl = document.getElementById("tree");
const spacer = document.getElementById("tree-spacer");
const countEl = document.getElementById("forest-count");
const levelSelect = document.getElementById("level");
const sortSelect = document.getElementById("sort");
const preview = document.getElementById("preview");

const keyOf = (level, index) => `${level}:${index}`;

class TreeNode {
  constructor(summary, depth, parent, position) {
    Object.assign(this, summary);
    this.key = keyOf(summary.level, summary.index);
    this.depth = depth;
    this.parentNode = parent;
    this.position = position; // among its siblings
    this.expanded = false;
    this.children = null; // null: not fetched
    this.childTotal = summary.child_count;
    this.loading = false;
  }
}

const state = {
  level: 0,
  sort: "density",
  total: 0,
  roots: [], // by offset; undefined: not fetched yet
  pending: new Map(), // page number -> promise
  rows: [],
  rootRow: [], // offset -> row index
  active: 0,
  focusKey: null,
  generation: 0, // bumps when level or sort change, so stale pages are dropped
  firstRowsPainted: false,
};

// ---- data -----------------------------------------------------------------------------------------------
function loadPage(page) {
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

async function loadChildren(node, offset = 0) {
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

async function expand(node) {
  if (node.childTotal === 0 || node.expanded) return;
  const started = performance.now();
  if (node.children === null) await loadChildren(node);
  if (node.children === null) return refresh(); // failed
  node.expanded = true;
  refresh();
  performance.measure("forest:expand", { start: started, end: performance.now() });
}

function collapse(node) {
  node.expanded = false;
  refresh();
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
function refresh() {
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
function scheduleRender() {
  if (!frame) frame = requestAnimationFrame(() => { frame = 0; render(); });
}

function render() {
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
  countEl.textContent = `${formatInt(state.total)} ${noun}`;
}

function showError(err) {
  const message = err instanceof ApiError && err.status === 404 ? `Run “${RUN}” not found.` : `Could not load the forest: ${err.message}`;
  replace(preview, h("div", { class: "error-box" }, message));
}

// ---- active row, keyboard, mouse ------------------------------------------------------------------------
function setActive(i, { scroll = true } = {}) {
  state.active = Math.max(0, Math.min(i, state.rows.length - 1));
  if (scroll) ensureVisible(state.active);
  render();
  schedulePreview();
}

function ensureVisible(i, { center = false } = {}) {
  const top = i * ROW_H;
  const height = treeEl.clientHeight;
  if (center) treeEl.scrollTop = Math.max(0, top - height / 2 + ROW_H / 2);
  else if (top < treeEl.scrollTop) treeEl.scrollTop = top;
  else if (top + ROW_H > treeEl.scrollTop + height) treeEl.scrollTop = top + ROW_H - height;
}

function activate(row) {
  if (row.more) loadChildren(row.node, row.loaded).then(refresh);
}

treeEl.addEventListener("keydown", (event) => {
  const row = state.rows[state.active];
  if (!row) return;
  const pageRows = Math.max(1, Math.floor(treeEl.clientHeight / ROW_H) - 1);
  switch (event.key) {
    case "ArrowDown": setActive(state.active + 1); break;
    case "ArrowUp": setActive(state.active - 1); break;
    case "PageDown": setActive(state.active + pageRows); break;
    case "PageUp": setActive(state.active - pageRows); break;
    case "Home": setActive(0); break;
    case "End": setActive(state.rows.length - 1); break;
    case "ArrowRight":
      if (row instanceof TreeNode && row.childTotal > 0) {
        if (!row.expanded) expand(row);
        else setActive(state.active + 1);
      }
      break;
    case "ArrowLeft":
      if (row instanceof TreeNode && row.expanded) collapse(row);
      else if (row.parentNode || row.node) setActive(state.rows.indexOf(row.parentNode || row.node));
      break;
    case " ":
      if (row instanceof TreeNode) (row.expanded ? collapse : expand)(row);
      else activate(row);
      break;
    case "Enter":
      if (row instanceof TreeNode) location.href = featurePath(RUN, row.level, row.index);
      else activate(row);
      break;
    default:
      return;
  }
  event.preventDefault();
});

treeEl.addEventListener("click", (event) => {
  const rowEl = event.target.closest(".tree-row");
  if (!rowEl || event.target.closest("a")) return;
  const i = Number(rowEl.dataset.row);
  const row = state.rows[i];
  treeEl.focus({ preventScroll: true });
  setActive(i, { scroll: false });
  if (row instanceof TreeNode && (event.target.closest(".twisty") || event.target.closest(".kids"))) {
    (row.expanded ? collapse : expand)(row);
  } else if (row?.more) {
    activate(row);
  }
});

treeEl.addEventListener("dblclick", (event) => {
  const rowEl = event.target.closest(".tree-row");
  const row = rowEl && state.rows[Number(rowEl.dataset.row)];
  if (row instanceof TreeNode && !event.target.closest(".twisty")) (row.expanded ? collapse : expand)(row);
});

treeEl.addEventListener("scroll", scheduleRender, { passive: true });
new ResizeObserver(scheduleRender).observe(treeEl);

// ---- preview pane ---------------------------------------------------------------------------------------
let previewAbort = null;
const schedulePreview = debounce(() => {
  const row = state.rows[state.active];
  if (row instanceof TreeNode) showPreview(row);
}, 140);

async function showPreview(node) {
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
    if (err.name !== "AbortError") replace(preview, h("div", { class: "error-box" }, err.message));
  }
}

function renderPreview(d, examples) {
  const pos = d.top_positive.slice(0, 8);
  replace(preview,
    h("div", { class: "muted mono" }, levelDot(d.level), " ", featureId(d.level, d.index),
      d.parent ? h("span", { class: "faint" }, " · child of ",
        h("a", { href: featurePath(RUN, d.parent.level, d.parent.index), title: d.parent.label ?? "" },
          featureId(d.parent.level, d.parent.index))) : null),
    h("h1", { class: d.label ? "" : "unlabelled" }, d.label || "Unlabelled feature"),
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

// ---- search ---------------------------------------------------------------------------------------------
const searchInput = document.getElementById("search");
const searchList = document.getElementById("search-results");
let searchAbort = null;
let searchHits = [];
let searchActive = -1;

function closeSearch() {
  searchList.hidden = true;
  searchInput.setAttribute("aria-expanded", "false");
  searchInput.removeAttribute("aria-activedescendant");
}

function renderSearch() {
  replace(searchList, searchHits.length
    ? searchHits.map((hit, i) => h("li", {
        role: "option", id: `sr-${i}`, aria: { selected: String(i === searchActive) }, dataset: { i },
      }, levelDot(hit.level), h("span", { class: "fid" }, featureId(hit.level, hit.index)), featureName(hit),
      h("span", { class: "faint" }, hit.matched.join(", "))))
    : h("li", { class: "empty", role: "option", "aria-disabled": "true" }, "No matches"));
  searchList.hidden = false;
  searchInput.setAttribute("aria-expanded", "true");
  if (searchActive >= 0) searchInput.setAttribute("aria-activedescendant", `sr-${searchActive}`);
}

const runSearch = debounce(async () => {
  const q = searchInput.value.trim();
  searchAbort?.abort();
  if (!q) return closeSearch();
  searchAbort = new AbortController();
  try {
    const page = await api.search(RUN, { q, limit: 30 }, searchAbort.signal);
    searchHits = page.items;
    searchActive = searchHits.length ? 0 : -1;
    renderSearch();
  } catch (err) {
    if (err.name !== "AbortError") {
      searchHits = [];
      replace(searchList, h("li", { class: "empty" }, err.message));
      searchList.hidden = false;
    }
  }
}, 200);

function chooseHit(i) {
  const hit = searchHits[i];
  if (!hit) return;
  closeSearch();
  focusFeature(hit.level, hit.index);
}

searchInput.addEventListener("input", runSearch);
searchInput.addEventListener("keydown", (event) => {
  if (event.key === "ArrowDown" && searchHits.length) {
    searchActive = Math.min(searchActive + 1, searchHits.length - 1);
    renderSearch();
  } else if (event.key === "ArrowUp" && searchHits.length) {
    searchActive = Math.max(searchActive - 1, 0);
    renderSearch();
  } else if (event.key === "Enter") {
    chooseHit(searchActive);
  } else if (event.key === "Escape") {
    closeSearch();
  } else return;
  event.preventDefault();
});
searchList.addEventListener("mousedown", (event) => {
  const li = event.target.closest("li[data-i]");
  if (li) { event.preventDefault(); chooseHit(Number(li.dataset.i)); }
});
searchInput.addEventListener("blur", () => setTimeout(closeSearch, 150));

// ---- focus: ?focus=level:index expands the ancestors and highlights the node ----------------------------
/** Where a root sits in the current order: the server numbers the level with the listing's own order (ties
 * and dead features included), so only the page that holds it is fetched. -1 if that page does not hold it
 * (the list changed in between). */
async function locateRoot(level, index) {
  const { forest_offset: offset } = await api.position(RUN, level, index, { sort: state.sort });
  await loadPage(Math.floor(offset / PAGE));
  return state.roots[offset]?.key === keyOf(level, index) ? offset : -1;
}

async function focusFeature(level, index) {
  try {
    const chain = [await api.feature(RUN, level, index)];
    while (chain[0].parent) chain.unshift(await api.feature(RUN, chain[0].parent.level, chain[0].parent.index));
    if (chain[0].level !== state.level) await reset({ level: chain[0].level });
    await ready;
    const offset = await locateRoot(chain[0].level, chain[0].index);
    if (offset < 0) throw new Error(`${featureId(chain[0].level, chain[0].index)} is not in this level's list`);
    let node = state.roots[offset];
    for (const step of chain.slice(1)) {
      if (node.children === null) await loadChildren(node);
      let child = node.children.find((c) => c?.index === step.index);
      while (!child && node.children.length < node.childTotal) {
        await loadChildren(node, node.children.length);
        child = node.children.find((c) => c?.index === step.index);
      }
      if (!child) throw new Error(`${featureId(step.level, step.index)} is missing from its parent's children`);
      node.expanded = true;
      node = child;
    }
    state.focusKey = node.key;
    refresh();
    const at = state.rows.indexOf(node);
    state.active = at;
    ensureVisible(at, { center: true });
    render();
    treeEl.focus({ preventScroll: true });
    showPreview(node);
    history.replaceState(null, "", forestFocusPath(RUN, level, index) + (state.sort !== "density" ? `&sort=${state.sort}` : ""));
  } catch (err) {
    showError(err);
  }
}

// ---- level and sort -------------------------------------------------------------------------------------
let ready = Promise.resolve();

function reset({ level = state.level, sort = state.sort } = {}) {
  state.generation += 1;
  Object.assign(state, { level, sort, total: 0, roots: [], pending: new Map(), rows: [], rootRow: [], active: 0 });
  levelSelect.value = String(level);
  sortSelect.value = sort;
  treeEl.scrollTop = 0;
  ready = loadPage(0);
  return ready;
}

levelSelect.addEventListener("change", () => reset({ level: Number(levelSelect.value) }));
sortSelect.addEventListener("change", () => {
  reset({ sort: sortSelect.value });
  const url = new URL(location.href);
  url.searchParams.set("sort", sortSelect.value);
  url.searchParams.delete("focus");
  history.replaceState(null, "", url);
});

async function init() {
  const params = new URLSearchParams(location.search);
  const sort = params.get("sort");
  if (sort && [...sortSelect.options].some((o) => o.value === sort)) state.sort = sort;
  const firstPage = reset({ level: 0, sort: state.sort }); // in parallel with the run's description
  try {
    const run = await api.run(RUN);
    replace(levelSelect, run.level_widths.map((width, level) =>
      h("option", { value: level }, `${level === 0 ? "0 · roots" : level} (${formatInt(width)})`)));
    levelSelect.value = String(state.level);
  } catch (err) {
    showError(err);
    return;
  }
  const focus = /^(\d+):(\d+)$/.exec(params.get("focus") || "");
  await firstPage;
  if (focus) await focusFeature(Number(focus[1]), Number(focus[2]));
  else if (state.rows.length) schedulePreview();
}

init();
