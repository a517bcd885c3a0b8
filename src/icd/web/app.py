"""The routes of the page (FastAPI) and `serve` (uvicorn). fastapi / uvicorn are the optional `web` extra, imported
when the app is built so that `icd --help` and the rest of the package never need them."""

import asyncio
import logging
import math
import threading
from importlib import resources

from icd.requests import parse_reweight
from icd.samplers import Cancelled
from icd.solver import NumericsError
from icd.web.engine import EditRequest, Engine, FieldError, public_message
from icd.web.examples import examples
from icd.web.uploads import Limits, UploadError, check_size, decode_upload

log = logging.getLogger(__name__)

DISCONNECT_POLL_S = 0.05  # how often a running edit looks whether its client has left
CLIENT_CLOSED = 499  # the status of a request whose client left before the answer (nginx's convention)
FLAGS = {"": False, "off": False, "false": False, "0": False, "on": True, "true": True, "1": True}


def page_html() -> str:
    return resources.files("icd.web").joinpath("page.html").read_text(encoding="utf-8")


def _text(form, name: str) -> str:
    value = form.get(name)
    if value is not None and not isinstance(value, str):
        raise FieldError(name, f"{name} expects text, got a file")
    return value or ""


def _number(form, name: str, kind=float, default=None):
    """The field `name` as an int or a finite float, `default` when empty; FieldError naming it otherwise."""
    text = _text(form, name).strip()
    if not text:
        return default
    what = "an integer" if kind is int else "a number"
    try:
        value = kind(text)
    except ValueError:
        raise FieldError(name, f"{name} expects {what}, got {text[:40]!r}") from None
    if kind is float and not math.isfinite(value):
        raise FieldError(name, f"{name} expects a finite number, got {text[:40]!r}")
    return value


async def _image(form, limits: Limits):
    """The uploaded file, else the chosen example; UploadError otherwise."""
    upload = form.get("image")
    if upload is not None and not isinstance(upload, str) and upload.filename:
        name = upload.filename
        if upload.size is not None:
            check_size(upload.size, limits)
        return decode_upload(await upload.read(limits.max_bytes + 1), limits, name=name)
    example = _text(form, "example")
    if example:
        if example not in examples():
            raise FieldError("example", f"unknown example {example[:40]!r}")
        return decode_upload(examples()[example].png, limits, name=example)
    raise UploadError("choose an image: upload one or pick an example")


def parse_form(form, image) -> EditRequest:
    """The form's fields as an EditRequest; FieldError naming a field that does not parse."""
    masactrl = _text(form, "masactrl").strip().lower()
    if masactrl not in FLAGS:
        raise FieldError("masactrl", f"masactrl expects on or off, got {masactrl[:40]!r}")
    try:
        reweight = parse_reweight(_text(form, "reweight"))
    except ValueError as e:
        raise FieldError("reweight", str(e)) from None
    return EditRequest(image=image, source=_text(form, "source"), target=_text(form, "target"),
                       method=_text(form, "method") or "icd", steps=_number(form, "steps", int),
                       seed=_number(form, "seed", int, 0), guidance=_number(form, "guidance"),
                       tau=_number(form, "tau"), cross_replace=_number(form, "cross_replace", default=0.3),
                       self_replace=_number(form, "self_replace", default=0.6),
                       blend=tuple(_text(form, "blend").replace(",", " ").split()), reweight=reweight,
                       masactrl=FLAGS[masactrl], fit=_text(form, "fit") or "resize", model=_text(form, "model"))


async def run_until_disconnected(request, engine: Engine, req: EditRequest) -> dict:
    """`engine.run(req)` in a worker thread while this task looks every DISCONNECT_POLL_S whether the client has
    left; then the engine's `should_stop` turns true and the run stops at its next step (or, queued, never starts),
    raising `Cancelled`."""
    from fastapi.concurrency import run_in_threadpool  # the optional `web` extra

    left = threading.Event()

    async def watch():
        while not left.is_set():
            if await request.is_disconnected():
                left.set()
                return
            await asyncio.sleep(DISCONNECT_POLL_S)

    watcher = asyncio.ensure_future(watch())
    try:
        return await run_in_threadpool(engine.run, req, should_stop=left.is_set)
    finally:
        watcher.cancel()


def create_app(engine: Engine, limits: Limits = Limits()):
    """The FastAPI app: the page, the examples, POST /api/edit, GET /api/progress."""
    from fastapi import FastAPI, Request  # the optional `web` extra
    from fastapi.responses import HTMLResponse, JSONResponse, Response  # the optional `web` extra
    from starlette.exceptions import HTTPException  # fastapi's own dependency (the `web` extra)

    app = FastAPI(title="icd", docs_url=None, redoc_url=None)

    def error(message: str, status: int = 400, **extra) -> JSONResponse:
        return JSONResponse({"error": message.strip().splitlines()[0], **extra}, status_code=status)

    @app.get("/", response_class=HTMLResponse)
    def index():
        return HTMLResponse(page_html())

    @app.get("/api/config")
    def config():
        """Every served model's menus (`Engine.menus`), the default model's also at the top level."""
        menus = engine.menus()
        default = next(m for m in menus if m["name"] == engine.default_model)
        return {**{k: v for k, v in default.items() if k != "name"}, "model": engine.default_model,
                "models": menus, "max_mb": limits.max_mb, "max_side": limits.max_side}

    @app.get("/api/examples")
    def list_examples():
        return [e.public() for e in examples().values()]

    @app.get("/api/examples/{name}.png")
    def example_png(name: str):
        if name not in examples():
            return error(f"unknown example {name!r}", 404)
        return Response(examples()[name].png, media_type="image/png")

    @app.get("/api/progress")
    def progress():
        return engine.progress()

    @app.post("/api/edit")
    async def edit(request: Request):
        try:
            declared = request.headers.get("content-length") or "0"
            if declared.isdigit() and int(declared) > limits.max_bytes + 1_000_000:
                raise UploadError(f"the upload is over the size limit of {limits.max_mb:g} MB", status=413)
            form = await request.form()
            try:
                image = await _image(form, limits)
            except UploadError as e:  # the message names the file the user chose, never a server path
                raise UploadError(f"image: {e}", e.status) from None
            req = parse_form(form, image)
            return await run_until_disconnected(request, engine, req)
        except FieldError as e:
            return error(str(e), 400, field=e.field)
        except UploadError as e:
            return error(public_message(str(e)), e.status, field="image")
        except HTTPException as e:  # a malformed multipart body
            return error(f"malformed upload: {public_message(str(e.detail))}", e.status_code)
        except Cancelled:
            log.info("edit cancelled: the client left")
            return error("cancelled: the client left", CLIENT_CLOSED)
        except ValueError as e:  # a library check this layer does not map to a field: its message, paths removed
            return error(public_message(str(e)), 400)
        except NumericsError:
            log.exception("edit gave NaN/Inf")
            return error("the model gave NaN/Inf values for this edit (details in the server log)", 500)
        except Exception:  # a bug must not take the server down: report it and keep serving
            log.exception("edit failed")
            return error("internal error (details in the server log)", 500)

    return app


def serve(engine: Engine, *, host: str, port: int, limits: Limits = Limits()) -> None:
    """Run the page until interrupted."""
    import uvicorn  # the optional `web` extra

    uvicorn.run(create_app(engine, limits), host=host, port=port, log_level="warning")
