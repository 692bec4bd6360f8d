// Forms inside the card: report an event at a clicked spot (POST /events), and create, edit,
// move or delete a risk point (OGC API - Features Part 4 on /collections/risk_points/items,
// with If-Match from the item's ETag). Writes need a role the anonymous map may not have: a
// 401/403 says so and opens the key box (api.ts keeps the key for the tab).

import * as maplibregl from "maplibre-gl";
import { ApiError, apiRequest, type Sector } from "./api";
import { el } from "./card";
import type { EventKind } from "./events";
import { named, t } from "./i18n";

export const RISK_ITEMS = "/collections/risk_points/items";
export const LEVELS = [1, 2, 3, 4];

/** What a form needs from the card and the page around it. */
export interface FormHost {
  map: maplibregl.Map;
  sectors: Sector[];
  levelColours: Record<number, string>;
  /** Replace the card's content. */
  show(...parts: HTMLElement[]): void;
  /** The next map click goes to ``handler`` (null: clicks open cards again). */
  pick(handler: ((lngLat: maplibregl.LngLat) => void) | null): void;
  openRiskPoint(id: number): Promise<void>;
  close(): void;
  /** The layer changed here: redraw its tiles now rather than wait for the push. */
  reloadLayer(layerId: string): void;
  /** An event was reported here. */
  reported(id: number): void;
  kinds(): Promise<EventKind[]>;
  askForKey(): void;
}

/** The fields a person edits (the server computes grid and H3 cells). */
export interface RiskFields {
  name: string;
  level: number;
  sector_code: string;
  category: string;
  address: string;
}

export function explainWrite(error: unknown, host: FormHost): string {
  if (!(error instanceof ApiError)) return String(error);
  if (error.status === 401) {
    host.askForKey();
    return t("auth.needKey");
  }
  if (error.status === 403) {
    host.askForKey();
    return `${t("auth.forbidden")} (${error.message})`;
  }
  if (error.status === 412) return t("edit.stale");
  return `${error.status}: ${error.message}`;
}

function field(label: string, input: HTMLElement): HTMLElement {
  const row = el("label", "form-row");
  row.append(el("span", "", label), input);
  return row;
}

function input(id: string, value: string, type = "text"): HTMLInputElement {
  const node = document.createElement("input");
  node.type = type;
  node.id = id;
  node.value = value;
  return node;
}

function select(id: string, options: Array<[string, string]>, value: string): HTMLSelectElement {
  const node = document.createElement("select");
  node.id = id;
  for (const [code, text] of options) {
    const option = document.createElement("option");
    option.value = code;
    option.textContent = text;
    node.append(option);
  }
  node.value = value;
  return node;
}

function button(id: string, text: string, className = ""): HTMLButtonElement {
  const node = el("button", className, text) as HTMLButtonElement;
  node.id = id;
  node.type = "button";
  return node;
}

function message(id: string): HTMLElement {
  const node = el("p", "form-message");
  node.id = id;
  node.setAttribute("role", "status");
  return node;
}

/** Report an event at ``lon``/``lat``: a kind, a description, an optional title. */
export async function reportForm(host: FormHost, lon: number, lat: number,
                                 back: () => void): Promise<void> {
  const note = message("report-message");
  let kinds: EventKind[] = [];
  try {
    kinds = await host.kinds();
  } catch (error) {
    note.textContent = `${t("report.noKinds")}: ${String(error)}`;
  }
  const kind = select("report-kind", kinds.map((k) => [k.code, named(k)]), kinds[0]?.code ?? "");
  const title = input("report-title", "");
  const description = document.createElement("textarea");
  description.id = "report-description";
  description.rows = 3;
  const submit = button("report-submit", t("report.submit"), "primary");
  const cancel = button("report-cancel", t("form.cancel"));
  cancel.addEventListener("click", back);
  submit.addEventListener("click", async () => {
    if (!description.value.trim()) {
      note.textContent = t("report.needDescription");
      return;
    }
    submit.disabled = true;
    note.textContent = t("form.sending");
    try {
      const answer = await apiRequest<Record<string, unknown>>("POST", "/events", {
        lon, lat, kind: kind.value, description: description.value.trim(),
        ...(title.value.trim() ? { title: title.value.trim() } : {}) });
      const id = idOf(answer.body, answer.location);
      note.textContent = `${t("report.done")} #${id}`;
      note.dataset.eventId = String(id);
      if (Number.isFinite(id)) host.reported(id);
    } catch (error) {
      note.textContent = explainWrite(error, host);
      submit.disabled = false;
    }
  });
  const form = el("div", "card-form");
  form.id = "report-form";
  form.append(el("h2", "card-title", t("report.title")),
    el("p", "muted", `${lon.toFixed(5)}, ${lat.toFixed(5)}`),
    field(t("report.kind"), kind), field(t("report.titleField"), title),
    field(t("report.description"), description), rowOf(submit, cancel), note);
  host.show(form);
}

/** The id of what a POST created: the body's id (a Feature or a plain record), else the last
 *  segment of Location. */
export function idOf(body: Record<string, unknown> | null, location: string | null): number {
  const properties = (body?.properties ?? {}) as Record<string, unknown>;
  const id = body?.id ?? properties.id ?? location?.split("/").pop();
  return Number(id);
}

function rowOf(...parts: HTMLElement[]): HTMLElement {
  const row = el("div", "row form-buttons");
  row.append(...parts);
  return row;
}

export interface RiskItem {
  id: number | null;
  fields: RiskFields;
  point: [number, number];
  etag: string | null;
}

/** The risk-point form: a new one (``item.id`` null) or an edit of an existing one, moved by
 *  dragging its marker or by picking a new spot on the map. */
export function riskForm(host: FormHost, item: RiskItem, back: () => void): void {
  const { fields } = item;
  let point = item.point;
  const name = input("rp-name", fields.name);
  const level = select("rp-level", LEVELS.map((l) => [String(l), t(`level.${l}`)]),
    String(fields.level));
  const sector = select("rp-sector", host.sectors.map((s) => [s.code, named(s)]),
    fields.sector_code || host.sectors[0]?.code || "");
  const category = input("rp-category", fields.category);
  const address = input("rp-address", fields.address);
  const position = el("span", "rp-position");
  position.id = "rp-position";
  const marker = new maplibregl.Marker({ draggable: true, color: "#00e5ff" })
    .setLngLat(point).addTo(host.map);
  marker.getElement().id = "rp-marker";
  const place = (lngLat: [number, number]) => {
    point = lngLat;
    marker.setLngLat(lngLat);
    position.textContent = `${lngLat[0].toFixed(6)}, ${lngLat[1].toFixed(6)}`;
    position.dataset.lon = String(lngLat[0]);
    position.dataset.lat = String(lngLat[1]);
  };
  place(point);
  marker.on("dragend", () => {
    const lngLat = marker.getLngLat();
    place([lngLat.lng, lngLat.lat]);
  });
  const pick = button("rp-pick", t("edit.pick"));
  pick.addEventListener("click", () => {
    pick.classList.add("active");
    pick.textContent = t("edit.picking");
    host.map.getCanvas().style.cursor = "crosshair";
    host.pick((lngLat) => {
      host.pick(null);
      host.map.getCanvas().style.cursor = "";
      pick.classList.remove("active");
      pick.textContent = t("edit.pick");
      place([lngLat.lng, lngLat.lat]);
    });
  });
  const note = message("rp-message");
  const save = button("rp-save", t("form.save"), "primary");
  const cancel = button("rp-cancel", t("form.cancel"));
  const done = () => {
    host.pick(null);
    marker.remove();
  };
  cancel.addEventListener("click", () => {
    done();
    back();
  });
  save.addEventListener("click", async () => {
    const now: RiskFields = { name: name.value.trim(), level: Number(level.value),
      sector_code: sector.value, category: category.value.trim(), address: address.value.trim() };
    // The features API may not serve a point's address: an edit keeps it unless typed.
    if (!now.name || !now.category || (item.id === null && !now.address)) {
      note.textContent = t("edit.needFields");
      return;
    }
    save.disabled = true;
    note.textContent = t("form.sending");
    const geometry = { type: "Point", coordinates: point };
    try {
      let id = item.id;
      if (id === null) {
        const answer = await apiRequest<Record<string, unknown>>("POST", RISK_ITEMS,
          { type: "Feature", geometry, properties: now });
        id = idOf(answer.body, answer.location);
      } else {
        // Merge patch: only what changed.
        const changed = Object.fromEntries(Object.entries(now).filter(
          ([key, value]) => fields[key as keyof RiskFields] !== value));
        const moved = point[0] !== item.point[0] || point[1] !== item.point[1];
        const patch: Record<string, unknown> = {};
        if (Object.keys(changed).length) patch.properties = changed;
        if (moved) patch.geometry = geometry;
        if (Object.keys(patch).length) {
          await apiRequest("PATCH", `${RISK_ITEMS}/${id}`, patch,
            item.etag ? { "If-Match": item.etag } : {}, "application/merge-patch+json");
        }
      }
      done();
      host.reloadLayer("risk_points");
      if (Number.isFinite(id)) await host.openRiskPoint(id);
      else host.close();
    } catch (error) {
      save.disabled = false;
      note.textContent = explainWrite(error, host);
      if (error instanceof ApiError && error.status === 412 && item.id !== null) {
        const reload = button("rp-reload", t("edit.reload"));
        const id = item.id;
        reload.addEventListener("click", () => {
          done();
          void host.openRiskPoint(id);
        });
        note.append(" ", reload);
      }
    }
  });
  const form = el("div", "card-form");
  form.id = "risk-form";
  const where = el("div", "row");
  where.append(position, pick);
  form.append(el("h2", "card-title", item.id === null ? t("edit.createTitle")
    : `${t("edit.title")} · ${fields.name}`),
  field(t("edit.name"), name), field(t("card.level"), level), field(t("card.sector"), sector),
  field(t("card.category"), category), field(t("edit.address"), address),
  field(t("edit.position"), where), el("p", "muted", t("edit.dragHint")),
  rowOf(save, cancel), note);
  host.show(form);
}

/** Delete a risk point after a second click. */
export function deleteButton(host: FormHost, id: number, etag: string | null): HTMLElement {
  const box = el("div", "delete-box");
  const remove = button("rp-delete", t("edit.delete"), "danger");
  const note = message("rp-delete-message");
  remove.addEventListener("click", () => {
    const confirm = button("rp-confirm-delete", t("edit.confirmDelete"), "danger");
    const keep = button("rp-keep", t("form.cancel"));
    keep.addEventListener("click", () => box.replaceChildren(remove, note));
    confirm.addEventListener("click", async () => {
      confirm.disabled = true;
      try {
        await apiRequest("DELETE", `${RISK_ITEMS}/${id}`, undefined,
          etag ? { "If-Match": etag } : {});
        host.reloadLayer("risk_points");
        host.close();
      } catch (error) {
        confirm.disabled = false;
        note.textContent = explainWrite(error, host);
      }
    });
    box.replaceChildren(el("span", "", t("edit.sureDelete")), confirm, keep, note);
  });
  box.append(remove, note);
  return box;
}
