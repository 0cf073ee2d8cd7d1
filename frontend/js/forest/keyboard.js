// Keyboard and mouse on the tree: arrows, Page Up/Down, Home/End, Space and Enter (the WAI-ARIA tree view
// pattern), clicks on the twisty or child count, double clicks, and re-rendering as the tree scrolls or resizes.
import { featurePath } from "../api.js";
import { ROW_H, RUN, TreeNode, els, state } from "./state.js";
import { collapse, expand, loadChildren, refresh, scheduleRender, setActive } from "./tree.js";

/** A "load more children" row: fetch the next page of its parent's children. */
function activate(row) {
  if (row.more) loadChildren(row.node, row.loaded).then(refresh);
}

function onKeydown(event) {
  const row = state.rows[state.active];
  if (!row) return;
  const pageRows = Math.max(1, Math.floor(els.tree.clientHeight / ROW_H) - 1);
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
}

function onClick(event) {
  const rowEl = event.target.closest(".tree-row");
  if (!rowEl || event.target.closest("a")) return;
  const i = Number(rowEl.dataset.row);
  const row = state.rows[i];
  els.tree.focus({ preventScroll: true });
  setActive(i, { scroll: false });
  if (row instanceof TreeNode && (event.target.closest(".twisty") || event.target.closest(".kids"))) {
    (row.expanded ? collapse : expand)(row);
  } else if (row?.more) {
    activate(row);
  }
}

function onDoubleClick(event) {
  const rowEl = event.target.closest(".tree-row");
  const row = rowEl && state.rows[Number(rowEl.dataset.row)];
  if (row instanceof TreeNode && !event.target.closest(".twisty")) (row.expanded ? collapse : expand)(row);
}

export function bindTree() {
  const treeEl = els.tree;
  treeEl.addEventListener("keydown", onKeydown);
  treeEl.addEventListener("click", onClick);
  treeEl.addEventListener("dblclick", onDoubleClick);
  treeEl.addEventListener("scroll", scheduleRender, { passive: true });
  new ResizeObserver(scheduleRender).observe(treeEl);
}
