// The forest page's shared state: the run, the layout constants, the page's elements, and the tree model.
//
// The tree is a virtual list: the visible rows (loaded roots, placeholders for roots not fetched yet, and the
// children of expanded nodes) are flattened into one array (`state.rows`) and only the rows in view are in the
// DOM, so a level with 10k+ roots scrolls like a short one.

export const RUN = document.body.dataset.run;
export const ROW_H = 30;
export const PAGE = 200; // roots per API page
export const CHILD_PAGE = 500;
export const OVERSCAN = 12;
export const INDENT = 20;

export const els = {
  tree: document.getElementById("tree"),
  spacer: document.getElementById("tree-spacer"),
  count: document.getElementById("forest-count"),
  level: document.getElementById("level"),
  sort: document.getElementById("sort"),
  preview: document.getElementById("preview"),
  search: document.getElementById("search"),
  searchResults: document.getElementById("search-results"),
};

export const keyOf = (level, index) => `${level}:${index}`;

export class TreeNode {
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

export const state = {
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
  ready: Promise.resolve(), // the first page of the current level and sort
};
