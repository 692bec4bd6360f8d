// Calls the web map makes, right and wrong, against the API types generated from twin's
// OpenAPI document (tests/test_web_types.py compiles this with tsc). Each wrong call must be a
// type error (@ts-expect-error fails the compile when it is not), so the generated types keep
// the map from drifting from the server.

import { apiGet, apiUrl, type Query, type UploadFields } from "../../web/src/api";

export async function calls(): Promise<number> {
  // Right: a path, its query parameters and the declared body.
  const located = await apiGet("/query/locate", { query: { lon: 106.55, lat: 29.56, k: 1 } });
  const tiles = apiUrl("/tiles/{layer_ids}/tilejson.json", { path: { layer_ids: "roads" } });
  const network: Query<"/query/pipe-anomalies">["network"] = "drainage";
  const field: keyof UploadFields = "source_crs";

  // @ts-expect-error a path the server does not have
  await apiGet("/query/locates", { query: { lon: 1, lat: 2 } });
  // @ts-expect-error a query parameter the route does not take
  await apiGet("/query/locate", { query: { lon: 1, latitude: 2 } });
  // @ts-expect-error a parameter of the wrong type
  await apiGet("/query/locate", { query: { lon: "106.55", lat: 29.56 } });
  // @ts-expect-error a required parameter left out
  await apiGet("/query/locate", { query: { lon: 106.55 } });
  // @ts-expect-error a path parameter misnamed
  apiUrl("/tiles/{layer_ids}/tilejson.json", { path: { layer_id: "roads" } });
  // @ts-expect-error a network the server does not know
  const nowhere: Query<"/query/pipe-anomalies">["network"] = "sewage";
  // @ts-expect-error an upload form field the server does not read
  const crs: keyof UploadFields = "crs";
  // @ts-expect-error a field the body does not have
  const missing = located.grid.nonexistent;

  return [located.grid.code, tiles, network, field, nowhere, crs, missing].length;
}
