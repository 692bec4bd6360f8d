// twin's HTTP API as the map uses it. Shapes follow the server's responses.

export class ApiError extends Error {
  constructor(public status: number, message: string) {
    super(message);
  }
}

export async function getJson<T>(path: string, init?: RequestInit): Promise<T> {
  const response = await fetch(path, init);
  if (!response.ok) {
    let message = `${response.status} ${response.statusText}`;
    try {
      const body = await response.json();
      message = body.description ?? body.detail ?? message;
    } catch {
      // Not JSON: keep the status line.
    }
    throw new ApiError(response.status, message);
  }
  return response.json() as Promise<T>;
}

export function query(params: Record<string, string | number | boolean | undefined>): string {
  const search = new URLSearchParams();
  for (const [key, value] of Object.entries(params)) {
    if (value !== undefined && value !== "") search.set(key, String(value));
  }
  return search.toString();
}

let paths: Promise<Set<string>> | undefined;

/** The API's paths (from its OpenAPI document), so optional features switch on when present. */
export function apiHas(path: string): Promise<boolean> {
  paths ??= getJson<{ paths: Record<string, unknown> }>("/api")
    .then((doc) => new Set(Object.keys(doc.paths)))
    .catch(() => new Set<string>());
  return paths.then((known) => known.has(path));
}

export interface Sector {
  code: string;
  name_zh: string;
  name_en: string;
}

export interface Collection {
  id: string;
  title: string;
  title_en: string;
  kind: string;
  geometryType: string | null;
  featureCount: number | null;
  minZoom: number;
  maxZoom: number;
  origin?: string;
  extent: { spatial: { bbox: number[][] } };
}

export interface Unit {
  code: string;
  name_zh: string;
  name_en: string;
}

export interface Located {
  point: { lon: number; lat: number };
  grid: Unit;
  community: Unit;
  street: Unit;
  district: Unit;
  responsible_teams: Array<Record<string, unknown>>;
}

export interface RoadTeam {
  rank: number;
  id: number;
  code: string;
  name_zh: string;
  name_en: string;
  team_type: string;
  headcount: number;
  phone: string;
  route_status: "ok" | "beyond_cutoff" | "unreachable";
  travel_time_s: number | null;
  network_distance_m: number | null;
  route?: GeoJSON.LineString | null;
}

export interface Plan {
  id: number;
  code: string;
  title_zh: string;
  title_en: string;
  response_level: number;
  issuer_name_zh: string | null;
  issuer_name_en: string | null;
  summary: string;
}

export interface H3Counts {
  resolution: number;
  cells: Array<{ h3: string; count: number; by_level: Record<string, number> }>;
  total: number;
}
