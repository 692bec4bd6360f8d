// The right-hand card: a risk point (its owners, plan, nearest teams and the route of the
// nearest one) or any clicked spot (its owners and what is reachable by road in 5/10/15 min).

import * as maplibregl from "maplibre-gl";
import {
  ApiError, apiGet, apiRequest, type Located, type Plan, type ReachAnswer, type RiskPoint,
  type RoadTeam, type Sector, type Unit,
} from "./api";
import { lngLats } from "./bounds";
import { deleteButton, type FormHost, reportForm, RISK_ITEMS, riskForm } from "./edit";
import type { EventKind } from "./events";
import { named, t } from "./i18n";
import { setOverlay } from "./map";
import type { BuildingProperties } from "./view3d";

export const REACH_MINUTES = [15, 10, 5];
const NEAREST_K = 3;

/** What the card's forms need from the rest of the page (main.ts wires them). */
export interface CardHooks {
  reloadLayer(layerId: string): void;
  reported(id: number): void;
  kinds(): Promise<EventKind[]>;
  askForKey(): void;
}

export class Card implements FormHost {
  private box = document.getElementById("card")!;
  private rerender: (() => void) | null = null;
  // Bumped on every open so a slow answer for an older click never overwrites a newer card.
  private generation = 0;
  // The risk point shown, for a push that changes it.
  shownRiskPoint: number | null = null;
  private picker: ((lngLat: maplibregl.LngLat) => void) | null = null;
  hooks: CardHooks = { reloadLayer: () => undefined, reported: () => undefined,
    kinds: async () => [], askForKey: () => undefined };

  constructor(readonly map: maplibregl.Map, readonly sectors: Sector[],
              readonly levelColours: Record<number, string>) {}

  refresh(): void {
    this.rerender?.();
  }

  close(): void {
    this.generation += 1;
    this.box.hidden = true;
    this.rerender = null;
    this.shownRiskPoint = null;
    this.picker = null;
    this.map.getCanvas().style.cursor = "";
    for (const marker of document.querySelectorAll("#rp-marker")) marker.remove();
    for (const source of ["twin-route", "twin-reach", "twin-locate"]) setOverlay(this.map, source, []);
  }

  // FormHost: the forms of edit.ts draw into this card.
  show(...parts: HTMLElement[]): void {
    // A form replaces the card: a slower answer for what it showed (the reach) must not.
    this.generation += 1;
    this.rerender = null;
    this.box.hidden = false;
    this.box.replaceChildren(closeButton(() => this.close()), ...parts);
  }

  pick(handler: ((lngLat: maplibregl.LngLat) => void) | null): void {
    this.picker = handler;
  }

  /** A map click while a form waits for a spot: true when the form took it. */
  takeClick(lngLat: maplibregl.LngLat): boolean {
    const picker = this.picker;
    if (!picker) return false;
    picker(lngLat);
    return true;
  }

  reloadLayer(layerId: string): void {
    this.hooks.reloadLayer(layerId);
  }

  reported(id: number): void {
    this.hooks.reported(id);
  }

  kinds(): Promise<EventKind[]> {
    return this.hooks.kinds();
  }

  askForKey(): void {
    this.hooks.askForKey();
  }

  private begin(): number {
    this.close();
    this.box.hidden = false;
    this.box.replaceChildren(el("p", "muted", t("card.loading")));
    return this.generation;
  }

  async openRiskPoint(featureId: number): Promise<void> {
    const generation = this.begin();
    this.shownRiskPoint = featureId;
    let item;
    try {
      // With its ETag, for If-Match on an edit.
      item = await apiRequest<GeoJSON.Feature<GeoJSON.Point, RiskPoint>>("GET",
        `${RISK_ITEMS}/${featureId}`);
    } catch (error) {
      if (generation !== this.generation) return;
      this.show(el("p", "muted", error instanceof ApiError && error.status === 404
        ? t("edit.gone") : String(error)));
      return;
    }
    const feature = item.body;
    const etag = item.etag;
    const [lon, lat] = feature.geometry.coordinates;
    const point = { ...feature.properties, id: Number(feature.properties.id ?? feature.id) };
    const [located, teams, plan] = await Promise.all([
      apiGet("/query/locate", { query: { lon, lat, k: 1 } }),
      apiGet("/query/nearest-teams",
        { query: { lon, lat, k: NEAREST_K, mode: "road", route: true } }),
      point.plan_id === null ? Promise.resolve(null)
        : apiGet("/emergency-plans/{plan_id}", { path: { plan_id: point.plan_id } }),
    ]);
    if (generation !== this.generation) return;
    setOverlay(this.map, "twin-locate", [{ type: "Feature", geometry: feature.geometry,
      properties: { colour: this.levelColours[point.level] } }]);
    this.rerender = () => this.renderRiskPoint(point, located, teams.features, plan,
      [lon, lat], etag);
    this.rerender();
  }

  private renderRiskPoint(point: RiskPoint, located: Located,
                          teams: Array<GeoJSON.Feature<GeoJSON.Point, RoadTeam>>,
                          plan: Plan | null, where: [number, number], etag: string | null): void {
    const sector = this.sectors.find((s) => s.code === point.sector_code);
    const level = el("span", "level-badge", t(`level.${point.level}`));
    level.style.background = this.levelColours[point.level];
    const title = el("h2", "card-title", point.name);
    title.dataset.riskPoint = String(point.id);
    const rows = el("dl", "facts");
    addFact(rows, t("card.sector"), sector ? named(sector)
      : point.sector_code);
    addFact(rows, t("card.category"), point.category);
    addFact(rows, t("card.level"), level);
    if (point.address) addFact(rows, t("edit.address"), point.address);
    addOwners(rows, located);
    const planBox = el("div", "plan");
    planBox.append(el("h3", "", t("card.plan")));
    if (plan) {
      planBox.append(el("p", "plan-title", `${named(plan,
        "title")} (${plan.code})`), el("p", "muted", plan.summary));
    } else {
      planBox.append(el("p", "muted", t("card.noPlan")));
    }
    const teamList = el("ol", "teams");
    for (const team of teams) teamList.append(teamItem(team.properties));
    const routeButton = el("button", "route-button", t("card.route")) as HTMLButtonElement;
    routeButton.id = "route-button";
    const nearest = teams.find((f) => f.properties.route);
    routeButton.disabled = !nearest;
    routeButton.addEventListener("click", () => {
      if (!nearest) return;
      this.drawRoute(nearest);
      routeButton.textContent = t("card.routeShown");
    });
    const edit = el("button", "", t("edit.edit")) as HTMLButtonElement;
    edit.id = "rp-edit";
    edit.addEventListener("click", () => {
      const rerender = this.rerender;
      riskForm(this, { id: point.id, point: where, etag, fields: { name: point.name,
        level: point.level, sector_code: point.sector_code, category: point.category,
        address: point.address ?? "" } }, () => {
        this.rerender = rerender;
        this.refresh();
      });
    });
    const editing = el("div", "edit-box row");
    editing.append(edit, deleteButton(this, point.id, etag));
    this.box.replaceChildren(closeButton(() => this.close()), title, rows, planBox,
      el("h3", "", t("card.teams")), teamList, routeButton, editing);
  }

  private drawRoute(team: GeoJSON.Feature<GeoJSON.Point, RoadTeam>): void {
    const route = team.properties.route!;
    setOverlay(this.map, "twin-route", [{ type: "Feature", geometry: route,
      properties: { team_id: team.properties.id } }]);
    const bounds = new maplibregl.LngLatBounds();
    for (const position of lngLats(route.coordinates)) bounds.extend(position);
    if (!bounds.isEmpty()) this.map.fitBounds(bounds, { padding: 120, maxZoom: 16, duration: 600 });
  }

  /** A building picked in the 3D view: its tileset properties (id, name, use, height, floors,
   *  CIM grade, roof) and the district and street it belongs to, named from the features API. */
  async openBuilding(building: BuildingProperties): Promise<void> {
    const generation = this.begin();
    const units = await Promise.all(([["districts", building.district_code],
      ["streets", building.street_code]] as const).map(([collection, code]) =>
      code ? unitNamed(collection, code) : Promise.resolve(null)));
    if (generation !== this.generation) return;
    this.rerender = () => this.renderBuilding(building, units[0], units[1]);
    this.rerender();
  }

  private renderBuilding(building: BuildingProperties, district: Unit | null,
                         street: Unit | null): void {
    const title = el("h2", "card-title", building.name || `${t("card.building")} ${building.id}`);
    title.dataset.building = String(building.id);
    const rows = el("dl", "facts");
    const id = el("code", "", String(building.id));
    id.dataset.buildingId = String(building.id);
    addFact(rows, t("card.buildingId"), id);
    if (building.use) addFact(rows, t("card.use"), t(`use.${building.use}`));
    if (typeof building.height === "number") {
      addFact(rows, t("card.height"), `${building.height.toFixed(1)} m`);
    }
    if (typeof building.floors === "number") addFact(rows, t("card.floors"), String(building.floors));
    if (building.cim_level) {
      addFact(rows, t("card.cim"), `CIM${building.cim_level} · ${t(`cim.${building.cim_level}`)}`);
    }
    if (building.roof_type) addFact(rows, t("card.roof"), t(`roof.${building.roof_type}`));
    for (const [level, code, unit] of [["district", building.district_code, district],
      ["street", building.street_code, street]] as const) {
      if (!code) continue;
      const value = el("span", "", unit ? `${named(unit)} ` : "");
      const codeBox = el("code", "", code);
      codeBox.dataset.unit = level;
      value.append(codeBox);
      addFact(rows, t(`card.${level}`), value);
    }
    this.box.replaceChildren(closeButton(() => this.close()), title, rows);
  }

  /** Any other spot: who owns it, and the area reachable by road in 5, 10 and 15 minutes. */
  async openLocation(lon: number, lat: number): Promise<void> {
    const generation = this.begin();
    setOverlay(this.map, "twin-locate", [{ type: "Feature", properties: {},
      geometry: { type: "Point", coordinates: [lon, lat] } }]);
    let located: Located;
    try {
      located = await apiGet("/query/locate", { query: { lon, lat, k: 1 } });
    } catch (error) {
      if (generation !== this.generation) return;
      const outside = error instanceof ApiError && error.status === 404;
      this.box.replaceChildren(closeButton(() => this.close()),
        el("p", "muted", outside ? t("card.outside") : String(error)));
      return;
    }
    if (generation !== this.generation) return;
    // One render once the reach is drawn too (tests/test_web.py reads the owners as the sign
    // that the reach overlay is there).
    const reach = await this.reach(lon, lat).catch(() => null);
    if (generation !== this.generation) return;
    this.rerender = () => this.renderLocation(located, reach ?? []);
    this.rerender();
  }

  private async reach(lon: number, lat: number): Promise<ReachResult[]> {
    const results = await Promise.all(REACH_MINUTES.map((minutes) =>
      apiGet("/query/reach", { query: { lon, lat, minutes, mode: "road" } })
        .then((answer) => ({ minutes, answer }))));
    const polygons = results.filter((r) => r.answer.features.length > 0).map((r) => ({
      type: "Feature" as const, geometry: r.answer.features[0].geometry,
      properties: { minutes: r.minutes },
    }));
    setOverlay(this.map, "twin-reach", polygons);
    return results;
  }

  private renderLocation(located: Located, reach: ReachResult[]): void {
    const { lon, lat } = located.point;
    const title = el("h2", "card-title", `${t("card.location")} ${lon.toFixed(5)}, `
      + lat.toFixed(5));
    const rows = el("dl", "facts");
    addOwners(rows, located);
    const back = () => {
      const rerender = this.rerender;
      return () => {
        this.rerender = rerender;
        this.refresh();
      };
    };
    const report = el("button", "primary", t("report.open")) as HTMLButtonElement;
    report.id = "report-event";
    report.addEventListener("click", () => void reportForm(this, lon, lat, back()));
    const create = el("button", "", t("edit.create")) as HTMLButtonElement;
    create.id = "rp-create";
    create.addEventListener("click", () => riskForm(this, { id: null, point: [lon, lat],
      etag: null, fields: { name: "", level: 3, sector_code: this.sectors[0]?.code ?? "",
        category: "", address: "" } }, back()));
    const actions = el("div", "row card-actions");
    actions.append(report, create);
    const parts: HTMLElement[] = [closeButton(() => this.close()), title, rows, actions];
    if (reach.length) {
      parts.push(el("h3", "", t("card.reach")));
      const list = el("ul", "reach");
      for (const { minutes, answer } of [...reach].reverse()) {
        list.append(el("li", "", `${minutes} ${t("minutes")}: ${summarise(answer)}`));
      }
      parts.push(list);
    }
    const responsible = located.responsible_teams.slice(0, 5);
    if (responsible.length) {
      parts.push(el("h3", "", t("card.responsible")));
      const list = el("ul", "teams");
      for (const team of responsible) {
        list.append(el("li", "", `${named(team)} · ${t(`team.${team.team_type}`)}`));
      }
      parts.push(list);
    }
    this.box.replaceChildren(...parts);
  }
}

interface ReachResult {
  minutes: number;
  answer: ReachAnswer;
}

// One line per budget: the area and what lies in it (risk points, hazard sources, buildings).
function summarise(answer: ReachAnswer): string {
  const area = answer.features[0]?.properties?.area_km2 as number | undefined;
  const summary = answer.summary ?? {};
  const parts = area === undefined ? [] : [`${area.toFixed(1)} km²`];
  for (const key of ["risk_points", "hazard_sources", "buildings"]) {
    const total = summary[key]?.total;
    if (typeof total === "number") parts.push(`${t(`reach.${key}`)} ${total.toLocaleString()}`);
  }
  return parts.join(" · ");
}

/** An admin unit's names by its code (null when the features API has none). */
async function unitNamed(collection: "districts" | "streets", code: string): Promise<Unit | null> {
  try {
    const answer = await apiGet("/collections/{collection_id}/items", {
      path: { collection_id: collection },
      query: { filter: `code = '${code.replace(/'/g, "''")}'`, limit: 1,
        properties: "code,name_zh,name_en" },
    }) as GeoJSON.FeatureCollection;
    return (answer.features[0]?.properties as Unit | undefined) ?? null;
  } catch {
    return null;
  }
}

function addOwners(rows: HTMLElement, located: Located): void {
  for (const level of ["grid", "community", "street", "district"] as const) {
    const unit = located[level];
    const value = el("span", "", `${named(unit)} `);
    const code = el("code", "", unit.code);
    code.dataset.unit = level;
    value.append(code);
    addFact(rows, t(`card.${level}`), value);
  }
}

function teamItem(team: RoadTeam): HTMLElement {
  const minutes = team.travel_time_s === null ? t("card.unreachable")
    : `${(team.travel_time_s / 60).toFixed(1)} ${t("minutes")}`;
  const distance = team.network_distance_m === null ? ""
    : ` · ${(team.network_distance_m / 1000).toFixed(1)} km`;
  const item = el("li", "", `${named(team)} · `
    + `${t(`team.${team.team_type}`)} · ${minutes}${distance}`);
  item.dataset.teamId = String(team.id);
  return item;
}

function addFact(list: HTMLElement, term: string, value: string | HTMLElement): void {
  list.append(el("dt", "", term));
  const dd = el("dd", "", "");
  dd.append(value);
  list.append(dd);
}

function closeButton(onClick: () => void): HTMLElement {
  const button = el("button", "close", "×");
  button.title = t("card.close");
  button.addEventListener("click", onClick);
  return button;
}

export function el(tag: string, className = "", text = ""): HTMLElement {
  const node = document.createElement(tag);
  if (className) node.className = className;
  node.textContent = text;
  return node;
}
