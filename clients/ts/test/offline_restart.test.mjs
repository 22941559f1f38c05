// Edits made offline are stored with the document, survive the app restarting, and are sent
// and acknowledged once the device is online again; none is lost. On the tests' file storage,
// and on IndexedDBStorage over fake-indexeddb (a complete IndexedDB in JavaScript).
import 'fake-indexeddb/auto'
import { test } from 'node:test'
import assert from 'node:assert/strict'
import { mkdtemp } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import * as Y from 'yjs'
import { IndexedDBStorage, workOrder } from '../dist/index.js'
import { FileStorage, createWorkOrder, device, eventually, newId } from './helpers.mjs'

test('offline edits survive a restart and are sent once online (file storage)', async () => {
  const path = join(await mkdtemp(join(tmpdir(), 'fieldsync-ts-')), 'device.json')
  await offlineRestart(() => new FileStorage(path))
})

test('offline edits survive a restart and are sent once online (IndexedDB)', async () => {
  await offlineRestart(() => new IndexedDBStorage({ name: 'fieldsync-tina' }))
})

/** `storage()` opens the device's storage, as the app does at each start. */
async function offlineRestart (storage) {
  const sam = await device('sam')
  await sam.waitCaughtUp()
  const ids = [newId('offline'), newId('offline')]
  for (const id of ids) createWorkOrder(sam, id)
  await sam.waitAcked()

  const first = await device('tina', { storage: storage() })
  await first.waitCaughtUp()
  const deviceId = first.deviceId
  await first.stop() // the technician drives into a valley

  for (const id of ids) {
    const doc = first.doc(id)
    workOrder.setStatus(doc, 'en_route', first.actor())
    workOrder.recordMeterReading(doc, 1042, first.actor())
    doc.getText('notes').insert(0, `Gate code 4411 (${id}). `)
  }
  assert.equal(first.pending(), 6)
  await first.destroy() // the app is closed, then killed: only the storage remains

  const stored = await storage().load()
  assert.equal(stored.pending.length, 6, 'the queued edits are in storage')

  // The app starts again, still offline: the documents and their edits are there.
  const second = await device('tina', { storage: storage(), token: () => new Promise(() => {}) })
  assert.equal(second.deviceId, deviceId, 'the same device')
  assert.equal(second.pending(), 6)
  assert.equal(second.doc(ids[0]).getMap('fields').get('meter_reading'), 1042)
  await second.destroy()

  // And online: everything is sent, acknowledged, and forgotten from the queue.
  const third = await device('tina', { storage: storage() })
  await third.waitAcked()
  assert.equal(third.pending(), 0)
  await third.flush()
  assert.equal((await storage().load()).pending.length, 0)
  for (const id of ids) {
    await eventually(() => sam.doc(id).getText('notes').toString().includes(`Gate code 4411 (${id})`),
      10_000, `the supervisor sees the notes of ${id}`)
    const fields = sam.doc(id).getMap('fields')
    assert.equal(fields.get('status'), 'en_route')
    assert.equal(fields.get('meter_reading'), 1042)
  }
  await third.destroy()
  await sam.destroy()
}

test('an app stopped between a reset and the server copy keeps its queued edits', async () => {
  const sam = await device('sam')
  await sam.waitCaughtUp()
  const id = newId('reset-crash')
  createWorkOrder(sam, id)
  await sam.waitAcked()
  const path = join(await mkdtemp(join(tmpdir(), 'fieldsync-ts-')), 'device.json')
  const first = await device('tina', { storage: new FileStorage(path) })
  await first.waitSynced(id)
  await first.stop()
  first.doc(id).getText('notes').insert(0, 'kept through the reset ')
  await first.destroy()
  // What a reset leaves in storage until the server's copy arrives: an empty document (the
  // dropped copy), and the edits still queued.
  const empty = Y.encodeStateAsUpdate(new Y.Doc())
  await new FileStorage(path).write({ forgotten: [], docs: new Map([[id, empty]]), edits: [], acked: [], meta: new Map() })

  const second = await device('tina', { storage: new FileStorage(path) })
  assert.equal(second.pending(id), 1)
  assert.equal(second.doc(id).getText('notes').toString(), 'kept through the reset ')
  await second.waitAcked()
  await eventually(() => sam.doc(id).getText('notes').toString() === 'kept through the reset ', 10_000, 'the note at the server')
  for (const client of [second, sam]) await client.destroy()
})
