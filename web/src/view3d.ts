// The 3D view of the command hall: CesiumJS, fully offline. twin's quantized-mesh terrain
// (CIM1), its 3D Tiles of buildings (CIM2-CIM6, chosen by grade), the risk points clamped to
// the ground or the roofs they sit on, and the district and street outlines. Nothing comes
// from Cesium ion or the internet: no base imagery, no geocoder, no access token; Cesium's own
// workers and assets are served from our build (vite.config.ts: /assets/cesium/).
//
// Loaded on demand (main.ts imports this module when the 3D view first opens), so the 2D map
// never pays for CesiumJS.

import "cesium/Build/Cesium/Widgets/widgets.css";
import * as Cesium from "cesium";
import { apiGet, type RiskPoint } from "./api";
import type { Card } from "./card";
import { lang, t } from "./i18n";
import { OutlineImagery, ringsOf } from "./outlines3d";
import type { FilterState } from "./panel";

export const TERRAIN_URL = "/collections/terrain/quantized-mesh/";
export const BUILDINGS_URL = "/collections/buildings/3dtiles/tileset.json";
export const CIM_GRADES = [2, 3, 4, 5, 6];

// Risk points are fetched for the view only below this camera height above the ground (m):
// higher up, the view holds more points than a clamped billboard each can carry.
export const RISK_MAX_HEIGHT_M = 20_000;
export const RISK_LIMIT = 2_000;

const EARTH_CIRCUMFERENCE_M = 2 * Math.PI * 6_378_137;
// MapLibre's tiles are 512 px wide at zoom z (a zoom of a whole world is 512 * 2^z px).
const TILE_PX = 512;
// MapLibre's maxPitch in this app (map.ts); a 3D camera looking at the horizon comes back at it.
const MAX_MAP_PITCH = 70;

export const USE_COLOURS: Record<string, string> = {
  residential: "#b0bec5", commercial: "#ffb74d", office: "#4fc3f7", industrial: "#a1887f",
  public: "#81c784", school: "#fff176", hospital: "#e57373",
};
const OTHER_USE_COLOUR = "#cfd8dc";
export const CIM_COLOURS: Record<number, string> = {
  2: "#9e9e9e", 3: "#64b5f6", 4: "#ba68c8", 5: "#ff8a65", 6: "#ffd54f",
};

export type ColourMode = "use" | "cim";

/** Where the 2D map looks: MapLibre's centre, zoom, bearing and pitch. */
export interface MapView {
  lon: number;
  lat: number;
  zoom: number;
  bearing: number;
  pitch: number;
}

/** A building's properties as the tileset's metadata carries them (tiles/buildings3d.py). */
export interface BuildingProperties {
  id: number;
  name?: string | null;
  use?: string | null;
  height?: number | null;
  floors?: number | null;
  cim_level?: number | null;
  roof_type?: string | null;
  district_code?: string | null;
  street_code?: string | null;
}

export const BUILDING_PROPERTIES = ["id", "name", "use", "height", "floors", "cim_level",
  "roof_type", "district_code", "street_code"] as const;

interface RiskPick {
  riskPoint: number;
}

interface Deps {
  card: Card;
  filters: FilterState;
  levelColours: Record<number, string>;
}

/** The URL Cesium fetches: same origin as the app. The app reads anonymously (api.ts sends no
 *  key for GETs); a deployment that requires a key on reads would add it here as headers. */
function resource(url: string, query?: Record<string, string>): Cesium.Resource {
  return new Cesium.Resource({ url, queryParameters: query });
}

export class View3D {
  readonly viewer: Cesium.Viewer;
  tileset: Cesium.Cesium3DTileset | null = null;
  terrainFallback = false;
  /** WebGL runs on a software rasteriser (no GPU): the view draws less. */
  readonly software: boolean;
  tilesetError: string | null = null;
  cim = new Set(CIM_GRADES);
  colourMode: ColourMode = "use";
  /** Risk points drawn now and matching the view (numberMatched), or null when too high. */
  riskShown: { shown: number; matched: number } | null = null;
  readonly risk: Cesium.BillboardCollection;
  /** The district and street outlines, draped on the terrain (outlines3d.ts). */
  outlines: Cesium.ImageryLayer | null = null;
  private riskGeneration = 0;
  // The view and filters of the risk points drawn (a camera at rest asks nothing again).
  private riskKey: string | null = null;
  private tilesetGeneration = 0;
  private pending = 0;
  private images = new Map<number, HTMLCanvasElement>();
  private panel: HTMLElement;

  private constructor(private container: HTMLElement, private deps: Deps,
                      terrainProvider: Cesium.TerrainProvider) {
    // Nothing may ask Cesium ion for anything.
    Cesium.Ion.defaultAccessToken = "";
    this.viewer = new Cesium.Viewer(container.querySelector<HTMLElement>(".globe-canvas")!, {
      baseLayer: false, terrainProvider,
      geocoder: false, baseLayerPicker: false, homeButton: false, sceneModePicker: false,
      navigationHelpButton: false, animation: false, timeline: false, fullscreenButton: false,
      infoBox: false, selectionIndicator: false, vrButton: false, projectionPicker: false,
      skyBox: false,
      // Draw only when something changed: a wall screen idles, software GL is slow.
      requestRenderMode: true, maximumRenderTimeChange: Infinity,
    });
    const scene = this.viewer.scene;
    scene.globe.baseColor = Cesium.Color.fromCssColorString("#34453b");
    scene.globe.depthTestAgainstTerrain = true;
    scene.globe.enableLighting = true;
    scene.globe.dynamicAtmosphereLighting = false;
    scene.backgroundColor = Cesium.Color.fromCssColorString("#0b1620");
    scene.fog.enabled = true;
    if (scene.sun) scene.sun.show = false;
    if (scene.moon) scene.moon.show = false;
    // A fixed light from the south-west, high up (the sun of the clock would put the city in
    // the dark at night shifts).
    scene.light = new Cesium.DirectionalLight({ direction: lightOver(106.55, 29.56) });
    this.software = softwareRenderer(scene);
    if (this.software) {
      // No GPU (a software rasteriser such as SwiftShader): every shader variant takes
      // seconds to compile, so the view keeps to the fewest (no terrain lighting, atmosphere
      // or fog; the buildings are still lit).
      scene.globe.enableLighting = false;
      scene.globe.showGroundAtmosphere = false;
      scene.fog.enabled = false;
      if (scene.skyAtmosphere) scene.skyAtmosphere.show = false;
      scene.postProcessStages.fxaa.enabled = false;
    }
    this.viewer.cesiumWidget.creditContainer.classList.add("globe-credits");
    this.risk = scene.primitives.add(new Cesium.BillboardCollection({ scene }));
    this.panel = container.querySelector<HTMLElement>(".globe-panel")!;
    this.renderPanel();

    const handler = new Cesium.ScreenSpaceEventHandler(scene.canvas);
    handler.setInputAction((event: Cesium.ScreenSpaceEventHandler.PositionedEvent) => {
      void this.click(event.position);
    }, Cesium.ScreenSpaceEventType.LEFT_CLICK);
    this.viewer.camera.moveEnd.addEventListener(() => void this.refreshForView());
    this.viewer.camera.percentageChanged = 0.2;
  }

  /** The viewer in ``container`` (a .globe-canvas and a .globe-panel inside), with twin's
   *  terrain, or the bare ellipsoid when the terrain service does not answer. */
  static async create(container: HTMLElement, deps: Deps): Promise<View3D> {
    let terrain: Cesium.TerrainProvider;
    let fallback = false;
    try {
      // Cesium takes a missing layer.json for an old heightmap tileset and then asks for
      // tiles that are not there: the service must answer its layer.json first.
      await resource(`${TERRAIN_URL}layer.json`).fetchJson();
      terrain = await Cesium.CesiumTerrainProvider.fromUrl(resource(TERRAIN_URL),
        { requestVertexNormals: true });
    } catch (error) {
      console.warn(`twin 3D: no quantized-mesh terrain at ${TERRAIN_URL} (${describe(error)}); `
        + "the ellipsoid stands in for it");
      terrain = new Cesium.EllipsoidTerrainProvider();
      fallback = true;
    }
    const view = new View3D(container, deps, terrain);
    view.terrainFallback = fallback;
    view.renderPanel();
    await Promise.all([view.loadTileset(), view.loadOutlines()]);
    return view;
  }

  // --- buildings ------------------------------------------------------------------------

  /** (Re)load the buildings' tileset for the chosen CIM grades (none chosen: no tileset). */
  async loadTileset(): Promise<void> {
    const generation = ++this.tilesetGeneration;
    const grades = CIM_GRADES.filter((grade) => this.cim.has(grade));
    this.pending += 1;
    try {
      let tileset: Cesium.Cesium3DTileset | null = null;
      if (grades.length) {
        const query: Record<string, string> = grades.length === CIM_GRADES.length ? {}
          : { cim: grades.join(",") };
        try {
          tileset = await Cesium.Cesium3DTileset.fromUrl(resource(BUILDINGS_URL, query), {
            maximumScreenSpaceError: 8,
            // Picking reads the tiles' metadata; the hall also needs the geometry for it.
            enablePick: true,
          });
          this.tilesetError = null;
        } catch (error) {
          this.tilesetError = describe(error);
          console.warn(`twin 3D: the buildings' tileset did not load: ${this.tilesetError}`);
        }
      }
      if (generation !== this.tilesetGeneration) {
        tileset?.destroy();
        return;
      }
      if (this.tileset) this.viewer.scene.primitives.remove(this.tileset);
      this.tileset = tileset;
      if (tileset) {
        tileset.style = this.buildingStyle();
        this.viewer.scene.primitives.add(tileset);
      }
      this.renderPanel();
      this.viewer.scene.requestRender();
    } finally {
      this.pending -= 1;
    }
  }

  setCim(grade: number, on: boolean): void {
    if (on) this.cim.add(grade);
    else this.cim.delete(grade);
    void this.loadTileset();
  }

  setColourMode(mode: ColourMode): void {
    this.colourMode = mode;
    if (this.tileset) this.tileset.style = this.buildingStyle();
    this.renderPanel();
    this.viewer.scene.requestRender();
  }

  private buildingStyle(): Cesium.Cesium3DTileStyle {
    const conditions: Array<[string, string]> = this.colourMode === "use"
      ? Object.entries(USE_COLOURS).map(([use, colour]) =>
        [`\${use} === '${use}'`, `color('${colour}')`])
      : Object.entries(CIM_COLOURS).map(([grade, colour]) =>
        [`\${cim_level} === ${grade}`, `color('${colour}')`]);
    conditions.push(["true", `color('${OTHER_USE_COLOUR}')`]);
    return new Cesium.Cesium3DTileStyle({ color: { conditions } });
  }

  // --- camera: the place shared with the 2D map --------------------------------------------

  /** Look where the 2D map looks: the same centre (on the ground), the same ground scale at
   *  the centre (zoom -> range), bearing -> heading, pitch -> pitch. */
  async lookAt(view: MapView): Promise<void> {
    this.viewer.resize();
    const centre = Cesium.Cartographic.fromDegrees(view.lon, view.lat);
    let ground = 0;
    try {
      const [sampled] = await Cesium.sampleTerrainMostDetailed(this.viewer.terrainProvider,
        [centre]);
      ground = Number.isFinite(sampled.height) ? sampled.height : 0;
    } catch {
      ground = this.viewer.scene.globe.getHeight(centre) ?? 0;
    }
    const camera = this.viewer.camera;
    const range = rangeForZoom(view.zoom, view.lat, this.canvasHeight(), this.fovy());
    const target = Cesium.Cartesian3.fromDegrees(view.lon, view.lat, ground);
    camera.lookAt(target, new Cesium.HeadingPitchRange(Cesium.Math.toRadians(view.bearing),
      Cesium.Math.toRadians(view.pitch - 90), range));
    camera.lookAtTransform(Cesium.Matrix4.IDENTITY);
    this.viewer.scene.requestRender();
    await this.refreshForView();
  }

  /** Where the 3D camera looks, as a 2D map view: the ground point under the canvas centre
   *  (or under the camera when the centre is sky) and the zoom of the same ground scale. */
  mapView(): MapView {
    const camera = this.viewer.camera;
    const scene = this.viewer.scene;
    const canvas = scene.canvas;
    const middle = new Cesium.Cartesian2(canvas.clientWidth / 2, canvas.clientHeight / 2);
    const ray = camera.getPickRay(middle);
    const hit = ray ? scene.globe.pick(ray, scene) : undefined;
    let lon: number;
    let lat: number;
    let range: number;
    if (hit) {
      const carto = Cesium.Cartographic.fromCartesian(hit);
      lon = Cesium.Math.toDegrees(carto.longitude);
      lat = Cesium.Math.toDegrees(carto.latitude);
      range = Cesium.Cartesian3.distance(camera.positionWC, hit);
    } else {
      const carto = camera.positionCartographic;
      lon = Cesium.Math.toDegrees(carto.longitude);
      lat = Cesium.Math.toDegrees(carto.latitude);
      range = Math.max(carto.height - (scene.globe.getHeight(carto) ?? 0), 1);
    }
    let bearing = Cesium.Math.toDegrees(camera.heading);
    if (bearing > 180) bearing -= 360;
    const pitch = Math.min(Math.max(Cesium.Math.toDegrees(camera.pitch) + 90, 0), MAX_MAP_PITCH);
    return { lon, lat, zoom: zoomForRange(range, lat, this.canvasHeight(), this.fovy()),
      bearing, pitch };
  }

  private canvasHeight(): number {
    return Math.max(this.viewer.scene.canvas.clientHeight, 1);
  }

  private fovy(): number {
    return (this.viewer.camera.frustum as Cesium.PerspectiveFrustum).fovy ?? Math.PI / 3;
  }

  /** Camera height above the ground under it (m). */
  heightAboveGround(): number {
    const carto = this.viewer.camera.positionCartographic;
    return carto.height - (this.viewer.scene.globe.getHeight(carto) ?? 0);
  }

  // --- risk points and outlines for the view ------------------------------------------------

  /** The risk points of the view. */
  async refreshForView(): Promise<void> {
    this.pending += 1;
    try {
      await this.loadRiskPoints();
    } finally {
      this.pending -= 1;
    }
  }

  /** The view's west, south, east, north (degrees), or null when it shows no ground. */
  viewBox(): [number, number, number, number] | null {
    const rectangle = this.viewer.camera.computeViewRectangle(
      this.viewer.scene.globe.ellipsoid);
    if (!rectangle) return null;
    const box = [rectangle.west, rectangle.south, rectangle.east, rectangle.north]
      .map((angle) => Cesium.Math.toDegrees(angle)) as [number, number, number, number];
    return box[0] <= box[2] ? box : null;
  }

  async loadRiskPoints(force = false): Promise<void> {
    const box = this.heightAboveGround() <= RISK_MAX_HEIGHT_M ? this.viewBox() : null;
    const { filters } = this.deps;
    const key = box ? `${box.map((v) => v.toFixed(6)).join(",")}|${[...filters.levels]}|`
      + [...filters.sectors].join(",") : null;
    if (key === this.riskKey && !force) return;
    this.riskKey = key;
    const generation = ++this.riskGeneration;
    if (!box) {
      this.risk.removeAll();
      this.riskShown = null;
      this.renderStatus();
      this.viewer.scene.requestRender();
      return;
    }
    const clauses: string[] = [];
    if (filters.levels.size < 4) clauses.push(`level IN (${[...filters.levels].join(",") || "0"})`);
    clauses.push(`sector_code IN (${[...filters.sectors].map((s) => `'${s.replace(/'/g, "''")}'`)
      .join(",") || "''"})`);
    let answer: GeoJSON.FeatureCollection<GeoJSON.Point, Pick<RiskPoint, "level" | "name">>
      & { numberMatched?: number };
    try {
      answer = await apiGet("/collections/{collection_id}/items", {
        path: { collection_id: "risk_points" },
        query: { bbox: box.map((v) => v.toFixed(6)).join(","), limit: RISK_LIMIT,
          properties: "level,name", sortby: "level", filter: clauses.join(" AND ") },
      }) as typeof answer;
    } catch (error) {
      console.warn(`twin 3D: risk points of the view did not load: ${describe(error)}`);
      if (generation === this.riskGeneration) this.riskKey = null;
      return;
    }
    if (generation !== this.riskGeneration) return;
    this.risk.removeAll();
    for (const feature of answer.features) {
      const [lon, lat] = feature.geometry.coordinates;
      const id: RiskPick = { riskPoint: Number(feature.id) };
      this.risk.add({
        id, position: Cesium.Cartesian3.fromDegrees(lon, lat),
        image: this.pointImage(feature.properties.level),
        // On the terrain, or on the roof of the building it sits in (3D Tiles clamp too).
        heightReference: Cesium.HeightReference.CLAMP_TO_GROUND,
        verticalOrigin: Cesium.VerticalOrigin.CENTER,
        disableDepthTestDistance: Number.POSITIVE_INFINITY,
      });
    }
    this.riskShown = { shown: answer.features.length,
      matched: answer.numberMatched ?? answer.features.length };
    this.renderStatus();
    this.viewer.scene.requestRender();
  }

  /** A filter change on the left panel: the points drawn follow it. */
  filtersChanged(): void {
    void this.loadRiskPoints(true);
  }

  private pointImage(level: number): HTMLCanvasElement {
    let image = this.images.get(level);
    if (!image) {
      image = document.createElement("canvas");
      image.width = image.height = 18;
      const g = image.getContext("2d")!;
      g.beginPath();
      g.arc(9, 9, 7, 0, 2 * Math.PI);
      g.fillStyle = this.deps.levelColours[level] ?? "#ffffff";
      g.fill();
      g.lineWidth = 2;
      g.strokeStyle = "#ffffff";
      g.stroke();
      this.images.set(level, image);
    }
    return image;
  }

  /** The district outlines (whole municipality, fetched once) and, close up, the streets'
   *  (outlines3d.ts fetches them per tile), as a draped imagery layer. */
  private async loadOutlines(): Promise<void> {
    const answer = await apiGet("/collections/{collection_id}/items", {
      path: { collection_id: "districts" }, query: { limit: 1000, properties: "code" },
    }).catch((error: unknown) => {
      console.warn(`twin 3D: district outlines did not load: ${describe(error)}`);
      return null;
    }) as GeoJSON.FeatureCollection | null;
    const provider = new OutlineImagery(answer ? ringsOf(answer) : []);
    this.outlines = this.viewer.imageryLayers.addImageryProvider(
      provider as unknown as Cesium.ImageryProvider);
    this.viewer.scene.requestRender();
  }

  // --- picking ------------------------------------------------------------------------

  /** What is drawn at a canvas pixel: a risk point (drawn over everything), a building, or
   *  nothing. One pick pass: software GL renders each pass on the CPU. */
  pickAt(x: number, y: number): { riskPoint?: number; building?: BuildingProperties } {
    const pick: unknown = this.viewer.scene.pick(new Cesium.Cartesian2(x, y));
    const id = (pick as { id?: unknown } | undefined)?.id;
    if (id && typeof id === "object" && "riskPoint" in id) {
      return { riskPoint: (id as RiskPick).riskPoint };
    }
    if (pick instanceof Cesium.Cesium3DTileFeature) return { building: buildingOf(pick) };
    return {};
  }

  private async click(position: Cesium.Cartesian2): Promise<void> {
    const picked = this.pickAt(position.x, position.y);
    if (picked.riskPoint !== undefined) {
      await this.deps.card.openRiskPoint(picked.riskPoint);
    } else if (picked.building) {
      await this.deps.card.openBuilding(picked.building);
    } else {
      const scene = this.viewer.scene;
      const ray = this.viewer.camera.getPickRay(position);
      const hit = ray ? scene.globe.pick(ray, scene) : undefined;
      if (!hit) return;
      const carto = Cesium.Cartographic.fromCartesian(hit);
      await this.deps.card.openLocation(Cesium.Math.toDegrees(carto.longitude),
        Cesium.Math.toDegrees(carto.latitude));
    }
  }

  // --- state for the hall (and the tests) ------------------------------------------------

  /** Everything asked for has arrived and is drawn: terrain and tiles loaded, no request of
   *  the view pending. */
  idle(): boolean {
    const scene = this.viewer.scene;
    return this.pending === 0 && scene.globe.tilesLoaded
      && (this.tileset === null || this.tileset.tilesLoaded);
  }

  /** Resolves once a frame drawn after now shows everything asked for (see idle); for the
   *  tests and for screenshots of the hall. */
  async settled(): Promise<void> {
    const scene = this.viewer.scene;
    for (;;) {
      await new Promise<void>((resolve) => {
        const off = scene.postRender.addEventListener(() => {
          off();
          resolve();
        });
        scene.requestRender();
      });
      if (this.idle()) return;
      await new Promise((resolve) => setTimeout(resolve, 50));
    }
  }

  /** Put the camera at lon/lat, ``height`` metres above the ellipsoid, looking along
   *  ``heading`` (degrees from north) and ``pitch`` (degrees, -90 straight down). */
  setCamera(lon: number, lat: number, height: number, heading = 0, pitch = -90): void {
    this.viewer.camera.setView({
      destination: Cesium.Cartesian3.fromDegrees(lon, lat, height),
      orientation: { heading: Cesium.Math.toRadians(heading), pitch: Cesium.Math.toRadians(pitch),
        roll: 0 },
    });
    this.viewer.scene.requestRender();
    // Now, not on the camera's moveEnd a few frames later (that one then finds it done).
    void this.refreshForView();
  }

  /** Show the view (its container visible) and fit the canvas. */
  resize(): void {
    this.viewer.resize();
    this.viewer.scene.requestRender();
  }

  /** The language changed: the panel's words follow. */
  relabel(): void {
    this.renderPanel();
  }

  private renderPanel(): void {
    const panel = this.panel;
    panel.replaceChildren();
    const cimTitle = element("h3", t("globe.cim"));
    const cimBox = element("div", "");
    cimBox.className = "checklist";
    for (const grade of CIM_GRADES) {
      const label = document.createElement("label");
      const box = document.createElement("input");
      box.type = "checkbox";
      box.id = `cim-${grade}`;
      box.checked = this.cim.has(grade);
      box.addEventListener("change", () => this.setCim(grade, box.checked));
      label.append(box, ` CIM${grade} · ${t(`cim.${grade}`)}`);
      cimBox.append(label);
    }
    const colourTitle = element("h3", t("globe.colour"));
    const select = document.createElement("select");
    select.id = "building-colour";
    for (const mode of ["use", "cim"] as const) {
      const option = document.createElement("option");
      option.value = mode;
      option.textContent = t(`globe.colour.${mode}`);
      select.append(option);
    }
    select.value = this.colourMode;
    select.addEventListener("change", () => this.setColourMode(select.value as ColourMode));
    const legend = element("div", "");
    legend.className = "legend";
    const entries: Array<[string, string]> = this.colourMode === "use"
      ? Object.entries(USE_COLOURS).map(([use, colour]) => [t(`use.${use}`), colour])
      : Object.entries(CIM_COLOURS).map(([grade, colour]) => [`CIM${grade}`, colour]);
    for (const [name, colour] of entries) {
      const item = element("span", name);
      const swatch = element("i", "");
      swatch.style.background = colour;
      item.prepend(swatch);
      legend.append(item);
    }
    const status = element("p", "");
    status.id = "globe-status";
    const notes = element("p", "");
    notes.id = "globe-notes";
    notes.className = "muted";
    panel.append(cimTitle, cimBox, colourTitle, select, legend, status, notes);
    this.renderStatus();
  }

  private renderStatus(): void {
    const status = this.panel.querySelector("#globe-status");
    if (status) {
      const shown = this.riskShown;
      status.textContent = shown === null ? t("globe.riskTooHigh")
        : `${t("globe.riskShown")} ${shown.shown.toLocaleString(lang() === "zh" ? "zh-CN" : "en")}`
          + (shown.matched > shown.shown ? ` / ${shown.matched.toLocaleString()}` : "");
      if (shown) (status as HTMLElement).dataset.shown = String(shown.shown);
      else delete (status as HTMLElement).dataset.shown;
    }
    const notes = this.panel.querySelector("#globe-notes");
    if (notes) {
      const lines: string[] = [];
      if (this.terrainFallback) lines.push(t("globe.noTerrain"));
      if (this.tilesetError) lines.push(`${t("globe.noBuildings")}: ${this.tilesetError}`);
      notes.textContent = lines.join(" · ");
    }
  }

  /** The container the view draws in (shown and hidden by main.ts). */
  get element(): HTMLElement {
    return this.container;
  }
}

// --- pure helpers (exported for the console and the tests) --------------------------------

/** Metres per CSS pixel of MapLibre at ``zoom`` and latitude ``lat``. */
export function metresPerPixel(zoom: number, lat: number): number {
  return EARTH_CIRCUMFERENCE_M * Math.cos(lat * Math.PI / 180) / (TILE_PX * 2 ** zoom);
}

/** The camera range showing, across ``heightPx`` pixels of a frustum of vertical angle
 *  ``fovy``, the ground MapLibre shows at ``zoom``. */
export function rangeForZoom(zoom: number, lat: number, heightPx: number, fovy: number): number {
  return heightPx * metresPerPixel(zoom, lat) / 2 / Math.tan(fovy / 2);
}

export function zoomForRange(range: number, lat: number, heightPx: number, fovy: number): number {
  const mpp = 2 * range * Math.tan(fovy / 2) / heightPx;
  return Math.log2(EARTH_CIRCUMFERENCE_M * Math.cos(lat * Math.PI / 180) / (TILE_PX * mpp));
}

function buildingOf(feature: Cesium.Cesium3DTileFeature): BuildingProperties {
  const properties: Record<string, unknown> = {};
  for (const name of BUILDING_PROPERTIES) properties[name] = feature.getProperty(name) ?? null;
  properties.id = Number(properties.id);
  return properties as unknown as BuildingProperties;
}

/** A light from the south-west, 50° above the horizon at lon/lat (world direction). */
function lightOver(lon: number, lat: number): Cesium.Cartesian3 {
  const origin = Cesium.Cartesian3.fromDegrees(lon, lat);
  const enu = Cesium.Transforms.eastNorthUpToFixedFrame(origin);
  const up = Math.sin(Cesium.Math.toRadians(50));
  const flat = Math.cos(Cesium.Math.toRadians(50)) / Math.SQRT2;
  // Pointing where the light goes: to the north-east and down.
  const local = new Cesium.Cartesian3(flat, flat, -up);
  const world = Cesium.Matrix4.multiplyByPointAsVector(enu, local, new Cesium.Cartesian3());
  return Cesium.Cartesian3.normalize(world, world);
}

/** Whether WebGL is a software rasteriser (SwiftShader, llvmpipe): no GPU in this machine. */
function softwareRenderer(scene: Cesium.Scene): boolean {
  const gl = (scene as unknown as { context: { _gl: WebGLRenderingContext } }).context._gl;
  const info = gl.getExtension("WEBGL_debug_renderer_info");
  const renderer = String(gl.getParameter(info ? info.UNMASKED_RENDERER_WEBGL : gl.RENDERER));
  return /swiftshader|llvmpipe|softpipe|software/i.test(renderer);
}

function element(tag: string, text: string): HTMLElement {
  const node = document.createElement(tag);
  node.textContent = text;
  return node;
}

function describe(error: unknown): string {
  if (error instanceof Error) return error.message;
  if (error && typeof error === "object" && "statusCode" in error) {
    return `HTTP ${(error as { statusCode?: number }).statusCode}`;
  }
  return String(error);
}

