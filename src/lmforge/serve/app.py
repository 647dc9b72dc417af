"""The `lmforge serve` web app: human-evaluation arena, chat playground, run dashboard.

Server-rendered HTML (Jinja, autoescaped) with a little vanilla JavaScript in
`static/app.js`; no build step. Who may see what:

- organisers (a token, checked against its SHA-256 in the store, exchanged at /login
  for an expiring server-side session kept in an http-only cookie) see everything;
- annotators open an invitation link ``/a/<token>``, which puts their token in a
  cookie and sends them to their one study; they can reach only that study's
  voting page;
- everything else gets a clear error page (JSON under /api/).

Every form carries a CSRF token that must match a same-site cookie (double
submit); `security.RequestGuard` checks Host, Origin, body sizes and sign-in before
any route runs. A Content-Security-
Policy allows scripts only from /static, so even text that slipped past the
escaping could not run. Files are served only from inside the runs folder.
"""

from __future__ import annotations

import csv
import hmac
import io
import json
import logging
import math
import secrets
import time
import uuid
from collections import defaultdict
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

import jinja2
from fastapi import FastAPI, File, Form, HTTPException, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import (
    FileResponse,
    HTMLResponse,
    JSONResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmforge.serve import openai_api, stats
from lmforge.serve.models import (
    PROMPT_FORMATS,
    ModelPool,
    StudyGenerator,
    find_checkpoints,
    iter_stream,
    safe_join,
    sampling_of,
)
from lmforge.serve.runs import (
    eval_json_path,
    eval_tables,
    find_runs,
    is_running,
    read_metrics,
    run_summary,
)
from lmforge.serve.security import ANN_COOKIE, ORG_COOKIE, SecuritySettings, install
from lmforge.serve.store import CHOICES, Annotator, Store, StudySettings, VoteRefused

log = logging.getLogger("lmforge.serve")
HERE = Path(__file__).parent

CSRF_COOKIE = "lmforge_csrf"

MAX_PROMPTS = 10_000
MAX_PROMPT_CHARS = 20_000
MAX_UPLOAD_BYTES = 8_000_000
MAX_COMMENT_CHARS = 5_000
# Files of a run the dashboard may serve (never the store itself, never weights).
SERVABLE_SUFFIXES = {".html", ".png", ".svg", ".jpg", ".json", ".jsonl", ".yaml", ".md", ".txt"}

PAGE_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)
# Run artefacts (report.html) are shown sandboxed: no scripts, no access to the app's origin.
FILE_CSP = (
    "sandbox; default-src 'none'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
    "font-src data:"
)


class SecurityHeaders:
    """ASGI middleware adding CSP and friends to every response."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        csp = FILE_CSP if scope["path"].startswith("/files/") else PAGE_CSP

        async def send_with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                names = {k.lower() for k, _ in headers}
                for k, v in (
                    (b"content-security-policy", csp.encode()),
                    (b"x-content-type-options", b"nosniff"),
                    (b"x-frame-options", b"DENY"),
                    # Invitation links carry a token: never leak it in a Referer header.
                    (b"referrer-policy", b"no-referrer"),
                ):
                    if k not in names:
                        headers.append((k, v))
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, send_with_headers)


class ChatRequest(BaseModel):
    checkpoint: str
    messages: list[dict[str, str]] = Field(min_length=1, max_length=200)
    prompt_format: str = "auto"  # the chat template for a fine-tuned checkpoint
    # The ranges of `lmforge.model.sampling.RANGES`; a bad value is a 422 naming the field.
    temperature: float = Field(0.8, ge=0.0, le=5.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, le=100_000)
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)
    stop: list[Annotated[str, Field(min_length=1, max_length=200)]] = Field([], max_length=16)
    max_tokens: int = Field(128, ge=1, le=4096)
    seed: int | None = None


def create_app(
    runs_dir: str | Path,
    db_path: str | Path | None = None,
    organiser_token: str | None = None,
    device: str = "cpu",
    resume_generation: bool = True,
    security: SecuritySettings | None = None,
) -> FastAPI:
    """The web app over `runs_dir`; the store defaults to `<runs_dir>/serve.sqlite`.

    `organiser_token`, if given, is registered (hashed) as an organiser. `security` sets
    the allowed hosts and origins, the trusted proxies and the session lifetime.
    """
    security = security or SecuritySettings()
    runs_root = Path(runs_dir).resolve()
    if not runs_root.is_dir():
        raise FileNotFoundError(f"runs folder {runs_root} does not exist")
    store = Store(Path(db_path) if db_path else runs_root / "serve.sqlite")
    if organiser_token:
        store.add_organiser(token=organiser_token)
    pool = ModelPool(runs_root, device=device)
    generator = StudyGenerator(store, pool)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if resume_generation:
            generator.resume_all()
        yield

    app = FastAPI(
        title="lmforge", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan
    )
    app.state.store, app.state.pool, app.state.generator = store, pool, generator
    app.state.runs_dir = runs_root
    app.add_middleware(SecurityHeaders)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(HERE / "templates"),
        autoescape=True,  # every {{ value }} is HTML-escaped
        undefined=jinja2.StrictUndefined,
    )
    env.filters["num"] = _fmt_num
    env.filters["when"] = lambda t: time.strftime("%Y-%m-%d %H:%M", time.localtime(t)) if t else ""
    templates = Jinja2Templates(env=env)

    # ------------------------------------------------------------------ helpers

    def organiser(request: Request) -> bool:
        return store.session_valid(request.cookies.get(ORG_COOKIE))

    def annotator(request: Request) -> Annotator | None:
        return store.annotator(request.cookies.get(ANN_COOKIE))

    def require_organiser(request: Request) -> None:
        if not organiser(request):
            who = "an annotator" if annotator(request) else "not signed in"
            raise HTTPException(
                403,
                f"This page is for study organisers (you are {who}). "
                "Sign in with an organiser token at /login.",
            )

    def render(request: Request, template: str, status: int = 200, **ctx: Any) -> HTMLResponse:
        csrf = request.cookies.get(CSRF_COOKIE) or secrets.token_urlsafe(24)
        ctx.setdefault("is_organiser", organiser(request))
        ctx.setdefault("annotator", annotator(request))
        response = templates.TemplateResponse(
            request, template, {"csrf": csrf, **ctx}, status_code=status
        )
        if request.cookies.get(CSRF_COOKIE) != csrf:
            response.set_cookie(CSRF_COOKIE, csrf, httponly=True, samesite="strict")
        return response

    def check_csrf(request: Request, token: str) -> None:
        # The Origin of every POST was checked by security.RequestGuard already.
        cookie = request.cookies.get(CSRF_COOKIE, "")
        if not cookie or not token or not hmac.compare_digest(cookie, token):
            raise HTTPException(
                403, "The form's security token is missing or stale. Reload the page and try again."
            )

    def get_study(study_id: int):
        study = store.study(study_id)
        if study is None:
            raise HTTPException(404, f"There is no study {study_id}.")
        return study

    # ------------------------------------------------------------------ errors

    def error_response(request: Request, status: int, message: str) -> Response:
        if request.url.path.startswith("/v1/"):  # OpenAI's clients expect 400 for bad values
            return openai_api.openai_error(400 if status == 422 else status, message)
        if request.url.path.startswith("/api/"):
            return JSONResponse({"error": message}, status_code=status)
        titles = {
            400: "Bad request",
            401: "Sign-in needed",
            403: "Not allowed",
            404: "Not found",
            405: "Method not allowed",
            409: "Conflict",
            413: "Too large",
            422: "Invalid input",
            500: "Something went wrong",
        }
        try:
            return render(
                request,
                "error.html",
                status=status,
                title=titles.get(status, f"Error {status}"),
                status_code=status,
                message=message,
            )
        except Exception:  # the error page itself must never fail
            return HTMLResponse(f"<h1>Error {status}</h1>", status_code=status)

    install(app, store, security, refuse=error_response)
    app.state.openai_batcher = openai_api.install_routes(app, pool, runs_root, store)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        message = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        if exc.status_code == 404 and message == "Not Found":
            message = f"There is no page at {request.url.path}."
        return await run_in_threadpool(error_response, request, exc.status_code, message)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        parts = []
        for err in exc.errors():
            where = ".".join(str(x) for x in err.get("loc", ()) if x not in ("body", "query"))
            parts.append(f"{where}: {err.get('msg', 'invalid')}")
        return await run_in_threadpool(error_response, request, 422, "; ".join(parts))

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception) -> Response:
        log.exception("error serving %s", request.url.path)
        return await run_in_threadpool(
            error_response,
            request,
            500,
            f"The server failed on this request ({type(exc).__name__}). "
            "The details are in the server's log.",
        )

    # ------------------------------------------------------------------ sign-in

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/", response_class=HTMLResponse)
    def home(request: Request) -> Response:
        if organiser(request):
            return render(
                request,
                "home.html",
                studies=store.studies()[:5],
                runs=[run_summary(runs_root, r) for r in find_runs(runs_root)][:5],
                n_checkpoints=len(find_checkpoints(runs_root)),
            )
        ann = annotator(request)
        if ann is not None:
            return RedirectResponse(f"/arena/{ann.study_id}", status_code=303)
        return RedirectResponse("/login", status_code=303)

    @app.get("/login", response_class=HTMLResponse)
    def login_page(request: Request) -> Response:
        return render(request, "login.html")

    @app.post("/login")
    def login(request: Request, token: Annotated[str, Form()], csrf: Annotated[str, Form()] = ""):
        check_csrf(request, csrf)
        ttl_s = security.session_hours * 3600
        store.end_session(request.cookies.get(ORG_COOKIE))  # never two live sessions per cookie
        session = store.start_session(token.strip(), ttl_s)
        if session is None:
            raise HTTPException(403, "That organiser token is not valid.")
        response = RedirectResponse("/", status_code=303)
        response.set_cookie(
            ORG_COOKIE,
            session,
            max_age=int(ttl_s),
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
        )
        return response

    @app.post("/logout")
    def logout(request: Request, csrf: Annotated[str, Form()] = ""):
        check_csrf(request, csrf)
        store.end_session(request.cookies.get(ORG_COOKIE))
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(ORG_COOKIE)
        response.delete_cookie(ANN_COOKIE)
        return response

    @app.get("/a/{token}")
    def invitation(request: Request, token: str) -> Response:
        ann = store.annotator(token)
        if ann is None:
            raise HTTPException(404, "This invitation link is not valid (or was revoked).")
        response = RedirectResponse(f"/arena/{ann.study_id}", status_code=303)
        response.set_cookie(
            ANN_COOKIE, token, httponly=True, samesite="lax", secure=request.url.scheme == "https"
        )
        return response

    # ------------------------------------------------------------------ studies (organiser)

    @app.get("/studies", response_class=HTMLResponse)
    def studies_page(request: Request) -> Response:
        require_organiser(request)
        return render(request, "studies.html", studies=store.studies())

    @app.get("/studies/new", response_class=HTMLResponse)
    def new_study_page(request: Request) -> Response:
        require_organiser(request)
        return render(
            request,
            "study_new.html",
            checkpoints=find_checkpoints(runs_root),
            defaults=StudySettings(),
            formats=PROMPT_FORMATS,
        )

    @app.post("/studies")
    def create_study(
        request: Request,
        name: Annotated[str, Form(max_length=200)],
        csrf: Annotated[str, Form()] = "",
        prompts_text: Annotated[str, Form()] = "",
        prompts_file: Annotated[UploadFile | None, File()] = None,
        checkpoints: Annotated[list[str] | None, Form()] = None,
        temperature: Annotated[float, Form(ge=0.0, le=5.0)] = 0.8,
        top_p: Annotated[float, Form(gt=0.0, le=1.0)] = 0.95,
        top_k: Annotated[int, Form(ge=0)] = 0,
        max_tokens: Annotated[int, Form(ge=1, le=4096)] = 64,
        seed: Annotated[int, Form()] = 0,
        prompt_format: Annotated[str, Form()] = "completion",
        criteria: Annotated[str, Form(max_length=2000)] = "",
        votes_per_item: Annotated[int, Form(ge=0, le=1000)] = 0,
    ) -> Response:
        require_organiser(request)
        check_csrf(request, csrf)
        name = name.strip()
        if not name:
            raise HTTPException(400, "The study needs a name.")
        prompts = [line.strip() for line in prompts_text.splitlines() if line.strip()]
        if prompts_file is not None and prompts_file.filename:
            data = prompts_file.file.read(MAX_UPLOAD_BYTES + 1)
            if len(data) > MAX_UPLOAD_BYTES:
                raise HTTPException(
                    413, f"{prompts_file.filename} is larger than {MAX_UPLOAD_BYTES:,} bytes."
                )
            prompts += parse_prompts(prompts_file.filename, data)
        if not prompts:
            raise HTTPException(400, "Give at least one prompt (typed, or in an uploaded file).")
        if len(prompts) > MAX_PROMPTS:
            raise HTTPException(400, f"{len(prompts)} prompts; at most {MAX_PROMPTS} per study.")
        too_long = [i for i, p in enumerate(prompts) if len(p) > MAX_PROMPT_CHARS]
        if too_long:
            raise HTTPException(
                400, f"prompt {too_long[0] + 1} is longer than {MAX_PROMPT_CHARS} characters."
            )
        chosen = list(dict.fromkeys(checkpoints or []))
        if len(chosen) < 2:
            raise HTTPException(400, "Choose at least two checkpoints to compare.")
        available = set(find_checkpoints(runs_root))
        for ckpt in chosen:
            # Only checkpoints found inside the runs folder: a typed path cannot escape it.
            if ckpt not in available:
                raise HTTPException(400, f"{ckpt!r} is not a checkpoint in the runs folder.")
        if prompt_format not in PROMPT_FORMATS:
            raise HTTPException(400, f"prompt_format must be one of {PROMPT_FORMATS}.")
        settings = StudySettings(
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            max_tokens=max_tokens,
            seed=seed,
            prompt_format=prompt_format,
            criteria=[c.strip() for c in criteria.split(",") if c.strip()][:10],
            votes_per_item=votes_per_item,
        )
        study_id = store.create_study(
            name, prompts, [(checkpoint_label(c), c) for c in chosen], settings
        )
        generator.start(study_id)
        return RedirectResponse(f"/studies/{study_id}", status_code=303)

    @app.get("/studies/{study_id}", response_class=HTMLResponse)
    def study_page(request: Request, study_id: int) -> Response:
        require_organiser(request)
        study = get_study(study_id)
        return render(
            request,
            "study.html",
            study=study,
            annotators=store.annotators(study_id),
            invitations=[],
        )

    @app.get("/api/studies/{study_id}/progress")
    def study_progress(request: Request, study_id: int) -> dict[str, Any]:
        require_organiser(request)
        study = get_study(study_id)
        return {
            "status": study.status,
            "done": study.n_outputs,
            "total": study.n_expected,
            "error": study.error,
        }

    @app.post("/studies/{study_id}/annotators", response_class=HTMLResponse)
    def invite(
        request: Request,
        study_id: int,
        names: Annotated[str, Form(max_length=10_000)],
        csrf: Annotated[str, Form()] = "",
    ) -> Response:
        require_organiser(request)
        check_csrf(request, csrf)
        study = get_study(study_id)
        wanted = [n.strip() for n in names.replace(",", "\n").splitlines() if n.strip()]
        if not wanted:
            raise HTTPException(400, "Give one or more annotator names.")
        base = str(request.base_url).rstrip("/")
        invitations = []
        for who in wanted[:200]:
            try:
                token = store.add_annotator(study_id, who[:100])
            except ValueError as exc:
                raise HTTPException(409, str(exc)) from exc
            invitations.append({"name": who[:100], "url": f"{base}/a/{token}"})
        return render(
            request,
            "study.html",
            study=study,
            annotators=store.annotators(study_id),
            invitations=invitations,
        )

    @app.get("/studies/{study_id}/results", response_class=HTMLResponse)
    def results_page(request: Request, study_id: int) -> Response:
        require_organiser(request)
        study = get_study(study_id)
        return render(request, "results.html", study=study, **study_results(store, study))

    @app.get("/studies/{study_id}/export.csv")
    def export_csv(request: Request, study_id: int) -> Response:
        require_organiser(request)
        study = get_study(study_id)
        prompts = store.prompts(study_id)
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(
            [
                "vote_id",
                "vote_uid",
                "time_utc",
                "annotator",
                "item",
                "prompt_idx",
                "prompt",
                "model_a",
                "model_b",
                "shown_left",
                "outcome",
                "winner",
                "ratings",
                "comment",
            ]
        )
        labels = {m["idx"]: m["label"] for m in study.models}
        for v in store.votes(study_id):
            winner = {"a": v["label_a"], "b": v["label_b"]}.get(v["outcome"], "")
            ratings = {labels[int(k)]: r for k, r in json.loads(v["ratings"]).items()}
            writer.writerow(
                [
                    _csv_cell(x)
                    for x in (
                        v["id"],
                        v["vote_uid"],
                        time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(v["created"])),
                        v["annotator"],
                        v["item_id"],
                        v["prompt_idx"],
                        prompts[v["prompt_idx"]],
                        v["label_a"],
                        v["label_b"],
                        labels[v["left_model"]],
                        v["outcome"],
                        winner,
                        json.dumps(ratings) if ratings else "",
                        v["comment"],
                    )
                ]
            )
        filename = f"study-{study_id}-votes.csv"
        return Response(
            out.getvalue(),
            media_type="text/csv; charset=utf-8",
            headers={"Content-Disposition": f'attachment; filename="{filename}"'},
        )

    # ------------------------------------------------------------------ arena (annotators)

    def require_annotator_of(request: Request, study_id: int) -> Annotator:
        ann = annotator(request)
        if ann is None or ann.study_id != study_id:
            raise HTTPException(
                403,
                "You need this study's invitation link to annotate it."
                if ann is None
                else "Your invitation is for a different study.",
            )
        return ann

    @app.get("/arena/{study_id}", response_class=HTMLResponse)
    def vote_page(request: Request, study_id: int, saved: int = 0) -> Response:
        ann = require_annotator_of(request, study_id)
        study = get_study(study_id)
        done, total = store.progress(ann)
        item = (
            store.next_item(ann, study.settings.votes_per_item) if study.status == "ready" else None
        )
        sides = None
        if item is not None:
            left_is_a = store.left_is_a(ann.id, item.id)
            sides = (item.output_a, item.output_b) if left_is_a else (item.output_b, item.output_a)
        return render(
            request,
            "vote.html",
            study=study,
            item=item,
            sides=sides,
            done=done,
            total=total,
            saved=bool(saved),
            vote_uid=uuid.uuid4().hex,
            criteria=study.settings.criteria,
        )

    @app.post("/arena/{study_id}/vote")
    async def vote(request: Request, study_id: int) -> Response:
        form = await request.form()
        check_csrf(request, str(form.get("csrf", "")))
        ann = await run_in_threadpool(require_annotator_of, request, study_id)
        try:
            item_id = int(str(form.get("item_id", "")))
        except ValueError:
            raise HTTPException(400, "The vote names no item.") from None
        choice = str(form.get("choice", ""))
        if choice not in CHOICES:
            raise HTTPException(400, f"Choose one of: {', '.join(CHOICES)}.")
        vote_uid = str(form.get("vote_uid", ""))
        if not (8 <= len(vote_uid) <= 64):
            raise HTTPException(400, "The vote has no valid id; reload the page.")
        comment = str(form.get("comment", ""))[:MAX_COMMENT_CHARS]
        study = await run_in_threadpool(get_study, study_id)
        ratings: dict[str, dict[str, int]] = {}
        for side in ("left", "right"):
            for k, crit in enumerate(study.settings.criteria):
                raw = str(form.get(f"rating_{side}_{k}", ""))
                if raw:
                    if raw not in {"1", "2", "3", "4", "5"}:
                        raise HTTPException(400, f"Rating for {crit!r} must be 1 to 5.")
                    ratings.setdefault(side, {})[crit] = int(raw)
        try:
            await run_in_threadpool(
                store.record_vote, ann, item_id, vote_uid, choice, ratings, comment
            )
        except LookupError as exc:
            raise HTTPException(404, str(exc)) from exc
        except VoteRefused as exc:
            raise HTTPException(409, f"Thank you, but {exc}.") from exc
        if request.headers.get("accept", "").startswith("application/json"):
            return JSONResponse({"ok": True})
        return RedirectResponse(f"/arena/{study_id}?saved=1", status_code=303)

    # ------------------------------------------------------------------ chat playground

    @app.get("/chat", response_class=HTMLResponse)
    def chat_page(request: Request) -> Response:
        require_organiser(request)
        return render(
            request, "chat.html", checkpoints=find_checkpoints(runs_root), formats=PROMPT_FORMATS
        )

    @app.post("/api/chat/stream")
    def chat_stream(request: Request, body: ChatRequest) -> Response:
        require_organiser(request)
        check_csrf(request, request.headers.get("x-csrf-token", ""))
        if body.prompt_format not in PROMPT_FORMATS:
            raise HTTPException(400, f"prompt_format must be one of {PROMPT_FORMATS}")
        if body.checkpoint not in set(find_checkpoints(runs_root)):
            raise HTTPException(404, f"{body.checkpoint!r} is not a checkpoint in the runs folder")
        messages = [
            {"role": m.get("role", "user"), "content": str(m.get("content", ""))}
            for m in body.messages
        ]
        pieces = iter_stream(
            pool,
            body.checkpoint,
            messages,
            prompt_format=body.prompt_format,
            params=sampling_of(body),
        )

        def events():
            # Server-sent events: one `data:` line of JSON per text piece.
            t0, n = time.perf_counter(), 0
            try:
                for piece in pieces:
                    n += 1
                    yield f"data: {json.dumps({'text': piece})}\n\n"
                dt = time.perf_counter() - t0
                yield f"event: done\ndata: {json.dumps({'pieces': n, 'seconds': dt})}\n\n"
            except Exception as exc:
                yield f"event: error\ndata: {json.dumps({'error': str(exc)})}\n\n"
            finally:
                pieces.close()

        return StreamingResponse(
            events(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )

    # ------------------------------------------------------------------ run dashboard

    def run_folder(rel: str) -> Path:
        try:
            path = safe_join(runs_root, rel)
        except PermissionError as exc:
            raise HTTPException(404, f"There is no run {rel!r}.") from exc
        if not path.is_dir() or path not in set(find_runs(runs_root)):
            raise HTTPException(404, f"There is no run {rel!r}.")
        return path

    @app.get("/runs", response_class=HTMLResponse)
    def runs_page(request: Request) -> Response:
        require_organiser(request)
        runs = [run_summary(runs_root, r) for r in find_runs(runs_root)]
        runs.sort(key=lambda r: r["updated"], reverse=True)
        return render(request, "runs.html", runs=runs, runs_dir=str(runs_root))

    @app.get("/runs/{rel:path}", response_class=HTMLResponse)
    def run_page(request: Request, rel: str) -> Response:
        from lmforge.sweep.report import sweep_view

        require_organiser(request)
        path = run_folder(rel)
        config = path / "config.yaml"
        tables, eval_error = eval_tables(eval_json_path(path))
        checkpoints = sorted(
            (
                c
                for c in find_checkpoints(runs_root)
                if safe_join(runs_root, c).parent.parent == path
            ),
        )
        return render(
            request,
            "run.html",
            rel=rel,
            name=path.name,
            config=config.read_text(encoding="utf-8", errors="replace") if config.is_file() else "",
            eval_tables=tables,
            eval_error=eval_error,
            has_report=(path / "report.html").is_file(),
            has_metrics=(path / "metrics.jsonl").is_file(),
            running=is_running(path),
            checkpoints=checkpoints,
            sweep=sweep_view(path),  # a sweep folder (lmforge sweep): its trials and plots
        )

    @app.get("/api/metrics/{rel:path}")
    def metrics_api(request: Request, rel: str, since: int = 0) -> dict[str, Any]:
        require_organiser(request)
        path = run_folder(rel)
        records, nxt = read_metrics(path / "metrics.jsonl", max(since, 0))
        return {"records": records, "next": nxt, "running": is_running(path)}

    @app.get("/files/{rel:path}")
    def run_file(request: Request, rel: str) -> Response:
        require_organiser(request)
        try:
            path = safe_join(runs_root, rel)
        except PermissionError as exc:
            raise HTTPException(404, f"There is no file {rel!r} in the runs folder.") from exc
        if not path.is_file() or path.suffix.lower() not in SERVABLE_SUFFIXES:
            raise HTTPException(404, f"There is no file {rel!r} in the runs folder.")
        return FileResponse(path)

    return app


# ----------------------------------------------------------------------------- results


def study_results(store: Store, study: Any) -> dict[str, Any]:
    """Everything the results page shows, computed from the stored votes."""
    labels = [m["label"] for m in study.models]
    judgments = store.judgments(study.id)
    votes = store.votes(study.id)
    rates = {r["model"]: r for r in stats.win_rates(judgments, labels)}
    wins = stats.head_to_head(judgments, labels)
    # One virtual tie per pair keeps a model that never won at a finite rating.
    strengths = stats.bradley_terry(wins, prior=1.0)
    rating = stats.to_elo_scale(strengths)
    low, high = stats.bootstrap_bt(judgments, labels, n_boot=200, prior=1.0)
    online = stats.elo(judgments, labels)
    leaderboard = []
    for k, label in enumerate(labels):
        r = rates[label]
        leaderboard.append(
            {
                "model": label,
                "bt": float(rating[k]),
                "low": float(low[k]),
                "high": float(high[k]),
                "strength": float(strengths[k]),
                "elo": online[label],
                **{key: r[key] for key in ("n", "wins", "losses", "ties", "both_bad", "win_rate")},
            }
        )
    leaderboard.sort(key=lambda r: -r["bt"])
    n = wins + wins.T
    matrix = [
        [(wins[i, j] / n[i, j]) if n[i, j] else None for j in range(len(labels))]
        for i in range(len(labels))
    ]
    per_annotator: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    ratings: dict[tuple[str, str], list[int]] = defaultdict(list)
    label_of = {m["idx"]: m["label"] for m in study.models}
    for v in votes:
        per_annotator[v["annotator"]][v["outcome"]] += 1
        per_annotator[v["annotator"]]["total"] += 1
        for model_idx, crits in json.loads(v["ratings"]).items():
            for crit, value in crits.items():
                ratings[(label_of[int(model_idx)], crit)].append(int(value))
    rating_rows = [
        {"model": m, "criterion": c, "mean": sum(vals) / len(vals), "n": len(vals)}
        for (m, c), vals in sorted(ratings.items())
    ]
    prompts = store.prompts(study.id)
    comments = [
        {
            "annotator": v["annotator"],
            "prompt": prompts[v["prompt_idx"]],
            "comment": v["comment"],
            "outcome": {"a": v["label_a"], "b": v["label_b"]}.get(
                v["outcome"], v["outcome"].replace("_", " ")
            ),
            "a": v["label_a"],
            "b": v["label_b"],
        }
        for v in votes
        if v["comment"].strip()
    ]
    return {
        "n_votes": len(votes),
        "n_items": len(prompts) * len(labels) * (len(labels) - 1) // 2,
        "labels": labels,
        "leaderboard": leaderboard,
        "matrix": matrix,
        "annotators": [
            {"name": name, "total": counts["total"], **{o: counts[o] for o in stats.OUTCOMES}}
            for name, counts in sorted(per_annotator.items())
        ],
        "invited": store.annotators(study.id),
        "agreement": stats.agreement(judgments),
        "rating_rows": rating_rows,
        "comments": comments,
    }


def parse_prompts(filename: str, data: bytes) -> list[str]:
    """Prompts from an uploaded file: .jsonl (a "prompt", "instruction", "input" or "text"
    field per line), .json (a list of strings or such objects), else one prompt per line."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise HTTPException(400, f"{filename} is not UTF-8 text ({exc}).") from exc
    fields = ("prompt", "instruction", "input", "text", "question")

    def from_record(rec: Any, where: str) -> str:
        if isinstance(rec, str):
            return rec
        if isinstance(rec, dict):
            for f in fields:
                if isinstance(rec.get(f), str) and rec[f].strip():
                    return rec[f]
        raise HTTPException(400, f"{where}: no prompt field (one of {', '.join(fields)}).")

    lower = filename.lower()
    if lower.endswith(".jsonl"):
        out = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise HTTPException(
                    400, f"{filename} line {n}: not valid JSON ({exc.msg})."
                ) from exc
            out.append(from_record(rec, f"{filename} line {n}"))
        return out
    if lower.endswith(".json"):
        try:
            data_json = json.loads(text)
        except json.JSONDecodeError as exc:
            raise HTTPException(
                400, f"{filename} line {exc.lineno}: not valid JSON ({exc.msg})."
            ) from exc
        if not isinstance(data_json, list):
            raise HTTPException(400, f"{filename}: expected a JSON list of prompts.")
        return [from_record(r, f"{filename} item {i + 1}") for i, r in enumerate(data_json)]
    return [line.strip() for line in text.splitlines() if line.strip()]


def checkpoint_label(checkpoint: str) -> str:
    """A short name for a checkpoint: ``run/checkpoints/step_00000600`` → ``run@600``."""
    path = Path(checkpoint)
    if path.name.startswith("step_") and path.parent.name == "checkpoints":
        run = path.parent.parent
        step = path.name.removeprefix("step_").lstrip("0") or "0"
        return f"{run.as_posix() if str(run) != '.' else 'run'}@{step}"
    return path.as_posix()


def _csv_cell(value: Any) -> Any:
    """Defuse spreadsheet formulas in exported text (a cell starting with = + - @ runs in Excel)."""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


def _fmt_num(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.{digits}f}"
