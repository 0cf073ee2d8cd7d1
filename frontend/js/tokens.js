// Token strips: each token a span shaded by its activation, its value in the title (shown on hover).
import { h } from "./dom.js";
import { activationColor, formatValue, tokenText } from "./format.js";

/** One token span. `label` names the value in the tooltip (e.g. the feature). */
function tokenSpan(token, value, max, { label = "activation", extraClass = "" } = {}) {
  const span = h("span", {
    class: `tok${token.includes("\n") ? " nl" : ""}${extraClass ? ` ${extraClass}` : ""}`,
    title: `${JSON.stringify(token)}  ${label} ${formatValue(value ?? 0)}`,
    dataset: { value: String(value ?? 0) },
    text: tokenText(token),
  });
  const background = activationColor(value, max);
  if (background) span.style.background = background;
  return span;
}

/**
 * A strip of tokens; with `window` set ([before, after]) only the tokens around `focus` show, with an
 * ellipsis on either cut side.
 */
export function tokenStrip(tokens, values, { max, focus = 0, window = null, label } = {}) {
  const scale = max ?? Math.max(0, ...values);
  let start = 0;
  let stop = tokens.length;
  if (window) {
    start = Math.max(0, focus - window[0]);
    stop = Math.min(tokens.length, focus + window[1] + 1);
  }
  const strip = h("div", { class: "strip" });
  if (start > 0) strip.append(h("span", { class: "ellipsis", text: "…" }));
  for (let i = start; i < stop; i++) {
    strip.append(tokenSpan(tokens[i], values[i], scale, { label, extraClass: i === focus && values[i] > 0 ? "hot" : "" }));
  }
  if (stop < tokens.length) strip.append(h("span", { class: "ellipsis", text: "…" }));
  return strip;
}
