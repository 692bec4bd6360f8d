// District and street outlines draped on the 3D terrain as an imagery layer drawn in the
// browser: each imagery tile is a canvas with the boundaries that cross it. Draped imagery
// follows the terrain at every scale without the shadow volumes of ground-clamped polylines
// (tens of thousands of segments there took tens of seconds to build on a 2-core machine), and
// it needs no simplification: a tile draws the full geometry, clipped by the canvas.
//
// Districts come once for the whole municipality; streets only on close tiles (level >=
// STREET_LEVEL), fetched from the features API per ancestor tile of STREET_FETCH_LEVEL (one
// request serves the tiles below it).

import * as Cesium from "cesium";
import { apiGet } from "./api";

const TILE_PX = 256;
// Geographic tiling: level 10 tiles are 0.18° (~17 km) wide, drawn below ~30 km.
export const STREET_LEVEL = 10;
const STREET_FETCH_LEVEL = 9;
const STREET_LIMIT = 5000;

export interface LineStyle {
  colour: string;
  width: number;
}

export const DISTRICT_LINE: LineStyle = { colour: "#ffca28", width: 2.5 };
export const STREET_LINE: LineStyle = { colour: "#cfd8dc", width: 1.2 };

/** A ring with its bounding box (degrees), to skip what a tile does not cross. */
interface Ring {
  box: [number, number, number, number];
  points: GeoJSON.Position[];
}

export function ringsOf(collection: GeoJSON.FeatureCollection): Ring[] {
  const out: Ring[] = [];
  for (const feature of collection.features) {
    const geometry = feature.geometry;
    const rings = !geometry ? []
      : geometry.type === "Polygon" ? geometry.coordinates
        : geometry.type === "MultiPolygon" ? geometry.coordinates.flat()
          : geometry.type === "LineString" ? [geometry.coordinates]
            : geometry.type === "MultiLineString" ? geometry.coordinates : [];
    for (const points of rings) {
      if (points.length < 2) continue;
      let [w, s, e, n] = [Infinity, Infinity, -Infinity, -Infinity];
      for (const [x, y] of points) {
        w = Math.min(w, x);
        s = Math.min(s, y);
        e = Math.max(e, x);
        n = Math.max(n, y);
      }
      out.push({ box: [w, s, e, n], points });
    }
  }
  return out;
}

/** The imagery provider (Cesium's ImageryProvider interface, implemented by hand). */
export class OutlineImagery {
  readonly tilingScheme = new Cesium.GeographicTilingScheme();
  readonly rectangle = this.tilingScheme.rectangle;
  readonly tileWidth = TILE_PX;
  readonly tileHeight = TILE_PX;
  readonly minimumLevel = 0;
  readonly maximumLevel = 19;
  readonly tileDiscardPolicy = undefined;
  readonly errorEvent = new Cesium.Event();
  readonly credit = undefined;
  readonly proxy = undefined;
  readonly hasAlphaChannel = true;
  readonly ready = true;
  /** Street rings per fetch tile ("level/x/y"), as promises shared by the tiles below. */
  private streets = new Map<string, Promise<Ring[]>>();

  constructor(private districts: Ring[]) {}

  getTileCredits(): Cesium.Credit[] {
    return [];
  }

  pickFeatures(): undefined {
    return undefined;
  }

  requestImage(x: number, y: number, level: number): Promise<HTMLCanvasElement> {
    return this.draw(x, y, level);
  }

  private async draw(x: number, y: number, level: number): Promise<HTMLCanvasElement> {
    const rectangle = this.tilingScheme.tileXYToRectangle(x, y, level);
    const box = [rectangle.west, rectangle.south, rectangle.east, rectangle.north]
      .map((angle) => Cesium.Math.toDegrees(angle)) as [number, number, number, number];
    const streets = level >= STREET_LEVEL ? await this.streetsFor(x, y, level) : [];
    const canvas = document.createElement("canvas");
    canvas.width = TILE_PX;
    canvas.height = TILE_PX;
    const g = canvas.getContext("2d")!;
    g.lineJoin = "round";
    stroke(g, box, streets, STREET_LINE);
    stroke(g, box, this.districts, DISTRICT_LINE);
    return canvas;
  }

  /** The streets crossing the fetch tile above (x, y, level). */
  private streetsFor(x: number, y: number, level: number): Promise<Ring[]> {
    const shift = level - STREET_FETCH_LEVEL;
    const [fx, fy] = [x >> shift, y >> shift];
    const key = `${STREET_FETCH_LEVEL}/${fx}/${fy}`;
    let rings = this.streets.get(key);
    if (!rings) {
      const r = this.tilingScheme.tileXYToRectangle(fx, fy, STREET_FETCH_LEVEL);
      const bbox = [r.west, r.south, r.east, r.north]
        .map((angle) => Cesium.Math.toDegrees(angle).toFixed(6)).join(",");
      rings = apiGet("/collections/{collection_id}/items", {
        path: { collection_id: "streets" },
        query: { bbox, limit: STREET_LIMIT, properties: "code" },
      }).then((answer) => ringsOf(answer as GeoJSON.FeatureCollection), (error: unknown) => {
        console.warn(`twin 3D: street outlines of ${bbox} did not load: ${String(error)}`);
        this.streets.delete(key);
        return [];
      });
      this.streets.set(key, rings);
    }
    return rings;
  }
}

/** Draw the rings crossing ``box`` (w, s, e, n degrees) onto a tile canvas. */
function stroke(g: CanvasRenderingContext2D, box: [number, number, number, number],
                rings: Ring[], style: LineStyle): void {
  const [w, s, e, n] = box;
  const sx = TILE_PX / (e - w);
  const sy = TILE_PX / (n - s);
  // A line a little outside the tile still shows its half width inside.
  const mx = style.width / sx;
  const my = style.width / sy;
  g.beginPath();
  let any = false;
  for (const ring of rings) {
    const [rw, rs, re, rn] = ring.box;
    if (re < w - mx || rw > e + mx || rn < s - my || rs > n + my) continue;
    any = true;
    ring.points.forEach(([x, y], i) => {
      const px = (x - w) * sx;
      const py = (n - y) * sy;
      if (i === 0) g.moveTo(px, py);
      else g.lineTo(px, py);
    });
  }
  if (!any) return;
  g.strokeStyle = style.colour;
  g.lineWidth = style.width;
  g.stroke();
}
