/**
 * A device: Yjs documents kept offline in a `Storage`, synced with a fieldsync server over one
 * `fieldsync.v1` WebSocket whenever there is a network (DESIGN.md §3). The behaviour is
 * `fieldsync.client.Client`'s (the Python client), message for message.
 */
import * as Y from 'yjs'
import * as awarenessProtocol from 'y-protocols/awareness'
import {
  type Control,
  type Message,
  ProtocolError,
  SyncStep,
  decodeFrame,
  decodeY,
  encodeAwareness,
  encodeControl,
  encodeDoc,
  encodeFrame,
  encodeSync
} from './codec.js'
import { type Changes, MemoryStorage, type PendingEdit, type Storage, emptyChanges, isEmpty, mergeChanges } from './storage.js'
import { type ViewListener, type ViewName, type ViewTypes, Views } from './views.js'

export const VERSION = '0.1.0'

/** Why the client asks its token source for a token: to open a connection, or because the
 * server said that the socket's token expires at `expiresAt` (epoch milliseconds): the answer
 * should then outlive it (a token the socket holds already is not sent again). */
export type TokenRequest = { reason: 'connect' } | { reason: 'expiring', expiresAt: number }

/** An access token, or a function that fetches a fresh one (called on every connect and on
 * `auth_expiring`, told which). */
export type TokenSource = string | ((request: TokenRequest) => string | Promise<string>)

/** What the client needs of a WebSocket: the browser's, React Native's, or `ws` in Node. */
export interface WebSocketLike {
  binaryType: string
  readonly readyState: number
  onopen: ((event: any) => void) | null
  // `any` events: each runtime types its own (ws, the DOM, React Native), all with these members.
  onmessage: ((event: any /* { data } */) => void) | null
  onclose: ((event: any /* { code, reason } */) => void) | null
  onerror: ((event: any) => void) | null
  send: (data: Uint8Array) => void
  close: (code?: number, reason?: string) => void
}

export type WebSocketConstructor = new (url: string) => WebSocketLike

export interface FieldsyncClientOptions {
  /** The server's `/v1/sync` URL, e.g. `wss://sync.example.com/v1/sync`. */
  url: string
  token: TokenSource
  /** Where documents and queued edits are kept; `MemoryStorage` when not given. */
  storage?: Storage
  /** For runtimes without a global `WebSocket` (Node 20: `import WebSocket from 'ws'`). */
  WebSocket?: WebSocketConstructor
  /** `hello.client`: the platform and version that `FIELDSYNC_MIN_CLIENT_VERSIONS` checks. */
  platform?: string
  version?: string
  /** A stable id for this installation; generated and stored on first start when not given. */
  deviceId?: string
  /** Ask the server for zstd-compressed frames (`hello.caps`); default true. */
  zstd?: boolean
  /** Reconnect delays over `base * 2^attempt` ms, at most `cap` ms: `full` jitter (the
   * default: anywhere from 0) or `equal` (from half of it: a drop is seen for a moment). */
  backoff?: { base?: number, cap?: number, jitter?: 'full' | 'equal' }
  /** Follow the server's change feed (default true): every document in the user's scope comes
   * to the device. `false` (a dashboard): only the documents opened with `doc(id)` sync; the
   * feed's pages just move `since`, and a `scope` that adds documents opens none. */
  feed?: boolean
}

/** `error` from the server: `code` is one of `fieldsync/errors.py`'s (`forbidden_field`, ...). */
export interface ServerError {
  type: 'error'
  code: string
  message: string
  doc?: string
  paths?: string[]
  rule?: string
  detail?: unknown
}

export interface ResetEvent {
  doc: string
  reason: string
  /** The unacknowledged edits the server refused (`forbidden`, `forbidden_field`,
   * `invalid_update`, `doc_too_large`): they are not sent again. Empty after any other reset,
   * whose edits are applied again on top of the server's copy. After every reset but
   * `forbidden` (the document is not the user's) the document is synced afresh: `doc(id)` is a
   * new `Y.Doc`. */
  rejected: Uint8Array[]
}

export interface ScopeEvent { added: string[], removed: string[] }

/** The server closed the socket for good: sign in again (4401 `reauthenticate`, or
 * `token_expired` with a fixed token string), the user lost access (4403), or the app must be
 * upgraded (4426). The client stays offline until `start()` is called again. */
export interface FatalEvent { code: number, reason: string }

export interface Events {
  error: ServerError
  reset: ResetEvent
  scope: ScopeEvent
  fatal: FatalEvent
  status: 'connecting' | 'connected' | 'disconnected'
  synced: string
}

export interface Principal { subject: string | null, roles: string[] }

/** Bytes on the wire, and what the server's frames would have been without zstd. */
export interface Traffic {
  sockets: number
  sent: number
  received: number
  receivedUncompressed: number
  framesReceived: number
  framesCompressed: number
}

// Reset reasons that mean the device's own edit was refused: sending it again cannot help.
const REFUSED = new Set(['forbidden', 'forbidden_field', 'invalid_update', 'doc_too_large'])
// Close codes after which reconnecting cannot help: the user or the app must act.
const FORBIDDEN = 4403
const UPGRADE_REQUIRED = 4426
const UNAUTHORIZED = 4401
const DRAINING = 4503
const DEFAULT_MAX_FRAME = 1 << 20
const DEFAULT_MAX_BODY = 8 << 20
const OPEN = 1
const STORAGE_RETRY_MS = 1_000

type Listener<T> = (value: T) => void

function randomId (): string {
  const bytes = new Uint8Array(16)
  const crypto = (globalThis as { crypto?: { getRandomValues?: (a: Uint8Array) => Uint8Array } }).crypto
  if (crypto?.getRandomValues !== undefined) crypto.getRandomValues(bytes)
  else for (let i = 0; i < bytes.length; i++) bytes[i] = Math.floor(Math.random() * 256)
  return Array.from(bytes, (b) => b.toString(16).padStart(2, '0')).join('')
}

function stateVector (doc: Y.Doc): Map<number, number> {
  return Y.decodeStateVector(Y.encodeStateVector(doc))
}

function toBytes (data: unknown): Uint8Array {
  if (data instanceof Uint8Array) return data // Node's Buffer too
  if (data instanceof ArrayBuffer) return new Uint8Array(data)
  if (ArrayBuffer.isView(data)) return new Uint8Array(data.buffer, data.byteOffset, data.byteLength)
  throw new ProtocolError('text WebSocket message: fieldsync.v1 frames are binary')
}

/**
 * Documents by id (`doc(id)`); edits are queued in `storage` until the server acknowledges them
 * durably, and sync whenever the device is online.
 */
export class FieldsyncClient {
  readonly url: string
  readonly storage: Storage
  readonly traffic: Traffic = {
    sockets: 0, sent: 0, received: 0, receivedUncompressed: 0, framesReceived: 0, framesCompressed: 0
  }

  /** The change sequence this device has caught up to (every document listed up to it synced). */
  since = 0
  deviceId: string
  /** Who the server takes the user to be (`welcome.principal`), kept for offline starts. */
  principal: Principal = { subject: null, roles: [] }
  /** Edits the server refused, by document, for the app to show (see `ResetEvent`). */
  readonly rejected: Array<{ doc: string, reason: string, update: Uint8Array }> = []

  private readonly token: TokenSource
  private readonly WebSocketImpl: WebSocketConstructor
  private readonly platform: string
  private readonly version: string
  private readonly zstd: boolean
  private readonly backoffBase: number
  private readonly backoffCap: number
  private readonly backoffJitter: 'full' | 'equal'
  private readonly feed: boolean
  private attempt = 0
  private socketToken: string | null = null // the token the socket was last given
  private welcomed = false // this socket's `welcome` arrived: views may be subscribed
  private readonly views = new Views((body) => { if (this.welcomed) this.send([encodeControl(body)]) })

  private readonly docs = new Map<string, Y.Doc>()
  private readonly unobserve = new Map<string, () => void>()
  private readonly awarenesses = new Map<string, awarenessProtocol.Awareness>()
  private readonly seen = new Map<string, Map<number, number>>() // state vector at the last event
  private readonly durable = new Map<string, Map<number, number>>() // what the server holds
  private readonly resynced = new Set<string>() // the server's step 1 arrived on this socket
  private readonly synced = new Set<string>()
  private readonly reapply = new Map<string, Uint8Array[]>()
  private pendingEdits: PendingEdit[] = []
  private nextSeq = 1
  // Documents listed by `changes` and not yet synced; `since` waits for them.
  private catchingUp: Set<string> | null = null
  private catchUpTo = 0
  private moreChanges = false

  private loaded: Promise<void> | null = null
  private online = false
  private runner: Promise<void> | null = null
  private ws: WebSocketLike | null = null
  private wake: (() => void) | null = null
  private maxFrame = DEFAULT_MAX_FRAME
  private maxBody = DEFAULT_MAX_BODY
  private outbox: Uint8Array[] = []
  private outboxScheduled = false
  private changes: Changes = emptyChanges()
  private dirty = new Set<string>()
  private writeScheduled = false
  private writing: Promise<void> = Promise.resolve()
  private readonly listeners = new Map<keyof Events, Set<Listener<any>>>()
  private readonly waiters = new Set<() => void>()

  constructor (options: FieldsyncClientOptions) {
    this.url = options.url
    this.token = options.token
    this.storage = options.storage ?? new MemoryStorage()
    const Impl = options.WebSocket ?? (globalThis as { WebSocket?: WebSocketConstructor }).WebSocket
    if (Impl === undefined) {
      throw new TypeError('FieldsyncClient: no global WebSocket; pass one as `WebSocket` (in Node: the ws package)')
    }
    this.WebSocketImpl = Impl
    this.platform = options.platform ?? 'web'
    this.version = options.version ?? VERSION
    this.deviceId = options.deviceId ?? ''
    this.zstd = options.zstd ?? true
    this.backoffBase = options.backoff?.base ?? 200
    this.backoffCap = options.backoff?.cap ?? 30_000
    this.backoffJitter = options.backoff?.jitter ?? 'full'
    this.feed = options.feed ?? true
  }

  // --- events ---------------------------------------------------------------------------

  /** Subscribe to `error`, `reset`, `scope`, `fatal`, `status` or `synced`; returns the
   * function that unsubscribes. */
  on<K extends keyof Events> (event: K, listener: Listener<Events[K]>): () => void {
    let set = this.listeners.get(event)
    if (set === undefined) this.listeners.set(event, set = new Set())
    set.add(listener)
    return () => { set?.delete(listener) }
  }

  private emit<K extends keyof Events> (event: K, value: Events[K]): void {
    for (const listener of this.listeners.get(event) ?? []) {
      try {
        listener(value)
      } catch (error) {
        console.error(`fieldsync: a ${event} listener threw`, error) // the sync goes on
      }
    }
  }

  /** The user's name and role for the log entries of `workOrder.setStatus` and
   * `workOrder.recordMeterReading`: `welcome.principal`'s subject and first role (kept from the
   * last connection, so offline starts have it too). */
  actor (): { by: string, role: string } {
    const { subject, roles } = this.principal
    if (subject === null || roles.length === 0) {
      throw new Error('FieldsyncClient: the user is not known yet (no welcome from the server so far)')
    }
    return { by: subject, role: roles[0] }
  }

  // --- documents ------------------------------------------------------------------------

  /** The local replica of `id` (`wo:…`, `form:…`), created empty if the device has none; it
   * syncs whenever the device is online. Call after `start()` has resolved. A `reset` replaces
   * it: take the new one from the event (or call `doc(id)` again). */
  doc (id: string): Y.Doc {
    this.requireLoaded()
    let doc = this.docs.get(id)
    if (doc === undefined) {
      doc = this.open(id, null)
      this.send([this.step1(id)])
    }
    return doc
  }

  /** The ids of the documents on this device. */
  documents (): string[] {
    return [...this.docs.keys()]
  }

  /** Presence for one document (y-protocols awareness), relayed to the document's other
   * replicas while online, never stored. */
  awareness (id: string): awarenessProtocol.Awareness {
    const doc = this.doc(id)
    let awareness = this.awarenesses.get(id)
    if (awareness === undefined) {
      awareness = new awarenessProtocol.Awareness(doc)
      awareness.on('update', ({ added, updated, removed }: Record<string, number[]>, origin: unknown) => {
        if (origin === this || !this.resynced.has(id)) return
        const changed = added.concat(updated, removed)
        this.send([encodeDoc(id, encodeAwareness(awarenessProtocol.encodeAwarenessUpdate(awareness!, changed)))])
      })
      this.awarenesses.set(id, awareness)
    }
    return awareness
  }

  /** Follow a live view (dashboards: supervisors, managers, admins): `listener` gets the
   * view's state at once when the server's rows arrive, and again at every change (or when the
   * server refuses the subscription: `state.error`). Kept across reconnects, and across
   * `stop()`/`start()`; one subscription per view name (a second replaces the first). Returns
   * the function that unsubscribes. */
  view<N extends ViewName> (view: N, params: ViewTypes[N]['params'], listener: ViewListener<N>): () => void {
    return this.views.add(view, params, listener)
  }

  /** Local edits the server has not yet acknowledged as durable (of one document, or all). */
  pending (doc?: string): number {
    return doc === undefined
      ? this.pendingEdits.length
      : this.pendingEdits.filter((edit) => edit.doc === doc).length
  }

  /** Resolves once no local edit (of `doc`, or all) is pending: each is held durably by the
   * server, or was refused by it (`reset` names those). */
  waitAcked (doc?: string, timeoutMs = 30_000): Promise<void> {
    return this.waitFor(() => this.pending(doc) === 0, timeoutMs, `edits of ${doc ?? 'every document'} acknowledged`)
  }

  /** Resolves once `id` has synced with the server (received the server's copy) since the
   * device opened it, or since the server last listed it as changed. */
  waitSynced (id: string, timeoutMs = 30_000): Promise<void> {
    this.doc(id)
    return this.waitFor(() => this.synced.has(id), timeoutMs, `${id} synced`)
  }

  /** Resolves once every document the server listed in `changes` has synced (and `since`
   * moved). */
  waitCaughtUp (timeoutMs = 30_000): Promise<void> {
    return this.waitFor(() => this.caughtUp, timeoutMs, 'caught up')
  }

  /** True on a connection whose `changes` are all synced. */
  caughtUp = false

  /** Resolves once everything so far is in `storage`. */
  async flush (): Promise<void> {
    this.write()
    await this.writing
  }

  private waitFor (ready: () => boolean, timeoutMs: number, what: string): Promise<void> {
    if (ready()) return Promise.resolve()
    return new Promise((resolve, reject) => {
      const check = (): void => {
        if (!ready()) return
        clearTimeout(timer)
        this.waiters.delete(check)
        resolve()
      }
      const timer = setTimeout(() => {
        this.waiters.delete(check)
        reject(new Error(`fieldsync: timed out after ${timeoutMs} ms waiting for ${what}`))
      }, timeoutMs)
      this.waiters.add(check)
    })
  }

  private notify (): void {
    for (const check of [...this.waiters]) check()
  }

  private requireLoaded (): void {
    if (this.loaded === null) throw new Error('FieldsyncClient: call `await client.start()` first')
  }

  private open (id: string, state: Uint8Array | null): Y.Doc {
    const doc = new Y.Doc()
    if (state !== null) Y.applyUpdate(doc, state, this)
    const listener = (update: Uint8Array, origin: unknown): void => this.changed(id, doc, update, origin)
    doc.on('update', listener)
    this.unobserve.set(id, () => doc.off('update', listener))
    this.docs.set(id, doc)
    this.seen.set(id, stateVector(doc))
    return doc
  }

  private changed (id: string, doc: Y.Doc, update: Uint8Array, origin: unknown): void {
    const state = stateVector(doc)
    const seen = this.seen.get(id) ?? new Map<number, number>()
    this.seen.set(id, state)
    this.dirty.add(id)
    if (origin !== this) {
      // What this edit added, by client id (an update names a client only from the struct it
      // starts at). A delete-only edit adds no clock: the next ack of the document clears it,
      // and every reconnect sends the server all it lacks, delete set included.
      const clock: Record<string, number> = {}
      for (const [client, value] of state) if (value > (seen.get(client) ?? 0)) clock[String(client)] = value
      const edit: PendingEdit = { seq: this.nextSeq++, doc: id, update, clock }
      this.pendingEdits.push(edit)
      this.changes.edits.push(edit)
      // Until this connection's resync of the document has gone out, an edit may build on one
      // the server never got: the resync (our step 2) carries it instead.
      if (this.resynced.has(id)) this.send([encodeDoc(id, encodeSync(SyncStep.Update, update))])
    }
    this.scheduleWrite()
  }

  /** Drop a document from the device, with its queued edits (out of scope, or refused). */
  private forget (id: string): void {
    this.release(id)
    this.pendingEdits = this.pendingEdits.filter((edit) => edit.doc !== id)
    this.changes.edits = this.changes.edits.filter((edit) => edit.doc !== id)
    this.changes.docs.delete(id)
    this.changes.forgotten.push(id)
    this.scheduleWrite()
    if (this.catchingUp?.delete(id) === true) this.advance()
    this.notify()
  }

  /** Let go of the replica of `id` in memory (its queued edits stay). */
  private release (id: string): void {
    this.unobserve.get(id)?.()
    this.unobserve.delete(id)
    this.docs.delete(id)
    this.awarenesses.get(id)?.destroy()
    this.awarenesses.delete(id)
    this.seen.delete(id)
    this.durable.delete(id)
    this.resynced.delete(id)
    this.synced.delete(id)
    this.dirty.delete(id)
    this.reapply.delete(id)
  }

  // --- storage --------------------------------------------------------------------------

  private scheduleWrite (): void {
    if (this.writeScheduled) return
    this.writeScheduled = true
    // One write per turn of the event loop: a BATCH of 500 step 2s is one transaction.
    setTimeout(() => this.write(), 0)
  }

  private write (): void {
    this.writeScheduled = false
    for (const id of this.dirty) {
      const doc = this.docs.get(id)
      if (doc !== undefined) this.changes.docs.set(id, Y.encodeStateAsUpdate(doc))
    }
    this.dirty.clear()
    if (isEmpty(this.changes)) return
    const changes = this.changes
    this.changes = emptyChanges()
    // Writes run one after the other, in order: an edit is stored before its ack deletes it.
    this.writing = this.writing.then(async () => await this.storage.write(changes)).catch((error) => {
      // Nothing is dropped: the failed changes go first into the next write (the disk full
      // now may have room later), and the app hears of it.
      this.changes = mergeChanges(changes, this.changes)
      this.emit('error', { type: 'error', code: 'storage_failed', message: String(error) })
      if (!this.writeScheduled) {
        this.writeScheduled = true
        setTimeout(() => this.write(), STORAGE_RETRY_MS)
      }
    })
  }

  // --- connection -----------------------------------------------------------------------

  /** Load the device's documents from storage, then go online: connect, and reconnect with
   * jittered backoff whenever the link drops. Resolves once the documents are loaded (offline
   * too); `waitCaughtUp()` waits for the server. */
  async start (): Promise<void> {
    if (this.loaded === null) this.loaded = this.load()
    await this.loaded
    this.online = true
    if (this.runner === null) {
      this.runner = this.run().finally(() => { this.runner = null })
    }
  }

  /** Go offline (edits keep queuing in storage); resolves once the socket is closed and
   * everything is stored. `start()` goes online again. */
  async stop (): Promise<void> {
    this.online = false
    for (const awareness of this.awarenesses.values()) {
      awarenessProtocol.removeAwarenessStates(awareness, [awareness.clientID], 'stop')
    }
    this.flushOutbox()
    this.ws?.close(1000, 'offline')
    this.wake?.()
    await this.runner
    await this.flush()
  }

  /** Stop, and release the awareness timers. The storage stays open (it is the app's). */
  async destroy (): Promise<void> {
    await this.stop()
    for (const awareness of this.awarenesses.values()) awareness.destroy()
    this.awarenesses.clear()
  }

  private async load (): Promise<void> {
    const stored = await this.storage.load()
    for (const [id, state] of stored.docs) this.open(id, state)
    this.pendingEdits = stored.pending.slice()
    // A queued edit is in its document's stored state, unless the app stopped between a reset
    // and the server's copy arriving: applying it again changes nothing in the first case.
    for (const edit of this.pendingEdits) {
      Y.applyUpdate(this.docs.get(edit.doc) ?? this.open(edit.doc, null), edit.update, this)
    }
    this.nextSeq = this.pendingEdits.reduce((max, edit) => Math.max(max, edit.seq), 0) + 1
    this.since = Number(stored.meta.get('since') ?? 0)
    const principal = stored.meta.get('principal')
    if (principal !== undefined) this.principal = JSON.parse(principal)
    if (this.deviceId === '') this.deviceId = stored.meta.get('device_id') ?? randomId()
    if (stored.meta.get('device_id') !== this.deviceId) {
      this.changes.meta.set('device_id', this.deviceId)
      this.scheduleWrite()
    }
  }

  private async tokenValue (request: TokenRequest): Promise<string> {
    return typeof this.token === 'string' ? this.token : await this.token(request)
  }

  private async run (): Promise<void> {
    while (this.online) {
      let close: FatalEvent | null = null
      try {
        close = await this.session()
      } catch {
        // The token source failed, or the socket could not be made: try again later.
      }
      if (close !== null) {
        // A fixed token that expired never becomes valid again: only a token source renews.
        const fatal = close.code === FORBIDDEN || close.code === UPGRADE_REQUIRED ||
          (close.code === UNAUTHORIZED && (close.reason === 'reauthenticate' || typeof this.token === 'string'))
        if (fatal) {
          this.online = false
          this.emit('fatal', close)
          break
        }
        if (close.code === DRAINING) this.attempt = 0 // reconnect elsewhere at once
      }
      if (!this.online) break
      const delay = Math.min(this.backoffCap, this.backoffBase * 2 ** this.attempt++)
      await this.sleep(this.backoffJitter === 'full' ? Math.random() * delay : delay / 2 + Math.random() * delay / 2)
    }
  }

  private sleep (ms: number): Promise<void> {
    return new Promise((resolve) => {
      const timer = setTimeout(done, ms)
      const self = this
      function done (): void {
        clearTimeout(timer)
        self.wake = null
        resolve()
      }
      this.wake = done
    })
  }

  /** One connection, from open to close; resolves with the close code and reason. */
  private async session (): Promise<FatalEvent> {
    // A token source may hang (no network to the identity provider): `stop()` must not.
    const stopped = new Promise<null>((resolve) => { this.wake = () => resolve(null) })
    const token = await Promise.race([this.tokenValue({ reason: 'connect' }), stopped])
    if (token === null || !this.online) return { code: 1000, reason: 'offline' }
    this.emit('status', 'connecting')
    return await new Promise<FatalEvent>((resolve) => {
      const ws = new this.WebSocketImpl(this.url)
      this.traffic.sockets++
      ws.binaryType = 'arraybuffer'
      this.ws = ws
      this.wake = () => ws.close(1000, 'offline')
      ws.onopen = () => {
        this.resynced.clear()
        this.outbox = []
        this.caughtUp = false
        this.socketToken = token
        // The token travels in `hello` (as browsers must send it), never in the URL. Every
        // local document is offered at once: the server answers with what the device lacks
        // and asks for what it lacks, so offline edits flow up in the same exchange.
        const hello: Control = {
          type: 'hello',
          client: { platform: this.platform, version: this.version, device_id: this.deviceId },
          since: this.since,
          caps: this.zstd ? ['zstd', 'batch'] : ['batch'],
          token
        }
        this.send([encodeControl(hello), ...[...this.docs.keys()].map((id) => this.step1(id))])
      }
      ws.onmessage = (event) => {
        try {
          this.receive(toBytes(event.data))
        } catch (error) {
          // A frame the client cannot read: the server speaks another protocol version, or
          // the link corrupted it. Start over on a new connection.
          this.emit('error', { type: 'error', code: 'protocol_error', message: String(error) })
          ws.close(4400, 'protocol error')
        }
      }
      ws.onerror = () => {} // `onclose` follows and says how it ended
      ws.onclose = (event) => {
        if (this.ws === ws) this.ws = null
        this.wake = null
        this.welcomed = false
        this.resynced.clear()
        this.caughtUp = false
        this.catchingUp = null
        for (const awareness of this.awarenesses.values()) {
          const others = [...awareness.getStates().keys()].filter((client) => client !== awareness.clientID)
          awarenessProtocol.removeAwarenessStates(awareness, others, this)
        }
        this.emit('status', 'disconnected')
        resolve({ code: event.code, reason: String(event.reason ?? '') })
      }
    })
  }

  private step1 (id: string): Uint8Array {
    return encodeDoc(id, encodeSync(SyncStep.Step1, Y.encodeStateVector(this.docs.get(id)!)))
  }

  /** Queue bodies for the socket; everything queued in one turn goes as one BATCH frame (or a
   * few, each under half the server's frame limit). Nothing is queued while offline: each
   * connection starts by offering every document. */
  private send (bodies: Uint8Array[]): void {
    if (this.ws === null || this.ws.readyState !== OPEN) return
    this.outbox.push(...bodies)
    if (this.outboxScheduled) return
    this.outboxScheduled = true
    queueMicrotask(() => this.flushOutbox())
  }

  private flushOutbox (): void {
    this.outboxScheduled = false
    const bodies = this.outbox
    this.outbox = []
    const ws = this.ws
    if (ws === null || ws.readyState !== OPEN || bodies.length === 0) return
    let chunk: Uint8Array[] = []
    let size = 0
    const emit = (): void => {
      const frame = encodeFrame(chunk)
      this.traffic.sent += frame.length
      ws.send(frame)
      chunk = []
      size = 0
    }
    for (const body of bodies) {
      if (chunk.length > 0 && size + body.length + 8 > this.maxFrame / 2) emit()
      chunk.push(body)
      size += body.length + 8
    }
    emit()
  }

  // --- incoming -------------------------------------------------------------------------

  private receive (frame: Uint8Array): void {
    this.traffic.received += frame.length
    this.traffic.framesReceived++
    const messages: Message[] = decodeFrame(frame, this.maxBody)
    if ((frame[0] & 1) === 1) this.traffic.framesCompressed++
    this.traffic.receivedUncompressed += 1 + messages.reduce((n, m) =>
      n + (m.kind === 'doc' ? m.doc.length + m.message.length + 2 : JSON.stringify(m.body).length + 1), 0)
    for (const message of messages) {
      if (message.kind === 'control') this.control(message.body)
      else this.docMessage(message.doc, message.message)
    }
    this.notify()
  }

  private control (body: Control): void {
    switch (body.type) {
      case 'welcome': {
        const principal = (body.principal ?? {}) as Partial<Principal>
        this.principal = { subject: principal.subject ?? this.principal.subject, roles: principal.roles ?? this.principal.roles }
        this.changes.meta.set('principal', JSON.stringify(this.principal))
        this.scheduleWrite()
        const limits = (body.limits ?? {}) as { max_frame?: number, max_body?: number }
        this.maxFrame = limits.max_frame ?? DEFAULT_MAX_FRAME
        this.maxBody = limits.max_body ?? DEFAULT_MAX_BODY
        this.attempt = 0
        this.welcomed = true
        this.send(this.views.resubscribe().map(encodeControl))
        this.emit('status', 'connected')
        break
      }
      case 'changes':
        this.changesPage(body as unknown as { docs?: Array<{ id: string }>, removed?: string[], upto: number, more?: boolean })
        break
      case 'ack':
        this.acked(String(body.doc), (body.clock ?? {}) as Record<string, number>)
        break
      case 'scope': {
        const removed = (body.removed ?? []) as string[]
        const added = this.feed ? ((body.added ?? []) as string[]).filter((id) => !this.docs.has(id)) : []
        for (const id of removed) this.forget(id)
        for (const id of added) this.open(id, null)
        this.send(added.map((id) => this.step1(id)))
        this.emit('scope', { added, removed })
        break
      }
      case 'reset':
        this.reset(String(body.doc), String(body.reason ?? ''))
        break
      case 'view':
      case 'view_changes':
        this.views.receive(body)
        break
      case 'error':
        // A view's refusal goes to that view's listener; every other error to the app.
        if (!this.views.receive(body)) this.emit('error', body as unknown as ServerError)
        break
      case 'auth_expiring':
        if (typeof this.token !== 'string') {
          const ws = this.ws
          this.tokenValue({ reason: 'expiring', expiresAt: typeof body.at === 'number' ? body.at * 1000 : Date.now() }).then((token) => {
            // The same token again would only bring the same notice back at once.
            if (this.ws !== ws || token === this.socketToken) return
            this.socketToken = token
            this.send([encodeControl({ type: 'auth', token })])
          }, () => {}) // no fresh token: the socket closes at expiry and the next connect retries
        }
        break
      default:
        break // unknown types are ignored so that both sides can evolve (DESIGN.md §3)
    }
  }

  /** Sync every listed document; `since` moves to `upto` only once all of them are synced, so a
   * crash in between never skips a change. */
  private changesPage (page: { docs?: Array<{ id: string }>, removed?: string[], upto: number, more?: boolean }): void {
    // Documents that left the scope while the device was away: as a live `scope` would say.
    const removed = (page.removed ?? []).filter((id) => this.docs.has(id))
    for (const id of removed) this.forget(id)
    if (removed.length > 0) this.emit('scope', { added: [], removed })
    const wanted = (page.docs ?? []).map((d) => d.id).filter((id) => this.feed || this.docs.has(id))
    if (this.catchingUp === null) this.catchingUp = new Set()
    for (const id of wanted) {
      this.catchingUp.add(id)
      if (this.docs.has(id)) this.synced.delete(id)
      else this.open(id, null)
    }
    this.catchUpTo = page.upto
    this.moreChanges = page.more === true
    this.advance()
    this.send(wanted.map((id) => this.step1(id)))
  }

  private advance (): void {
    if (this.catchingUp === null || this.catchingUp.size > 0 || this.moreChanges) return
    this.catchingUp = null
    this.since = this.catchUpTo
    this.caughtUp = true
    this.changes.meta.set('since', String(this.since))
    this.scheduleWrite()
  }

  private docMessage (id: string, message: Uint8Array): void {
    const doc = this.docs.get(id)
    if (doc === undefined) return
    const y = decodeY(message)
    if (y.type === 'awareness') {
      const awareness = this.awarenesses.get(id)
      if (awareness !== undefined) awarenessProtocol.applyAwarenessUpdate(awareness, y.payload, this)
      return
    }
    if (y.type !== 'sync') return
    if (y.step === SyncStep.Step1) {
      // The server's state vector is durable (it is sent once everything it covers is
      // committed): edits it covers may be forgotten.
      const clock: Record<string, number> = {}
      for (const [client, value] of Y.decodeStateVector(y.payload)) clock[String(client)] = value
      this.acked(id, clock)
      this.resynced.add(id)
      const replies = [encodeDoc(id, encodeSync(SyncStep.Step2, Y.encodeStateAsUpdate(doc, y.payload)))]
      const awareness = this.awarenesses.get(id)
      if (awareness?.getLocalState() != null) {
        replies.push(encodeDoc(id, encodeAwareness(awarenessProtocol.encodeAwarenessUpdate(awareness, [awareness.clientID]))))
      }
      this.send(replies)
      return
    }
    Y.applyUpdate(doc, y.payload, this)
    if (y.step === SyncStep.Step2) {
      // Still queued as they were (see `reset`): applied as the server's, not queued again.
      for (const update of this.reapply.get(id) ?? []) Y.applyUpdate(doc, update, this)
      this.reapply.delete(id)
      this.synced.add(id)
      this.emit('synced', id)
      if (this.catchingUp?.delete(id) === true) this.advance()
    }
  }

  private acked (id: string, clock: Record<string, number>): void {
    let durable = this.durable.get(id)
    if (durable === undefined) this.durable.set(id, durable = new Map())
    for (const [client, value] of Object.entries(clock)) {
      const key = Number(client)
      if (value > (durable.get(key) ?? 0)) durable.set(key, value)
    }
    const kept: PendingEdit[] = []
    for (const edit of this.pendingEdits) {
      const covered = edit.doc === id &&
        Object.entries(edit.clock).every(([client, end]) => (durable!.get(Number(client)) ?? 0) >= end)
      if (covered) this.changes.acked.push({ doc: edit.doc, seq: edit.seq })
      else kept.push(edit)
    }
    if (kept.length !== this.pendingEdits.length) {
      this.pendingEdits = kept
      this.scheduleWrite()
    }
  }

  /** The server told this device to drop its copy. Edits the server refused go to `rejected`
   * (and the event) for the app to show; after any other reset (the server lost its copy in
   * memory, the device was offline too long) the unacknowledged edits are applied again on top
   * of the server's state once it arrives, so no field work is lost. They stay queued (in
   * memory and in storage) meanwhile: re-applied, an update makes the same Yjs items, with the
   * same client ids and clocks, so the acks that will cover them are the ones they wait for. */
  private reset (id: string, reason: string): void {
    const kept = this.pendingEdits.filter((edit) => edit.doc === id).map((edit) => edit.update)
    const awareness = this.awarenesses.get(id)
    const local = awareness?.getLocalState() ?? null
    const refused = REFUSED.has(reason)
    if (refused) {
      this.forget(id)
      for (const update of kept) this.rejected.push({ doc: id, reason, update })
    } else {
      this.release(id)
    }
    // `forbidden`: the document is not the user's (any more): asking again would be refused
    // again. Otherwise the server's copy is synced afresh.
    if (reason !== 'forbidden') {
      this.open(id, null)
      this.dirty.add(id) // the dropped copy leaves storage too
      this.scheduleWrite()
      if (!refused) this.reapply.set(id, kept)
      if (local !== null) this.awareness(id).setLocalState(local)
      this.send([this.step1(id)])
    }
    this.emit('reset', { doc: id, reason, rejected: refused ? kept : [] })
    // A document offered on connect that was reassigned meanwhile is refused before `changes`
    // can list it as removed: the app hears of it as of any other that left the scope.
    if (reason === 'forbidden') this.emit('scope', { added: [], removed: [id] })
  }
}
