// The offline contract: a device away longer than FIELDSYNC_MAX_OFFLINE_DAYS (here a second)
// gets `reset offline_too_long` for every document it offers; the client takes the server's
// copy and applies its unacknowledged edits again on top, so no field work is lost.
import { test } from 'node:test'
import assert from 'node:assert/strict'
import { createWorkOrder, device, eventually, newId, next } from './helpers.mjs'

const AWAY = Number(process.env.FIELDSYNC_MAX_OFFLINE_SECONDS)

test('edits made during a too long absence are applied again after the reset', async () => {
  assert.ok(AWAY > 0, 'FIELDSYNC_MAX_OFFLINE_SECONDS is set')
  const sam = await device('sam')
  await sam.waitCaughtUp()
  const id = newId('away')
  createWorkOrder(sam, id)
  await sam.waitAcked()

  const tina = await device('tina')
  await tina.waitCaughtUp()
  await tina.stop()
  const left = Date.now()
  tina.doc(id).getText('notes').insert(0, 'written far away ')
  // Meanwhile the supervisor edits the same work order.
  sam.doc(id).getMap('fields').set('priority', 'urgent')
  await sam.waitAcked()
  await eventually(() => Date.now() > left + AWAY * 1000 + 500, AWAY * 1000 + 5_000, 'the absence')

  const reset = next(tina, 'reset', (e) => e.doc === id)
  await tina.start()
  const { reason, rejected } = await reset
  assert.equal(reason, 'offline_too_long')
  assert.deepEqual(rejected, [])
  await tina.waitAcked()
  const doc = tina.doc(id)
  assert.equal(doc.getText('notes').toString(), 'written far away ')
  assert.equal(doc.getMap('fields').get('priority'), 'urgent')
  await eventually(() => sam.doc(id).getText('notes').toString() === 'written far away ', 10_000, 'the note at the server')
  for (const client of [tina, sam]) await client.destroy()
})
