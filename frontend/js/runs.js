// `/`: the indexed runs.
import { api, runPath } from "./api.js";
import { mountAuthBar } from "./authbar.js";
import { h, replace } from "./dom.js";
import { formatInt } from "./format.js";

mountAuthBar(document.getElementById("auth"));

const target = document.getElementById("runs");

function row(run) {
  const enc = encodeURIComponent(run.name);
  return h("tr", { dataset: { run: run.name } },
    h("td", {}, h("a", { class: "run-link", href: runPath(run.name) }, run.name),
      run.arch === "sae-lens" ? h("div", { class: "sources faint", dataset: { sources: run.name } }) : null),
    h("td", {}, h("span", { class: "pill arch" }, run.arch)),
    h("td", {}, h("span", { title: run.hook }, run.model), h("span", { class: "faint" }, ` · layer ${run.layer}`)),
    h("td", { class: "num mono" }, run.level_widths.map(formatInt).join(" / ")),
    h("td", { class: "num" }, formatInt(run.n_tokens)),
    h("td", { class: "muted" }, new Date(run.created_at).toLocaleString()),
    h("td", {},
      h("a", { href: runPath(run.name) }, "Forest"), " · ",
      run.live ? h("a", { href: `/runs/${enc}/prompt` }, "Prompt") : h("span", { class: "faint", title: "No checkpoint for live prompts" }, "Prompt")));
}

/** Which sae-lens SAEs a run was indexed from (`hsae index-sae`): one folder per SAE, with its groups. */
function sourcesText(sources) {
  const bySae = new Map();
  for (const s of sources) {
    const name = s.path.split(/[\\/]/).filter(Boolean).pop();
    if (!bySae.has(s.path)) bySae.set(s.path, { name, arch: s.architecture, width: s.d_sae, groups: 0 });
    if (s.matryoshka_group !== null) bySae.get(s.path).groups += 1;
  }
  return [...bySae.values()].map((s) =>
    `${s.name} (${s.arch}, ${formatInt(s.width)}${s.groups ? `, ${s.groups} Matryoshka groups` : ""})`).join(" · ");
}

async function showSources(name) {
  const run = await api.run(name).catch(() => null);
  const slot = [...target.querySelectorAll("[data-sources]")].find((el) => el.dataset.sources === name);
  if (!run?.sources || !slot) return;
  slot.textContent = `from SAEs: ${sourcesText(run.sources)}`;
  slot.title = [...new Set(run.sources.map((s) => s.path))].join("\n");
}

async function load() {
  try {
    const page = await api.runs({ limit: 500 });
    document.getElementById("runs-count").textContent = `${formatInt(page.total)} run${page.total === 1 ? "" : "s"}`;
    if (!page.items.length) {
      replace(target, h("div", { class: "body" },
        h("p", { class: "empty" }, "No runs indexed yet."),
        h("p", { class: "muted" }, "Train and index one with ", h("code", {}, "hsae demo"), " or ",
          h("code", {}, "hsae index RUN_DIR"), ".")));
      return;
    }
    replace(target, h("table", { class: "runs-table" },
      h("thead", {}, h("tr", {},
        h("th", {}, "Run"), h("th", {}, "Arch"), h("th", {}, "Model"), h("th", { class: "num" }, "Level widths"),
        h("th", { class: "num" }, "Tokens indexed"), h("th", {}, "Indexed"), h("th", {}, "Open"))),
      h("tbody", {}, page.items.map(row))));
    for (const run of page.items) if (run.arch === "sae-lens") showSources(run.name);
  } catch (err) {
    replace(target, h("div", { class: "error-box" }, `Could not load runs: ${err.message}`));
  }
}

load();
