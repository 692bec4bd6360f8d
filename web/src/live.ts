// The live connection: twin's push stream (Server-Sent Events at /events/stream). EventSource
// cannot send a header, so the page first asks for a short-lived ticket (POST
// /events/stream/tickets, with the stored key when there is one) and opens the stream with it.
// On any error (the server restarted, the ticket expired, the network dropped) the page asks
// for a fresh ticket and reopens with ``last_event_id`` = the last id it saw: the server
// replays every missed message once, in order. Messages are dispatched by kind.

import { apiRequest } from "./api";

export const LIVE_KINDS = ["alert", "event", "layer", "feature", "anomaly"] as const;
export type LiveKind = (typeof LIVE_KINDS)[number];

/** One outbox message as the stream writes it in ``data``. */
export interface LiveMessage<P = Record<string, unknown>> {
  id: number;
  kind: LiveKind;
  created_at: string;
  payload: P;
}

/** A ``layer`` message: a layer's data version changed (or it was deleted). */
export interface LayerPayload {
  id: string;
  data_version?: number | string;
  deleted?: boolean;
}

interface Ticket {
  ticket: string;
  expires_at: string;
  stream?: string;
}

export type LiveState = "connecting" | "open" | "retrying";
type Handler = (message: LiveMessage) => void;

const RETRY_MIN_MS = 1000;
const RETRY_MAX_MS = 15000;

export class LiveConnection {
  /** The last message id seen (replay starts after it). */
  lastId: number | null = null;
  state: LiveState = "connecting";
  /** Every message received, for the browser tests and the curious (the last 200). */
  readonly recent: LiveMessage[] = [];
  private source: EventSource | null = null;
  private handlers = new Map<LiveKind, Handler[]>();
  private stateListeners: Array<(state: LiveState) => void> = [];
  private retryMs = RETRY_MIN_MS;
  private timer: number | undefined;
  private generation = 0;

  on(kind: LiveKind, handler: Handler): void {
    const list = this.handlers.get(kind) ?? [];
    list.push(handler);
    this.handlers.set(kind, list);
  }

  onState(listener: (state: LiveState) => void): void {
    this.stateListeners.push(listener);
  }

  start(): void {
    void this.open();
  }

  /** Close and open again now (a new key: a new principal, a new scope). */
  restart(): void {
    this.retryMs = RETRY_MIN_MS;
    void this.open();
  }

  stop(): void {
    this.generation += 1;
    window.clearTimeout(this.timer);
    this.source?.close();
    this.source = null;
  }

  private setState(state: LiveState): void {
    this.state = state;
    for (const listener of this.stateListeners) listener(state);
  }

  private async open(): Promise<void> {
    this.stop();
    const generation = this.generation;
    this.setState(this.lastId === null ? "connecting" : "retrying");
    let ticket: Ticket;
    try {
      ticket = (await apiRequest<Ticket>("POST", "/events/stream/tickets")).body;
    } catch (error) {
      console.warn("live: no stream ticket", error);
      if (generation === this.generation) this.retry();
      return;
    }
    if (generation !== this.generation) return;
    const url = new URL(ticket.stream ?? "/events/stream", location.origin);
    url.searchParams.set("ticket", ticket.ticket);
    if (this.lastId !== null) url.searchParams.set("last_event_id", String(this.lastId));
    const source = new EventSource(url.pathname + url.search);
    this.source = source;
    source.onopen = () => {
      this.retryMs = RETRY_MIN_MS;
      this.setState("open");
    };
    // EventSource would retry by itself with the same (perhaps expired) ticket: take over.
    source.onerror = () => {
      if (generation !== this.generation) return;
      source.close();
      this.retry();
    };
    for (const kind of LIVE_KINDS) {
      source.addEventListener(kind, (event) => this.receive(kind, event as MessageEvent));
    }
  }

  private retry(): void {
    this.setState("retrying");
    window.clearTimeout(this.timer);
    this.timer = window.setTimeout(() => void this.open(), this.retryMs);
    this.retryMs = Math.min(this.retryMs * 2, RETRY_MAX_MS);
  }

  private receive(kind: LiveKind, event: MessageEvent): void {
    let message: LiveMessage;
    try {
      message = JSON.parse(event.data as string) as LiveMessage;
    } catch {
      console.warn("live: unreadable message", event.data);
      return;
    }
    const id = Number(event.lastEventId || message.id);
    // A replay never repeats a message; guard anyway (ids follow commit order).
    if (this.lastId !== null && id <= this.lastId) return;
    this.lastId = id;
    message.kind ??= kind;
    this.recent.push(message);
    if (this.recent.length > 200) this.recent.shift();
    for (const handler of this.handlers.get(kind) ?? []) {
      try {
        handler(message);
      } catch (error) {
        console.error(`live: the ${kind} handler failed`, error);
      }
    }
  }
}
