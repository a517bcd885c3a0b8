"""The routes of the page (FastAPI) and `serve` (uvicorn). fastapi / uvicorn are the optional `web` extra, imported
when the app is built so that `icd --help` and the rest of the package never need them."""

import logging
from importlib import resources

from icd.models.base import PromptError
from icd.web.engine import WEB_METHODS, EditRequest, Engine, parse_reweight
from icd.web.examples import examples
from icd.web.uploads import Limits, UploadError, check_size, decode_upload

log = logging.getLogger(__name__)


def page_html() -> str:
    return resources.files("icd.web").joinpath("page.html").read_text(encoding="utf-8")


def _number(form, name: str, kind=float, default=None):
    text = str(form.get(name) or "").strip()
    if not text:
        return default
    try:
        return kind(text)
    except ValueError:
        raise ValueError(f"{name.replace('_', ' ')} expects {'an integer' if kind is int else 'a number'}, got "
                         f"{text!r}") from None


async def _image(form, limits: Limits):
    """The uploaded file, else the chosen example; UploadError otherwise."""
    upload = form.get("image")
    if upload is not None and not isinstance(upload, str) and upload.filename:
        name = upload.filename
        if upload.size is not None:
            check_size(upload.size, limits)
        return decode_upload(await upload.read(limits.max_bytes + 1), limits, name=name)
    example = str(form.get("example") or "")
    if example:
        if example not in examples():
            raise UploadError(f"unknown example {example!r}")
        return decode_upload(examples()[example].png, limits, name=example)
    raise UploadError("choose an image: upload one or pick an example")


def parse_form(form, image) -> EditRequest:
    """The form's fields as an EditRequest; ValueError naming a field that does not parse."""
    return EditRequest(image=image, source=str(form.get("source") or ""), target=str(form.get("target") or ""),
                       method=str(form.get("method") or "icd"), steps=_number(form, "steps", int),
                       seed=_number(form, "seed", int, 0), guidance=_number(form, "guidance"),
                       tau=_number(form, "tau"), cross_replace=_number(form, "cross_replace", default=0.3),
                       self_replace=_number(form, "self_replace", default=0.6),
                       blend=tuple(str(form.get("blend") or "").replace(",", " ").split()),
                       reweight=parse_reweight(str(form.get("reweight") or "")),
                       masactrl=str(form.get("masactrl") or "") in ("on", "true", "1"),
                       fit=str(form.get("fit") or "resize"))


def create_app(engine: Engine, limits: Limits = Limits()):
    """The FastAPI app: the page, the examples, POST /api/edit, GET /api/progress."""
    from fastapi import FastAPI, Request  # the optional `web` extra
    from fastapi.concurrency import run_in_threadpool  # the optional `web` extra
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
        return {"methods": list(WEB_METHODS), "fits": list(engine.fits), "image_size": engine.image_size,
                "max_mb": limits.max_mb, "max_side": limits.max_side,
                "vocabulary": list(engine.pipe.model.vocabulary or [])}

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
            if int(request.headers.get("content-length") or 0) > limits.max_bytes + 1_000_000:
                raise UploadError(f"the upload is over the size limit of {limits.max_mb:g} MB", status=413)
            form = await request.form()
            req = parse_form(form, await _image(form, limits))
            return await run_in_threadpool(engine.run, req)
        except UploadError as e:
            return error(str(e), e.status)
        except HTTPException as e:  # a malformed multipart body
            return error(f"malformed upload: {e.detail}", e.status_code)
        except PromptError as e:
            return error(str(e), 400, kind="prompt")
        except ValueError as e:  # the library's range checks name the option
            return error(str(e), 400)
        except Exception as e:  # a bug must not take the server down: report it and keep serving
            log.exception("edit failed")
            return error(f"internal error: {type(e).__name__}: {e}", 500)

    return app


def serve(engine: Engine, *, host: str, port: int, limits: Limits = Limits()) -> None:
    """Run the page until interrupted."""
    import uvicorn  # the optional `web` extra

    uvicorn.run(create_app(engine, limits), host=host, port=port, log_level="warning")
