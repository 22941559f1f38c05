// A long-lived socket outlives the token it opened with: the server says `auth_expiring`, the
// client asks its token source for a fresh one and renews in band, and the socket stays.
import { test } from 'node:test'
import assert from 'node:assert/strict'
import { createWorkOrder, device, eventually, newId, next, token } from './helpers.mjs'

const SHORT = process.env.FIELDSYNC_SHORT_TOKEN
const expiresAt = JSON.parse(Buffer.from(SHORT.split('.')[1], 'base64url')).exp

test('a token about to expire is renewed on the same socket', async () => {
  const sam = await device('sam')
  await sam.waitCaughtUp()
  const id = newId('token')
  createWorkOrder(sam, id)
  await sam.waitAcked()

  let asked = 0
  const tina = await device('tina', {
    token: async () => (++asked === 1 ? SHORT : await token('tina'))
  })
  await tina.waitCaughtUp()
  await eventually(() => asked >= 2, 10_000, 'the token source asked again on auth_expiring')
  // Past the first token's expiry, the same socket still carries edits both ways.
  await eventually(() => Date.now() / 1000 > expiresAt + 0.5, 15_000, 'the first token to expire')
  tina.doc(id).getText('notes').insert(0, 'after renewal ')
  await tina.waitAcked()
  await eventually(() => sam.doc(id).getText('notes').toString().startsWith('after renewal'), 10_000, 'the note')
  assert.equal(tina.traffic.sockets, 1, 'never reconnected')
  for (const client of [tina, sam]) await client.destroy()
})

test('a fixed token that expires takes the client offline with `fatal`, not into a reconnect loop', async () => {
  const tina = await device('tina', { token: SHORT })
  const fatal = await next(tina, 'fatal', () => true, 15_000)
  assert.deepEqual(fatal, { code: 4401, reason: 'token_expired' })
  assert.equal(tina.traffic.sockets, 1)
  await tina.destroy()
})
