// One technician's device with N work orders, synced cold and again after a day offline, by
// `@fieldsync/client` (one socket, BATCH, zstd, durable acks) or by the stock y-websocket
// provider (one socket per work order on /v1/yws). Driven by bench/ts_client_sync.py:
//
//   node bench/ts_client_sync.mjs fieldsync|yws <sync or yws base url> <token> <doc ids file>
//
// stdout, one JSON object a line: {"phase": "cold", ...}, then {"ready": "offline"}; the driver
// makes the day's server-side edits and writes a line to stdin; the device makes its own
// offline edits, reconnects and prints {"phase": "day", ...}. Bytes are WebSocket message
// payloads both ways (frame headers and TCP not counted: the same for both).
import { readFileSync } from 'node:fs'
import * as readline from 'node:readline'

const [mode, url, token, idsFile] = process.argv.slice(2)
const ids = JSON.parse(readFileSync(idsFile, 'utf8'))
const root = new URL('..', import.meta.url)
const from = (path) => import(new URL(path, root).href)
const lines = readline.createInterface({ input: process.stdin })[Symbol.asyncIterator]()
const emit = (message) => process.stdout.write(JSON.stringify(message) + '\n')

const counted = { sockets: 0, sent: 0, received: 0, messages: 0 }
function counting (WebSocket) {
  return class extends WebSocket {
    constructor (...args) {
      super(...args)
      counted.sockets++
      this.on('message', (data) => { counted.received += data.byteLength ?? data.length; counted.messages++ })
    }

    send (data, ...rest) {
      counted.sent += data.byteLength ?? data.length
      counted.messages++
      super.send(data, ...rest)
    }
  }
}

function measure (phase, started) {
  const result = { phase, mode, docs: ids.length, seconds: (performance.now() - started) / 1000, ...counted }
  for (const key of Object.keys(counted)) counted[key] = 0
  return result
}

/** The day's offline edits on every tenth work order: a status change, a note, a tick. */
function offlineEdits (Y, docOf, by) {
  for (const id of ids.filter((_, i) => i % 10 === 0)) {
    const doc = docOf(id)
    doc.transact(() => {
      doc.getArray('status_log').push([new Y.Map(Object.entries({ status: 'en_route', by, role: 'technician', at: new Date().toISOString().replace(/\.\d+Z$/, 'Z') }))])
      doc.getMap('fields').set('status', 'en_route')
    })
    doc.getText('notes').insert(0, 'Pressure 4.2 bar after the valve was replaced. ')
    doc.getArray('checklist').get(0).set('done', true)
  }
}

if (mode === 'fieldsync') {
  const { default: WebSocket } = await from('clients/ts/node_modules/ws/wrapper.mjs')
  const Y = await from('clients/ts/node_modules/yjs/dist/yjs.mjs')
  const { FieldsyncClient, MemoryStorage } = await from('clients/ts/dist/index.js')
  const client = new FieldsyncClient({ url, token, storage: new MemoryStorage(), WebSocket: counting(WebSocket), platform: 'bench' })
  let started = performance.now()
  await client.start()
  await client.waitCaughtUp(120_000)
  const synced = ids.filter((id) => client.documents().includes(id)).length
  emit({ ...measure('cold', started), synced })
  await client.stop()
  emit({ ready: 'offline' })
  await lines.next()
  offlineEdits(Y, (id) => client.doc(id), client.actor().by)
  const pending = client.pending()
  started = performance.now()
  await client.start()
  await client.waitCaughtUp(120_000)
  await client.waitAcked(undefined, 120_000)
  emit({ ...measure('day', started), pending, acked: true })
  await client.destroy()
} else if (mode === 'yws') {
  process.setMaxListeners(0) // every provider adds an exit listener
  const { default: WebSocket } = await from('tests/interop/node_modules/ws/wrapper.mjs')
  const Y = await from('tests/interop/node_modules/yjs/dist/yjs.mjs')
  const { WebsocketProvider } = await from('tests/interop/node_modules/y-websocket/src/y-websocket.js')
  const docs = new Map(ids.map((id) => [id, new Y.Doc()]))
  const providers = []
  const allSynced = (ms = 120_000) => Promise.race([
    Promise.all(providers.map((provider) => new Promise((resolve) => {
      if (provider.synced) resolve()
      else provider.once('sync', resolve)
    }))),
    // A provider the server closes (a limit, say) reconnects for ever: fail, saying how many.
    new Promise((_, reject) => setTimeout(() => {
      const waiting = providers.filter((provider) => !provider.synced).length
      reject(new Error(`${waiting} of ${providers.length} providers not synced within ${ms} ms`))
    }, ms).unref()),
  ])
  let started = performance.now()
  for (const [id, doc] of docs) {
    providers.push(new WebsocketProvider(url, id, doc, {
      WebSocketPolyfill: counting(WebSocket), params: { token }, disableBc: true, resyncInterval: -1
    }))
  }
  await allSynced()
  emit({ ...measure('cold', started), synced: providers.length })
  for (const provider of providers) provider.disconnect()
  emit({ ready: 'offline' })
  await lines.next()
  offlineEdits(Y, (id) => docs.get(id), 'tina')
  started = performance.now()
  for (const provider of providers) provider.connect()
  await allSynced()
  // y-websocket has no acknowledgement: "synced" is the server's answer to step 1, and says
  // nothing of whether the offline edits are stored.
  emit({ ...measure('day', started), acked: false })
  for (const provider of providers) provider.destroy()
} else {
  throw new Error(`mode: fieldsync or yws, not ${mode}`)
}
process.exit(0)
