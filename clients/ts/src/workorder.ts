/**
 * The paired edits of a work order (README, *Domain rules*): a log entry the server's rules
 * judge, and the field the app shows meanwhile, in one transaction, as
 * `fieldsync.documents.work_order` writes them. `by` and `role` are the user's, as the server
 * gave them in `welcome.principal` (`client.actor()`); a technician's entry in anyone else's
 * name is refused whole (`forbidden_field`).
 */
import * as Y from 'yjs'

export interface Actor {
  /** The user's subject (`welcome.principal.subject`). */
  by: string
  /** One of the user's roles (`welcome.principal.roles`). */
  role: string
  /** ISO 8601 UTC time of the change; now when not given. */
  at?: string
}

/** `2026-12-06T21:31:25Z`, as the server's own entries are written. */
export function now (): string {
  return new Date().toISOString().replace(/\.\d{3}Z$/, 'Z')
}

/** Move the work order to `status` (`en_route`, `in_progress`, `completed`, …). */
export function setStatus (doc: Y.Doc, status: string, actor: Actor): void {
  doc.transact(() => {
    doc.getArray('status_log').push([entry({ status, by: actor.by, role: actor.role, at: actor.at ?? now() })])
    doc.getMap('fields').set('status', status)
  })
}

/** Record a meter reading of the work order's asset. */
export function recordMeterReading (doc: Y.Doc, value: number, actor: Pick<Actor, 'by' | 'at'>): void {
  doc.transact(() => {
    doc.getArray('meter_readings').push([entry({ value, by: actor.by, at: actor.at ?? now() })])
    doc.getMap('fields').set('meter_reading', value)
  })
}

function entry (values: Record<string, unknown>): Y.Map<unknown> {
  return new Y.Map(Object.entries(values))
}
