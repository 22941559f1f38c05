// Live views, as the dashboard follows them: a supervisor's client that follows no change feed
// (`feed: false`) subscribes to its team queue; work orders appear, move and leave as devices
// and reassignments change them; a dropped socket resubscribes and catches up; a technician is
// refused.
import { test } from 'node:test'
import assert from 'node:assert/strict'
import WebSocket from 'ws'
import { workOrder } from '../dist/index.js'
import { createWorkOrder, device, eventually, newId } from './helpers.mjs'

/** A WebSocket implementation that keeps every socket the client opens, for the test to drop. */
function keptSockets () {
  const sockets = []
  class Kept extends WebSocket {
    constructor (url) {
      super(url)
      sockets.push(this)
    }
  }
  return { sockets, WebSocket: Kept }
}

/** Follows `view` on `client`; `latest()` is its last state, `calls` how often it changed. */
function follow (client, view, params = {}) {
  const followed = { state: null, calls: 0 }
  followed.stop = client.view(view, params, (state) => {
    followed.state = state
    followed.calls++
  })
  followed.row = (id) => followed.state?.rows.get(id)
  return followed
}

test('a team queue follows the field live, and catches up after a dropped socket', async (t) => {
  const clients = []
  t.after(async () => { for (const client of clients) await client.destroy() })
  const sam = await device('sam') // creates the work orders, as a supervisor's app would
  await sam.waitCaughtUp()
  const first = newId('view')
  createWorkOrder(sam, first, { assignee: 'tina' })
  await sam.waitAcked()

  const kept = keptSockets()
  const dashboard = await device('sam', { feed: false, WebSocket: kept.WebSocket, backoff: { base: 50, cap: 200, jitter: 'equal' } })
  clients.push(sam, dashboard)
  const errors = []
  dashboard.on('error', (error) => errors.push(error))
  const queue = follow(dashboard, 'team-queue')
  await eventually(() => queue.row(first) !== undefined, 10_000, 'the work order in the queue')
  assert.equal(queue.state.ready, true)
  assert.equal(queue.row(first).assignee, 'tina')
  assert.equal(queue.row(first).status, 'assigned')
  assert.ok(queue.state.extra.counts.assigned >= 1, JSON.stringify(queue.state.extra))
  await dashboard.waitCaughtUp()
  assert.deepEqual(dashboard.documents(), [], 'no change feed: the work orders stay on the server')
  assert.ok(dashboard.since > 0, 'though the feed moves `since`')

  // A technician's device moves the work order: its card follows.
  const tina = await device('tina')
  clients.push(tina)
  await tina.waitSynced(first)
  workOrder.setStatus(tina.doc(first), 'en_route', tina.actor())
  await tina.waitAcked()
  await eventually(() => queue.row(first)?.status === 'en_route', 10_000, 'the card to move')

  // The detail of one work order: a document opened by hand syncs, live.
  const detail = dashboard.doc(first)
  await dashboard.waitSynced(first)
  assert.equal(detail.getMap('fields').get('status'), 'en_route')
  tina.doc(first).getText('notes').insert(0, 'Gate code 4411. ')
  await eventually(() => dashboard.doc(first).getText('notes').toString() === 'Gate code 4411. ', 10_000, 'the note')

  // The socket drops; meanwhile a work order is created: the resubscription's rows have it.
  const second = newId('view-away')
  const dropped = new Promise((resolve) => dashboard.on('status', (s) => s === 'disconnected' && resolve()))
  kept.sockets.at(-1).terminate()
  await dropped
  createWorkOrder(sam, second, { assignee: 'tom' })
  await sam.waitAcked()
  await eventually(() => queue.row(second) !== undefined, 15_000, 'the catch-up after reconnecting')
  assert.ok(kept.sockets.length >= 2, 'a new socket')

  // Moved to another team (an admin's edit): the card leaves this supervisor's queue.
  const ada = await device('ada')
  clients.push(ada)
  await ada.waitSynced(second)
  ada.doc(second).transact(() => {
    ada.doc(second).getMap('fields').set('team', 'south')
    ada.doc(second).getMap('fields').set('region', 'west')
  })
  await ada.waitAcked()
  await eventually(() => queue.row(second) === undefined, 10_000, 'the card to leave')
  assert.deepEqual(errors, [])

  // Unsubscribed: the listener hears nothing more; a new subscription with a filter has the
  // work order created since, and only the filtered ones.
  queue.stop()
  const calls = queue.calls
  const third = newId('view-after')
  createWorkOrder(sam, third, { assignee: 'tom' })
  await sam.waitAcked()
  const toms = follow(dashboard, 'team-queue', { assignee: 'tom' })
  await eventually(() => toms.row(third) !== undefined, 10_000, "tom's queue")
  assert.equal(toms.row(first), undefined, "tina's work order is not in tom's queue")
  assert.equal(queue.calls, calls)
  // Through reconnects, change feed pages and scope changes, the one document opened.
  assert.deepEqual(dashboard.documents(), [first])
})

test("a technician's subscription is refused, to the view's listener", async (t) => {
  const clients = []
  t.after(async () => { for (const client of clients) await client.destroy() })
  const sam = await device('sam')
  clients.push(sam)
  await sam.waitCaughtUp()
  createWorkOrder(sam, newId('view-metrics'), { assignee: 'tina' })
  await sam.waitAcked()
  const tina = await device('tina', { feed: false })
  clients.push(tina)
  const errors = []
  tina.on('error', (error) => errors.push(error))
  const queue = follow(tina, 'team-queue')
  await eventually(() => queue.state?.error != null, 10_000, 'the refusal')
  assert.equal(queue.state.error.code, 'forbidden')
  assert.equal(queue.state.ready, false)
  // A manager's view of the same socket kind is served; the refusal went nowhere else.
  const mia = await device('mia', { feed: false })
  clients.push(mia)
  const metrics = follow(mia, 'region-metrics')
  await eventually(() => metrics.state?.ready === true, 10_000, 'the metrics')
  assert.equal(metrics.state.error, null)
  assert.ok(metrics.state.rows.has('north'), JSON.stringify([...metrics.state.rows.keys()]))
  assert.equal(typeof metrics.row('north').total, 'number')
  assert.deepEqual(errors, [])
})
