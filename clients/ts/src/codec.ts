/**
 * The `fieldsync.v1` wire format (DESIGN.md §3), as `fieldsync/replication/_codec.py` has it:
 *
 *     frame = flags:u8 body            flags bit 0: body is one zstd frame
 *     body  = kind:varuint payload     0 CONTROL (JSON), 1 DOC (varstring doc id + y message),
 *                                      2 BATCH (count:varuint, count x (len:varuint body))
 *
 * Pure functions from bytes to typed messages and back; malformed input throws `ProtocolError`.
 */
import * as decoding from 'lib0/decoding'
import * as encoding from 'lib0/encoding'
import { Decompress } from 'fzstd'

export const FLAG_ZSTD = 0x01

export const enum Kind {
  Control = 0,
  Doc = 1,
  Batch = 2
}

/** y-protocols top-level message types (y-protocols/sync.js, awareness.js). */
export const enum YMessage {
  Sync = 0,
  Awareness = 1
}

export const enum SyncStep {
  Step1 = 0,
  Step2 = 1,
  Update = 2
}

/** A control message: a JSON object with a string `type`; unknown members are kept. */
export interface Control {
  type: string
  [member: string]: unknown
}

export type Message = { kind: 'control', body: Control } | { kind: 'doc', doc: string, message: Uint8Array }

export class ProtocolError extends Error {
  override name = 'ProtocolError'
}

const utf8 = new TextEncoder()
const fromUtf8 = new TextDecoder('utf-8', { fatal: true })

export function encodeControl (body: Control): Uint8Array {
  const e = encoding.createEncoder()
  encoding.writeVarUint(e, Kind.Control)
  encoding.writeUint8Array(e, utf8.encode(JSON.stringify(body)))
  return encoding.toUint8Array(e)
}

export function encodeDoc (doc: string, message: Uint8Array): Uint8Array {
  const e = encoding.createEncoder()
  encoding.writeVarUint(e, Kind.Doc)
  encoding.writeVarString(e, doc)
  encoding.writeUint8Array(e, message)
  return encoding.toUint8Array(e)
}

/** Bodies to one uncompressed frame: a BATCH when there are several. */
export function encodeFrame (bodies: Uint8Array[]): Uint8Array {
  const e = encoding.createEncoder()
  encoding.writeUint8(e, 0)
  if (bodies.length === 1) {
    encoding.writeUint8Array(e, bodies[0])
  } else {
    encoding.writeVarUint(e, Kind.Batch)
    encoding.writeVarUint(e, bodies.length)
    for (const body of bodies) encoding.writeVarUint8Array(e, body)
  }
  return encoding.toUint8Array(e)
}

/**
 * Decompress one zstd frame, refusing output past `limit` (the server's `max_body`): a zstd bomb
 * costs at most `limit` bytes of memory, as on the server.
 */
export function decompress (data: Uint8Array, limit: number): Uint8Array {
  const chunks: Uint8Array[] = []
  let size = 0
  const stream = new Decompress((chunk) => {
    size += chunk.length
    if (size > limit) throw new ProtocolError(`zstd frame expands past ${limit} bytes`)
    chunks.push(chunk)
  })
  try {
    stream.push(data, true)
  } catch (error) {
    if (error instanceof ProtocolError) throw error
    throw new ProtocolError(`bad zstd frame: ${String(error)}`)
  }
  if (chunks.length === 1) return chunks[0]
  const out = new Uint8Array(size)
  let at = 0
  for (const chunk of chunks) {
    out.set(chunk, at)
    at += chunk.length
  }
  return out
}

/** One WebSocket message to the messages it carries (a BATCH carries many). */
export function decodeFrame (frame: Uint8Array, maxBody: number): Message[] {
  if (frame.length === 0) throw new ProtocolError('empty frame')
  const flags = frame[0]
  if ((flags & ~FLAG_ZSTD) !== 0) throw new ProtocolError('unknown frame flags')
  let body = frame.subarray(1)
  if ((flags & FLAG_ZSTD) !== 0) body = decompress(body, maxBody)
  try {
    return decodeBody(body, true)
  } catch (error) {
    if (error instanceof ProtocolError) throw error
    throw new ProtocolError(`malformed frame: ${String(error)}`) // lib0 throws on truncation
  }
}

function decodeBody (body: Uint8Array, allowBatch: boolean): Message[] {
  const d = decoding.createDecoder(body)
  const kind = decoding.readVarUint(d)
  if (kind === Kind.Control) {
    let parsed: unknown
    try {
      parsed = JSON.parse(fromUtf8.decode(decoding.readTailAsUint8Array(d)))
    } catch {
      throw new ProtocolError('control message is not JSON')
    }
    if (parsed === null || typeof parsed !== 'object' || Array.isArray(parsed) ||
        typeof (parsed as Control).type !== 'string') {
      throw new ProtocolError('control message must be an object with a string `type`')
    }
    return [{ kind: 'control', body: parsed as Control }]
  }
  if (kind === Kind.Doc) {
    const doc = decoding.readVarString(d)
    const message = decoding.readTailAsUint8Array(d)
    if (message.length === 0) throw new ProtocolError('DOC message without a y-protocols message')
    return [{ kind: 'doc', doc, message }]
  }
  if (kind === Kind.Batch && allowBatch) {
    const count = decoding.readVarUint(d)
    const messages: Message[] = []
    for (let i = 0; i < count; i++) messages.push(...decodeBody(decoding.readVarUint8Array(d), false))
    if (decoding.hasContent(d)) throw new ProtocolError('bytes after the last batch entry')
    return messages
  }
  throw new ProtocolError(`unknown message kind ${kind}`)
}

/** A y-protocols sync message (step 1: a state vector; step 2 and update: an update). */
export function encodeSync (step: SyncStep, payload: Uint8Array): Uint8Array {
  const e = encoding.createEncoder()
  encoding.writeVarUint(e, YMessage.Sync)
  encoding.writeVarUint(e, step)
  encoding.writeVarUint8Array(e, payload)
  return encoding.toUint8Array(e)
}

export function encodeAwareness (payload: Uint8Array): Uint8Array {
  const e = encoding.createEncoder()
  encoding.writeVarUint(e, YMessage.Awareness)
  encoding.writeVarUint8Array(e, payload)
  return encoding.toUint8Array(e)
}

export type YMsg =
  | { type: 'sync', step: SyncStep, payload: Uint8Array }
  | { type: 'awareness', payload: Uint8Array }
  | { type: 'other' }

export function decodeY (message: Uint8Array): YMsg {
  try {
    const d = decoding.createDecoder(message)
    const kind = decoding.readVarUint(d)
    if (kind === YMessage.Sync) {
      const step = decoding.readVarUint(d)
      if (step > SyncStep.Update) throw new ProtocolError(`unknown sync step ${step}`)
      return { type: 'sync', step, payload: decoding.readVarUint8Array(d) }
    }
    if (kind === YMessage.Awareness) return { type: 'awareness', payload: decoding.readVarUint8Array(d) }
    return { type: 'other' }
  } catch (error) {
    if (error instanceof ProtocolError) throw error
    throw new ProtocolError(`malformed y-protocols message: ${String(error)}`)
  }
}
