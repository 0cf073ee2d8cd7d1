// Focusing a feature (`?focus=level:index`, or a search hit): switch to its root's level, expand its
// ancestors, highlight and preview it, and put it in the address bar.
import { api, forestFocusPath } from "../api.js";
import { featureId } from "../format.js";
import { showError, showPreview } from "./preview.js";
import { PAGE, RUN, els, keyOf, state } from "./state.js";
import { ensureVisible, loadChildren, loadPage, refresh, render, reset } from "./tree.js";

/** Where a root sits in the current order: the server numbers the level with the listing's own order (ties
 * and dead features included), so only the page that holds it is fetched. -1 if that page does not hold it
 * (the list changed in between). */
async function locateRoot(level, index) {
  const { forest_offset: offset } = await api.position(RUN, level, index, { sort: state.sort });
  await loadPage(Math.floor(offset / PAGE));
  return state.roots[offset]?.key === keyOf(level, index) ? offset : -1;
}

export async function focusFeature(level, index) {
  try {
    const chain = [await api.feature(RUN, level, index)];
    while (chain[0].parent) chain.unshift(await api.feature(RUN, chain[0].parent.level, chain[0].parent.index));
    if (chain[0].level !== state.level) await reset({ level: chain[0].level });
    await state.ready;
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
    els.tree.focus({ preventScroll: true });
    showPreview(node);
    history.replaceState(null, "", forestFocusPath(RUN, level, index) + (state.sort !== "density" ? `&sort=${state.sort}` : ""));
  } catch (err) {
    showError(err);
  }
}
