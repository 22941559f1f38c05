// Presence per document: relayed to the document's other replicas while online, gone when a
// device leaves.
import { test } from 'node:test'
import assert from 'node:assert/strict'
import { createWorkOrder, device, eventually, newId } from './helpers.mjs'

test('awareness is relayed per document and cleared when a device leaves', async () => {
  const sam = await device('sam')
  await sam.waitCaughtUp()
  const id = newId('presence')
  createWorkOrder(sam, id)
  await sam.waitAcked()

  const tina = await device('tina')
  await tina.waitSynced(id)
  const seen = sam.awareness(id)
  await sam.waitSynced(id)
  tina.awareness(id).setLocalStateField('user', { name: 'Tina Tech', editing: 'notes' })
  const tinaId = tina.awareness(id).clientID
  await eventually(() => seen.getStates().get(tinaId)?.user?.editing === 'notes', 10_000, "tina's presence at sam's")

  await tina.destroy()
  await eventually(() => !seen.getStates().has(tinaId), 10_000, "tina's presence gone")
  assert.ok(seen.getStates().has(sam.awareness(id).clientID), 'sam keeps its own')
  await sam.destroy()
})
