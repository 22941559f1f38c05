// Inline SVG charts of the region metrics: every number is the server's (`region-metrics`
// rows); the charts only draw them.
import { s } from "./dom";
import type { TeamMetricsRow as Row } from "@fieldsync/client";

export const STATUS_ORDER = [
  "new",
  "assigned",
  "en_route",
  "in_progress",
  "on_hold",
  "completed",
  "closed",
  "cancelled",
];
// Colour-blind-safe (Okabe-Ito) and labelled in a legend: colour is never the only cue.
const COLOURS: Record<string, string> = {
  new: "#999999",
  assigned: "#0072B2",
  en_route: "#56B4E9",
  in_progress: "#E69F00",
  on_hold: "#CC79A7",
  completed: "#009E73",
  closed: "#005a44",
  cancelled: "#D55E00",
};

const WIDTH = 560;
const BAR = 22;
const GAP = 10;
const LABEL = 110;

function teamName(row: Row): string {
  return row.team ?? "(no team)";
}

/** One stacked bar per team: its work orders by status. */
export function statusChart(rows: Row[]): SVGElement {
  const max = Math.max(1, ...rows.map((row) => row.total));
  const height = rows.length * (BAR + GAP) + 60;
  const svg = s("svg", {
    viewBox: `0 0 ${WIDTH} ${height}`,
    role: "img",
    "aria-label": "Work orders by status, per team",
    class: "chart",
  });
  rows.forEach((row, i) => {
    const y = i * (BAR + GAP);
    svg.append(s("text", { x: 0, y: y + BAR * 0.7, class: "label" }, teamName(row)));
    let x = LABEL;
    const counts = row.by_status;
    const others = Object.keys(counts).filter((status) => !STATUS_ORDER.includes(status));
    for (const status of [...STATUS_ORDER, ...others]) {
      const count = counts[status];
      if (!count) continue;
      const width = (count / max) * (WIDTH - LABEL - 40);
      svg.append(
        s(
          "rect",
          { x, y, width, height: BAR, fill: COLOURS[status] ?? "#444444" },
          s("title", {}, `${teamName(row)}: ${count} ${status || "no status"}`),
        ),
      );
      x += width;
    }
    svg.append(s("text", { x: x + 4, y: y + BAR * 0.7, class: "value" }, String(row.total)));
  });
  // The legend, four to a row.
  STATUS_ORDER.forEach((status, i) => {
    const lx = (i % 4) * 130;
    const ly = rows.length * (BAR + GAP) + 20 + Math.floor(i / 4) * 20;
    svg.append(s("rect", { x: lx, y: ly - 10, width: 10, height: 10, fill: COLOURS[status] }));
    svg.append(s("text", { x: lx + 14, y: ly, class: "legend" }, status.replace("_", " ")));
  });
  return svg;
}

/** One bar per team of a single figure (overdue, hours to complete, first-time-fix %). */
export function barChart(
  rows: Row[],
  label: string,
  value: (row: Row) => number | null,
  format: (value: number) => string,
): SVGElement {
  const values = rows.map(value);
  const max = Math.max(1e-9, ...values.map((v) => v ?? 0));
  const height = rows.length * (BAR + GAP);
  const svg = s("svg", {
    viewBox: `0 0 ${WIDTH} ${Math.max(height, BAR)}`,
    role: "img",
    "aria-label": label,
    class: "chart",
  });
  rows.forEach((row, i) => {
    const y = i * (BAR + GAP);
    const v = values[i];
    svg.append(s("text", { x: 0, y: y + BAR * 0.7, class: "label" }, teamName(row)));
    const width = v === null ? 0 : (v / max) * (WIDTH - LABEL - 90);
    svg.append(s("rect", { x: LABEL, y, width, height: BAR, class: "bar" }));
    svg.append(
      s("text", { x: LABEL + width + 4, y: y + BAR * 0.7, class: "value" }, v === null ? "—" : format(v)),
    );
  });
  return svg;
}
