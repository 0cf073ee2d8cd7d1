// The search box: a combobox over the run's search API (labels, notes, top tokens); choosing a hit focuses it
// in the tree.
import { api } from "../api.js";
import { debounce, h, replace } from "../dom.js";
import { featureId } from "../format.js";
import { featureName, levelDot } from "../widgets.js";
import { focusFeature } from "./focus.js";
import { RUN, els } from "./state.js";

let searchAbort = null;
let searchHits = [];
let searchActive = -1;

function closeSearch() {
  els.searchResults.hidden = true;
  els.search.setAttribute("aria-expanded", "false");
  els.search.removeAttribute("aria-activedescendant");
}

function renderSearch() {
  const { search: searchInput, searchResults: searchList } = els;
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
  const q = els.search.value.trim();
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
      replace(els.searchResults, h("li", { class: "empty" }, err.message));
      els.searchResults.hidden = false;
    }
  }
}, 200);

function chooseHit(i) {
  const hit = searchHits[i];
  if (!hit) return;
  closeSearch();
  focusFeature(hit.level, hit.index);
}

function onKeydown(event) {
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
}

export function bindSearch() {
  els.search.addEventListener("input", runSearch);
  els.search.addEventListener("keydown", onKeydown);
  els.searchResults.addEventListener("mousedown", (event) => {
    const li = event.target.closest("li[data-i]");
    if (li) { event.preventDefault(); chooseHit(Number(li.dataset.i)); }
  });
  els.search.addEventListener("blur", () => setTimeout(closeSearch, 150));
}
