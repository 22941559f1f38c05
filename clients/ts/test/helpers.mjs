// Shared by the Node tests: they run against a real fieldsync server and its development
// issuer, which `tests/clients/test_ts_client.py` starts and names in the environment:
//   FIELDSYNC_SYNC_URL   ws://127.0.0.1:<port>/v1/sync
//   FIELDSYNC_TOKEN_URL  the issuer's token endpoint (password grant, the test users' password)
//   FIELDSYNC_SHORT_TOKEN  a token for tina that expires a few seconds after the run starts
import { readFile, rename, writeFile } from 'node:fs/promises'
import WebSocket from 'ws'
import * as Y from 'yjs'
import { FieldsyncClient, MemoryStorage, applyChanges, workOrder } from '../dist/index.js'

export const SYNC_URL = required('FIELDSYNC_SYNC_URL')
const TOKEN_URL = required('FIELDSYNC_TOKEN_URL')

function required (name) {
  const value = process.env[name]
  if (!value) throw new Error(`${name} is not set: run these tests through tests/clients/test_ts_client.py`)
  return value
}

/** A fresh access token for a test user (tests/harness.py USERS). */
export async function token (user) {
  const response = await fetch(TOKEN_URL, {
    method: 'POST',
    headers: { 'content-type': 'application/x-www-form-urlencoded' },
    body: new URLSearchParams({ grant_type: 'password', username: user, password: 'demo' })
  })
  if (!response.ok) throw new Error(`token for ${user}: ${response.status} ${await response.text()}`)
  return (await response.json()).access_token
}

/** A client for `user`, not started; `options` override (storage, token, zstd, ...). */
export function newDevice (user, options = {}) {
  return new FieldsyncClient({
    url: SYNC_URL,
    token: () => token(user),
    storage: new MemoryStorage(),
    WebSocket,
    platform: 'test',
    backoff: { base: 20, cap: 500 },
    ...options
  })
}

/** A started client for `user`. */
export async function device (user, options = {}) {
  const client = newDevice(user, options)
  await client.start()
  return client
}

let unique = 0
/** A fresh work order id, unique across test files and runs against one server. */
export function newId (prefix = 'ts') {
  return `wo:${prefix}-${process.pid}-${Date.now().toString(36)}-${++unique}`
}

/** A supervisor creates a work order as `tests/harness.py` `work_order` does. */
export function createWorkOrder (supervisor, id, { assignee = 'tina', title = `Inspect pump ${id}` } = {}) {
  const doc = supervisor.doc(id)
  doc.transact(() => {
    const fields = doc.getMap('fields')
    for (const [key, value] of Object.entries({
      number: id.split(':')[1], title, assignee, team: 'north', region: 'east'
    })) fields.set(key, value)
    workOrder.setStatus(doc, 'assigned', supervisor.actor())
    doc.getArray('checklist').push([new Y.Map(Object.entries({ id: 'c1', label: 'Check seals', required: true, done: false }))])
  })
  return doc
}

/** Resolves once `predicate()` holds, checked after every turn of the event loop that follows
 * a frame (state with no event of its own: what another device sees). */
export async function eventually (predicate, timeoutMs = 10_000, what = 'condition') {
  const deadline = Date.now() + timeoutMs
  while (!(await predicate())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`)
    await new Promise((resolve) => setTimeout(resolve, 5))
  }
}

/** The next `event` the client emits that satisfies `predicate`. */
export function next (client, event, predicate = () => true, timeoutMs = 10_000) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => { off(); reject(new Error(`no ${event} within ${timeoutMs} ms`)) }, timeoutMs)
    const off = client.on(event, (value) => {
      if (!predicate(value)) return
      clearTimeout(timer)
      off()
      resolve(value)
    })
  })
}

/**
 * A `Storage` kept in one JSON file, replaced atomically on every write (written beside, then
 * renamed): enough for tests of a device restarting, and the shape a React Native app's storage
 * follows (see the README for SQLite).
 */
export class FileStorage {
  constructor (path) {
    this.path = path
  }

  async read () {
    let raw
    try {
      raw = JSON.parse(await readFile(this.path, 'utf8'))
    } catch (error) {
      if (error.code === 'ENOENT') return { docs: new Map(), pending: [], meta: new Map() }
      throw error
    }
    const bytes = (text) => new Uint8Array(Buffer.from(text, 'base64'))
    return {
      docs: new Map(Object.entries(raw.docs).map(([id, state]) => [id, bytes(state)])),
      pending: raw.pending.map((edit) => ({ ...edit, update: bytes(edit.update) })),
      meta: new Map(Object.entries(raw.meta))
    }
  }

  async load () {
    return await this.read()
  }

  async write (changes) {
    const state = await this.read()
    applyChanges(state, changes)
    const text = (data) => Buffer.from(data).toString('base64')
    const raw = {
      docs: Object.fromEntries([...state.docs].map(([id, data]) => [id, text(data)])),
      pending: state.pending.map((edit) => ({ ...edit, update: text(edit.update) })),
      meta: Object.fromEntries(state.meta)
    }
    await writeFile(this.path + '.tmp', JSON.stringify(raw))
    await rename(this.path + '.tmp', this.path)
  }

  async close () {}
}
