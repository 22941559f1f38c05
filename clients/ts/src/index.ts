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
  type TokenRequest,
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
export type {
  ConflictRow,
  DeviceRow,
  TeamMetricsRow,
  ViewError,
  ViewListener,
  ViewName,
  ViewState,
  ViewTypes,
  WorkOrderCard
} from './views.js'
export { IndexedDBStorage, type IndexedDBStorageOptions } from './indexeddb.js'
export * as workOrder from './workorder.js'
export { ProtocolError, decodeFrame, encodeFrame } from './codec.js'
