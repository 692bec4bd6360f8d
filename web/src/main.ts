import "maplibre-gl/dist/maplibre-gl.css";
import "./style.css";
import type * as maplibregl from "maplibre-gl";
import { apiGet, type Collection, onKeyChange, setStoredKey, storedKey } from "./api";
import { checkedBbox } from "./bounds";
import { Card } from "./card";
import { EventPanel } from "./events";
import { applyStatic, lang, onLangChange, setLang, t } from "./i18n";
import { type LayerPayload, LiveConnection } from "./live";
import { createMap, levelColours, reloadLayer, RISK_POINTS_LAYER, setVisible } from "./map";
import { LayerPanel } from "./panel";
import { PipePanel } from "./pipes";
import { StatsStrip } from "./stats";
import { UploadPage } from "./upload";
import type { MapView, View3D } from "./view3d";

declare global {
  interface Window {
    // Exposed for the browser tests (tests/test_web.py) and for the curious in the console.
    __twinMap?: maplibregl.Map;
    __twin?: { panel: LayerPanel; stats: StatsStrip; card: Card; pipes: PipePanel; ready: boolean;
      live?: LiveConnection; events?: EventPanel; reloads?: Array<{ layer: string;
        sources: string[]; at: number }> };
    // The 3D view (view3d.ts), once opened; ``mode`` says which view is shown.
    __twin3d?: { mode: "2d" | "3d"; view: View3D | null; switching: boolean };
  }
}

// Pixels around a click that still count as hitting a risk point.
const HIT_PX = 6;
const BUILDINGS_LAYER = "buildings-3d";

async function loadCollections(panel: LayerPanel): Promise<Collection[]> {
  const [{ collections }, facts] = await Promise.all([
    apiGet("/collections"),
    // DEM flags and 3D anchors; the map still works (without them) if /layers is refused.
    apiGet("/layers").then((answer) => answer.layers, () => []),
  ]);
  panel.setCollections(collections, facts);
  return collections;
}

/** A collection's extent, when it has one MapLibre can fit (else none, and a warning). */
function boundsOf(collections: Collection[], id: string): [number, number, number, number] | null {
  const collection = collections.find((c) => c.id === id);
  return collection ? checkedBbox(collection.extent.spatial.bbox[0], `layer '${id}'`) : null;
}

function route(): void {
  const upload = location.hash.startsWith("#/upload");
  document.getElementById("map-view")!.hidden = upload;
  document.getElementById("upload-view")!.hidden = !upload;
  document.getElementById("nav-map")!.classList.toggle("active", !upload);
  document.getElementById("nav-upload")!.classList.toggle("active", upload);
  if (!upload) {
    window.__twinMap?.resize();
    window.__twin3d?.view?.resize();
  }
}

/** Where the 2D map looks, for the 3D camera. */
function mapViewOf(map: maplibregl.Map): MapView {
  const centre = map.getCenter();
  return { lon: centre.lng, lat: centre.lat, zoom: map.getZoom(), bearing: map.getBearing(),
    pitch: map.getPitch() };
}

/** The 2D/3D switch: the 3D view opens where the map looks and gives the place back. CesiumJS
 *  (view3d.ts) is loaded on the first switch only. */
function setUpViewSwitch(map: maplibregl.Map, card: Card, panel: LayerPanel,
                         colours: Record<number, string>): void {
  const button = document.getElementById("view-switch")!;
  const mapBox = document.getElementById("map")!;
  const globe = document.getElementById("globe-view")!;
  const loading = globe.querySelector<HTMLElement>(".globe-loading")!;
  const state: NonNullable<Window["__twin3d"]> = { mode: "2d", view: null, switching: false };
  window.__twin3d = state;
  const label = () => {
    button.dataset.i18n = state.mode === "3d" ? "view.to2d" : "view.to3d";
    button.textContent = t(button.dataset.i18n);
    button.classList.toggle("active", state.mode === "3d");
  };
  const to3d = async () => {
    const from = mapViewOf(map);
    state.mode = "3d";
    label();
    mapBox.hidden = true;
    globe.hidden = false;
    if (!state.view) {
      loading.hidden = false;
      try {
        const { View3D } = await import("./view3d");
        state.view = await View3D.create(globe, { card, filters: panel.filters,
          levelColours: colours });
      } catch (error) {
        loading.textContent = `${t("view.failed")}: ${error instanceof Error ? error.message
          : String(error)}`;
        throw error;
      }
      loading.hidden = true;
    }
    await state.view.lookAt(from);
  };
  const to2d = () => {
    const view = state.view?.mapView();
    state.mode = "2d";
    label();
    globe.hidden = true;
    mapBox.hidden = false;
    map.resize();
    if (view) {
      map.jumpTo({ center: [view.lon, view.lat], zoom: view.zoom, bearing: view.bearing,
        pitch: view.pitch });
    }
  };
  button.addEventListener("click", () => {
    if (state.switching) return;
    state.switching = true;
    const done = () => { state.switching = false; };
    if (state.mode === "2d") to3d().then(done, (error: unknown) => { done(); throw error; });
    else {
      to2d();
      done();
    }
  });
  panel.onFilterChange(() => state.view?.filtersChanged());
  onLangChange(() => {
    label();
    state.view?.relabel();
  });
  label();
}

/** The header's key box: a key entered once for the writes (api.ts keeps it for the tab). */
function setUpKeyBox(): () => void {
  const button = document.getElementById("key-button")!;
  const form = document.getElementById("key-form") as HTMLFormElement;
  const input = document.getElementById("key-input") as HTMLInputElement;
  const mark = () => {
    button.classList.toggle("set", Boolean(storedKey()));
    button.title = storedKey() ? t("key.set") : "";
  };
  const open = () => {
    input.value = storedKey();
    form.hidden = false;
    input.focus();
  };
  button.addEventListener("click", () => {
    if (form.hidden) open();
    else form.hidden = true;
  });
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    form.hidden = true;
    setStoredKey(input.value.trim());
  });
  document.getElementById("key-clear")!.addEventListener("click", () => {
    form.hidden = true;
    setStoredKey("");
  });
  onKeyChange(mark);
  mark();
  return open;
}

/** The push stream: the live status in the header, tiles reloaded per changed layer, the open
 *  risk point's card kept current. */
function setUpLive(map: maplibregl.Map, card: Card, stats: StatsStrip): LiveConnection {
  const live = new LiveConnection();
  const status = document.getElementById("live-status")!;
  const label = () => {
    status.dataset.state = live.state;
    status.dataset.i18n = `live.${live.state}`;
    status.textContent = t(status.dataset.i18n);
  };
  live.onState(label);
  onLangChange(label);
  const versions = new Map<string, string>();
  const reloads: NonNullable<NonNullable<Window["__twin"]>["reloads"]> = [];
  live.on("layer", (message) => {
    const layer = message.payload as unknown as LayerPayload;
    const version = String(layer.data_version ?? message.id);
    if (versions.get(layer.id) === version) return;
    versions.set(layer.id, version);
    const sources = reloadLayer(map, layer.id);
    reloads.push({ layer: layer.id, sources, at: Date.now() });
    if (layer.id === "risk_points") stats.schedule();
  });
  live.on("feature", (message) => {
    const payload = message.payload as { collection?: string; id?: number | string;
      action?: string };
    if (payload.collection !== "risk_points") return;
    if (card.shownRiskPoint !== null && card.shownRiskPoint === Number(payload.id)
        && !document.getElementById("risk-form")) {
      if (payload.action === "delete") card.close();
      else void card.openRiskPoint(Number(payload.id));
    }
  });
  if (window.__twin) window.__twin.reloads = reloads;
  label();
  return live;
}

async function main(): Promise<void> {
  applyStatic();
  route();
  window.addEventListener("hashchange", route);
  const langButton = document.getElementById("lang")!;
  const langLabel = () => { langButton.textContent = lang() === "zh" ? "English" : "中文"; };
  langLabel();
  langButton.addEventListener("click", () => setLang(lang() === "zh" ? "en" : "zh"));

  const [map, { sectors }] = await Promise.all([
    createMap(document.getElementById("map")!),
    apiGet("/sectors"),
  ]);
  window.__twinMap = map;
  const colours = levelColours(map);
  const panel = new LayerPanel(map, sectors, colours);
  const card = new Card(map, sectors, colours);
  const pipes = new PipePanel(map);
  const stats = new StatsStrip(map, panel, sectors, colours);
  window.__twin = { panel, stats, card, pipes, ready: false };
  panel.render();
  let collections = await loadCollections(panel);
  // The whole municipality on a wall screen, whatever the style's default view.
  const city = boundsOf(collections, "districts");
  if (city) map.fitBounds(city, { padding: 20, animate: false });

  const live = setUpLive(map, card, stats);
  const events = new EventPanel(map, live);
  window.__twin.live = live;
  window.__twin.events = events;
  const askForKey = setUpKeyBox();
  card.hooks = {
    reloadLayer: (layerId) => { reloadLayer(map, layerId); },
    reported: (id) => {
      void events.refreshOne(id).then(() => events.flash(id));
    },
    kinds: () => events.loadKinds(),
    askForKey,
  };
  onKeyChange(() => {
    live.restart();
    events.keyChanged();
  });
  // The live detector changed its zones: the pipe panel reads them again (once per burst).
  let anomalyTimer: number | undefined;
  live.on("anomaly", () => {
    window.clearTimeout(anomalyTimer);
    anomalyTimer = window.setTimeout(() => void pipes.load(), 2000);
  });
  live.start();

  map.on("click", (event) => {
    if (card.takeClick(event.lngLat)) return;
    const { x, y } = event.point;
    const hits = map.queryRenderedFeatures([[x - HIT_PX, y - HIT_PX], [x + HIT_PX, y + HIT_PX]],
      { layers: [RISK_POINTS_LAYER] });
    if (hits.length && hits[0].id !== undefined) {
      void card.openRiskPoint(Number(hits[0].id));
    } else {
      void card.openLocation(event.lngLat.lng, event.lngLat.lat);
    }
  });
  map.on("mouseenter", RISK_POINTS_LAYER, () => { map.getCanvas().style.cursor = "pointer"; });
  map.on("mouseleave", RISK_POINTS_LAYER, () => { map.getCanvas().style.cursor = ""; });

  setUpViewSwitch(map, card, panel, colours);

  const toggle3d = document.getElementById("toggle-3d") as HTMLInputElement;
  toggle3d.addEventListener("change", () => {
    if (toggle3d.checked) {
      setVisible(map, [BUILDINGS_LAYER], true);
      map.easeTo({ pitch: 55, zoom: Math.max(map.getZoom(), 15), duration: 800 });
    } else {
      map.easeTo({ pitch: 0, bearing: 0, duration: 800 });
    }
  });

  onLangChange(() => {
    langLabel();
    panel.render();
    card.refresh();
    pipes.refresh();
    stats.draw();
    events.refresh();
  });

  new UploadPage(async (layerId) => {
    collections = await loadCollections(panel);
    panel.showCollection(layerId);
    location.hash = "#/";
    // Show the map (and let it measure its container) now, not on the later hashchange:
    // fitBounds needs the visible size.
    route();
    const bbox = boundsOf(collections, layerId);
    if (bbox) map.fitBounds(bbox, { padding: 80, maxZoom: 15 });
  });

  await Promise.all([stats.update(), pipes.load(), events.load()]);
  window.__twin.ready = true;
}

// A failed start (the API down, the database not migrated) says so on screen, not only in the
// console: a duty officer has no console.
main().catch((error: unknown) => {
  const banner = document.createElement("div");
  banner.className = "fatal";
  banner.textContent = `${t("error.start")}: ${error instanceof Error ? error.message : error}`;
  document.body.prepend(banner);
  throw error;
});
