export {
  FieldsyncClient,
  VERSION,
  type Events,
  type FatalEvent,
  type FieldsyncClientOptions,
  type Principal,
  type ResetEvent,
  type ScopeEvent,
  type ServerError,
  type TokenSource,
  type Traffic,
  type WebSocketConstructor,
  type WebSocketLike
} from './client.js'
export {
  MemoryStorage,
  applyChanges,
  type Changes,
  type PendingEdit,
  type Storage,
  type StoredState
} from './storage.js'
export { IndexedDBStorage, type IndexedDBStorageOptions } from './indexeddb.js'
export * as workOrder from './workorder.js'
export { ProtocolError, decodeFrame, encodeFrame } from './codec.js'
