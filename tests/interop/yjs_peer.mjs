// A stock Yjs client (y-websocket's WebsocketProvider) that the interop tests drive.
//
//   node yjs_peer.mjs <ws base url, e.g. ws://127.0.0.1:8080/v1/yws> <doc id>
//
// Commands arrive on stdin, one JSON object a line, `{"id": 1, "cmd": "...", ...}`; each gets
// exactly one reply `{"id": 1, ...}` on stdout. Lines without an `id` are events the test may
// wait on: `{"event": "close", "code", "reason"}` and `{"event": "awareness", "states"}`.
//
//   connect {token}     (re)connect; replies once synced ({ok: true}) or refused ({ok: false,
//                       code, reason})
//   disconnect          go offline; edits keep applying locally, as in a browser tab offline
//   edit {ops}          apply ops, one transaction each (see `applyOp`)
//   dump                {json: {fields, checklist, notes}, sv: {client: clock}, client}
//   awareness {state}   set the local awareness state
//   exit

import * as readline from 'node:readline'
import WebSocket from 'ws'
import * as Y from 'yjs'
import { WebsocketProvider } from 'y-websocket'

const [serverUrl, docId] = process.argv.slice(2)
const doc = new Y.Doc()
const fields = doc.getMap('fields')
const checklist = doc.getArray('checklist')
const notes = doc.getText('notes')

const provider = new WebsocketProvider(serverUrl, docId, doc, {
  connect: false,
  WebSocketPolyfill: WebSocket, // Node 20 has no global WebSocket
  disableBc: true, // no cross-tab channel: each peer is its own process
  maxBackoffTime: 200
})

const emit = (message) => process.stdout.write(JSON.stringify(message) + '\n')

// The reply a pending `connect` is waiting for; settled by `sync` or by a refusal.
let settleConnect = null

provider.on('sync', (synced) => {
  if (synced && settleConnect) settleConnect({ ok: true })
})

provider.on('connection-close', (event) => {
  if (event === null) return // our own disconnect(), not the server's
  const { code, reason } = event
  emit({ event: 'close', code, reason: String(reason) })
  // 44xx are fieldsync's "do not retry as is" codes (DESIGN.md §3): an app would refresh the
  // token or give up; the provider alone would reconnect forever.
  if (code >= 4400 && code < 4500) {
    provider.disconnect()
    if (settleConnect) settleConnect({ ok: false, code, reason: String(reason) })
  }
})

provider.awareness.on('change', () => {
  const states = {}
  for (const [client, state] of provider.awareness.getStates()) {
    if (client !== doc.clientID) states[client] = state
  }
  emit({ event: 'awareness', states })
})

// Positions come as fractions of the current length, so the test can ask for "a random place"
// without knowing this replica's length.
const at = (fraction, length) => Math.min(length, Math.floor(fraction * (length + 1)))

function applyOp (op) {
  doc.transact(() => {
    if (op.set) {
      fields.set(op.set[0], op.set[1])
    } else if (op.fields) {
      // Several fields in one update, as an app's "new work order" form writes them.
      for (const [key, value] of Object.entries(op.fields)) fields.set(key, value)
    } else if (op.insert) {
      notes.insert(at(op.insert[0], notes.length), op.insert[1])
    } else if (op.push) {
      checklist.push([new Y.Map(Object.entries(op.push))])
    } else if (op.check) {
      // Edit a map nested in the array, concurrently with the other side.
      if (checklist.length > 0) {
        checklist.get(at(op.check[0], checklist.length - 1)).set('done', op.check[1])
      }
    } else {
      throw new Error(`unknown op ${JSON.stringify(op)}`)
    }
  })
}

async function handle (message) {
  switch (message.cmd) {
    case 'connect':
      provider.params = { token: message.token }
      return await new Promise((resolve) => {
        settleConnect = (reply) => {
          settleConnect = null
          resolve(reply)
        }
        provider.connect()
      })
    case 'disconnect':
      provider.disconnect()
      return { ok: true }
    case 'edit':
      message.ops.forEach(applyOp)
      return { ok: true }
    case 'dump':
      return {
        json: { fields: fields.toJSON(), checklist: checklist.toJSON(), notes: notes.toString() },
        sv: Object.fromEntries(Y.decodeStateVector(Y.encodeStateVector(doc))),
        client: doc.clientID
      }
    case 'awareness':
      provider.awareness.setLocalState(message.state)
      return { ok: true }
    case 'exit':
      provider.destroy()
      setImmediate(() => process.exit(0))
      return { ok: true }
    default:
      throw new Error(`unknown command ${message.cmd}`)
  }
}

readline
  .createInterface({ input: process.stdin })
  .on('line', async (line) => {
    const message = JSON.parse(line)
    try {
      emit({ id: message.id, ...(await handle(message)) })
    } catch (error) {
      emit({ id: message.id, error: String(error?.stack ?? error) })
    }
  })
  // The test went away (or failed): do not linger as an orphan.
  .on('close', () => {
    provider.destroy()
    process.exit(0)
  })
