// A technician's device syncs every work order it carries over one socket, in BATCH frames,
// zstd-compressed when it asks for it and plain when it does not.
import { test } from 'node:test'
import assert from 'node:assert/strict'
import { workOrder } from '../dist/index.js'
import { createWorkOrder, device, eventually, newId } from './helpers.mjs'

const COUNT = 60

test('many documents over one socket, both ways', async () => {
  const sam = await device('sam')
  await sam.waitCaughtUp()
  const ids = Array.from({ length: COUNT }, () => newId('many'))
  for (const id of ids) createWorkOrder(sam, id)
  await sam.waitAcked()

  for (const zstd of [true, false]) {
    const tina = await device('tina', { zstd })
    await tina.waitCaughtUp()
    assert.equal(tina.traffic.sockets, 1)
    for (const id of ids) {
      assert.ok(tina.documents().includes(id), `${id} reached the device`)
      assert.equal(tina.doc(id).getMap('fields').get('title'), `Inspect pump ${id}`)
    }
    assert.ok(tina.since > 0)
    // The catch-up came in few frames: BATCHes, not one frame per document.
    assert.ok(tina.traffic.framesReceived < COUNT, `${tina.traffic.framesReceived} frames`)
    if (zstd) assert.ok(tina.traffic.framesCompressed > 0, 'the server compressed its frames')
    else assert.equal(tina.traffic.framesCompressed, 0, 'no zstd without the capability')
    await tina.destroy()
  }

  // Edits of every document go up, are acknowledged, and reach the supervisor live.
  const tina = await device('tina')
  await tina.waitCaughtUp()
  for (const id of ids) workOrder.setStatus(tina.doc(id), 'en_route', tina.actor())
  assert.equal(tina.pending(), COUNT)
  await tina.waitAcked()
  assert.equal(tina.pending(), 0)
  assert.equal(tina.traffic.sockets, 1)
  await eventually(() => ids.every((id) => sam.doc(id).getMap('fields').get('status') === 'en_route'),
    10_000, 'the supervisor sees every status')
  const log = sam.doc(ids[0]).getArray('status_log').toJSON()
  assert.deepEqual(log.map((e) => [e.status, e.by, e.role]), [['assigned', 'sam', 'supervisor'], ['en_route', 'tina', 'technician']])
  await tina.destroy()
  await sam.destroy()
})
