// An edit the technician's role may not make is refused whole: the app hears `error
// forbidden_field` and `reset`, the edit is set aside (never sent again), and the device holds
// the server's copy.
import { test } from 'node:test'
import assert from 'node:assert/strict'
import { workOrder } from '../dist/index.js'
import { createWorkOrder, device, eventually, newId, next } from './helpers.mjs'

test('a refused edit is surfaced and not sent again', async () => {
  const sam = await device('sam')
  await sam.waitCaughtUp()
  const id = newId('refused')
  createWorkOrder(sam, id)
  await sam.waitAcked()

  const tina = await device('tina')
  await tina.waitCaughtUp()
  const error = next(tina, 'error', (e) => e.doc === id)
  const reset = next(tina, 'reset', (e) => e.doc === id)
  tina.doc(id).getMap('fields').set('title', 'Not a pump at all') // technicians may not
  const refusal = await error
  assert.equal(refusal.code, 'forbidden_field')
  assert.ok(refusal.paths.some((path) => path.startsWith('fields')), JSON.stringify(refusal.paths))
  const { reason, rejected } = await reset
  assert.equal(reason, 'forbidden_field')
  assert.equal(rejected.length, 1)
  assert.equal(tina.rejected.length, 1)
  assert.equal(tina.pending(), 0, 'not queued any more')

  // The device takes the server's copy again, and goes on working on it.
  await tina.waitSynced(id)
  assert.equal(tina.doc(id).getMap('fields').get('title'), `Inspect pump ${id}`)
  workOrder.setStatus(tina.doc(id), 'en_route', tina.actor())
  await tina.waitAcked()

  // A restart sends nothing of the refused edit: no second refusal, the title stands. (The
  // note's ack comes after the server has handled the document's resync on the new socket.)
  let refusals = 0
  tina.on('error', () => { refusals++ })
  await tina.stop()
  await tina.start()
  await tina.waitCaughtUp()
  tina.doc(id).getText('notes').insert(0, 'after the restart ')
  await tina.waitAcked()
  assert.equal(tina.traffic.sockets, 2)
  assert.equal(refusals, 0)
  await eventually(() => sam.doc(id).getText('notes').toString() === 'after the restart ', 10_000, 'the note')
  assert.equal(sam.doc(id).getMap('fields').get('title'), `Inspect pump ${id}`)
  assert.equal(sam.doc(id).getMap('fields').get('status'), 'en_route')
  for (const client of [tina, sam]) await client.destroy()
})
