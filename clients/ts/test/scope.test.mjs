// A reassignment takes the work order off the old assignee's device (`scope`), storage
// included, and puts it on the new one's.
import { test } from 'node:test'
import assert from 'node:assert/strict'
import { createWorkOrder, device, newId, next } from './helpers.mjs'

test('a reassigned work order leaves the device', async () => {
  const sam = await device('sam')
  await sam.waitCaughtUp()
  const id = newId('scope')
  createWorkOrder(sam, id, { assignee: 'tina' })
  await sam.waitAcked()

  const tina = await device('tina')
  const tom = await device('tom')
  await tina.waitCaughtUp()
  await tom.waitCaughtUp()
  assert.ok(tina.documents().includes(id))
  assert.ok(!tom.documents().includes(id))

  const removed = next(tina, 'scope', (event) => event.removed.includes(id))
  const added = next(tom, 'scope', (event) => event.added.includes(id))
  sam.doc(id).getMap('fields').set('assignee', 'tom')
  await removed
  assert.ok(!tina.documents().includes(id), 'dropped from the device')
  await tina.flush()
  const stored = await tina.storage.load()
  assert.ok(!stored.docs.has(id), 'and from its storage')

  await added
  await tom.waitSynced(id)
  assert.equal(tom.doc(id).getMap('fields').get('title'), `Inspect pump ${id}`)
  for (const client of [tina, tom, sam]) await client.destroy()
})

test('a work order reassigned while the device was offline leaves it when it comes back', async () => {
  const sam = await device('sam')
  await sam.waitCaughtUp()
  const id = newId('scope-offline')
  createWorkOrder(sam, id, { assignee: 'tina' })
  await sam.waitAcked()
  const tina = await device('tina')
  await tina.waitCaughtUp()
  await tina.stop()

  sam.doc(id).getMap('fields').set('assignee', 'tom')
  await sam.waitAcked()
  const removed = next(tina, 'scope', (event) => event.removed.includes(id))
  await tina.start()
  await removed
  await tina.waitCaughtUp()
  assert.ok(!tina.documents().includes(id))
  await tina.flush()
  assert.ok(!(await tina.storage.load()).docs.has(id))
  for (const client of [tina, sam]) await client.destroy()
})
