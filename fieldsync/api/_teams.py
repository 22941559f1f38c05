"""The people of a team, for a supervisor's screen: the directory table (kept by the directory
adapter), scoped by the policy as documents are: a supervisor sees its own team, a regional
manager the teams of its region (their members in that region), an admin every team."""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web

from fieldsync.api._http import json_response, rest
from fieldsync.api._paging import Cursors, page_size
from fieldsync.api._permissions import PRINCIPAL
from fieldsync.auth import Policy
from fieldsync.errors import ErrorCode, FieldsyncError
from fieldsync.records import Person, ScopeKind
from fieldsync.storage import Directory, Screens

__all__ = ["TeamRoutes"]

_MAX_TEAM = 200  # characters: a team's name is short


def _member(person: Person) -> dict[str, str | None]:
    return {
        "subject": person.subject,
        "name": person.name,
        "mail": person.mail,
        "region": person.region,
        "supervisor": person.supervisor,
    }


class TeamRoutes:
    def __init__(
        self, directory: Directory, policy: Callable[[], Policy], screens: Screens
    ) -> None:
        self._directory = directory
        self._policy = policy  # read per request: SIGHUP may replace it
        self._cursors = Cursors(screens.cursor_key)

    def routes(self) -> list[web.RouteDef]:
        return [web.get("/v1/teams/{team}/members", rest(self.members))]

    async def members(self, request: web.Request) -> web.StreamResponse:
        """The enabled people of the team, by subject. A team outside the caller's scope and
        one nobody belongs to answer alike (403), so team names cannot be probed."""
        principal = request[PRINCIPAL]
        team = request.match_info["team"]
        if not 0 < len(team) <= _MAX_TEAM:
            message = f"a team is 1 to {_MAX_TEAM} characters"
            raise FieldsyncError(ErrorCode.INVALID_REQUEST, message)
        scope = self._policy().scope(principal)
        region = scope.value if scope.kind is ScopeKind.REGION else None
        own_team = scope.kind is ScopeKind.TEAM and scope.value == team
        if not (own_team or region is not None or scope.kind is ScopeKind.ALL):
            raise _not_visible(team)
        binding = ("team-members", principal.subject, team)
        after = await self._cursors.read(request, binding, 1)
        limit = page_size(request)
        people = await self._directory.members(
            team, region=region, after=after[0] if after else None, limit=limit + 1
        )
        if region is not None and after is None and not people:
            raise _not_visible(team)  # no member in the manager's region: not its region's team
        more = len(people) > limit
        people = people[:limit]
        next_cursor = await self._cursors.make(binding, (people[-1].subject,)) if more else None
        return await json_response(
            request, {"team": team, "items": [_member(p) for p in people], "next": next_cursor}
        )


def _not_visible(team: str) -> FieldsyncError:
    return FieldsyncError(ErrorCode.FORBIDDEN, f"team {team!r}: not in your scope")
