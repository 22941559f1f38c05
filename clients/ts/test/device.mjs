// One device running @fieldsync/client, driven by the Python tests (tests/clients) over stdin
// and stdout, one JSON object a line, like tests/interop/yjs_peer.mjs:
//
//   FIELDSYNC_SYNC_URL=... FIELDSYNC_TOKEN_URL=... node device.mjs <user> <storage file>
//
// Each command `{"id": 1, "cmd": "...", ...}` gets one reply `{"id": 1, ...}`; lines without
// an `id` are events: `{"event": "error" | "reset" | "scope" | "fatal" | "status", "value"}`.
//
//   start / stop          go online (documents loaded from the storage file) / offline
//   caught_up {ms}        wait until every document the server listed has synced
//   synced {doc, ms}      wait until `doc` has synced
//   edit {doc, ops}       apply ops, one transaction each (see `applyOp`)
//   acked {ms}            wait until the server holds every edit durably
//   state                 {pending, since, sockets, documents}
//   dump {doc}            {json: {fields, checklist, notes, status_log, meter_readings}, sv}
//   exit
import * as readline from 'node:readline'
import * as Y from 'yjs'
import { workOrder } from '../dist/index.js'
import { FileStorage, newDevice } from './helpers.mjs'

const [user, storagePath] = process.argv.slice(2)
const emit = (message) => process.stdout.write(JSON.stringify(message) + '\n')
const client = newDevice(user, { storage: new FileStorage(storagePath) })
for (const event of ['error', 'reset', 'scope', 'fatal', 'status']) {
  client.on(event, (value) => emit({ event, value: event === 'reset' ? { ...value, rejected: value.rejected.length } : value }))
}

const at = (fraction, length) => Math.min(length, Math.floor(fraction * (length + 1)))

function applyOp (doc, op) {
  if (op.status) workOrder.setStatus(doc, op.status, client.actor())
  else if (op.meter !== undefined) workOrder.recordMeterReading(doc, op.meter, client.actor())
  else if (op.insert) doc.getText('notes').insert(at(op.insert[0], doc.getText('notes').length), op.insert[1])
  else if (op.check) {
    const items = doc.getArray('checklist')
    if (items.length > 0) items.get(at(op.check[0], items.length - 1)).set('done', op.check[1])
  } else if (op.set) doc.getMap('fields').set(op.set[0], op.set[1])
  else throw new Error(`unknown op ${JSON.stringify(op)}`)
}

async function handle (message) {
  switch (message.cmd) {
    case 'start': await client.start(); return { ok: true }
    case 'stop': await client.stop(); return { ok: true }
    case 'caught_up': await client.waitCaughtUp(message.ms ?? 30_000); return { ok: true }
    case 'synced': await client.waitSynced(message.doc, message.ms ?? 30_000); return { ok: true }
    case 'edit': {
      const doc = client.doc(message.doc)
      for (const op of message.ops) doc.transact(() => applyOp(doc, op))
      return { ok: true }
    }
    case 'acked': await client.waitAcked(undefined, message.ms ?? 30_000); return { ok: true }
    case 'state':
      return { pending: client.pending(), since: client.since, sockets: client.traffic.sockets, documents: client.documents() }
    case 'dump': {
      const doc = client.doc(message.doc)
      return {
        json: {
          fields: doc.getMap('fields').toJSON(),
          checklist: doc.getArray('checklist').toJSON(),
          notes: doc.getText('notes').toString(),
          status_log: doc.getArray('status_log').toJSON(),
          meter_readings: doc.getArray('meter_readings').toJSON()
        },
        sv: Object.fromEntries(Y.decodeStateVector(Y.encodeStateVector(doc)))
      }
    }
    case 'exit':
      await client.destroy()
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
  .on('close', () => process.exit(0)) // the test went away: do not linger as an orphan
