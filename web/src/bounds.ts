// Coordinates from the API, checked before MapLibre sees them. MapLibre throws on a latitude
// outside [-90, 90] ("Invalid LngLat latitude value"), and one layer's absurd metadata (a bbox
// with longitude and latitude swapped, or 1e9 from a bad upload) must not stop the whole map:
// the bad value is dropped with a console warning and the rest of the map works.

/** West, south, east, north in degrees. */
export type Bbox = [number, number, number, number];

/** The whole Web Mercator world: a tile source's bounds when its own are unusable. */
export const WORLD: Bbox = [-180, -85.0511287798066, 180, 85.0511287798066];

export function isLngLat(lon: unknown, lat: unknown): boolean {
  return typeof lon === "number" && typeof lat === "number" && Number.isFinite(lon)
    && Number.isFinite(lat) && Math.abs(lon) <= 180 && Math.abs(lat) <= 90;
}

/** A box MapLibre can fit and bound tiles with, or null: four numbers (or OGC's six, with
 *  heights) that are longitudes and latitudes, west of east and south of north. */
export function validBbox(value: unknown): Bbox | null {
  if (!Array.isArray(value) || (value.length !== 4 && value.length !== 6)) return null;
  const [w, s, e, n] = value.length === 6 ? [value[0], value[1], value[3], value[4]] : value;
  if (!isLngLat(w, s) || !isLngLat(e, n) || w > e || s > n) return null;
  return [w, s, e, n] as Bbox;
}

const warned = new Set<string>();

/** Say once, in the console, whose metadata the map ignores (a duty officer sees the map). */
export function warnBad(whose: string, what: string, value: unknown): void {
  const key = `${whose}\u0000${what}`;
  if (warned.has(key)) return;
  warned.add(key);
  console.warn(`twin map: ${whose} has an impossible ${what} ${JSON.stringify(value)}; ignored`);
}

/** ``value`` as a bbox, or null (with a warning naming ``whose`` when it was there but bad). */
export function checkedBbox(value: unknown, whose: string): Bbox | null {
  if (value === undefined || value === null) return null;
  const box = validBbox(value);
  if (!box) warnBad(whose, "bbox", value);
  return box;
}

/** Only the positions that are longitude/latitude pairs (for LngLatBounds.extend). */
export function lngLats(positions: GeoJSON.Position[]): Array<[number, number]> {
  return positions.filter((p) => isLngLat(p[0], p[1])).map((p) => [p[0], p[1]]);
}
