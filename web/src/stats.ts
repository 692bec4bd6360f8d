// The statistics strip: risk points in the current view by sector and level, from /query/h3
// (one call per sector, each giving its counts by level), drawn as stacked SVG bars.

import type * as maplibregl from "maplibre-gl";
import { apiGet, type Sector } from "./api";
import { named, t } from "./i18n";
import type { LayerPanel } from "./panel";
import { LEVELS } from "./panel";

// The coarsest resolution: totals do not depend on it and it groups the fewest cells.
const RESOLUTION = 3;
const SVG_NS = "http://www.w3.org/2000/svg";

export interface SectorCounts {
  sector: Sector;
  byLevel: Record<number, number>;
  total: number;
}

export class StatsStrip {
  private timer: number | undefined;
  private generation = 0;
  private last: SectorCounts[] = [];

  constructor(private map: maplibregl.Map, private panel: LayerPanel, private sectors: Sector[],
              private levelColours: Record<number, string>) {
    map.on("moveend", () => this.schedule());
    panel.onFilterChange(() => this.schedule());
    window.addEventListener("resize", () => this.draw());
  }

  schedule(): void {
    window.clearTimeout(this.timer);
    this.timer = window.setTimeout(() => void this.update(), 300);
  }

  async update(): Promise<void> {
    const generation = ++this.generation;
    const b = this.map.getBounds();
    const bbox = [Math.max(b.getWest(), -180), Math.max(b.getSouth(), -90),
      Math.min(b.getEast(), 180), Math.min(b.getNorth(), 90)].map((v) => v.toFixed(5)).join(",");
    const levels = this.panel.levelParam();
    const chosen = this.sectors.filter((s) => this.panel.filters.sectors.has(s.code));
    const empty = this.panel.filters.levels.size === 0;
    const counts = await Promise.all(chosen.map(async (sector) => {
      const answer = empty ? null : await apiGet("/query/h3", { query: {
        res: RESOLUTION, bbox, sector: sector.code, level: levels?.join(","),
      } });
      const byLevel: Record<number, number> = {};
      for (const cell of answer?.cells ?? []) {
        for (const [level, n] of Object.entries(cell.by_level)) {
          byLevel[Number(level)] = (byLevel[Number(level)] ?? 0) + n;
        }
      }
      return { sector, byLevel, total: answer?.total ?? 0 };
    }));
    if (generation !== this.generation) return;
    this.last = counts;
    this.draw();
  }

  current(): SectorCounts[] {
    return this.last;
  }

  draw(): void {
    const svg = document.getElementById("stats-chart") as unknown as SVGSVGElement;
    const width = svg.clientWidth || 800;
    const height = svg.clientHeight || 90;
    svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
    svg.replaceChildren();
    const total = this.last.reduce((sum, c) => sum + c.total, 0);
    document.getElementById("stats-total")!.textContent =
      `${t("stats.total")} ${total.toLocaleString()} · ` + LEVELS.map((level) =>
        `${t(`level.${level}`)} ${this.last.reduce((s, c) => s + (c.byLevel[level] ?? 0), 0)
          .toLocaleString()}`).join(" · ");
    const max = Math.max(1, ...this.last.map((c) => c.total));
    const column = width / Math.max(1, this.last.length);
    const labelHeight = 22;
    const barArea = height - labelHeight - 4;
    this.last.forEach((counts, index) => {
      const x = index * column + column * 0.15;
      const barWidth = column * 0.7;
      let y = barArea;
      // Stacked from the least serious level at the bottom, red on top.
      for (const level of [...LEVELS].reverse()) {
        const n = counts.byLevel[level] ?? 0;
        const h = (n / max) * (barArea - 14);
        y -= h;
        const rect = document.createElementNS(SVG_NS, "rect");
        rect.setAttribute("x", String(x));
        rect.setAttribute("y", String(y));
        rect.setAttribute("width", String(barWidth));
        rect.setAttribute("height", String(h));
        rect.setAttribute("fill", this.levelColours[level]);
        const tip = document.createElementNS(SVG_NS, "title");
        tip.textContent = `${named(counts.sector)} · `
          + `${t(`level.${level}`)}: ${n}`;
        rect.append(tip);
        svg.append(rect);
      }
      svg.append(text(x + barWidth / 2, y - 3, counts.total.toLocaleString(), "stats-count"));
      const label = text(x + barWidth / 2, height - 6,
        named(counts.sector), "stats-label");
      label.dataset.sector = counts.sector.code;
      label.dataset.total = String(counts.total);
      svg.append(label);
    });
  }
}

function text(x: number, y: number, content: string, className: string): SVGTextElement {
  const node = document.createElementNS(SVG_NS, "text");
  node.setAttribute("x", String(x));
  node.setAttribute("y", String(y));
  node.setAttribute("text-anchor", "middle");
  node.setAttribute("class", className);
  node.textContent = content;
  return node;
}
