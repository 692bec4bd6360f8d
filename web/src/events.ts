// The live event panel: the events in the principal's jurisdiction (GET /events), newest first,
// each with its kind, place, status, escalation level, a countdown to its next deadline (red
// when overdue) and a button for its next state. Kept current by the push stream (live.ts): an
// ``event`` message re-reads that event; a new event or alert flashes in the list and, as a
// pulsing marker, on the map.

import * as maplibregl from "maplibre-gl";
import { ApiError, apiRequest } from "./api";
import { el } from "./card";
import { named, t } from "./i18n";
import type { LiveConnection, LiveMessage } from "./live";

export const STATES = ["reported", "responded", "verified", "handled", "closed"] as const;
export type EventStatus = (typeof STATES)[number];
export const LEVEL_ORDER = ["grid", "street", "district", "city"] as const;
const LIST_LIMIT = 100;
// Open events whose details (deadlines, ETag) are read at start; the rest on demand.
const DETAIL_LIMIT = 40;
const FLASH_MS = 20000;
export const EVENTS_SOURCE = "twin-events";
const LEVEL_COLOURS: Record<string, string> = { grid: "#ffb300", street: "#fb8c00",
  district: "#e53935", city: "#b71c1c" };

export interface EventDeadline {
  step: "respond" | "verify" | "handle";
  due_at: string;
  met_at: string | null;
  fired_at?: string | null;
}

export interface EventKind {
  code: string;
  sector_code?: string;
  name_zh: string;
  name_en: string;
  respond_s?: number;
  verify_s?: number;
  handle_s?: number;
}

/** An event's properties as GET /events and GET /events/{id} write them (read loosely: the
 *  detail adds history, deadlines and links). */
export interface TwinEvent {
  id: number;
  kind: string;
  title?: string | null;
  description?: string | null;
  source?: string;
  status: EventStatus;
  level: string;
  grid_code?: string | null;
  community_code?: string | null;
  street_code?: string | null;
  district_code?: string | null;
  reported_at?: string;
  updated_at?: string;
  version?: number;
  deadlines?: EventDeadline[];
  etag?: string;
  lon?: number;
  lat?: number;
  [key: string]: unknown;
}

type EventFeature = GeoJSON.Feature<GeoJSON.Point | null, TwinEvent>;

interface Row {
  event: TwinEvent;
  point: [number, number] | null;
  etag: string | null;
  // The deadlines are known (from the list or the detail).
  detailed: boolean;
  message: string;
}

/** The next state after ``status`` (the server refuses any other with 409). */
export function nextState(status: string): EventStatus | null {
  const index = STATES.indexOf(status as EventStatus);
  return index >= 0 && index < STATES.length - 1 ? STATES[index + 1] : null;
}

/** The earliest deadline not met yet, or null. */
export function nextDeadline(event: TwinEvent): EventDeadline | null {
  const open = (event.deadlines ?? []).filter((d) => !d.met_at);
  open.sort((a, b) => Date.parse(a.due_at) - Date.parse(b.due_at));
  return open[0] ?? null;
}

function clock(seconds: number): string {
  const s = Math.floor(Math.abs(seconds));
  const h = Math.floor(s / 3600);
  const mm = String(Math.floor((s % 3600) / 60)).padStart(h ? 2 : 1, "0");
  const ss = String(s % 60).padStart(2, "0");
  return h ? `${h}:${mm}:${ss}` : `${mm}:${ss}`;
}

function pointOf(feature: EventFeature): [number, number] | null {
  const geometry = feature.geometry;
  if (geometry?.type === "Point") return geometry.coordinates.slice(0, 2) as [number, number];
  const { lon, lat } = feature.properties;
  return typeof lon === "number" && typeof lat === "number" ? [lon, lat] : null;
}

export class EventPanel {
  private rows = new Map<number, Row>();
  private kinds = new Map<string, EventKind>();
  private names = new Map<string, Promise<Record<string, string> | null>>();
  private list = document.getElementById("event-list")!;
  private banner = document.getElementById("events-message")!;
  private flashes = new Map<number, maplibregl.Marker>();
  // False once the server said this principal cannot move events (401/403): buttons hidden.
  private canAct = true;

  constructor(private map: maplibregl.Map, live: LiveConnection) {
    map.addSource(EVENTS_SOURCE, { type: "geojson", data: { type: "FeatureCollection",
      features: [] } });
    map.addLayer({ id: "twin-events", type: "circle", source: EVENTS_SOURCE,
      filter: ["!=", ["get", "status"], "closed"],
      paint: { "circle-radius": 8, "circle-color": ["match", ["get", "level"],
        "grid", LEVEL_COLOURS.grid, "street", LEVEL_COLOURS.street, "district",
        LEVEL_COLOURS.district, "city", LEVEL_COLOURS.city, "#ffb300"],
      "circle-stroke-color": "#ffffff", "circle-stroke-width": 2 } });
    live.on("event", (message) => void this.onEventMessage(message));
    live.on("alert", (message) => this.onAlert(message));
    window.setInterval(() => this.tick(), 1000);
  }

  /** Kinds by code (GET /events/kinds), for the names here and the report form. */
  async loadKinds(): Promise<EventKind[]> {
    if (this.kinds.size) return [...this.kinds.values()];
    let answer: unknown;
    try {
      answer = (await apiRequest<unknown>("GET", "/events/kinds")).body;
    } catch (error) {
      // The design named it /event-kinds; either will do.
      if (!(error instanceof ApiError) || error.status !== 404) throw error;
      answer = (await apiRequest<unknown>("GET", "/event-kinds")).body;
    }
    const list = (Array.isArray(answer) ? answer
      : (answer as { kinds?: EventKind[] }).kinds ?? []) as EventKind[];
    for (const kind of list) this.kinds.set(kind.code, kind);
    return list;
  }

  /** A kind's name: from GET /events/kinds, else the event's own kind_name_zh/_en. */
  kindName(event: TwinEvent): string {
    const kind = this.kinds.get(event.kind);
    return (kind ? named(kind) : named(event, "kind_name")) || event.kind;
  }

  /** Read the events in scope and the deadlines of the open ones. */
  async load(): Promise<void> {
    await this.loadKinds().catch((error: unknown) => console.warn("event kinds", error));
    let answer: GeoJSON.FeatureCollection<GeoJSON.Point | null, TwinEvent>;
    try {
      answer = (await apiRequest<typeof answer>("GET", `/events?limit=${LIST_LIMIT}`)).body;
    } catch (error) {
      this.say(error instanceof ApiError && (error.status === 401 || error.status === 403)
        ? t("events.forbidden") : `${t("events.unavailable")}: ${String(error)}`);
      return;
    }
    this.say("");
    this.rows.clear();
    for (const feature of answer.features) {
      const event = { ...feature.properties, id: Number(feature.properties.id ?? feature.id) };
      this.rows.set(event.id, { event, point: pointOf(feature), etag: null,
        detailed: Array.isArray(event.deadlines), message: "" });
    }
    this.render();
    const open = [...this.rows.values()].filter((r) => r.event.status !== "closed" && !r.detailed)
      .slice(0, DETAIL_LIMIT);
    await Promise.all(open.map((row) => this.refreshOne(row.event.id).catch(() => undefined)));
  }

  /** Re-read one event (GET /events/{id}: deadlines, ETag); false when it is gone from scope. */
  async refreshOne(id: number): Promise<{ row: Row; isNew: boolean } | null> {
    let answer;
    try {
      answer = await apiRequest<EventFeature | TwinEvent>("GET", `/events/${id}`);
    } catch (error) {
      if (error instanceof ApiError && error.status === 404) {
        this.rows.delete(id);
        this.render();
        return null;
      }
      throw error;
    }
    const body = answer.body;
    const feature: EventFeature = "properties" in body && body.type === "Feature"
      ? body as EventFeature
      : { type: "Feature", geometry: null, properties: body as TwinEvent };
    const event = { ...feature.properties, id: Number(feature.properties.id ?? feature.id ?? id) };
    const isNew = !this.rows.has(id);
    const old = this.rows.get(id);
    const etag = answer.etag ?? (typeof event.etag === "string" ? event.etag : null);
    const row: Row = { event, point: pointOf(feature) ?? old?.point ?? null, etag,
      detailed: true, message: old?.message ?? "" };
    this.rows.set(id, row);
    this.render();
    return { row, isNew };
  }

  private async onEventMessage(message: LiveMessage): Promise<void> {
    const payload = message.payload as Record<string, unknown>;
    const id = Number(payload.id ?? payload.event_id);
    if (!Number.isFinite(id)) return;
    const known = this.rows.get(id);
    const changed = !known || known.event.status !== payload.status
      || known.event.level !== payload.level;
    const result = await this.refreshOne(id).catch((error: unknown) => {
      console.warn(`event ${id}`, error);
      return null;
    });
    if (!result) return;
    if (result.isNew || changed) this.flash(id);
  }

  /** An alert opened or closed (twin/live/rules.py's payload): said above the list; the
   *  event it raised flashes once it is read. */
  private onAlert(message: LiveMessage): void {
    const payload = message.payload as Record<string, unknown>;
    const closed = payload.state === "closed";
    const sensor = payload.sensor_code ?? payload.sensor_id;
    const value = payload.value === undefined || payload.value === null ? ""
      : ` = ${String(payload.value)}`;
    this.say(`${t(closed ? "events.alertClosed" : "events.alert")} ${String(payload.rule ?? "")}`
      + `${sensor !== undefined ? ` · ${t("events.sensor")} ${String(sensor)}${value}` : ""}`,
    closed ? "info" : "alert");
    const eventId = Number(payload.event_id);
    if (closed || !payload.event_id || !Number.isFinite(eventId)) return;
    void this.refreshOne(eventId).then((result) => {
      if (result) this.flash(eventId);
    }, () => undefined);
  }

  /** The event in the list and on the map, pulsing for a while. */
  flash(id: number): void {
    const row = this.rows.get(id);
    const item = this.list.querySelector<HTMLElement>(`li.event[data-event-id='${id}']`);
    if (item) {
      item.classList.remove("flash");
      void item.offsetWidth;
      item.classList.add("flash");
    }
    if (row?.point) this.pulse(id, row.point);
  }

  private pulse(key: number, point: [number, number]): void {
    this.flashes.get(key)?.remove();
    const element = el("div", "flash-marker");
    element.dataset.eventId = String(key);
    element.append(el("span", "flash-ring"), el("span", "flash-dot"));
    const marker = new maplibregl.Marker({ element }).setLngLat(point).addTo(this.map);
    this.flashes.set(key, marker);
    window.setTimeout(() => {
      if (this.flashes.get(key) === marker) {
        marker.remove();
        this.flashes.delete(key);
      }
    }, FLASH_MS);
  }

  private say(text: string, kind = "info"): void {
    this.banner.textContent = text;
    this.banner.dataset.kind = kind;
    this.banner.hidden = !text;
  }

  refresh(): void {
    this.render();
  }

  private sorted(): Row[] {
    const when = (row: Row) => Date.parse(row.event.reported_at ?? "") || 0;
    return [...this.rows.values()].sort((a, b) => when(b) - when(a) || b.event.id - a.event.id);
  }

  private render(): void {
    const rows = this.sorted();
    (this.map.getSource(EVENTS_SOURCE) as maplibregl.GeoJSONSource | undefined)?.setData({
      type: "FeatureCollection", features: rows.filter((r) => r.point).map((r) => ({
        type: "Feature", id: r.event.id, geometry: { type: "Point", coordinates: r.point! },
        properties: { id: r.event.id, status: r.event.status, level: r.event.level } })) });
    const flashing = new Set([...this.list.querySelectorAll<HTMLElement>("li.event.flash")]
      .map((item) => item.dataset.eventId));
    this.list.replaceChildren(...rows.map((row) => this.item(row, flashing)));
    if (!rows.length) this.list.append(el("li", "muted", t("events.none")));
    this.tick();
  }

  private item(row: Row, flashing: Set<string | undefined>): HTMLElement {
    const { event } = row;
    const item = el("li", `event status-${event.status}`);
    item.dataset.eventId = String(event.id);
    item.dataset.status = event.status;
    item.dataset.level = event.level;
    if (flashing.has(String(event.id))) item.classList.add("flash");
    const head = el("div", "event-head");
    const kind = el("span", "event-kind", this.kindName(event));
    kind.dataset.kind = event.kind;
    const level = el("span", `event-level level-${event.level}`, t(`elevel.${event.level}`));
    level.style.background = LEVEL_COLOURS[event.level] ?? "#ffb300";
    head.append(kind, el("span", "event-id", `#${event.id}`), level);
    item.append(head);
    // The title defaults to the kind's name: said once.
    const title = event.title && event.title !== event.kind_name_zh ? String(event.title) : "";
    const text = [title, event.description ?? ""].filter(Boolean).join(" · ");
    if (text) item.append(el("p", "event-text", text));
    item.append(this.place(event));
    const status = el("div", "event-status");
    const badge = el("span", "status-badge", t(`status.${event.status}`));
    badge.dataset.status = event.status;
    status.append(badge);
    const deadline = nextDeadline(event);
    if (deadline && event.status !== "closed") {
      const countdown = el("span", "countdown");
      countdown.dataset.due = deadline.due_at;
      countdown.dataset.step = deadline.step;
      status.append(countdown);
    }
    item.append(status);
    const next = nextState(event.status);
    if (next && this.canAct) {
      const actions = el("div", "event-actions");
      const button = el("button", "transition", t(`to.${next}`)) as HTMLButtonElement;
      button.dataset.to = next;
      button.addEventListener("click", (clickEvent) => {
        clickEvent.stopPropagation();
        void this.transition(row, next, button);
      });
      actions.append(button);
      item.append(actions);
    }
    if (row.message) item.append(el("p", "event-message", row.message));
    item.addEventListener("click", () => {
      if (row.point) this.map.flyTo({ center: row.point, zoom: Math.max(this.map.getZoom(), 15) });
    });
    return item;
  }

  /** Grid, street and district: names where the features API has them, codes always. */
  private place(event: TwinEvent): HTMLElement {
    const box = el("div", "event-place");
    for (const [level, collection] of [["grid", "grids"], ["street", "streets"],
      ["district", "districts"]] as const) {
      const code = event[`${level}_code`];
      if (typeof code !== "string" || !code) continue;
      const part = el("span", "place-part");
      part.dataset.unit = level;
      part.title = code;
      part.textContent = code;
      void this.unitName(collection, code).then((unit) => {
        if (unit) part.textContent = named(unit) || code;
      });
      box.append(part);
    }
    return box;
  }

  private unitName(collection: string, code: string): Promise<Record<string, string> | null> {
    const key = `${collection}:${code}`;
    let found = this.names.get(key);
    if (!found) {
      const filter = encodeURIComponent(`code = '${code.replace(/'/g, "''")}'`);
      found = apiRequest<GeoJSON.FeatureCollection>("GET", `/collections/${collection}/items?`
        + `filter=${filter}&limit=1&properties=code,name_zh,name_en`)
        .then((answer) => (answer.body.features[0]?.properties as Record<string, string>) ?? null,
          () => null);
      this.names.set(key, found);
    }
    return found;
  }

  private async transition(row: Row, to: EventStatus, button: HTMLButtonElement): Promise<void> {
    button.disabled = true;
    const id = row.event.id;
    try {
      if (!row.etag) await this.refreshOne(id);
      const current = this.rows.get(id);
      const headers: Record<string, string> = current?.etag ? { "If-Match": current.etag } : {};
      await apiRequest("POST", `/events/${id}/transitions`, { to, note: "" }, headers);
      const done = this.rows.get(id);
      if (done) done.message = "";
      await this.refreshOne(id);
      this.flash(id);
    } catch (error) {
      const target = this.rows.get(id) ?? row;
      target.message = this.explain(error);
      if (error instanceof ApiError && (error.status === 409 || error.status === 412)) {
        await this.refreshOne(id).catch(() => undefined);
      } else if (error instanceof ApiError && (error.status === 401 || error.status === 403)) {
        // This principal cannot move events: say so once, and offer no more buttons.
        this.canAct = false;
        this.say(this.explain(error), "error");
      }
      this.render();
    }
  }

  private explain(error: unknown): string {
    if (!(error instanceof ApiError)) return String(error);
    if (error.status === 401) return t("auth.needKey");
    if (error.status === 403) return `${t("auth.forbidden")} (${error.message})`;
    if (error.status === 404) return t("events.notYours");
    if (error.status === 409) return `${t("events.conflict")}: ${error.message}`;
    if (error.status === 412) return t("events.stale");
    return error.message;
  }

  /** Update every countdown: time left to the next deadline, or how long it is overdue. */
  private tick(): void {
    const now = Date.now();
    for (const node of this.list.querySelectorAll<HTMLElement>(".countdown")) {
      const left = (Date.parse(node.dataset.due!) - now) / 1000;
      const step = t(`step.${node.dataset.step}`);
      const overdue = left < 0;
      node.classList.toggle("overdue", overdue);
      node.textContent = overdue ? `${step} ${t("events.overdue")} ${clock(left)}`
        : `${step} ${t("events.left")} ${clock(left)}`;
    }
  }

  /** A new key: perhaps another role and jurisdiction. */
  keyChanged(): void {
    this.canAct = true;
    void this.load();
  }
}
