// The dashboard: supervisors' team queue, work order detail, devices and conflicts; managers'
// region metrics; admins' dead letters. Every figure comes from the server (views over the
// socket, REST for acts and the outbox); the page only shows it.
import type { ViewName, ViewState, ViewTypes, WorkOrderCard } from "@fieldsync/client";

import { Auth, SignInRequired } from "./auth";
import { barChart, STATUS_ORDER, statusChart } from "./charts";
import { h, when } from "./dom";
import { Connection } from "./sync";

const app = document.getElementById("app") as HTMLElement;
const status = document.getElementById("connection") as HTMLElement;
const nav = document.getElementById("nav") as HTMLElement;
const notice = document.getElementById("notice") as HTMLElement;
const who = document.getElementById("who") as HTMLElement;

let auth: Auth;
let connection: Connection;
let leave: () => void = () => {};

function show(...children: Array<Node | string>): void {
  app.replaceChildren(...children);
}

function say(message: string): void {
  notice.textContent = message;
  notice.hidden = message === "";
}

function renderState(): void {
  const labels = {
    connecting: "Connecting…",
    live: "Live",
    reconnecting: "Reconnecting…",
    offline: `Offline since ${connection.since?.toLocaleTimeString() ?? ""}`,
  };
  status.textContent = labels[connection.state];
  status.dataset.state = connection.state;
}

function roles(): string[] {
  return connection.principal?.roles ?? [];
}

function renderNav(): void {
  const pages: Array<[string, string, string[]]> = [
    ["#/queue", "Team queue", ["supervisor", "manager", "admin"]],
    ["#/devices", "Devices", ["supervisor", "manager", "admin"]],
    ["#/conflicts", "Conflicts", ["supervisor", "manager", "admin"]],
    ["#/metrics", "Region metrics", ["manager", "admin"]],
    ["#/outbox", "Dead letters", ["admin"]],
  ];
  const mine = pages.filter(([, , allowed]) => allowed.some((role) => roles().includes(role)));
  nav.replaceChildren(
    ...mine.map(([href, label]) =>
      h("a", { href, "aria-current": location.hash.startsWith(href) ? "page" : undefined }, label),
    ),
  );
  who.replaceChildren(
    connection.principal ? `${connection.principal.subject} (${roles().join(", ")})` : "",
    " ",
    h("button", { type: "button", onclick: () => auth.signOut() }, "Sign out"),
  );
}

function route(): void {
  leave();
  leave = () => {};
  say("");
  renderNav();
  const [, page, arg] = location.hash.split("/");
  const fallback = roles().includes("supervisor") ? "queue" : roles().includes("manager") ? "metrics" : "queue";
  switch (page ?? fallback) {
    case "wo":
      return detailPage(decodeURIComponent(arg ?? ""));
    case "devices":
      return devicesPage();
    case "conflicts":
      return conflictsPage();
    case "metrics":
      return metricsPage();
    case "outbox":
      return void outboxPage();
    case "queue":
      return queuePage();
    default:
      location.hash = `#/${fallback}`;
  }
}

function follow<N extends ViewName>(view: N, params: ViewTypes[N]["params"], draw: (state: ViewState<N>) => void): void {
  leave = connection.client.view(view, params, draw);
}

// --- supervisor: the team queue -----------------------------------------------------------------

let queueStatus = "";
let queueAssignee = "";

function dueText(row: WorkOrderCard): string {
  return row.due_at ?? "no due date";
}

function queuePage(): void {
  const heading = h("h1", {}, "Team queue");
  const tabs = h("div", { role: "tablist", "aria-label": "Status", class: "tabs" });
  const list = h("ul", { class: "cards", "aria-live": "polite" });
  const filter = h("input", {
    id: "assignee",
    type: "search",
    value: queueAssignee,
    placeholder: "everyone",
    "aria-describedby": "assignee-help",
  }) as HTMLInputElement;
  const form = h(
    "form",
    {
      class: "filter",
      onsubmit: (event: Event) => {
        event.preventDefault();
        queueAssignee = filter.value.trim();
        route();
      },
    },
    h("label", { for: "assignee" }, "Assignee"),
    filter,
    h("button", { type: "submit" }, "Filter"),
    h("span", { id: "assignee-help", class: "help" }, "a technician's user name; empty for everyone"),
  );
  const error = h("p", { role: "alert", class: "error", hidden: true });
  show(heading, form, tabs, error, list);

  const draw = (state: ViewState<"team-queue">) => {
    error.hidden = state.error === null;
    error.textContent = state.error?.message ?? "";
    const counts = state.extra.counts ?? {};
    const total = Object.values(counts).reduce((a, b) => a + b, 0);
    const statuses = [...STATUS_ORDER.filter((s) => counts[s]), ...Object.keys(counts).filter((s) => !STATUS_ORDER.includes(s))];
    if (queueStatus && !statuses.includes(queueStatus)) statuses.push(queueStatus);
    tabs.replaceChildren(
      ...[["", "All", total] as const, ...statuses.map((s) => [s, s.replace("_", " ") || "no status", counts[s] ?? 0] as const)].map(
        ([value, label, count]) =>
          h(
            "button",
            {
              type: "button",
              role: "tab",
              "aria-selected": String(queueStatus === value),
              "data-status": value,
              onclick: () => {
                queueStatus = value;
                draw(state);
              },
            },
            `${label} `,
            h("span", { class: "count" }, String(count)),
          ),
      ),
    );
    const rows = [...state.rows.values()]
      .filter((row) => queueStatus === "" || (row.status ?? "") === queueStatus)
      .sort((a, b) => {
        const da = a.due_at ?? "~";
        const db = b.due_at ?? "~";
        return da < db ? -1 : da > db ? 1 : a.id < b.id ? -1 : 1;
      });
    list.replaceChildren(
      ...rows.map((row) =>
        h(
          "li",
          { class: row.overdue ? "card overdue" : "card", "data-id": row.id, "data-status": String(row.status ?? "") },
          h("a", { href: `#/wo/${encodeURIComponent(row.id)}`, class: "title" }, `${row.number ?? ""} ${row.title ?? row.id}`),
          h("span", { class: "status" }, String(row.status ?? "")),
          row.overdue ? h("strong", { class: "overdue-flag" }, "Overdue") : null,
          h("span", {}, `Due ${dueText(row)}`),
          h("span", {}, `Assignee: ${row.assignee ?? "nobody"}`),
          h("span", {}, `Priority: ${row.priority ?? "—"}`),
          row.site ? h("span", {}, `Site: ${row.site}`) : null,
        ),
      ),
      ...(rows.length === 0 ? [h("li", { class: "empty" }, "No work orders here.")] : []),
    );
  };
  follow("team-queue", queueAssignee ? { assignee: queueAssignee } : {}, draw);
}

// --- a work order, live ---------------------------------------------------------------------------

function detailPage(id: string): void {
  let doc = connection.client.doc(id);
  const body = h("div", { class: "detail" });
  const message = h("p", { role: "status", class: "help" });
  const reassignInput = h("input", { id: "reassign-to", type: "text", required: true }) as HTMLInputElement;
  const act = async (path: string, payload: unknown) => {
    const answer = await auth.api(`/v1/work-orders/${encodeURIComponent(id)}/${path}`, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(payload),
    });
    const result = (await answer.json()) as { detail?: string };
    message.textContent = answer.ok ? `Done: ${path}.` : `Refused: ${result.detail ?? answer.status}`;
  };
  const actions = h(
    "div",
    { class: "actions" },
    h(
      "form",
      {
        onsubmit: (event: Event) => {
          event.preventDefault();
          void act("reassign", { assignee: reassignInput.value.trim() });
        },
      },
      h("label", { for: "reassign-to" }, "Reassign to"),
      reassignInput,
      h("button", { type: "submit" }, "Reassign"),
    ),
    h(
      "button",
      {
        type: "button",
        class: "danger",
        onclick: () => {
          if (confirm(`Cancel ${id}?`)) void act("cancel", {});
        },
      },
      "Cancel work order",
    ),
  );
  show(h("p", {}, h("a", { href: "#/queue" }, "← Team queue")), h("h1", {}, id), actions, message, body);
  const draw = () => {
    const fields = doc.getMap("fields").toJSON() as Record<string, unknown>;
    const checklist = doc.getArray("checklist").toJSON() as Array<Record<string, unknown>>;
    const log = doc.getArray("status_log").toJSON() as Array<Record<string, unknown>>;
    body.replaceChildren(
      h("h2", {}, String(fields.title ?? "")),
      h(
        "dl",
        {},
        ...["status", "assignee", "priority", "due_at", "site", "asset_id", "team"].flatMap((key) => [
          h("dt", {}, key.replace("_", " ")),
          h("dd", { "data-field": key }, String(fields[key] ?? "—")),
        ]),
      ),
      h("h3", {}, "Checklist"),
      h(
        "ul",
        { class: "checklist" },
        ...checklist.map((item) =>
          h(
            "li",
            { "data-done": String(Boolean(item.done)) },
            item.done ? "☑ " : "☐ ",
            String(item.label ?? ""),
            item.required ? " (required)" : "",
            item.done_by ? ` — ${item.done_by}` : "",
          ),
        ),
      ),
      h("h3", {}, "Notes"),
      h("p", { class: "notes" }, doc.getText("notes").toString() || "—"),
      h("h3", {}, "Status log"),
      h(
        "ol",
        { class: "log" },
        ...log.map((entry) =>
          h(
            "li",
            { class: entry.rejected ? "rejected" : "" },
            `${entry.at ?? ""} ${entry.status} by ${entry.by} (${entry.role})`,
            entry.rejected ? ` — rejected: ${entry.rejected}` : "",
          ),
        ),
      ),
    );
  };
  const observer = () => draw();
  doc.on("update", observer);
  draw();
  // A `reset` replaces the document (the server's copy is synced afresh); out of scope, it is
  // gone from the socket.
  const offReset = connection.client.on("reset", (event) => {
    if (event.doc !== id || event.reason === "forbidden") return;
    doc.off("update", observer);
    doc = connection.client.doc(id);
    doc.on("update", observer);
    draw();
  });
  const offScope = connection.client.on("scope", (event) => {
    if (event.removed.includes(id)) message.textContent = "This work order has left your scope.";
  });
  leave = () => {
    doc.off("update", observer);
    offReset();
    offScope();
  };
}

// --- devices, conflicts ---------------------------------------------------------------------------

function table(headings: string[], rows: Node[]): HTMLElement {
  return h(
    "table",
    {},
    h("thead", {}, h("tr", {}, ...headings.map((text) => h("th", { scope: "col" }, text)))),
    h("tbody", {}, ...rows),
  );
}

function devicesPage(): void {
  const holder = h("div", { "aria-live": "polite" });
  show(h("h1", {}, "Devices"), holder);
  follow("devices", {}, (state) => {
    const rows = [...state.rows.values()].sort((a, b) => Number(b.last_seen) - Number(a.last_seen));
    holder.replaceChildren(
      h("p", { class: "help" }, `Server change sequence: ${state.extra.server_seq ?? "—"}. Lag is the changes a device had not yet caught up with when it last synced.`),
      table(
        ["Device", "User", "Platform", "Version", "Last seen", "Lag", "Online"],
        rows.map((row) =>
          h(
            "tr",
            { "data-id": row.id },
            h("td", {}, row.id),
            h("td", {}, String(row.subject)),
            h("td", {}, String(row.platform || "—")),
            h(
              "td",
              {},
              String(row.version || "—"),
              row.below_min_version ? h("strong", { class: "warn" }, ` below minimum ${row.min_version}`) : null,
            ),
            h("td", {}, when(row.last_seen)),
            h("td", { class: "number" }, String(row.lag)),
            h("td", {}, row.online ? "online" : "offline"),
          ),
        ),
      ),
    );
  });
}

function conflictsPage(): void {
  const holder = h("div", { "aria-live": "polite" });
  show(h("h1", {}, "Conflicts"), h("p", { class: "help" }, "What the domain rules corrected, newest first."), holder);
  follow("conflicts", {}, (state) => {
    const rows = [...state.rows.values()].sort((a, b) => Number(b.id) - Number(a.id));
    holder.replaceChildren(
      table(
        ["When", "Work order", "Rule", "What", "By"],
        rows.map((row) =>
          h(
            "tr",
            { "data-id": row.id },
            h("td", {}, when(row.at)),
            h("td", {}, h("a", { href: `#/wo/${encodeURIComponent(String(row.doc))}` }, String(row.doc))),
            h("td", {}, String(row.rule)),
            h("td", {}, String(row.detail)),
            h("td", {}, `${row.actor} (${row.origin})`),
          ),
        ),
      ),
    );
  });
}

// --- manager: region metrics ----------------------------------------------------------------------

function metricsPage(): void {
  const holder = h("div", { class: "metrics", "aria-live": "polite" });
  show(h("h1", {}, "Region metrics"), holder);
  follow("region-metrics", {}, (state) => {
    const rows = [...state.rows.values()].sort((a, b) => (a.id < b.id ? -1 : 1));
    const section = (title: string, chart: Node) => h("section", {}, h("h2", {}, title), chart);
    holder.replaceChildren(
      section("Work orders by status", statusChart(rows)),
      section("Overdue", barChart(rows, "Overdue work orders per team", (r) => Number(r.overdue), String)),
      section(
        "Mean time to complete",
        barChart(
          rows,
          "Mean hours from creation to completion per team",
          (r) => (r.mean_seconds_to_complete === null ? null : Number(r.mean_seconds_to_complete) / 3600),
          (v) => (v < 1 ? `${Math.round(v * 60)} min` : `${v.toFixed(1)} h`),
        ),
      ),
      section(
        "First-time fix",
        barChart(
          rows,
          "Share of completed work orders never reopened, per team",
          (r) => (r.first_time_fix_rate === null ? null : Number(r.first_time_fix_rate) * 100),
          (v) => `${v.toFixed(0)} %`,
        ),
      ),
      table(
        ["Team", "Total", "Overdue", "Completed", "Conflicts (24 h)"],
        rows.map((row) =>
          h(
            "tr",
            { "data-id": row.id },
            h("td", {}, String(row.team ?? "(no team)")),
            h("td", { class: "number" }, String(row.total)),
            h("td", { class: "number" }, String(row.overdue)),
            h("td", { class: "number" }, String(row.completed)),
            h("td", { class: "number" }, String(row.conflicts_24h ?? "—")),
          ),
        ),
      ),
    );
  });
}

// --- admin: the outbox's dead letters -------------------------------------------------------------

async function outboxPage(): Promise<void> {
  const holder = h("div", { "aria-live": "polite" });
  const refresh = h("button", { type: "button", onclick: () => void load() }, "Refresh");
  show(h("h1", {}, "Dead letters"), refresh, holder);
  const load = async () => {
    const answer = await auth.api("/v1/admin/outbox?state=dead&limit=200");
    if (!answer.ok) {
      holder.replaceChildren(h("p", { role: "alert", class: "error" }, `HTTP ${answer.status}`));
      return;
    }
    const page = (await answer.json()) as { items: Array<Record<string, any>> };
    holder.replaceChildren(
      page.items.length === 0
        ? h("p", {}, "No dead letters.")
        : table(
            ["Entry", "Adapter", "Document", "Change", "Attempts", "Error", "Since"],
            page.items.map((item) =>
              h(
                "tr",
                { "data-id": String(item.id) },
                h("td", {}, String(item.id)),
                h("td", {}, String(item.adapter)),
                h("td", {}, String(item.doc)),
                h("td", { class: "number" }, String(item.seq)),
                h("td", { class: "number" }, String(item.attempts)),
                h("td", {}, item.error ? `${item.error.code}: ${item.error.message}` : "—"),
                h("td", {}, when(item.updated_at)),
              ),
            ),
          ),
    );
  };
  await load();
}

// --- start ---------------------------------------------------------------------------------------

function signedOut(reason = ""): void {
  status.textContent = "Signed out";
  status.dataset.state = "offline";
  nav.replaceChildren();
  who.replaceChildren();
  show(
    h("h1", {}, "fieldsync dashboard"),
    reason ? h("p", { role: "alert" }, reason) : "",
    h("button", { type: "button", id: "sign-in", onclick: () => void auth.signIn() }, "Sign in"),
  );
}

async function main(): Promise<void> {
  auth = await Auth.load();
  try {
    await auth.start();
  } catch (error) {
    signedOut(error instanceof SignInRequired ? "" : String(error));
    return;
  }
  connection = new Connection(auth);
  let routed = false;
  connection.onState = () => {
    renderState();
    if (connection.state === "live" && !routed) {
      routed = true;
      route();
    }
  };
  connection.onError = say;
  connection.onSignedOut = () => signedOut("Your session ended: sign in again.");
  window.addEventListener("hashchange", () => routed && route());
  renderState();
  await connection.connect();
}

void main();
