// The wire format against fieldsync/replication/_codec.py's: frames, BATCH, refusals.
import { test } from 'node:test'
import assert from 'node:assert/strict'
import { ProtocolError, decodeFrame, encodeFrame } from '../dist/index.js'
import { encodeControl, encodeDoc, encodeSync } from '../dist/codec.js'

test('one body is sent as it is, several as one BATCH', () => {
  const hello = encodeControl({ type: 'hello', since: 3 })
  const step1 = encodeDoc('wo:1', encodeSync(0, new Uint8Array([0])))
  // flags 0, kind 0, then the JSON: as Python's `encode_frame([encode_body(Control(...))])`.
  assert.deepEqual([...encodeFrame([hello]).subarray(0, 3)], [0, 0, '{'.charCodeAt(0)])
  const batch = encodeFrame([hello, step1])
  assert.deepEqual([...batch.subarray(0, 3)], [0, 2, 2])
  const messages = decodeFrame(batch, 1 << 20)
  assert.deepEqual(messages[0], { kind: 'control', body: { type: 'hello', since: 3 } })
  assert.equal(messages[1].doc, 'wo:1')
  assert.deepEqual([...messages[1].message], [0, 0, 1, 0])
})

test('malformed frames are refused with ProtocolError, never another error', () => {
  const bad = [
    new Uint8Array([]), // empty
    new Uint8Array([4, 0]), // unknown flag
    new Uint8Array([0, 9]), // unknown kind
    new Uint8Array([0, 0, 0x7b]), // control that is not JSON
    new Uint8Array([0, 0, 0x5b, 0x5d]), // control that is not an object
    new Uint8Array([0, 1, 5, 0x77]), // doc id past the end
    new Uint8Array([0, 2, 2, 1]), // batch shorter than its count
    new Uint8Array([1, 1, 2, 3]) // not a zstd frame
  ]
  for (const frame of bad) assert.throws(() => decodeFrame(frame, 1 << 20), ProtocolError, `frame ${[...frame]}`)
})

test('zstd frames are decompressed up to the body limit and refused past it', () => {
  // flags 1, then `zstandard.ZstdCompressor(level=3).compress(body)` of a 5,024-byte CONTROL
  // body {"type":"pad","pad":"aaaa…"} (made with the server's library).
  const frame = new Uint8Array([1, ...Buffer.from(
    '28b52ffd60a012f50000a0007b2274797065223a22706164222c3a2261227d02008483eb43845207', 'hex')])
  const [message] = decodeFrame(frame, 5024)
  assert.equal(message.body.type, 'pad')
  assert.equal(message.body.pad.length, 5000)
  assert.throws(() => decodeFrame(frame, 5023), ProtocolError) // one byte over: a bomb's fate
  assert.throws(() => decodeFrame(frame.subarray(0, 20), 1 << 20), ProtocolError) // truncated
})
