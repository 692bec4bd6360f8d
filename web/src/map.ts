// The one map: twin's style (read from the server, never copied here), plus the client-side
// layers the style does not carry: supply depots, other published collections and overlays.

import * as maplibregl from "maplibre-gl";
import type {
  RasterDEMSourceSpecification, RasterSourceSpecification, SourceSpecification,
  VectorSourceSpecification, VectorTileSource,
} from "maplibre-gl";
import workerUrl from "maplibre-gl/dist/maplibre-gl-worker.mjs?url";
import {
  apiGet, apiUrl, type Collection, fetchJson, type LayerFacts, type TileJson,
} from "./api";
import { checkedBbox, isLngLat, warnBad, WORLD } from "./bounds";

export type { LayerFacts } from "./api";

// Bundled with the app: command halls are often offline.
maplibregl.setWorkerUrl(workerUrl);

export const RISK_SOURCE = "risk_points";
export const RISK_POINTS_LAYER = "risk-points";
// Collections the style already draws (by source id); the rest are added here.
export const STYLED_COLLECTIONS = new Set([
  "districts", "streets", "communities", "grids", "risk_points", "response_teams",
  "pipe_segments", "buildings",
]);
// Overlay colours for what the app draws on top (not part of the shared style).
const OVERLAY = { route: "#d500f9", reach: ["#1b5e20", "#43a047", "#a5d6a7"], zone: "#ff1744",
  affected: "#ff1744", trace: "#00e5ff", depot: "#6a1b9a", locate: "#263238" };
const EXTRA_PALETTE = ["#00897b", "#5e35b1", "#c0ca33", "#8d6e63", "#3949ab", "#d81b60"];

export async function createMap(container: HTMLElement): Promise<maplibregl.Map> {
  const style = await apiGet("/styles/risk-map.json");
  await Promise.all(Object.keys(style.sources).map((id) => inlineTileJson(style.sources, id)));
  const map = new maplibregl.Map({
    container, style, attributionControl: { compact: true }, maxPitch: 70,
  });
  map.addControl(new maplibregl.NavigationControl({ visualizePitch: true }), "top-right");
  map.addControl(new maplibregl.ScaleControl({ unit: "metric" }), "bottom-right");
  await new Promise<void>((resolve) => map.once("load", () => resolve()));
  addOverlays(map);
  return map;
}

type TiledSource = VectorSourceSpecification | RasterSourceSpecification
  | RasterDEMSourceSpecification;

/** Each tile source's TileJSON URL: its tile URL carries the data versions (``v=``, sent
 *  immutable, cached by the browser and a shared proxy), so new data means a new URL, read
 *  from the TileJSON again (``reloadLayer``). */
const tileJsonOf = new Map<string, string>();

/** A tile URL template with its query parameters changed (``null`` removes one); the
 *  ``{z}/{x}/{y}`` braces stay as they are (URL would escape them). */
export function withQuery(template: string, changes: Record<string, string | null>): string {
  const [path, query = ""] = template.split("?", 2);
  const search = new URLSearchParams(query);
  for (const [name, value] of Object.entries(changes)) {
    if (value === null) search.delete(name);
    else search.set(name, value);
  }
  const qs = search.toString();
  return qs ? `${path}?${qs}` : path;
}

/** A style source's TileJSON written into the style, its bounds checked: MapLibre would throw
 *  on a layer's impossible bbox. Also lets a filter change (setTiles) reload tiles directly
 *  instead of refetching the TileJSON first. A TileJSON that fails to load is left to MapLibre
 *  (which reports it): the rest of the map still starts. */
async function inlineTileJson(sources: Record<string, SourceSpecification>,
                              id: string): Promise<void> {
  const source = sources[id] as TiledSource;
  if (!("url" in source) || !source.url) return;
  let tileJson: TileJson;
  try {
    tileJson = await fetchJson<TileJson>(source.url);
  } catch {
    return;
  }
  tileJsonOf.set(id, source.url);
  const { url: _url, ...explicit } = source;
  const { tiles, minzoom, maxzoom, attribution, scheme } = tileJson;
  const fromTileJson = Object.fromEntries(Object.entries({ tiles, minzoom, maxzoom, attribution,
    scheme }).filter(([, value]) => value !== undefined));
  // The style's own options win over the TileJSON's, as they would in MapLibre.
  const whose = `the tile source '${id}'${tileJson.name ? ` (layers ${tileJson.name})` : ""}`;
  const bounds = checkedBbox(explicit.bounds ?? tileJson.bounds, whose) ?? WORLD;
  sources[id] = { ...fromTileJson, ...explicit, bounds } as TiledSource;
}

/** A collection's own bounds for its tile source: given explicitly, they take precedence over
 *  its TileJSON's (which MapLibre would throw on when impossible). */
function sourceBounds(collection: Collection): [number, number, number, number] {
  return checkedBbox(collection.extent.spatial.bbox[0],
    `layer '${collection.id}'`) ?? WORLD;
}

function emptyCollection(): GeoJSON.FeatureCollection {
  return { type: "FeatureCollection", features: [] };
}

function addOverlays(map: maplibregl.Map): void {
  for (const id of ["twin-reach", "twin-zone", "twin-trace", "twin-route", "twin-locate"]) {
    map.addSource(id, { type: "geojson", data: emptyCollection() });
  }
  map.addLayer({ id: "twin-reach-fill", type: "fill", source: "twin-reach",
    paint: { "fill-color": ["match", ["get", "minutes"], 5, OVERLAY.reach[0], 10, OVERLAY.reach[1],
      OVERLAY.reach[2]], "fill-opacity": 0.25 } }, RISK_POINTS_LAYER);
  map.addLayer({ id: "twin-reach-line", type: "line", source: "twin-reach",
    paint: { "line-color": OVERLAY.reach[0], "line-width": 1.5 } }, RISK_POINTS_LAYER);
  map.addLayer({ id: "twin-zone-fill", type: "fill", source: "twin-zone",
    paint: { "fill-color": OVERLAY.zone, "fill-opacity": 0.15 } });
  map.addLayer({ id: "twin-zone-line", type: "line", source: "twin-zone",
    paint: { "line-color": OVERLAY.zone, "line-width": 2, "line-dasharray": [2, 1] } });
  map.addLayer({ id: "twin-trace-line", type: "line", source: "twin-trace",
    paint: { "line-color": OVERLAY.trace, "line-width": 4, "line-opacity": 0.8 } });
  map.addLayer({ id: "twin-affected-segments", type: "line", source: "pipe_segments",
    "source-layer": "pipe_segments", filter: ["in", ["id"], ["literal", []]],
    paint: { "line-color": OVERLAY.affected, "line-width": 5 } });
  map.addLayer({ id: "twin-route-line", type: "line", source: "twin-route",
    layout: { "line-cap": "round", "line-join": "round" },
    paint: { "line-color": OVERLAY.route, "line-width": 5, "line-opacity": 0.9 } });
  map.addLayer({ id: "twin-locate-point", type: "circle", source: "twin-locate",
    paint: { "circle-radius": 7, "circle-color": ["coalesce", ["get", "colour"], OVERLAY.locate],
      "circle-stroke-color": "#ffffff", "circle-stroke-width": 2 } });
}

export function setOverlay(map: maplibregl.Map, source: string,
                           features: GeoJSON.Feature[]): void {
  (map.getSource(source) as maplibregl.GeoJSONSource).setData(
    { type: "FeatureCollection", features });
}

// 3D layers are drawn as a marker at the model's anchor (name and CIM level); a glTF
// renderer would need three.js as a MapLibre custom layer, more than a wall map needs yet.
const modelMarkers = new Map<string, maplibregl.Marker>();

/** A published collection the style does not draw: vector tiles, raster tiles (a DEM also
 *  hillshaded) or a 3D model's anchor. Hidden until switched on. */
export function addCollectionLayer(map: maplibregl.Map, collection: Collection, index: number,
                                   facts?: LayerFacts): void {
  if (collection.kind === "raster") addRasterLayer(map, collection, facts);
  else if (collection.kind === "3d") addModelMarker(collection, facts);
  else addVectorLayer(map, collection, index);
}

function addVectorLayer(map: maplibregl.Map, collection: Collection, index: number): void {
  const source = `collection-${collection.id}`;
  if (map.getSource(source)) return;
  const url = apiUrl("/tiles/{layer_ids}/tilejson.json", { path: { layer_ids: collection.id } });
  tileJsonOf.set(source, url);
  map.addSource(source, { type: "vector", bounds: sourceBounds(collection), url });
  const colour = collection.id === "supply_depots" ? OVERLAY.depot
    : EXTRA_PALETTE[index % EXTRA_PALETTE.length];
  const common = { source, "source-layer": collection.id, minzoom: collection.minZoom,
    layout: { visibility: "none" as const } };
  const geometry = (collection.geometryType ?? "").replace("Multi", "");
  const before = RISK_POINTS_LAYER;
  if (geometry === "Point") {
    map.addLayer({ id: `${source}-circle`, type: "circle", ...common,
      paint: { "circle-color": colour, "circle-radius": 5, "circle-stroke-color": "#fff",
        "circle-stroke-width": 1.5 } });
  } else if (geometry === "LineString") {
    map.addLayer({ id: `${source}-line`, type: "line", ...common,
      paint: { "line-color": colour, "line-width": 2 } }, before);
  } else {
    map.addLayer({ id: `${source}-fill`, type: "fill", ...common,
      paint: { "fill-color": colour, "fill-opacity": 0.35, "fill-outline-color": colour } },
      before);
  }
}

/** Raster tiles (twin/api/routes/raster.py: TileJSON at raster-tilejson.json) under the
 *  boundaries and points; a DEM also as a hillshade from its Terrarium elevation tiles. */
function addRasterLayer(map: maplibregl.Map, collection: Collection, facts?: LayerFacts): void {
  const source = `collection-${collection.id}`;
  if (map.getSource(source)) return;
  const tileJson = (terrain?: "terrarium") => apiUrl("/tiles/{layer_id}/raster-tilejson.json",
    { path: { layer_id: collection.id }, query: { terrain } });
  const bounds = sourceBounds(collection);
  const below = map.getStyle().layers.find((layer) => layer.type !== "background")?.id;
  tileJsonOf.set(source, tileJson());
  map.addSource(source, { type: "raster", url: tileJson(), bounds, tileSize: 256 });
  map.addLayer({ id: `${source}-raster`, type: "raster", source,
    layout: { visibility: "none" }, paint: { "raster-opacity": 0.8 } }, below);
  if (facts?.meta?.dem) {
    tileJsonOf.set(`${source}-dem`, tileJson("terrarium"));
    map.addSource(`${source}-dem`, { type: "raster-dem", url: tileJson("terrarium"), bounds,
      encoding: "terrarium", tileSize: 256 });
    map.addLayer({ id: `${source}-hillshade`, type: "hillshade", source: `${source}-dem`,
      layout: { visibility: "none" }, paint: { "hillshade-exaggeration": 0.6 } }, below);
  }
}

function addModelMarker(collection: Collection, facts?: LayerFacts): void {
  const anchor = facts?.meta?.anchor;
  if (!anchor || modelMarkers.has(collection.id)) return;
  if (!isLngLat(anchor.lon, anchor.lat)) {
    warnBad(`layer '${collection.id}'`, "3D anchor", anchor);
    return;
  }
  const element = document.createElement("div");
  element.className = "model-marker";
  element.dataset.layerId = collection.id;
  const icon = document.createElement("span");
  icon.className = "model-icon";
  icon.textContent = "▲";
  icon.style.transform = `rotate(${facts?.meta?.heading ?? 0}deg)`;
  const label = document.createElement("span");
  label.className = "model-label";
  element.append(icon, label);
  modelMarkers.set(collection.id, new maplibregl.Marker({ element, anchor: "bottom" })
    .setLngLat([anchor.lon, anchor.lat]));
  labelModel(collection, facts);
}

/** The marker's text: the model's title and CIM level (kept in step with the language). */
export function labelModel(collection: Collection, facts?: LayerFacts, title?: string): void {
  const marker = modelMarkers.get(collection.id);
  const label = marker?.getElement().querySelector(".model-label");
  if (!label) return;
  const level = facts?.meta?.cim_level;
  label.textContent = `${title ?? collection.title}${level ? ` · CIM${level}` : ""}`;
}

/** Show or hide everything drawn for a collection added by addCollectionLayer. */
export function setCollectionVisible(map: maplibregl.Map, collectionId: string,
                                     visible: boolean): void {
  const marker = modelMarkers.get(collectionId);
  if (marker) {
    if (visible) marker.addTo(map);
    else marker.remove();
  }
  setVisible(map, layerIdsOf(collectionId), visible);
}

function layerIdsOf(collectionId: string): string[] {
  const prefix = `collection-${collectionId}-`;
  return ["circle", "line", "fill", "raster", "hillshade"].map((kind) => prefix + kind);
}

export function setVisible(map: maplibregl.Map, layerIds: string[], visible: boolean): void {
  for (const id of layerIds) {
    if (map.getLayer(id)) map.setLayoutProperty(id, "visibility", visible ? "visible" : "none");
  }
}

/** Re-request the risk tiles with ``sector=``/``level=``; the server filters points and hexagons. */
export function filterRiskTiles(map: maplibregl.Map, sectors: string[] | null,
                                levels: number[] | null): void {
  const source = map.getSource(RISK_SOURCE) as VectorTileSource;
  source.setTiles([withQuery(source.tiles[0], {
    sector: sectors ? sectors.join(",") : null, level: levels ? levels.join(",") : null })]);
}

/** The level colours as the style draws them (the risk-points ``match`` on ``level``). */
export function levelColours(map: maplibregl.Map): Record<number, string> {
  const expression = map.getPaintProperty(RISK_POINTS_LAYER, "circle-color") as unknown[];
  const colours: Record<number, string> = {};
  for (let i = 2; i + 1 < expression.length; i += 2) {
    colours[expression[i] as number] = expression[i + 1] as string;
  }
  colours[4] ??= expression[expression.length - 1] as string;
  return colours;
}

/** The map's tile sources that draw registry layer ``layerId``: a tile URL names its layers
 *  (``/tiles/<id>,<id>/{z}/{x}/{y}``), composite sources several of them. */
export function sourcesOfLayer(map: maplibregl.Map, layerId: string): string[] {
  const found: string[] = [];
  for (const id of Object.keys(map.getStyle().sources)) {
    const tiles = (map.getSource(id) as { tiles?: string[] } | undefined)?.tiles;
    const match = tiles?.[0] && /\/tiles\/([^/?]+)\//.exec(tiles[0]);
    if (match && decodeURIComponent(match[1]).split(",").includes(layerId)) found.push(id);
  }
  return found;
}

/** Re-request the tiles of the sources drawing ``layerId``: each source's TileJSON names
 *  the tile URL of the layers' data versions now (``v=``), kept with the source's filters;
 *  a source whose URL did not change re-requests its tiles (sent ``no-cache`` without a
 *  current ``v``, with an ETag: unchanged tiles come back as 304). A second pass a moment
 *  later covers a message that reached this page before the server it reads had the data
 *  (a standby replaying, a node's versions listener). */
export function reloadLayer(map: maplibregl.Map, layerId: string): string[] {
  const sources = sourcesOfLayer(map, layerId);
  const refresh = async (id: string) => {
    const source = map.getSource(id) as VectorTileSource | undefined;
    const url = tileJsonOf.get(id);
    if (!source) return;
    let version: string | null = null;
    if (url) {
      try {
        version = new URLSearchParams(
          (await fetchJson<TileJson>(url)).tiles[0].split("?", 2)[1] ?? "").get("v");
      } catch {
        version = null;  // the TileJSON failed: refresh with the URL as it is
      }
    }
    const current = source.tiles?.[0];
    if (version && current && withQuery(current, { v: version }) !== current) {
      source.setTiles([withQuery(current, { v: version })]);
    } else {
      map.refreshTiles(id);
    }
  };
  const all = () => { for (const id of sources) void refresh(id); };
  all();
  if (sources.length) window.setTimeout(all, 1500);
  return sources;
}
