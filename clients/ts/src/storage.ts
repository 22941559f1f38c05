/**
 * A device's offline state behind one small interface: the documents, the local edits the
 * server has not yet acknowledged as durable, and a few named values (the change sequence the
 * device has caught up to, its device id, who its user is).
 *
 * Implementations: `MemoryStorage` (tests, and apps that keep nothing), `IndexedDBStorage`
 * (browsers, Capacitor/Ionic). A React Native app implements `Storage` over its SQLite; the
 * README shows the three tables and the one transaction `write` needs.
 */

/** A local edit queued until the server holds it durably. */
export interface PendingEdit {
  /** Increasing across the device's life: the order the edits were made in. */
  seq: number
  doc: string
  /** The Yjs update the edit made (as `Y.Doc`'s `update` event gave it). */
  update: Uint8Array
  /**
   * For each Yjs client id (decimal text) the edit advanced, the clock it reached: the edit is
   * durable once every one of them is covered by the clocks an `ack` reports. Empty for an edit
   * that only deletes (the next ack of its document covers it: every reconnect sends the server
   * the whole delete set it lacks anyway).
   */
  clock: Record<string, number>
}

/** Everything a device holds, read once when the client starts. */
export interface StoredState {
  docs: Map<string, Uint8Array>
  /** Oldest first. */
  pending: PendingEdit[]
  meta: Map<string, string>
}

/**
 * What changed since the last write, to be applied atomically (one transaction), in this
 * order: `forgotten`, `docs`, `edits`, `acked`, `meta`.
 */
export interface Changes {
  /** Documents dropped together with their queued edits (out of scope, or reset). */
  forgotten: string[]
  /** Document id to its whole state (`Y.encodeStateAsUpdate`), replacing what was there. */
  docs: Map<string, Uint8Array>
  /** Local edits to queue. */
  edits: PendingEdit[]
  /** Queued edits the server now holds durably: delete them. */
  acked: Array<{ doc: string, seq: number }>
  meta: Map<string, string>
}

export interface Storage {
  load: () => Promise<StoredState>
  /** Apply `changes` in one transaction; resolve once they are stored. */
  write: (changes: Changes) => Promise<void>
  close: () => Promise<void>
}

export function emptyChanges (): Changes {
  return { forgotten: [], docs: new Map(), edits: [], acked: [], meta: new Map() }
}

export function isEmpty (changes: Changes): boolean {
  return changes.forgotten.length === 0 && changes.docs.size === 0 && changes.edits.length === 0 &&
    changes.acked.length === 0 && changes.meta.size === 0
}

/** One `Changes` that does what `older` then `newer` do (a failed write is retried with the
 * next one). */
export function mergeChanges (older: Changes, newer: Changes): Changes {
  const gone = new Set(newer.forgotten)
  const docs = new Map([...older.docs].filter(([doc]) => !gone.has(doc)))
  for (const [doc, state] of newer.docs) docs.set(doc, state)
  return {
    forgotten: [...new Set([...older.forgotten, ...newer.forgotten])],
    docs,
    edits: older.edits.filter((edit) => !gone.has(edit.doc)).concat(newer.edits),
    acked: older.acked.filter((edit) => !gone.has(edit.doc)).concat(newer.acked),
    meta: new Map([...older.meta, ...newer.meta])
  }
}

/**
 * Applies `changes` to plain maps; the reference semantics every `Storage` follows, used by
 * `MemoryStorage` (and handy for a storage that persists a whole snapshot at a time).
 */
export function applyChanges (state: StoredState, changes: Changes): void {
  const forgotten = new Set(changes.forgotten)
  for (const doc of forgotten) state.docs.delete(doc)
  const acked = new Set(changes.acked.map((edit) => edit.seq))
  state.pending = state.pending
    .filter((edit) => !forgotten.has(edit.doc))
    .concat(changes.edits)
    .filter((edit) => !acked.has(edit.seq))
  for (const [doc, data] of changes.docs) state.docs.set(doc, data)
  for (const [key, value] of changes.meta) state.meta.set(key, value)
}

/**
 * Keeps everything in memory, for tests and for apps that need nothing across restarts. One
 * instance handed to a second client after the first stopped is that device restarting.
 */
export class MemoryStorage implements Storage {
  private state: StoredState = { docs: new Map(), pending: [], meta: new Map() }

  async load (): Promise<StoredState> {
    return {
      docs: new Map(this.state.docs),
      pending: this.state.pending.slice(),
      meta: new Map(this.state.meta)
    }
  }

  async write (changes: Changes): Promise<void> {
    applyChanges(this.state, changes)
  }

  async close (): Promise<void> {}
}
