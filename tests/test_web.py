"""`icd serve`: the upload checks, and the page end to end in Debian's headless chromium (Selenium, chromium-driver).

The browser tests start `python -m icd.cli serve` on a free loopback port once for the module (the embedded model),
drive the page like a user and read the images it shows. They skip, saying why, only when no browser is installed
(`make test` installs chromium and chromium-driver with apt-get when they are missing). Set ICD_WEB_SCREENSHOT=PATH
to also save the page's screenshot (docs/img/web.png).
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import struct
import threading
import time
import urllib.error
import urllib.request
import uuid
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import icd_serve
from icd import world
from icd.metrics import psnr
from icd.requests import blend_words, parse_reweight
from icd.web.uploads import Limits, UploadError, decode_upload

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
WAIT_S = 60  # the longest bounded wait of any step (start-up, an edit)


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _png_header(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height (what a decompression bomb shows before it is decoded)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


# ------------------------------------------------------------------------------------------- uploads (no browser)

def test_decode_upload_refuses_bad_files_with_one_line_messages():
    good = _png(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    assert decode_upload(good, Limits()).size == (64, 64)
    cases = [
        (b"", Limits(), "empty"),
        (b"hello, not an image", Limits(), "not an image"),
        (good[: len(good) // 2], Limits(), "corrupt or truncated"),
        (_png_header(100_000, 100_000), Limits(max_side=10**6), "decompression bomb"),
        (_png_header(5000, 10), Limits(), "over the limit of 4096 px"),
        (good, Limits(max_bytes=1000), "size limit"),
    ]
    for data, limits, words in cases:
        with pytest.raises(UploadError, match=words) as info:
            decode_upload(data, limits)
        assert "\n" not in str(info.value)
    assert decode_upload(_png(np.zeros((4096, 1, 3), np.uint8)), Limits()).size == (1, 4096)


def test_form_field_parsers():
    assert parse_reweight("blue=2, star=0.5") == {"blue": 2.0, "star": 0.5}
    with pytest.raises(ValueError, match="WORD=FACTOR"):
        parse_reweight("blue")
    assert blend_words(("red", "blue"), "a red star", "a blue star") == (("red",), ("blue",))
    with pytest.raises(ValueError, match="neither prompt"):
        blend_words(("green",), "a red star", "a blue star")


# ------------------------------------------------------------------------------------------- the server

@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with icd_serve([], log, wait_s=WAIT_S) as url:
        with urllib.request.urlopen(url + "/", timeout=WAIT_S) as r:
            assert r.status == 200 and b"<html" in r.read()
        assert f"{url}/" in log.read_text()  # it says the URL on start
        yield url


@pytest.fixture(scope="module")
def browser(server):
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not shutil.which(p)]
    if missing:
        pytest.skip(f"no browser: {', '.join(missing)} missing (install Debian's chromium and chromium-driver: "
                    "`make test` does it with apt-get when it can)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (the dev extra)")
    from selenium.webdriver.chrome.service import Service

    os.environ["SE_AVOID_STATS"] = "true"
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1180,900"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(WAIT_S)
    try:
        yield driver
    finally:
        driver.quit()


class Page:
    """The page as a user sees it."""

    def __init__(self, driver, url: str):
        self.d = driver
        driver.get(url + "/")
        self.wait(lambda d: d.find_elements("css selector", "#examples button"))

    def wait(self, cond, timeout: float = WAIT_S):
        from selenium.webdriver.support.ui import WebDriverWait

        return WebDriverWait(self.d, timeout, poll_frequency=0.05).until(cond)

    def el(self, css: str):
        return self.d.find_element("css selector", css)

    def fill(self, **fields: str) -> None:
        for name, text in fields.items():
            box = self.el(f"#{name}")
            box.clear()
            box.send_keys(text)

    def upload(self, path: Path) -> None:
        self.el("#image").send_keys(str(path))

    def click_edit(self) -> float:
        """Click Edit, wait until the page shows the result or an error; the seconds from the click."""
        runs = int(self.el("body").get_attribute("data-runs") or 0)
        t0 = time.perf_counter()
        self.el("#edit-button").click()
        self.wait(lambda d: int(d.find_element("css selector", "body").get_attribute("data-runs") or 0) > runs)
        return time.perf_counter() - t0

    @property
    def state(self) -> str:
        return self.el("body").get_attribute("data-state")

    def error(self) -> str:
        box = self.el("#error")
        return box.text if box.is_displayed() else ""

    def image(self, css: str) -> np.ndarray:
        src = self.el(css).get_attribute("src")
        assert src.startswith("data:image/png;base64,")
        return np.asarray(Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).convert("RGB"))


@pytest.fixture()
def page(browser, server):
    return Page(browser, server)


def _case(tmp_path: Path, seed: int = 11):
    case = world.make_case("color", world.EVAL_SEED_START + seed)
    path = tmp_path / "source.png"
    path.write_bytes(_png(case.source))
    return case, path


def test_upload_edit_then_cached_second_target(page, tmp_path):
    case, path = _case(tmp_path)
    old, new = case.blend_words
    page.upload(path)
    page.fill(source=case.source_prompt, target=case.target_prompt, blend=f"{old} {new}")
    first = page.click_edit()
    assert page.state == "done", page.error()
    edit, shown_source = page.image("#out-edit"), page.image("#out-source")
    np.testing.assert_array_equal(shown_source, case.source)
    inside = float(psnr(case.source[None], edit[None], case.mask)[0])
    outside = float(psnr(case.source[None], edit[None], ~case.mask)[0])
    assert inside < 15.0 and outside > 22.0, (inside, outside)  # the object changed, the rest kept
    assert page.el("#nfe").text == "8" and not page.d.find_elements("css selector", "#cached")
    assert page.el("#download").get_attribute("href") == page.el("#out-edit").get_attribute("src")

    other = next(c for c in ("red", "green", "orange", "black") if c not in (old, new)
                 and c not in case.source_prompt.split())
    page.fill(target=case.target_prompt.replace(new, other, 1), blend=f"{old} {other}")
    second = page.click_edit()
    assert page.state == "done", page.error()
    assert page.el("#nfe").text == "4" and "cached" in page.el("#cached").text  # 4 reverse calls only
    assert not np.array_equal(page.image("#out-edit"), edit)
    print(f"\nclick to image shown: first edit {first:.2f} s, cached second edit {second:.2f} s "
          f"(page's own timer: {page.el('#roundtrip').text} s)")
    if os.environ.get("ICD_WEB_SCREENSHOT"):
        out = Path(os.environ["ICD_WEB_SCREENSHOT"])
        out.parent.mkdir(parents=True, exist_ok=True)
        page.d.execute_script("window.scrollTo(0, 0)")
        shot = Image.open(io.BytesIO(page.d.get_screenshot_as_png())).convert("RGB")
        shot.quantize(colors=64, method=Image.Quantize.MEDIANCUT).save(out, optimize=True)


def test_corrupt_upload_shows_an_error_and_the_next_request_works(page, tmp_path):
    case, good = _case(tmp_path, seed=12)
    bad = tmp_path / "broken.png"
    bad.write_bytes(good.read_bytes()[:60])
    page.upload(bad)
    page.fill(source=case.source_prompt, target=case.target_prompt)
    page.click_edit()
    assert page.state == "error" and "corrupt or truncated" in page.error()
    page.upload(good)
    page.click_edit()
    assert page.state == "done" and page.error() == ""
    assert page.image("#out-edit").shape == case.source.shape


def test_the_page_offers_both_built_in_models_each_with_its_methods(page):
    from selenium.webdriver.support.ui import Select

    model, method = Select(page.el("#model")), Select(page.el("#method"))
    assert [o.text for o in model.options] == ["embedded", "embedded-flow"]
    assert model.first_selected_option.text == "embedded" and method.first_selected_option.text == "icd"
    model.select_by_visible_text("embedded-flow")
    flow = [o.text for o in method.options]
    assert {"icd", "flow-ode", "fireflow"} <= set(flow) and "ip2p" not in flow
    page.el("#examples button").click()
    method.select_by_visible_text("flow-ode")
    page.fill(steps="2")
    page.click_edit()
    assert page.state == "done", page.error()
    assert "embedded-flow" in page.el("#stats").text and page.el("#nfe").text == "4"
    model.select_by_visible_text("embedded")
    assert "icd" in [o.text for o in method.options] and "flow-ode" not in [o.text for o in method.options]


def test_unknown_words_and_empty_prompts_are_pointed_out(page):
    page.el("#examples button").click()
    assert page.el("#source").get_attribute("value")  # an example fills in the prompts
    page.fill(target="a small yelow sqare on a white background")
    page.click_edit()
    assert page.state == "error"
    assert "'yelow' (did you mean yellow" in page.error() and "'sqare' (did you mean square" in page.error()
    page.fill(target=" ")
    page.click_edit()
    assert "empty" in page.error()


def _post_edit(url: str, fields: dict[str, str]) -> tuple[int, dict]:
    boundary = uuid.uuid4().hex
    body = b"".join(f"--{boundary}\r\nContent-Disposition: form-data; name=\"{k}\"\r\n\r\n{v}\r\n".encode()
                    for k, v in fields.items()) + f"--{boundary}--\r\n".encode()
    req = urllib.request.Request(url + "/api/edit", data=body,
                                 headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    try:
        with urllib.request.urlopen(req, timeout=WAIT_S) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_concurrent_requests_are_queued(server):
    examples = json.loads(urllib.request.urlopen(server + "/api/examples", timeout=10).read())
    ex = next(e for e in examples if not e["masactrl"])
    results: list = [None] * 3
    fields = [{"example": ex["name"], "source": ex["source"], "target": ex["target"], "blend": ex["blend"],
               "seed": str(i)} for i in range(3)]

    def go(i):
        results[i] = _post_edit(server, fields[i])

    threads = [threading.Thread(target=go, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT_S)
    assert [r[0] for r in results] == [200, 200, 200], results
    assert all(r[1]["nfe"] == 8 for r in results)  # three seeds: three inversions, none mixed up
    status, out = _post_edit(server, {**fields[0], "method": "ddim", "steps": "0"})
    assert status == 400 and "--steps" in out["error"]
    bad = urllib.request.Request(server + "/api/edit", data=b"xx", headers={"Content-Type": "multipart/form-data"})
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(bad, timeout=10)
    assert info.value.code == 400 and "malformed upload" in json.loads(info.value.read())["error"]
