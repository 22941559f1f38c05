// One contract for every `Storage`: MemoryStorage, the tests' FileStorage, and IndexedDBStorage
// (on fake-indexeddb, a complete IndexedDB in JavaScript: the browser's own is not run here).
import 'fake-indexeddb/auto'
import { describe, test } from 'node:test'
import assert from 'node:assert/strict'
import { mkdtemp } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { IndexedDBStorage, MemoryStorage } from '../dist/index.js'
import { FileStorage } from './helpers.mjs'

const bytes = (...values) => new Uint8Array(values)
const changes = (partial) => ({ forgotten: [], docs: new Map(), edits: [], acked: [], meta: new Map(), ...partial })
const edit = (seq, doc, ...update) => ({ seq, doc, update: bytes(...update), clock: { 7: seq } })

let databases = 0
const backends = {
  // `reopen` gives a second instance over the same data: the app restarted.
  memory: async () => { const storage = new MemoryStorage(); return { storage, reopen: () => storage } },
  file: async () => {
    const path = join(await mkdtemp(join(tmpdir(), 'fieldsync-ts-')), 'device.json')
    return { storage: new FileStorage(path), reopen: () => new FileStorage(path) }
  },
  indexeddb: async () => {
    const name = `fieldsync-test-${++databases}`
    return { storage: new IndexedDBStorage({ name }), reopen: () => new IndexedDBStorage({ name }) }
  }
}

for (const [name, make] of Object.entries(backends)) {
  describe(`${name} storage`, () => {
    test('starts empty', async () => {
      const { storage } = await make()
      const state = await storage.load()
      assert.equal(state.docs.size, 0)
      assert.deepEqual(state.pending, [])
      assert.equal(state.meta.size, 0)
    })

    test('keeps documents, queued edits in order, and values across a restart', async () => {
      const { storage, reopen } = await make()
      await storage.write(changes({
        docs: new Map([['wo:1', bytes(1, 2)], ['wo:2', bytes(3)]]),
        edits: [edit(1, 'wo:2', 9), edit(2, 'wo:1', 8), edit(3, 'wo:2', 7)],
        meta: new Map([['since', '42']])
      }))
      await storage.write(changes({ docs: new Map([['wo:1', bytes(4, 5, 6)]]), acked: [{ doc: 'wo:2', seq: 1 }] }))
      await storage.close()
      const again = reopen()
      const state = await again.load()
      assert.deepEqual([...state.docs.keys()].sort(), ['wo:1', 'wo:2'])
      assert.deepEqual([...state.docs.get('wo:1')], [4, 5, 6])
      assert.deepEqual(state.pending.map((e) => [e.seq, e.doc, [...e.update], e.clock]),
        [[2, 'wo:1', [8], { 7: 2 }], [3, 'wo:2', [7], { 7: 3 }]])
      assert.equal(state.meta.get('since'), '42')
      await again.close()
    })

    test('forgetting a document drops its edits, and only its, before what the same write adds', async () => {
      const { storage } = await make()
      await storage.write(changes({
        docs: new Map([['wo:1', bytes(1)], ['wo:2', bytes(2)]]),
        edits: [edit(1, 'wo:1', 1), edit(2, 'wo:2', 2)]
      }))
      // A reset: the copy is dropped, a fresh one stored, its edits queued again.
      await storage.write(changes({ forgotten: ['wo:1'], docs: new Map([['wo:1', bytes(9)]]), edits: [edit(3, 'wo:1', 3)] }))
      await storage.write(changes({ forgotten: ['wo:2'] }))
      const state = await storage.load()
      assert.deepEqual([...state.docs.keys()], ['wo:1'])
      assert.deepEqual([...state.docs.get('wo:1')], [9])
      assert.deepEqual(state.pending.map((e) => e.seq), [3])
      await storage.close()
    })
  })
}

test('a failed write is reported and retried with the next one: nothing is dropped', async () => {
  const { MemoryStorage: Memory } = await import('../dist/index.js')
  const { newDevice } = await import('./helpers.mjs')
  class Flaky extends Memory {
    failures = 1
    async write (changes) {
      if (this.failures-- > 0) throw new Error('QuotaExceededError')
      await super.write(changes)
    }
  }
  const storage = new Flaky()
  const client = newDevice('tina', { storage, token: () => new Promise(() => {}) }) // offline
  const errors = []
  client.on('error', (e) => errors.push(e.code))
  await client.start()
  client.doc('wo:flaky').getText('notes').insert(0, 'first ')
  await client.flush() // this write fails
  assert.deepEqual(errors, ['storage_failed'])
  client.doc('wo:flaky').getText('notes').insert(6, 'second')
  await client.flush() // carries both
  const state = await storage.load()
  assert.equal(state.pending.length, 2)
  assert.ok(state.docs.has('wo:flaky'))
  assert.equal(state.meta.get('device_id'), client.deviceId)
  await client.destroy()
})
