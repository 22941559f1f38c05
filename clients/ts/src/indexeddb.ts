/**
 * `Storage` on IndexedDB, for browsers and Capacitor/Ionic WebViews: one database per device
 * (and user), three object stores, each `write` one read-write transaction that resolves only
 * once the transaction has completed (committed).
 */
import type { Changes, PendingEdit, Storage, StoredState } from './storage.js'

const VERSION = 1
const DOCS = 'docs' // key: document id; value: its whole state (a Yjs update)
const PENDING = 'pending' // keyPath [doc, seq]: a document's edits are one key range
const META = 'meta' // key: name; value: text

export interface IndexedDBStorageOptions {
  /** Database name; one per signed-in user, so that two users of a device never share edits. */
  name?: string
  /** Defaults to `globalThis.indexedDB`. */
  indexedDB?: IDBFactory
}

function done (request: IDBRequest): Promise<any> {
  return new Promise((resolve, reject) => {
    request.onsuccess = () => resolve(request.result)
    request.onerror = () => reject(request.error)
  })
}

function completed (tx: IDBTransaction): Promise<void> {
  return new Promise((resolve, reject) => {
    tx.oncomplete = () => resolve()
    tx.onerror = () => reject(tx.error)
    tx.onabort = () => reject(tx.error ?? new Error('IndexedDB transaction aborted'))
  })
}

export class IndexedDBStorage implements Storage {
  readonly name: string
  private readonly factory: IDBFactory
  private db: Promise<IDBDatabase> | null = null

  constructor (options: IndexedDBStorageOptions = {}) {
    this.name = options.name ?? 'fieldsync'
    const factory = options.indexedDB ?? (globalThis as { indexedDB?: IDBFactory }).indexedDB
    if (factory === undefined) throw new Error('IndexedDBStorage: this runtime has no indexedDB')
    this.factory = factory
  }

  private open (): Promise<IDBDatabase> {
    if (this.db === null) {
      this.db = new Promise((resolve, reject) => {
        const request = this.factory.open(this.name, VERSION)
        request.onupgradeneeded = () => {
          const db = request.result
          if (!db.objectStoreNames.contains(DOCS)) db.createObjectStore(DOCS)
          if (!db.objectStoreNames.contains(PENDING)) {
            db.createObjectStore(PENDING, { keyPath: ['doc', 'seq'] })
          }
          if (!db.objectStoreNames.contains(META)) db.createObjectStore(META)
        }
        request.onsuccess = () => {
          const db = request.result
          // Another tab upgrading the schema: let it, this one reopens on its next start.
          db.onversionchange = () => db.close()
          resolve(db)
        }
        request.onerror = () => reject(request.error)
        request.onblocked = () => reject(new Error(`IndexedDB ${this.name} is blocked by another tab`))
      })
      this.db.catch(() => { this.db = null })
    }
    return this.db
  }

  async load (): Promise<StoredState> {
    const db = await this.open()
    const tx = db.transaction([DOCS, PENDING, META], 'readonly')
    const docs = new Map<string, Uint8Array>()
    const meta = new Map<string, string>()
    const [docKeys, docValues, pending, metaKeys, metaValues] = await Promise.all([
      done(tx.objectStore(DOCS).getAllKeys()),
      done(tx.objectStore(DOCS).getAll()),
      done(tx.objectStore(PENDING).getAll()), // by document, then seq
      done(tx.objectStore(META).getAllKeys()),
      done(tx.objectStore(META).getAll())
    ])
    docKeys.forEach((key: string, i: number) => docs.set(key, new Uint8Array(docValues[i])))
    metaKeys.forEach((key: string, i: number) => meta.set(key, metaValues[i]))
    return {
      docs,
      pending: (pending as PendingEdit[])
        .map((edit) => ({ ...edit, update: new Uint8Array(edit.update) }))
        .sort((a, b) => a.seq - b.seq),
      meta
    }
  }

  async write (changes: Changes): Promise<void> {
    const db = await this.open()
    const tx = db.transaction([DOCS, PENDING, META], 'readwrite')
    const finished = completed(tx)
    const docs = tx.objectStore(DOCS)
    const pending = tx.objectStore(PENDING)
    const meta = tx.objectStore(META)
    // The requests of one transaction run in the order they are made: forgetting comes first.
    for (const doc of changes.forgotten) {
      docs.delete(doc)
      pending.delete(IDBKeyRange.bound([doc], [doc, []])) // every [doc, seq]: arrays sort last
    }
    for (const [doc, state] of changes.docs) docs.put(state, doc)
    for (const edit of changes.edits) pending.put(edit)
    for (const edit of changes.acked) pending.delete([edit.doc, edit.seq])
    for (const [key, value] of changes.meta) meta.put(value, key)
    await finished
  }

  async close (): Promise<void> {
    if (this.db !== null) (await this.db).close()
    this.db = null
  }
}
