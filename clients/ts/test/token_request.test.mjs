// The token source is told why it is asked (a connect, or the server's `auth_expiring` with the
// socket's expiry), and a token the socket already holds is never sent again: the server would
// answer the same `auth` with the same notice at once, again and again.
import { test } from 'node:test'
import assert from 'node:assert/strict'
import { device, eventually, token } from './helpers.mjs'

const SHORT = process.env.FIELDSYNC_SHORT_TOKEN
const expiresAt = JSON.parse(Buffer.from(SHORT.split('.')[1], 'base64url')).exp

test('the token source learns why it is asked, and a token the socket holds is not sent again', async () => {
  const requests = []
  const tina = await device('tina', {
    // A source that keeps handing out the same token until it expires (a cache, say).
    token: async (request) => {
      requests.push(request)
      return Date.now() / 1000 < expiresAt - 0.5 ? SHORT : await token('tina')
    }
  })
  await eventually(() => tina.traffic.sockets >= 2, 20_000, 'a new socket once the token expired')
  await tina.waitCaughtUp()
  assert.deepEqual(requests[0], { reason: 'connect' })
  assert.deepEqual(requests[1], { reason: 'expiring', expiresAt: expiresAt * 1000 })
  // Sent again, the same token would have brought the same notice back at once, again and again.
  const expiring = requests.filter((request) => request.reason === 'expiring' && request.expiresAt === expiresAt * 1000)
  assert.equal(expiring.length, 1, JSON.stringify(requests))
  await tina.destroy()
})
