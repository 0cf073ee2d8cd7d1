// Number and token formatting shared by every page.

const intFormat = new Intl.NumberFormat("en-US");

export function formatInt(n) {
  return intFormat.format(n);
}

/** A fraction of tokens as a short percentage: 12.3%, 0.045%, 3.1e-5%. */
export function formatDensity(d) {
  if (!d) return "0%";
  const pct = d * 100;
  if (pct >= 10) return `${pct.toFixed(1)}%`;
  if (pct >= 0.01) return `${pct.toPrecision(2)}%`;
  return `${pct.toExponential(1)}%`;
}

/** An activation or logit value with 3 significant digits. */
export function formatValue(v) {
  if (v === null || v === undefined || Number.isNaN(v)) return "–";
  const a = Math.abs(v);
  if (a === 0) return "0";
  if (a >= 1000 || a < 0.001) return v.toExponential(2);
  return v.toPrecision(3).replace(/\.?0+$/, (m) => (m.includes(".") ? "" : m));
}

export function formatProb(p) {
  return p === null || p === undefined ? "–" : p.toFixed(2);
}

/** Width (0..1) of a density bar: log scale over 1e-6 .. 1, so rare and common features both show. */
export function densityWidth(d) {
  if (!d || d <= 0) return 0;
  return Math.max(0.02, Math.min(1, (Math.log10(d) + 6) / 6));
}

export function featureId(level, index) {
  return `L${level} #${index}`;
}

/** How a token reads inside a text strip: newlines and tabs made visible, everything else as is. */
export function tokenText(token) {
  return token.replace(/\n/g, "↵").replace(/\t/g, "⇥").replace(/\r/g, "");
}

/** A token alone (a chip or a chart label): spaces at its ends made visible too. */
export function tokenLabel(token) {
  const shown = tokenText(token).replace(/^ +| +$/g, (m) => "·".repeat(m.length));
  return shown === "" ? "∅" : shown;
}

/** Escape for plotly labels, which read a few HTML tags and entities: tokens must show literally. */
export function plotlyText(text) {
  return text.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;");
}

/** Background of a token holding `value` when the strongest value shown is `max`. */
export function activationColor(value, max) {
  if (!(value > 0) || !(max > 0)) return "";
  const alpha = Math.min(1, value / max) * 0.85 + 0.06;
  return `rgba(var(--act), ${alpha.toFixed(3)})`;
}
