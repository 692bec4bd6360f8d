// The layer panel: sector and level filters (the risk tiles re-request with them) and a switch
// for each layer, uploaded collections included.

import type * as maplibregl from "maplibre-gl";
import type { Collection, Sector } from "./api";
import { lang, named, t } from "./i18n";
import {
  addCollectionLayer, filterRiskTiles, labelModel, type LayerFacts, setCollectionVisible,
  setVisible, STYLED_COLLECTIONS,
} from "./map";

export const LEVELS = [1, 2, 3, 4];

// Switch -> the style's layer ids it shows or hides (ids from tiles/style.py).
const STYLE_SWITCHES: Array<[string, string[], boolean]> = [
  ["layer.districts", ["districts-outline"], true],
  ["layer.streets", ["streets-outline"], true],
  ["layer.communities", ["communities-outline"], true],
  ["layer.grids", ["grids-outline"], true],
  ["layer.hexagons", ["risk-hexagons", "risk-hexagons-worst-level"], true],
  ["layer.risk_points", ["risk-points"], true],
  ["layer.teams", ["response-teams"], true],
  ["layer.pipes", ["pipe-segments"], true],
  ["layer.buildings", ["buildings-3d"], true],
];

export interface FilterState {
  sectors: Set<string>;
  levels: Set<number>;
}

export class LayerPanel {
  readonly filters: FilterState;
  private extra: Collection[] = [];
  private facts = new Map<string, LayerFacts>();
  private shown = new Map<string, boolean>();
  private changeListeners: Array<() => void> = [];

  constructor(private map: maplibregl.Map, private sectors: Sector[],
              private levelColours: Record<number, string>) {
    this.filters = { sectors: new Set(sectors.map((s) => s.code)), levels: new Set(LEVELS) };
    for (const [key, , on] of STYLE_SWITCHES) this.shown.set(key, on);
  }

  onFilterChange(listener: () => void): void {
    this.changeListeners.push(listener);
  }

  /** Every published collection the style does not draw (vector, raster and 3D); uploads
   *  appear here automatically. ``facts``: GET /layers' DEM flags and 3D anchors. */
  setCollections(collections: Collection[], facts: LayerFacts[] = []): void {
    for (const fact of facts) this.facts.set(fact.id, fact);
    this.extra = collections.filter((c) => !STYLED_COLLECTIONS.has(c.id));
    this.extra.forEach((collection, index) => {
      addCollectionLayer(this.map, collection, index, this.facts.get(collection.id));
      const key = `collection:${collection.id}`;
      if (!this.shown.has(key)) this.shown.set(key, collection.id === "supply_depots");
      setCollectionVisible(this.map, collection.id, this.shown.get(key)!);
    });
    this.render();
  }

  showCollection(id: string): void {
    this.shown.set(`collection:${id}`, true);
    setCollectionVisible(this.map, id, true);
    this.render();
  }

  render(): void {
    this.renderSectors();
    this.renderLevels();
    this.renderSwitches();
  }

  private renderSectors(): void {
    const box = document.getElementById("sector-filters")!;
    box.replaceChildren(...this.sectors.map((sector) =>
      checkbox(`sector-${sector.code}`, named(sector), this.filters.sectors.has(sector.code),
        (on) => this.toggle(this.filters.sectors, sector.code, on), { sector: sector.code })));
  }

  private renderLevels(): void {
    const box = document.getElementById("level-filters")!;
    box.replaceChildren(...LEVELS.map((level) => {
      const label = checkbox(`level-${level}`, t(`level.${level}`), this.filters.levels.has(level),
        (on) => this.toggle(this.filters.levels, level, on), { level: String(level) });
      const swatch = document.createElement("i");
      swatch.className = "swatch";
      swatch.style.background = this.levelColours[level];
      label.prepend(swatch);
      return label;
    }));
  }

  private renderSwitches(): void {
    const box = document.getElementById("layer-switches")!;
    const items = STYLE_SWITCHES.map(([key, ids]) =>
      checkbox(`layer-${key}`, t(key), this.shown.get(key)!, (on) => {
        this.shown.set(key, on);
        setVisible(this.map, ids, on && this.riskLayerAllowed(ids));
      }, { layer: key }));
    for (const collection of this.extra) {
      const key = `collection:${collection.id}`;
      const title = lang() === "zh" ? collection.title : collection.title_en;
      labelModel(collection, this.facts.get(collection.id), title);
      const marks = [collection.kind !== "vector" ? t(`kind.${collection.kind}`) : "",
        collection.origin && collection.origin !== "builtin" ? t("layers.uploaded") : ""]
        .filter(Boolean);
      const mark = marks.length ? ` (${marks.join(", ")})` : "";
      items.push(checkbox(`layer-${collection.id}`, title + mark, this.shown.get(key)!, (on) => {
        this.shown.set(key, on);
        setCollectionVisible(this.map, collection.id, on);
      }, { collection: collection.id, kind: collection.kind }));
    }
    box.replaceChildren(...items);
  }

  // With every sector or level unticked nothing matches: hide the risk layers rather than
  // send an empty filter (which the server reads as "no filter").
  private riskLayerAllowed(ids: string[]): boolean {
    const risk = ids.some((id) => id.startsWith("risk-"));
    return !risk || (this.filters.sectors.size > 0 && this.filters.levels.size > 0);
  }

  private toggle<T>(set: Set<T>, value: T, on: boolean): void {
    if (on) set.add(value);
    else set.delete(value);
    this.applyFilters();
    for (const listener of this.changeListeners) listener();
  }

  /** Comma lists for the API, or null for "everything" (no parameter sent). */
  sectorParam(): string[] | null {
    const all = this.filters.sectors.size === this.sectors.length;
    return all ? null : this.sectors.map((s) => s.code).filter((c) => this.filters.sectors.has(c));
  }

  levelParam(): number[] | null {
    const all = this.filters.levels.size === LEVELS.length;
    return all ? null : LEVELS.filter((l) => this.filters.levels.has(l));
  }

  private applyFilters(): void {
    const empty = this.filters.sectors.size === 0 || this.filters.levels.size === 0;
    for (const [key, ids] of STYLE_SWITCHES) {
      if (ids.some((id) => id.startsWith("risk-"))) {
        setVisible(this.map, ids, !empty && this.shown.get(key)!);
      }
    }
    if (!empty) filterRiskTiles(this.map, this.sectorParam(), this.levelParam());
  }
}

function checkbox(id: string, text: string, checked: boolean, onChange: (on: boolean) => void,
                  data: Record<string, string>): HTMLLabelElement {
  const label = document.createElement("label");
  const input = document.createElement("input");
  input.type = "checkbox";
  input.id = id;
  input.checked = checked;
  Object.assign(input.dataset, data);
  input.addEventListener("change", () => onChange(input.checked));
  const span = document.createElement("span");
  span.textContent = text;
  label.append(input, span);
  return label;
}
