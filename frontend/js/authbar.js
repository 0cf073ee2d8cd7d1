// The write-access control in the top bar: local mode says so; otherwise the user may paste a write token.
import { auth } from "./api.js";
import { h, replace } from "./dom.js";

export function mountAuthBar(slot) {
  if (!slot) return;
  const render = () => {
    if (auth.local) {
      replace(slot, h("span", { class: "auth-state writable", title: "The server runs with --local: annotations can be edited" }, "Local · writes on"));
      return;
    }
    if (auth.mode === "off") {
      replace(slot, h("span", { class: "auth-state", title: "This server has no write token configured (HSAE_WRITE_TOKEN) and does not run with --local" }, "Read-only server"));
      return;
    }
    const state = auth.token()
      ? h("span", { class: "auth-state writable", title: "A write token is stored in this browser" }, "Write token set")
      : h("span", { class: "auth-state", title: "Annotations are read-only without a write token" }, "Read-only");
    const button = h("button", { class: "btn small", type: "button", aria: { expanded: "false", haspopup: "dialog" } },
      auth.token() ? "Change token" : "Paste write token");
    const popover = buildPopover(() => { popover.hidden = true; button.setAttribute("aria-expanded", "false"); });
    popover.hidden = true;
    button.addEventListener("click", () => {
      popover.hidden = !popover.hidden;
      button.setAttribute("aria-expanded", String(!popover.hidden));
      if (!popover.hidden) popover.querySelector("input").focus();
    });
    replace(slot, state, button, popover);
  };
  render();
  window.addEventListener("hsae:auth", render);
}

function buildPopover(close) {
  const input = h("input", {
    class: "input", type: "password", placeholder: "Bearer token", autocomplete: "off", "aria-label": "Write token",
    value: auth.token(),
  });
  const save = () => { auth.setToken(input.value.trim()); close(); };
  input.addEventListener("keydown", (e) => {
    if (e.key === "Enter") save();
    if (e.key === "Escape") close();
  });
  return h("div", { class: "auth-popover", role: "dialog", "aria-label": "Write token" },
    h("p", {}, "Annotation edits need the server's write token (HSAE_WRITE_TOKEN). It stays in this browser's storage."),
    input,
    h("div", { class: "row", style: { display: "flex", gap: "8px", justifyContent: "flex-end" } },
      h("button", { class: "btn small", type: "button", onclick: () => { auth.setToken(""); close(); } }, "Forget"),
      h("button", { class: "btn small primary", type: "button", onclick: save }, "Save")));
}
