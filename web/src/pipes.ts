// The pipe-anomaly panel: current anomaly zones by severity; choosing one zooms to it and shows
// the zone, the affected segments, the traced downstream network and what is at risk.
// ``?until=<ISO 8601>`` in the page's address shows the zones as of that moment.

import * as maplibregl from "maplibre-gl";
import { apiGet, type Query, type ZoneProperties } from "./api";
import { lngLats } from "./bounds";
import { el } from "./card";
import { named, t } from "./i18n";
import { setOverlay } from "./map";

type Zone = GeoJSON.Feature<GeoJSON.Polygon | GeoJSON.MultiPolygon, ZoneProperties>;
// The networks the server knows (the <select> in index.html offers them).
type Network = Query<"/query/pipe-anomalies">["network"];

export class PipePanel {
  private zones: Zone[] = [];
  private selected: Zone | null = null;
  private trace: GeoJSON.FeatureCollection | null = null;
  private available = false;

  constructor(private map: maplibregl.Map) {
    document.getElementById("pipe-refresh")!.addEventListener("click", () => void this.load());
    document.getElementById("pipe-network")!.addEventListener("change", () => void this.load());
  }

  private network(): Network {
    return (document.getElementById("pipe-network") as HTMLSelectElement).value as Network;
  }

  async load(): Promise<void> {
    this.select(null);
    try {
      const answer = await apiGet("/query/pipe-anomalies",
        { query: { network: this.network(), until: asOf() } });
      this.zones = answer.features.sort((a, b) => severityRank(b) - severityRank(a));
      this.available = true;
    } catch (error) {
      // Refused (a role without sensor access) or failed: the panel says so, the map goes on.
      console.warn("twin map: pipe anomalies unavailable:", error);
      this.zones = [];
      this.available = false;
    }
    this.renderList();
  }

  refresh(): void {
    this.renderList();
    this.renderDetail();
  }

  private renderList(): void {
    const list = document.getElementById("pipe-list")!;
    if (!this.available || this.zones.length === 0) {
      list.replaceChildren(el("li", "muted", t(this.available ? "pipes.none" : "pipes.unavailable")));
      return;
    }
    list.replaceChildren(...this.zones.map((zone, index) => {
      const p = zone.properties;
      const item = el("li", "zone", "");
      const button = el("button", "zone-button", "") as HTMLButtonElement;
      button.dataset.zone = String(zone.id ?? index);
      const badge = el("span", `severity severity-${p.severity_level}`,
        t(`severity.${p.severity_level}`));
      button.append(badge, document.createTextNode(` ${zoneLabel(zone)}`));
      button.addEventListener("click", () => void this.choose(zone));
      if (zone === this.selected) item.classList.add("selected");
      item.append(button);
      return item;
    }));
  }

  private select(zone: Zone | null): void {
    this.selected = zone;
    this.trace = null;
    setOverlay(this.map, "twin-zone", zone ? [zone] : []);
    setOverlay(this.map, "twin-trace", []);
    const ids = zone ? affectedIds(zone) : [];
    this.map.setFilter("twin-affected-segments", ["in", ["id"], ["literal", ids]]);
    this.renderDetail();
  }

  private async choose(zone: Zone): Promise<void> {
    this.select(zone);
    this.renderList();
    const bounds = new maplibregl.LngLatBounds();
    for (const ring of polygonsOf(zone.geometry)) for (const c of lngLats(ring)) bounds.extend(c);
    if (!bounds.isEmpty()) this.map.fitBounds(bounds, { padding: 160, maxZoom: 17, duration: 600 });
    const source = zone.properties.source_segment_id;
    if (source !== undefined) {
      const trace = await apiGet("/query/pipe-trace", { query: {
        segment_id: source, direction: "downstream", network: this.network() } });
      if (this.selected !== zone) return;
      this.trace = trace;
      setOverlay(this.map, "twin-trace", trace.features);
      this.renderDetail();
    }
  }

  private renderDetail(): void {
    const box = document.getElementById("pipe-detail")!;
    const zone = this.selected;
    if (!zone) {
      box.replaceChildren();
      return;
    }
    const p = zone.properties;
    const facts = el("dl", "facts");
    const add = (term: string, value: string) => facts.append(el("dt", "", term), el("dd", "", value));
    add(t("severity"), `${t(`severity.${p.severity_level}`)} (z ${p.severity})`);
    add(t("pipes.window"), `${shortTime(p.start)} – ${shortTime(p.end)}`);
    add(t("pipes.source"), String(p.source_segment_id));
    add(t("pipes.sensors"), p.sensors.map((s) => s.code).join("、"));
    add(t("pipes.segments"), String(p.affected_segment_ids.length));
    if (this.trace) {
      const segments = this.trace.features.filter((f) => f.geometry.type !== "Point").length;
      add(t("pipes.downstream"), String(segments));
    }
    const atRisk = el("div", "at-risk");
    atRisk.append(el("h3", "", t("pipes.atRisk")));
    const communities = el("p", "", `${t("pipes.communities")}: ${p.communities.length}`);
    const names = p.communities.slice(0, 8).map((c) => named(c));
    if (names.length) {
      communities.append(el("span", "muted",
        ` (${names.join("、")}${p.communities.length > 8 ? "…" : ""})`));
    }
    const levels = [1, 2, 3, 4].map((l) => `${t(`level.${l}`)} ${p.risk_points.by_level[l] ?? 0}`);
    atRisk.append(communities,
      el("p", "", `${t("pipes.riskPoints")}: ${p.risk_points.count} (${levels.join(" · ")})`),
      el("p", "", `${t("pipes.buildings")}: ${p.buildings.count}`));
    box.replaceChildren(facts, atRisk);
  }
}

/** ``?until=`` in the page's address: the zones as of that moment (an incident reviewed
 *  afterwards); by default the server's, the network's newest reading. */
function asOf(): string | undefined {
  return new URLSearchParams(location.search).get("until") ?? undefined;
}

function shortTime(iso: string): string {
  return iso.slice(5, 16).replace("T", " ");
}

function severityRank(zone: Zone): number {
  return Number(zone.properties.severity ?? 0);
}

function affectedIds(zone: Zone): number[] {
  const raw = zone.properties.affected_segment_ids;
  return (Array.isArray(raw) ? raw : []).map(Number);
}

function zoneLabel(zone: Zone): string {
  const p = zone.properties;
  const place = p.communities.length ? named(p.communities[0]) : "";
  return [shortTime(p.start), place].filter(Boolean).join(" · ");
}

function polygonsOf(geometry: GeoJSON.Polygon | GeoJSON.MultiPolygon): GeoJSON.Position[][] {
  return geometry.type === "Polygon" ? geometry.coordinates : geometry.coordinates.flat();
}
