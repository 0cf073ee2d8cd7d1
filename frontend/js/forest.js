// `/runs/{run}`: the collapsible feature forest. This entry module wires the parts in forest/ together:
//   state.js     the run, layout constants, the page's elements, the tree model (TreeNode, state)
//   tree.js      fetching roots and children, the virtual list, the active row, level/sort reset
//   keyboard.js  keyboard and mouse on the tree
//   preview.js   the preview pane (and where errors show)
//   search.js    the search combobox
//   focus.js     ?focus=level:index and search hits: expand the ancestors, highlight the node
// and owns the level and sort selects and the page's start-up.
import { api } from "./api.js";
import { mountAuthBar } from "./authbar.js";
import { h, replace } from "./dom.js";
import { formatInt } from "./format.js";
import { focusFeature } from "./forest/focus.js";
import { bindTree } from "./forest/keyboard.js";
import { schedulePreview, showError } from "./forest/preview.js";
import { bindSearch } from "./forest/search.js";
import { RUN, els, state } from "./forest/state.js";
import { reset } from "./forest/tree.js";

mountAuthBar(document.getElementById("auth"));
bindTree();
bindSearch();

const { level: levelSelect, sort: sortSelect } = els;
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
    const source = (level) => {
      const s = run.sources?.[level];
      if (!s) return "";
      const folder = s.path.split(/[\\/]/).filter(Boolean).pop();
      return s.matryoshka_group !== null ? ` · ${folder} group ${s.matryoshka_group}` : ` · ${folder}`;
    };
    replace(levelSelect, run.level_widths.map((width, level) =>
      h("option", { value: level }, `${level === 0 ? "0 · roots" : level} (${formatInt(width)})${source(level)}`)));
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
