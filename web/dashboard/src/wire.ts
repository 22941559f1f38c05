// The `fieldsync.v1` frame format (DESIGN.md §3): `flags:u8 body`, `body = kind:varuint payload`;
// kind 0 CONTROL (JSON), 1 DOC (varstring doc id + one y-protocols message), 2 BATCH. The
// dashboard never offers `zstd` in its `hello`, so the server never compresses what it sends.
import * as decoding from "lib0/decoding";
import * as encoding from "lib0/encoding";

export type Control = { type: string; [member: string]: unknown };
export type Incoming =
  | { kind: "control"; body: Control }
  | { kind: "doc"; doc: string; message: Uint8Array };

const CONTROL = 0;
const DOC = 1;
const BATCH = 2;

// What WebSocket.send takes: bytes over a plain (not shared) buffer, which lib0 always makes.
export type Bytes = Uint8Array<ArrayBuffer>;

export function encodeControl(body: Control): Bytes {
  const encoder = encoding.createEncoder();
  encoding.writeUint8(encoder, 0);
  encoding.writeVarUint(encoder, CONTROL);
  encoding.writeUint8Array(encoder, new TextEncoder().encode(JSON.stringify(body)));
  return encoding.toUint8Array(encoder) as Bytes;
}

export function encodeDoc(doc: string, message: Uint8Array): Bytes {
  const encoder = encoding.createEncoder();
  encoding.writeUint8(encoder, 0);
  encoding.writeVarUint(encoder, DOC);
  encoding.writeVarString(encoder, doc);
  encoding.writeUint8Array(encoder, message);
  return encoding.toUint8Array(encoder) as Bytes;
}

export function decodeFrame(frame: Uint8Array): Incoming[] {
  if (frame.length === 0 || frame[0] !== 0) {
    throw new Error("unexpected frame flags");
  }
  return decodeBody(frame.subarray(1), true);
}

function decodeBody(body: Uint8Array, allowBatch: boolean): Incoming[] {
  const decoder = decoding.createDecoder(body);
  const kind = decoding.readVarUint(decoder);
  if (kind === CONTROL) {
    const rest = decoding.readTailAsUint8Array(decoder);
    return [{ kind: "control", body: JSON.parse(new TextDecoder().decode(rest)) as Control }];
  }
  if (kind === DOC) {
    const doc = decoding.readVarString(decoder);
    return [{ kind: "doc", doc, message: decoding.readTailAsUint8Array(decoder) }];
  }
  if (kind === BATCH && allowBatch) {
    const count = decoding.readVarUint(decoder);
    const messages: Incoming[] = [];
    for (let i = 0; i < count; i++) {
      messages.push(...decodeBody(decoding.readVarUint8Array(decoder), false));
    }
    return messages;
  }
  throw new Error(`unknown message kind ${kind}`);
}
