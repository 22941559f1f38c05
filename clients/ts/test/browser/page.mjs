// The page of tests/clients/test_ts_browser.py: `@fieldsync/client` in a real browser, on the
// browser's own WebSocket and IndexedDB, driven through `window.device` with Playwright.
// Bundled with yjs into one ES module by `npm run build:browser-test` (dist/page.js).
import { FieldsyncClient, IndexedDBStorage, workOrder } from '../../dist/index.js'

let client = null

window.device = {
  /** Start the client on the IndexedDB database `name` (as the app does at each page load). */
  async start (url, token, name) {
    client = new FieldsyncClient({
      url,
      token,
      storage: new IndexedDBStorage({ name }),
      platform: 'web',
      backoff: { base: 20, cap: 500 }
    })
    await client.start()
  },

  async waitSynced (id) { await client.waitSynced(id, 20_000) },
  async waitAcked () { await client.waitAcked(undefined, 20_000) },
  async stop () { await client.stop() },
  pending () { return client.pending() },

  /** The technician's edits of a work order: status, meter reading, a note. */
  edit (id, note) {
    const doc = client.doc(id)
    workOrder.setStatus(doc, 'en_route', client.actor())
    workOrder.recordMeterReading(doc, 1042, client.actor())
    doc.getText('notes').insert(0, note)
  },

  /** Let every edit so far reach IndexedDB (the client writes once per turn of the loop). */
  async flush () { await client.flush() },

  /** What the database `name` holds, read by a storage of its own: queued edits per document. */
  async stored (name) {
    const storage = new IndexedDBStorage({ name })
    try {
      const state = await storage.load()
      return { docs: [...state.docs.keys()], pending: state.pending.map((edit) => edit.doc) }
    } finally {
      await storage.close()
    }
  },

  /** The work order as the client holds it. */
  content (id) {
    const doc = client.doc(id)
    return {
      fields: doc.getMap('fields').toJSON(),
      notes: doc.getText('notes').toString(),
      statusLog: doc.getArray('status_log').length,
      meterReadings: doc.getArray('meter_readings').length
    }
  }
}
