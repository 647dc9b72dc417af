"""The arena: organisers create studies, invite annotators and read the results
(`organiser`); annotators compare two outputs and vote (`voting`)."""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Depends, File, Form, HTTPException, Request, UploadFile
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData

from lmforge.serve.deps import CsrfForm, Organiser, StudyAnnotator, StudyOf
from lmforge.serve.models import PROMPT_FORMATS, find_checkpoints
from lmforge.serve.pages import render
from lmforge.serve.state import State
from lmforge.serve.store import CHOICES, StudySettings, VoteRefused
from lmforge.serve.studies import (
    MAX_UPLOAD_BYTES,
    checkpoint_label,
    study_prompts,
    study_results,
    votes_csv,
)

MAX_COMMENT_CHARS = 5_000

organiser = APIRouter(dependencies=[Organiser])
voting = APIRouter()


def settings_form(
    temperature: Annotated[float, Form(ge=0.0, le=5.0)] = 0.8,
    top_p: Annotated[float, Form(gt=0.0, le=1.0)] = 0.95,
    top_k: Annotated[int, Form(ge=0)] = 0,
    max_tokens: Annotated[int, Form(ge=1, le=4096)] = 64,
    seed: Annotated[int, Form()] = 0,
    prompt_format: Annotated[str, Form()] = "completion",
    criteria: Annotated[str, Form(max_length=2000)] = "",
    votes_per_item: Annotated[int, Form(ge=0, le=1000)] = 0,
) -> StudySettings:
    """A new study's generation and voting settings, from its form."""
    return StudySettings(
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        max_tokens=max_tokens,
        seed=seed,
        prompt_format=prompt_format,
        criteria=[c.strip() for c in criteria.split(",") if c.strip()][:10],
        votes_per_item=votes_per_item,
    )


@organiser.get("/studies", response_class=HTMLResponse)
def studies_page(request: Request, state: State) -> Response:
    return render(request, "studies.html", studies=state.store.studies())


@organiser.get("/studies/new", response_class=HTMLResponse)
def new_study_page(request: Request, state: State) -> Response:
    return render(
        request,
        "study_new.html",
        checkpoints=find_checkpoints(state.runs_root),
        defaults=StudySettings(),
        formats=PROMPT_FORMATS,
    )


@organiser.post("/studies", dependencies=[CsrfForm])
def create_study(
    state: State,
    name: Annotated[str, Form(max_length=200)],
    settings: Annotated[StudySettings, Depends(settings_form)],
    prompts_text: Annotated[str, Form()] = "",
    prompts_file: Annotated[UploadFile | None, File()] = None,
    checkpoints: Annotated[list[str] | None, Form()] = None,
) -> Response:
    name = name.strip()
    if not name:
        raise HTTPException(400, "The study needs a name.")
    upload = prompts_file if prompts_file is not None and prompts_file.filename else None
    prompts = study_prompts(
        prompts_text,
        upload.filename if upload else None,
        upload.file.read(MAX_UPLOAD_BYTES + 1) if upload else None,
    )
    chosen = list(dict.fromkeys(checkpoints or []))
    if len(chosen) < 2:
        raise HTTPException(400, "Choose at least two checkpoints to compare.")
    available = set(find_checkpoints(state.runs_root))
    for ckpt in chosen:
        # Only checkpoints found inside the runs folder: a typed path cannot escape it.
        if ckpt not in available:
            raise HTTPException(400, f"{ckpt!r} is not a checkpoint in the runs folder.")
    if settings.prompt_format not in PROMPT_FORMATS:
        raise HTTPException(400, f"prompt_format must be one of {PROMPT_FORMATS}.")
    models = [(checkpoint_label(c), c) for c in chosen]
    study_id = state.store.create_study(name, prompts, models, settings)
    state.generator.start(study_id)
    return RedirectResponse(f"/studies/{study_id}", status_code=303)


@organiser.get("/studies/{study_id}", response_class=HTMLResponse)
def study_page(request: Request, state: State, study: StudyOf) -> Response:
    annotators = state.store.annotators(study.id)
    return render(request, "study.html", study=study, annotators=annotators, invitations=[])


@organiser.get("/api/studies/{study_id}/progress")
def study_progress(study: StudyOf) -> dict[str, Any]:
    return {
        "status": study.status,
        "done": study.n_outputs,
        "total": study.n_expected,
        "error": study.error,
    }


@organiser.post(
    "/studies/{study_id}/annotators", response_class=HTMLResponse, dependencies=[CsrfForm]
)
def invite(
    request: Request, state: State, study: StudyOf, names: Annotated[str, Form(max_length=10_000)]
) -> Response:
    wanted = [n.strip() for n in names.replace(",", "\n").splitlines() if n.strip()]
    if not wanted:
        raise HTTPException(400, "Give one or more annotator names.")
    base = str(request.base_url).rstrip("/")
    invitations = []
    for who in wanted[:200]:
        try:
            token = state.store.add_annotator(study.id, who[:100])
        except ValueError as exc:
            raise HTTPException(409, str(exc)) from exc
        invitations.append({"name": who[:100], "url": f"{base}/a/{token}"})
    annotators = state.store.annotators(study.id)
    return render(
        request, "study.html", study=study, annotators=annotators, invitations=invitations
    )


@organiser.get("/studies/{study_id}/results", response_class=HTMLResponse)
def results_page(request: Request, state: State, study: StudyOf) -> Response:
    return render(request, "results.html", study=study, **study_results(state.store, study))


@organiser.get("/studies/{study_id}/export.csv")
def export_csv(state: State, study: StudyOf) -> Response:
    filename = f"study-{study.id}-votes.csv"
    return Response(
        votes_csv(state.store, study),
        media_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": f'attachment; filename="{filename}"'},
    )


# ----------------------------------------------------------------------------- voting


@voting.get("/arena/{study_id}", response_class=HTMLResponse)
def vote_page(
    request: Request, state: State, ann: StudyAnnotator, study: StudyOf, saved: int = 0
) -> Response:
    store = state.store
    done, total = store.progress(ann)
    item = store.next_item(ann, study.settings.votes_per_item) if study.status == "ready" else None
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


@voting.post("/arena/{study_id}/vote", dependencies=[CsrfForm])
async def vote(request: Request, state: State, ann: StudyAnnotator, study: StudyOf) -> Response:
    form = await request.form()
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
    ratings = form_ratings(form, study.settings.criteria)
    try:
        await run_in_threadpool(
            state.store.record_vote, ann, item_id, vote_uid, choice, ratings, comment
        )
    except LookupError as exc:
        raise HTTPException(404, str(exc)) from exc
    except VoteRefused as exc:
        raise HTTPException(409, f"Thank you, but {exc}.") from exc
    if request.headers.get("accept", "").startswith("application/json"):
        return JSONResponse({"ok": True})
    return RedirectResponse(f"/arena/{study.id}?saved=1", status_code=303)


def form_ratings(form: FormData, criteria: list[str]) -> dict[str, dict[str, int]]:
    """The 1-5 ratings of a vote form (``rating_left_0`` ...), by side and criterion."""
    ratings: dict[str, dict[str, int]] = {}
    for side in ("left", "right"):
        for k, crit in enumerate(criteria):
            raw = str(form.get(f"rating_{side}_{k}", ""))
            if raw:
                if raw not in {"1", "2", "3", "4", "5"}:
                    raise HTTPException(400, f"Rating for {crit!r} must be 1 to 5.")
                ratings.setdefault(side, {})[crit] = int(raw)
    return ratings
