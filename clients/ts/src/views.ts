/**
 * Live views for dashboards (the README's *Live views*): `subscribe {view, params}` is answered
 * by `view {view, rows, ...}`, then `view_changes {view, added, changed, removed, ...}` as
 * commits touch the view. The server computes every row; the client only keeps them by id.
 *
 * A socket holds one subscription per view name (subscribing again replaces the parameters, as
 * on the server), and a dropped socket loses them all: they are sent again after every
 * `welcome`, and the `view` that answers is the catch-up.
 */
import type { Control } from './codec.js'

/** A work order card of `team-queue` (from the server's index, never from the document). */
export interface WorkOrderCard {
  id: string
  number: string | null
  title: string | null
  status: string | null
  priority: string | null
  due_at: string | null
  site: string | null
  asset_id: string | null
  asset_name: string | null
  assignee: string | null
  overdue: boolean
}

/** One team's figures in `region-metrics` (`id` is the team, `""` for none). */
export interface TeamMetricsRow {
  id: string
  team: string | null
  total: number
  by_status: Record<string, number>
  overdue: number
  completed: number
  mean_seconds_to_complete: number | null
  first_time_fix_rate: number | null
  conflicts_24h: number | null
}

/** A rule's correction in `conflicts` (`at` in epoch seconds). */
export interface ConflictRow {
  id: string
  seq: number
  at: number
  doc: string
  rule: string
  detail: string
  actor: string
  origin: string
  team: string | null
  assignee: string | null
}

/** A device in `devices` (`last_seen` in epoch seconds; `lag` is the server's seq minus
 * `since`). */
export interface DeviceRow {
  id: string
  device_id: string
  subject: string
  team: string | null
  platform: string
  version: string
  last_seen: number
  since: number
  lag: number
  below_min_version: boolean
  min_version: string | null
  online: boolean
}

/** Each view's parameters, rows, and the members its messages carry beside the rows. */
export interface ViewTypes {
  'team-queue': {
    params: { status?: string, assignee?: string, limit?: number }
    row: WorkOrderCard
    /** `counts`: per status, with the assignee filter applied and the status filter not. */
    extra: { counts: Record<string, number>, truncated: boolean }
  }
  'region-metrics': { params: { limit?: number }, row: TeamMetricsRow, extra: { truncated: boolean } }
  conflicts: { params: { limit?: number }, row: ConflictRow, extra: Record<string, never> }
  devices: { params: { limit?: number }, row: DeviceRow, extra: { server_seq: number } }
}

export type ViewName = keyof ViewTypes

/** What a view shows now; the listener gets the same object, updated, at every change. */
export interface ViewState<N extends ViewName = ViewName> {
  readonly view: N
  readonly params: ViewTypes[N]['params']
  /** Every row by id, as the server last said (kept while reconnecting: the catch-up replaces
   * them); empty until the first `view`. */
  readonly rows: ReadonlyMap<string, ViewTypes[N]['row']>
  /** The message's other members (`counts`, `truncated`, `server_seq`). */
  readonly extra: Partial<ViewTypes[N]['extra']>
  /** True once the server has sent the view's rows. */
  readonly ready: boolean
  /** The server refused the subscription (`forbidden`, `invalid_request`,
   * `storage_unavailable`: see the README), or null. */
  readonly error: ViewError | null
}

export interface ViewError { code: string, message: string }

export type ViewListener<N extends ViewName = ViewName> = (state: ViewState<N>) => void

interface Row { id: string }

interface Subscription {
  state: {
    view: string
    params: Record<string, unknown>
    rows: Map<string, Row>
    extra: Record<string, unknown>
    ready: boolean
    error: ViewError | null
  }
  listener: (state: any) => void
}

/** The subscriptions of one client: what to send, and the server's view messages applied. */
export class Views {
  private readonly subscriptions = new Map<string, Subscription>()

  /** `send` takes a `subscribe`/`unsubscribe` while the socket is welcomed, and drops it
   * otherwise (`resubscribe` sends them all after the next `welcome`). */
  constructor (private readonly send: (body: Control) => void) {}

  add<N extends ViewName> (view: N, params: ViewTypes[N]['params'], listener: ViewListener<N>): () => void {
    const subscription: Subscription = {
      state: { view, params: { ...params }, rows: new Map(), extra: {}, ready: false, error: null },
      listener
    }
    this.subscriptions.set(view, subscription)
    this.send({ type: 'subscribe', view, params: subscription.state.params })
    return () => {
      // A handle whose subscription was replaced since leaves the new one alone.
      if (this.subscriptions.get(view) !== subscription) return
      this.subscriptions.delete(view)
      this.send({ type: 'unsubscribe', view })
    }
  }

  /** The `subscribe` of every view, for a socket just welcomed. */
  resubscribe (): Control[] {
    return [...this.subscriptions.values()].map(({ state }) => ({ type: 'subscribe', view: state.view, params: state.params }))
  }

  /** Apply `view`, `view_changes`, or an `error` naming a view; false for any other message. */
  receive (body: Control): boolean {
    if (typeof body.view !== 'string' || !['view', 'view_changes', 'error'].includes(body.type)) return false
    const subscription = this.subscriptions.get(body.view)
    if (subscription === undefined) return true // unsubscribed meanwhile
    const state = subscription.state
    if (body.type === 'view') {
      const { type: _type, view: _view, rows, ...extra } = body
      state.rows = new Map((rows as Row[]).map((row) => [row.id, row]))
      state.extra = extra
      state.ready = true
      state.error = null
    } else if (body.type === 'view_changes') {
      // Changes before the rows belong to a subscription this one replaced: its `view` follows.
      if (!state.ready) return true
      const { type: _type, view: _view, added, changed, removed, ...extra } = body
      for (const row of [...(added as Row[]), ...(changed as Row[])]) state.rows.set(row.id, row)
      for (const id of removed as string[]) state.rows.delete(id)
      state.extra = { ...state.extra, ...extra }
    } else {
      state.error = { code: String(body.code), message: String(body.message) }
    }
    try {
      subscription.listener(state)
    } catch (error) {
      console.error(`fieldsync: the listener of view ${state.view} threw`, error) // the sync goes on
    }
    return true
  }
}
