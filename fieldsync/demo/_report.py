"""What the demo prints: a line per phase while it works, then a summary a person can check."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from fieldsync.demo import _dataset

Print = Callable[[str], None]


def _print(text: str) -> None:
    print(text, flush=True)


class Progress:
    """`[  12.3s] phase       what happened (took 1.2s)` lines on stdout."""

    def __init__(self, out: Print = _print) -> None:
        self.out = out
        self.started = time.perf_counter()
        self._phase_started = self.started

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def begin(self) -> None:
        """Start timing a phase (the next `line` reports how long it took)."""
        self._phase_started = time.perf_counter()

    def line(self, phase: str, text: str, *, timed: bool = True) -> None:
        now = time.perf_counter()
        took = f"  ({now - self._phase_started:.1f}s)" if timed else ""
        self.out(f"[{now - self.started:6.1f}s] {phase:<12} {text}{took}")
        self._phase_started = now


def size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class Summary:
    docs_converged: int
    docs_checked: int
    replicas: int
    devices: int
    mismatches: list[str]
    stored: dict[str, int]
    received: int
    received_uncompressed: int
    sent: int
    edits: int
    concurrent_docs: int
    conflicts: int
    text_merges: int
    notes_kept: int
    notes_written: int
    refused: int
    corrections: Counter[str]
    resets: int
    elapsed: float
    erp: list[str]  # what landed in the demo's ERP (`_erp.Landed.lines`)
    plant_floor: str  # what the alarm and the meter reading did, or why they were skipped
    directory: str  # what the directory gave, why it failed, or that there is none

    @property
    def converged(self) -> bool:
        return (
            self.docs_converged == self.docs_checked
            and not self.mismatches
            and self.notes_kept == self.notes_written
        )

    def correction_summary(self) -> str:
        """Concurrent edits the merge kept but the domain rules did not let stand."""
        if not self.corrections:
            return "none needed"
        total = sum(self.corrections.values())
        each = ", ".join(f"{rule} {n}" for rule, n in sorted(self.corrections.items()))
        return f"{total} merged states corrected by the server and converged everywhere ({each})"

    def lines(self) -> list[str]:
        ratio = self.received_uncompressed / self.received if self.received else 1.0
        verdict = "yes" if self.converged else "NO"
        out = [
            "",
            "fieldsync demo: summary",
            f"  converged             {verdict}: {self.docs_converged}/{self.docs_checked} "
            f"documents identical on every device that holds them and in the server's store "
            f"({self.replicas} replicas on {self.devices} devices)",
            f"  concurrent edits      {self.edits} edits made offline; {self.concurrent_docs} "
            f"times a document was edited on 2+ devices in the same round: merged",
            f"  conflicts             {self.conflicts} fields set on 2+ devices at once: one value "
            f"kept everywhere; {self.text_merges} notes appended to by 2+ authors at once: "
            f"{self.notes_kept}/{self.notes_written} note lines kept",
            f"  updates stored        {self.stored.get('updates', 0)} in the log "
            f"(a device's offline edits to a document arrive as one), "
            f"{self.stored.get('snapshots', 0)} snapshots, {self.stored.get('docs', 0)} documents, "
            f"{self.stored.get('commits', 0)} group commits",
            f"  bytes on the wire     received {size(self.received)} with zstd, "
            f"{size(self.received_uncompressed)} without ({ratio:.1f}x smaller); "
            f"sent {size(self.sent)}",
            f"  rule corrections      {self.correction_summary()}",
            f"  refused / resets      {self.refused} / {self.resets}",
            *self.erp,
            f"  plant floor           {self.plant_floor}",
            f"  directory             {self.directory}",
            f"  time                  {self.elapsed:.1f}s",
        ]
        out += [f"  MISMATCH              {m}" for m in self.mismatches[:10]]
        if len(self.mismatches) > 10:
            out.append(f"  …                     and {len(self.mismatches) - 10} more")
        return out


def serving(
    server_url: str, issuer_url: str, data_dir: str, example_doc: str, users: str
) -> list[str]:
    ws = server_url.replace("http", "ws", 1)
    return [
        "",
        f"fieldsync keeps serving at {server_url}  (Ctrl-C to stop)",
        f"  dashboard             {server_url}/dashboard/   (sign in as a supervisor, e.g. "
        f"sam, the manager {_dataset.MANAGER.subject} or the admin {_dataset.ADMIN.subject}; "
        "password demo)",
        f"  device sync (v1)      {ws}/v1/sync",
        f"  y-websocket           {ws}/v1/yws/{{doc}}   e.g. {ws}/v1/yws/{example_doc}",
        f"  health                {server_url}/v1/health",
        f"  metrics               {server_url}/v1/metrics   (with a token of admin "
        f"{_dataset.ADMIN.subject} or manager {_dataset.MANAGER.subject})",
        f"  OpenID discovery      {issuer_url}/.well-known/openid-configuration",
        f"  get a token           curl -d grant_type=password -d username=<user> "
        f"-d password=demo {issuer_url}/token",
        "  use it                curl -H 'Authorization: Bearer <access_token>' "
        f"{server_url}/v1/metrics   (browsers' y-websocket: ?token=<access_token>)",
        f"  users                 {users}",
        f"  data                  {data_dir}  (run again to reuse it; delete it to start over)",
    ]
