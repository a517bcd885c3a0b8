"""`icd edit --server URL`: the edit runs in a running `icd serve`, whose model is already loaded, so the command
waits for the edit and not for torch, diffusers and the weights. Standard library only (no torch here): the request
is the web page's own (POST /api/edit, multipart), the answer its JSON with the images as PNG data URLs."""

from __future__ import annotations

import base64
import json
import mimetypes
import urllib.error
import urllib.request
import uuid
from pathlib import Path

from icd.cli.common import CLIError

TIMEOUT_S = 3600.0  # an NTI edit of a large image on a CPU takes minutes; a dead server is found by the connection

# `icd edit` options the page's form has (dest -> field); the others are refused with --server unless left at their
# defaults (`unsupported`)
FORM_FIELDS = {"method": "method", "steps": "steps", "seed": "seed", "guidance": "guidance", "tau": "tau",
               "cross_replace": "cross_replace", "self_replace": "self_replace", "fit": "fit"}


def unsupported(args, defaults: dict) -> list[str]:
    """The options of `args` the server cannot take (given, and not at their `defaults`)."""
    local = ("batch", "mask", "swap", "p2p_blocks", "blend_threshold", "masactrl_start_t", "masactrl_layer",
             "strength", "instruction", "image_guidance", "ip2p", "save_inversion", "inversion", "unet", "adapters",
             "lora_forward", "lora_reverse", "boundaries", "device", "ddim_rule", "dtype", "offload", "vae_tiling",
             "vae_slicing", "no_fuse", "vae", "compile", "threads")
    return ["--" + d.replace("_", "-") for d in local if d in defaults and getattr(args, d, None) != defaults[d]]


def form_fields(args, default_model: str) -> dict[str, str]:
    """The form's text fields for `args`: every given edit option, the served model when --model was given."""
    fields = {"source": args.source, "target": args.target}
    for dest, name in FORM_FIELDS.items():
        value = getattr(args, dest)
        if value is not None:
            fields[name] = str(value)
    if args.blend:
        fields["blend"] = " ".join(args.blend)
    if args.reweight:
        fields["reweight"] = ",".join(args.reweight)
    fields["masactrl"] = "on" if args.masactrl else "off"
    if args.model != default_model:
        fields["model"] = args.model
    return fields


def multipart(fields: dict[str, str], file_field: str, path: Path) -> tuple[bytes, str]:
    """(body, content type) of a multipart/form-data request with `fields` and the file at `path`."""
    boundary = uuid.uuid4().hex
    parts = []
    for name, value in fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    kind = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    safe = path.name.replace('"', "_").replace("\r", "_").replace("\n", "_")
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{file_field}"; filename="{safe}"\r\n'
                 f"Content-Type: {kind}\r\n\r\n".encode() + path.read_bytes() + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def post_edit(url: str, fields: dict[str, str], image: Path, *, timeout: float = TIMEOUT_S) -> dict:
    """POST one edit to the `icd serve` at `url`; its JSON answer, or CLIError with the server's one-line error
    (naming the field where it names one) or why it could not be reached."""
    body, content_type = multipart(fields, "image", image)
    endpoint = url.rstrip("/") + "/api/edit"
    request = urllib.request.Request(endpoint, data=body, method="POST", headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as e:
        try:
            answer = json.loads(e.read())
        except ValueError:
            answer = {}
        message = answer.get("error") or f"HTTP {e.code} {e.reason}"
        field = answer.get("field") or ""
        where = f" ({field})" if field and not message.startswith(field) else ""  # the field, once
        raise CLIError(f"the server refused the edit{where}: {message}") from None
    except urllib.error.URLError as e:
        raise CLIError(f"no icd serve answers at {url} ({e.reason}); start one with `icd serve`") from None
    except (OSError, ValueError) as e:  # a timeout, a reset connection, an answer that is not JSON
        raise CLIError(f"the server at {url} gave no usable answer ({e})") from None


def png_bytes(data_url: str) -> bytes:
    """The PNG of a ``data:image/png;base64,…`` URL."""
    head, _, data = data_url.partition(",")
    if head != "data:image/png;base64":
        raise CLIError("the server's answer holds no PNG image")
    return base64.b64decode(data)


def check_url(url: str) -> None:
    if not url.startswith(("http://", "https://")):
        raise CLIError(f"--server expects an http:// or https:// address such as http://127.0.0.1:7860, got {url!r}")
