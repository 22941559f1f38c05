// The dashboard's one `fieldsync.v1` socket: a `@fieldsync/client` for the page, which follows
// the live views and opens work orders as CRDT documents (`client.doc(id)`). The client
// reconnects by itself (jittered backoff) and, once welcomed again, subscribes anew (each view
// answers with all its rows: the catch-up) and syncs the documents it holds. This module only
// turns its events into what the header shows, and feeds it the tokens `auth.ts` renews.
import { FieldsyncClient, MemoryStorage, type TokenRequest } from "@fieldsync/client";

import { type Auth, SignInRequired } from "./auth";

export type ConnectionState = "connecting" | "live" | "reconnecting" | "offline";

const DEVICE_KEY = "fieldsync.device";
const OFFLINE_AFTER = 3; // failed reconnections before the state says "offline since"
const VERSION = "1.0.0"; // the `web` version FIELDSYNC_MIN_CLIENT_VERSIONS checks, as in auth.ts

/** A stable id for this browser, so that the devices view shows it once, not per page load. */
function deviceId(): string {
  let device = localStorage.getItem(DEVICE_KEY);
  if (device === null) {
    device = `dashboard-${crypto.getRandomValues(new Uint32Array(2)).join("")}`;
    localStorage.setItem(DEVICE_KEY, device);
  }
  return device;
}

export class Connection {
  state: ConnectionState = "connecting";
  since: Date | null = null; // when the socket last dropped
  onState: () => void = () => {};
  onError: (message: string) => void = () => {};
  onSignedOut: () => void = () => {};
  readonly client: FieldsyncClient;
  private failures = 0; // connections lost or refused since the last welcome

  constructor(private readonly auth: Auth) {
    this.client = new FieldsyncClient({
      url: `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/v1/sync`,
      token: (request) => this.token(request),
      // In memory: the dashboard edits no document and shows nothing offline (its views come
      // from the server), so nothing of a work order is kept on a shared office computer.
      storage: new MemoryStorage(),
      // Views and the work orders opened, not the whole scope's documents.
      feed: false,
      platform: "web",
      version: VERSION,
      deviceId: deviceId(),
      // A first retry after 0.5 to 1 s: a dropped socket is seen, not only a flicker.
      backoff: { base: 1_000, cap: 10_000, jitter: "equal" },
    });
    this.client.on("status", (status) => {
      if (status === "connected") {
        this.failures = 0;
        this.since = null;
        this.setState("live");
      } else if (status === "disconnected") {
        if (this.since === null) this.since = new Date();
        this.failures += 1;
        this.setState(this.failures > OFFLINE_AFTER ? "offline" : "reconnecting");
      }
    });
    this.client.on("error", (error) => {
      if (error.code !== "rule_violation") this.onError(error.message);
    });
    this.client.on("fatal", ({ code, reason }) => {
      if (code === 4426) this.onError("This dashboard is older than the server accepts: reload the page.");
      else if (code === 4403) this.onError(`The server refused the connection (${reason}).`);
      else this.onSignedOut(); // 4401 reauthenticate
    });
  }

  get principal(): { subject: string; roles: string[] } | null {
    const { subject, roles } = this.client.principal;
    return subject === null ? null : { subject, roles };
  }

  connect(): Promise<void> {
    return this.client.start();
  }

  /** The client's token source: `auth.ts` renews the tokens (silently, before they expire);
   * a socket told its token expires gets one that outlives it. */
  private async token(request: TokenRequest): Promise<string> {
    try {
      return request.reason === "expiring"
        ? await this.auth.outliving(request.expiresAt)
        : await this.auth.current();
    } catch (error) {
      if (error instanceof SignInRequired) void this.client.stop().then(() => this.onSignedOut());
      throw error;
    }
  }

  private setState(state: ConnectionState): void {
    this.state = state;
    this.onState();
  }
}
