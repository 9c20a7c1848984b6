"""The web dashboard: workers, executions, one execution's timeline, parked requests, an overview.

Pages are rendered on the server (Starlette and Jinja2). A live page holds a server-sent-events
stream that pushes its re-rendered fragment every `dashboard.refresh_interval`; nothing but a few
lines of JavaScript run in the browser. Everything is read through the client's indexed queries;
cancel, retry and replay are the client's own operations, and need `dashboard.token`.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hmac
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

from jinja2 import Environment, FileSystemLoader, select_autoescape
from markupsafe import escape
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Route

from common.client import BatonClient
from common.logging import get_logger
from common.schemas import TERMINAL_STATUSES, FinishedMinute, Status
from common.settings import Settings
from common.timeline import timeline
from common.values import parse_moment

log = get_logger("baton.dashboard")

TEMPLATES = Environment(
    loader=FileSystemLoader(Path(__file__).parent / "templates"), autoescape=select_autoescape(["html"])
)
TEMPLATES.filters["json"] = lambda value: json.dumps(value, indent=2, default=str)
TEMPLATES.filters["short"] = lambda value: str(value)[:8] if value else ""
TEMPLATES.filters["when"] = lambda value: value.strftime("%Y-%m-%d %H:%M:%S") if isinstance(value, dt.datetime) else (value or "")

Fragment = Callable[[Request], Awaitable[str]]


def _time(value: str | None, what: str) -> dt.datetime | None:
    if not value:
        return None
    try:
        return parse_moment(value, naive_is_utc=True)
    except ValueError as exc:
        raise ValueError(f"{what}: {exc}") from None


class Dashboard:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.cfg = settings.dashboard
        self.client = BatonClient(settings)

    # -- fragments: what a live page re-renders -------------------------------------------------

    async def overview_fragment(self, request: Request) -> str:
        active = await self.client.count_active()
        minutes = await self.client.finished_per_minute()
        # One bar per minute of the last hour, the newest on the right, empty minutes included.
        now = dt.datetime.now(dt.UTC).replace(second=0, microsecond=0)
        by_minute = {m["minute"]: m for m in minutes}
        slots = [
            by_minute.get(t) or FinishedMinute(minute=t, completed=0, failed=0)
            for t in (now - dt.timedelta(minutes=59 - i) for i in range(60))
        ]
        peak = max((m["completed"] + m["failed"] for m in slots), default=0)
        return TEMPLATES.get_template("_overview.html").render(
            active=active, minutes=slots, peak=peak, statuses=[s.value for s in Status],
            completed=sum(m["completed"] for m in minutes), failed=sum(m["failed"] for m in minutes),
        )

    async def workers_fragment(self, request: Request) -> str:
        workers = await self.client.list_workers()
        actions = {w["name"]: w.get("actions") or [] for w in workers}
        return TEMPLATES.get_template("_workers.html").render(workers=workers, actions=actions)

    def _filters(self, request: Request) -> dict[str, Any]:
        p = request.query_params
        return {k: p.get(k) or None for k in ("status", "action", "worker", "since", "until", "q", "after")}

    async def executions_fragment(self, request: Request) -> str:
        f = self._filters(request)
        after = None
        if f["after"]:
            stamp, _, last_id = f["after"].partition("~")
            after = (_time(stamp, "after"), uuid.UUID(last_id))
        rows = await self.client.list_page(
            status=f["status"], action_ref=f["action"], worker=f["worker"], since=_time(f["since"], "since"),
            until=_time(f["until"], "until"), after=after, id_prefix=f["q"], limit=self.cfg.page_size,  # type: ignore[arg-type]
        )
        more = None
        if len(rows) == self.cfg.page_size:
            last = rows[-1]
            query = {k: v for k, v in f.items() if v and k != "after"}
            query["after"] = f"{last['created_at'].isoformat()}~{last['id']}"
            more = "/executions?" + "&".join(f"{k}={_quote(v)}" for k, v in query.items())
        return TEMPLATES.get_template("_executions.html").render(rows=rows, more=more)

    async def execution_fragment(self, request: Request) -> str:
        execution = await self.client.get(request.path_params["id"])
        if execution is None:
            return "<p class=error>No such execution.</p>"
        return TEMPLATES.get_template("_execution.html").render(
            e=execution, timeline=timeline(execution.get("events") or []), steps=execution.get("steps") or [],
            terminal=execution["status"] in TERMINAL_STATUSES,
            can_act=self.cfg.token is not None,
        )

    # -- pages ------------------------------------------------------------------------------

    def page(self, title: str, live: str, fragment: Fragment) -> Callable[[Request], Awaitable[Response]]:
        """A whole page: its fragment now, and the stream that keeps it current."""

        async def endpoint(request: Request) -> Response:
            try:
                body = await fragment(request)
            except ValueError as exc:
                body = f"<p class=error>{escape(str(exc))}</p>"
            stream = "/live/" + live + "".join(f"/{v}" for v in request.path_params.values())
            if request.url.query:
                stream += "?" + request.url.query
            return HTMLResponse(TEMPLATES.get_template("page.html").render(
                title=title, body=body, stream=stream,
                filters=self._filters(request) if live == "executions" else None,
                statuses=[s.value for s in Status], read_only=self.cfg.token is None,
                notice=request.query_params.get("notice"), nav=live,
            ))

        return endpoint

    def live(self, fragment: Fragment) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            async def events() -> AsyncIterator[str]:
                last = None
                while not await request.is_disconnected():
                    try:
                        html = await fragment(request)
                    except ValueError as exc:
                        html = f"<p class=error>{escape(str(exc))}</p>"
                    if html != last:
                        last = html
                        yield "event: update\n" + "".join(f"data: {line}\n" for line in html.splitlines()) + "\n"
                    else:
                        yield ": still here\n\n"
                    await asyncio.sleep(self.cfg.refresh_interval_s)

            return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-store"})

        return endpoint

    async def rejected(self, request: Request) -> Response:
        parked = await self.client.list_rejected(limit=200)
        body = TEMPLATES.get_template("_rejected.html").render(parked=parked, can_act=self.cfg.token is not None)
        return HTMLResponse(TEMPLATES.get_template("page.html").render(
            title="Parked requests", body=body, stream=None, filters=None, statuses=[], nav="rejected",
            read_only=self.cfg.token is None, notice=request.query_params.get("notice"),
        ))

    # -- actions --------------------------------------------------------------------------------

    async def _authorized(self, request: Request) -> str | None:
        """None if the request carries the token; else why it is refused."""
        if self.cfg.token is None:
            return "this dashboard is read-only: set dashboard.token to cancel, retry or replay from it"
        given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        if not given:
            form = await request.form()
            given = str(form.get("token") or "")
        if not given or not hmac.compare_digest(given.encode(), self.cfg.token.encode()):
            return "refused: the token is missing or wrong"
        return None

    def action(self, do: Callable[[Request], Awaitable[tuple[str, str]]]) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            refusal = await self._authorized(request)
            if refusal is not None:
                log.warning("dashboard_action_refused", path=request.url.path, reason=refusal)
                return HTMLResponse(f"<p class=error>{escape(refusal)}</p>", status_code=403)
            try:
                where, notice = await do(request)
            except ValueError as exc:
                return HTMLResponse(f"<p class=error>{escape(str(exc))}</p>", status_code=409)
            log.info("dashboard_action", path=request.url.path, result=notice)
            return RedirectResponse(f"{where}?notice={_quote(notice)}", status_code=303)

        return endpoint

    async def cancel(self, request: Request) -> tuple[str, str]:
        rows = await self.client.cancel(request.path_params["id"])
        return f"/executions/{request.path_params['id']}", f"cancelled ({len(rows)} execution(s))"

    async def retry(self, request: Request) -> tuple[str, str]:
        old = await self.client.resolve_id(request.path_params["id"])
        new = await self.client.retry(old)
        return f"/executions/{new}", "retried from its checkpoint" if new == old else f"rerun as {new}"

    async def replay(self, request: Request) -> tuple[str, str]:
        parked = await self.client.replay_rejected(request.path_params["key"])
        return "/rejected", f"request {parked.key} posted again"


def _quote(text: str) -> str:
    return quote(text, safe="")


def create_app(settings: Settings, d: Dashboard | None = None) -> Starlette:
    d = d or Dashboard(settings)

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        await d.client.pool()
        log.info("dashboard_started", host=settings.dashboard.host, port=settings.dashboard.port,
                 read_only=settings.dashboard.token is None)
        try:
            yield
        finally:
            await d.client.close()

    async def healthz(_request: Request) -> Response:
        await d.client.count_active()  # the database answers
        return PlainTextResponse("ok")

    routes = [
        Route("/healthz", healthz),
        Route("/", d.page("Overview", "overview", d.overview_fragment)),
        Route("/workers", d.page("Workers", "workers", d.workers_fragment)),
        Route("/executions", d.page("Executions", "executions", d.executions_fragment)),
        Route("/executions/{id}", d.page("Execution", "execution", d.execution_fragment)),
        Route("/rejected", d.rejected),
        Route("/live/overview", d.live(d.overview_fragment)),
        Route("/live/workers", d.live(d.workers_fragment)),
        Route("/live/executions", d.live(d.executions_fragment)),
        Route("/live/execution/{id}", d.live(d.execution_fragment)),
        Route("/executions/{id}/cancel", d.action(d.cancel), methods=["POST"]),
        Route("/executions/{id}/retry", d.action(d.retry), methods=["POST"]),
        Route("/rejected/{key}/replay", d.action(d.replay), methods=["POST"]),
    ]
    return Starlette(routes=routes, lifespan=lifespan)


async def serve(settings: Settings) -> bool:
    """Serve until stopped; False if it could not listen. PostgreSQL is reached first, so that a
    failure to reach it is the caller's to report in one line."""
    import uvicorn

    d = Dashboard(settings)
    await d.client.pool()
    config = uvicorn.Config(
        create_app(settings, d), host=settings.dashboard.host, port=settings.dashboard.port, log_config=None,
        access_log=False, lifespan="on",
    )
    server = uvicorn.Server(config)
    try:
        await server.serve()
    except SystemExit:  # uvicorn's answer to an address it cannot bind (it has logged why)
        return False
    return True
