// One `fieldsync.v1` socket for the whole dashboard: the live views it subscribes to, and the
// work orders it opens as CRDT documents. It reconnects by itself (jittered backoff) and, once
// welcomed again, subscribes anew (each view answers with all its rows: the catch-up) and syncs
// its documents from their state vectors.
import * as decoding from "lib0/decoding";
import * as encoding from "lib0/encoding";
import * as syncProtocol from "y-protocols/sync";
import * as Y from "yjs";

import { Auth, SignInRequired } from "./auth";
import { type Control, decodeFrame, encodeControl, encodeDoc } from "./wire";

export type Row = { id: string; [member: string]: unknown };
export type ConnectionState = "connecting" | "live" | "reconnecting" | "offline";

export interface ViewState {
  rows: Map<string, Row>;
  extra: Record<string, unknown>;
  error: string | null;
}

interface Subscription {
  params: Record<string, unknown>;
  state: ViewState;
  changed: (state: ViewState) => void;
}

const MESSAGE_SYNC = 0;
const DEVICE_KEY = "fieldsync.device";
const OFFLINE_AFTER = 3; // failed reconnections before the state says "offline since"

export class Connection {
  state: ConnectionState = "connecting";
  since: Date | null = null; // when the socket last dropped
  principal: { subject: string; roles: string[] } | null = null;
  onState: () => void = () => {};
  onError: (message: string) => void = () => {};
  onSignedOut: () => void = () => {};
  private ws: WebSocket | null = null;
  private attempts = 0;
  private timer: number | undefined;
  private views = new Map<string, Subscription>();
  private docs = new Map<string, Y.Doc>();
  private readonly deviceId: string;

  constructor(private readonly auth: Auth) {
    let device = localStorage.getItem(DEVICE_KEY);
    if (device === null) {
      device = `dashboard-${crypto.getRandomValues(new Uint32Array(2)).join("")}`;
      localStorage.setItem(DEVICE_KEY, device);
    }
    this.deviceId = device;
    // A renewed token goes to the live socket in band (`auth`): nothing is lost.
    auth.onToken((token) => this.send({ type: "auth", token }));
  }

  connect(): void {
    window.clearTimeout(this.timer);
    const url = `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/v1/sync`;
    const ws = new WebSocket(url);
    ws.binaryType = "arraybuffer";
    this.ws = ws;
    ws.onopen = () => {
      // Browsers cannot set headers on a WebSocket: the token is in the first message.
      ws.send(
        encodeControl({
          type: "hello",
          client: { platform: "web", version: "1.0.0", device_id: this.deviceId },
          since: null,
          caps: [],
          token: this.auth.accessToken ?? "",
        }),
      );
    };
    ws.onmessage = (event) => {
      for (const message of decodeFrame(new Uint8Array(event.data as ArrayBuffer))) {
        if (message.kind === "control") this.control(message.body);
        else this.docMessage(message.doc, message.message);
      }
    };
    ws.onclose = (event) => {
      if (this.ws !== ws) return;
      this.ws = null;
      void this.closed(event.code, event.reason);
    };
  }

  private async closed(code: number, reason: string): Promise<void> {
    if (this.since === null) this.since = new Date();
    if (code === 4401) {
      try {
        await this.auth.renew(); // token_expired: renew, then come back at once
        this.attempts = 0;
      } catch (error) {
        if (error instanceof SignInRequired) {
          this.onSignedOut();
          return;
        }
      }
    } else if (code === 4426) {
      this.onError("This dashboard is older than the server accepts: reload the page.");
    } else if (code === 4403) {
      this.onError(`The server refused the connection (${reason}).`);
    }
    this.attempts += 1;
    this.setState(this.attempts > OFFLINE_AFTER ? "offline" : "reconnecting");
    const delay = Math.min(10_000, 500 * 2 ** Math.min(this.attempts, 5));
    this.timer = window.setTimeout(() => this.connect(), delay * (0.75 + Math.random() / 2));
  }

  private setState(state: ConnectionState): void {
    this.state = state;
    this.onState();
  }

  private send(body: Control): void {
    if (this.ws !== null && this.ws.readyState === WebSocket.OPEN && this.state === "live") {
      this.ws.send(encodeControl(body));
    }
  }

  private control(body: Control): void {
    switch (body.type) {
      case "welcome":
        this.principal = body.principal as { subject: string; roles: string[] };
        this.attempts = 0;
        this.since = null;
        this.setState("live");
        for (const [view, sub] of this.views) {
          this.send({ type: "subscribe", view, params: sub.params });
        }
        for (const [id, doc] of this.docs) this.step1(id, doc);
        break;
      case "view": {
        const sub = this.views.get(body.view as string);
        if (sub === undefined) break;
        const { type: _t, view: _v, rows, ...extra } = body;
        sub.state = {
          rows: new Map((rows as Row[]).map((row) => [row.id, row])),
          extra,
          error: null,
        };
        sub.changed(sub.state);
        break;
      }
      case "view_changes": {
        const sub = this.views.get(body.view as string);
        if (sub === undefined) break;
        const { type: _t, view: _v, added, changed, removed, ...extra } = body;
        for (const row of [...(added as Row[]), ...(changed as Row[])]) {
          sub.state.rows.set(row.id, row);
        }
        for (const id of removed as string[]) sub.state.rows.delete(id);
        sub.state.extra = { ...sub.state.extra, ...extra };
        sub.changed(sub.state);
        break;
      }
      case "auth_expiring":
        this.auth.expiring(Number(body.at));
        break;
      case "error": {
        const sub = typeof body.view === "string" ? this.views.get(body.view) : undefined;
        if (sub !== undefined) {
          sub.state.error = String(body.message);
          sub.changed(sub.state);
        } else if (body.code !== "rule_violation") {
          this.onError(String(body.message));
        }
        break;
      }
      default:
        break; // changes, scope, ack…: a dashboard replicates no document of its own
    }
  }

  subscribe(
    view: string,
    params: Record<string, unknown>,
    changed: (state: ViewState) => void,
  ): void {
    const state: ViewState = { rows: new Map(), extra: {}, error: null };
    this.views.set(view, { params, state, changed });
    this.send({ type: "subscribe", view, params });
  }

  unsubscribe(view: string): void {
    if (this.views.delete(view)) this.send({ type: "unsubscribe", view });
  }

  /** A work order as a live CRDT document, synced over this socket. */
  open(id: string): Y.Doc {
    let doc = this.docs.get(id);
    if (doc === undefined) {
      doc = new Y.Doc();
      this.docs.set(id, doc);
      if (this.state === "live") this.step1(id, doc);
    }
    return doc;
  }

  private step1(id: string, doc: Y.Doc): void {
    const encoder = encoding.createEncoder();
    encoding.writeVarUint(encoder, MESSAGE_SYNC);
    syncProtocol.writeSyncStep1(encoder, doc);
    this.ws?.send(encodeDoc(id, encoding.toUint8Array(encoder)));
  }

  private docMessage(id: string, message: Uint8Array): void {
    const doc = this.docs.get(id);
    if (doc === undefined) return;
    const decoder = decoding.createDecoder(message);
    if (decoding.readVarUint(decoder) !== MESSAGE_SYNC) return; // awareness: not shown here
    const step = decoding.readVarUint(decoder);
    // The server's step 2 and updates; its step 1 asks for edits this read-only copy never has.
    if (step === syncProtocol.messageYjsSyncStep2 || step === syncProtocol.messageYjsUpdate) {
      Y.applyUpdate(doc, decoding.readVarUint8Array(decoder), "server");
    }
  }
}
