"""The web page at / in a real headless browser (Debian's chromium, driven by Playwright)
against a real ``python -m mmfs_fast.serve`` process. What the page shows is read back
pixel by pixel (drawn onto a canvas in the page) and compared with what the JSON API
returns for the same inputs.

Without playwright or chromium these tests skip, unless $MMFS_FAST_REQUIRE_BROWSER=1
(CI sets it), where a missing browser is an error. $MMFS_FAST_SCREENSHOT=<path> also
writes the page's screenshot there (README's docs/webpage.png)."""
import base64
import io
import os
import re
import shutil

import numpy as np
import pytest
import torch

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
skimage_data = pytest.importorskip("skimage.data")

from PIL import Image  # noqa: E402

from mmfs_fast.api import MMFS  # noqa: E402
from mmfs_fast.io import to_pil  # noqa: E402
from mmfs_fast.models import Stylizer, StylizerConfig  # noqa: E402
from test_serve import Server, png, random_image  # noqa: E402

CHROMIUM = os.environ.get("MMFS_FAST_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TOKEN = "page-token-9f2c"
SIZE = 64
MAX_PIXELS = 300_000  # the 512² astronaut passes, a 600² upload does not
GRID = 6
DESKTOP = {"width": 1200, "height": 900}
PHONE = {"width": 390, "height": 844}

# the page's own pixels: the <img> drawn at its natural size onto a canvas, as PNG-free RGBA
# decode() first: an <img> whose src was just set has no pixels until its image is decoded
READ_PIXELS = """async (img) => {
  await img.decode();
  const canvas = document.createElement("canvas");
  canvas.width = img.naturalWidth;
  canvas.height = img.naturalHeight;
  const context = canvas.getContext("2d");
  context.drawImage(img, 0, 0);
  const bytes = context.getImageData(0, 0, canvas.width, canvas.height).data;
  let binary = "";
  for (let i = 0; i < bytes.length; i += 32768) binary += String.fromCharCode(...bytes.subarray(i, i + 32768));
  return [canvas.width, canvas.height, btoa(binary)];
}"""


def sync_playwright():
    """Playwright's entry point and the browser binary, or a skip (an error under CI)."""
    try:
        from playwright.sync_api import sync_playwright as start
    except ImportError:
        start, missing = None, "the playwright package (pip install -r requirements.txt)"
    else:
        missing = None if shutil.which(CHROMIUM) else f"{CHROMIUM} (apt-get install chromium)"
    if missing:
        if os.environ.get("MMFS_FAST_REQUIRE_BROWSER") == "1":
            pytest.fail(f"MMFS_FAST_REQUIRE_BROWSER=1 but {missing} is missing")
        pytest.skip(f"needs {missing}")
    return start


@pytest.fixture(scope="module")
def browser():
    with sync_playwright()() as playwright:
        # launch() gives every run a fresh temporary profile (user-data-dir)
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("webpage")
    torch.manual_seed(11)
    Stylizer(StylizerConfig(size=SIZE, ngf=4, style_dim=512, n_mlp=2)).save(folder / "tiny.safetensors")
    (folder / "token").write_text(TOKEN)
    server = Server(folder / "tiny.safetensors", "--random-init", "--token-file", str(folder / "token"),
                    "--max-pixels", str(MAX_PIXELS))
    server.ckpt = folder / "tiny.safetensors"
    yield server
    server.stop()


def open_page(browser, server, viewport=DESKTOP, token=TOKEN):
    """A fresh tab on the page; ``token``: already entered in this tab (sessionStorage)."""
    context = browser.new_context(viewport=viewport)
    if token is not None:
        context.add_init_script(f"sessionStorage.setItem('mmfs_fast.token', {token!r})")
    context.set_default_timeout(20_000)
    page = context.new_page()
    page.goto(server.url + "/")
    page.wait_for_selector("#status.ready")
    return page


@pytest.fixture
def page(browser, server):
    page = open_page(browser, server)
    yield page
    page.context.close()


def face_png(seed: int = 0) -> bytes:
    return png(random_image(seed, 80))


def astronaut_png() -> bytes:
    return png(Image.fromarray(skimage_data.astronaut()))


def upload(page, selector: str, data: bytes, name: str = "face.png", mime: str = "image/png"):
    page.set_input_files(selector, files=[{"name": name, "mimeType": mime, "buffer": data}])


def pick_style(page, kind: str):
    page.click(f".tabs label:has(input[value={kind}])")
    assert page.is_checked(f"input[name=style][value={kind}]")


def click_and_wait(page, button: str):
    page.click(button)
    page.wait_for_selector("#stage[aria-busy=false]")


def shown_pixels(page, selector: str) -> np.ndarray:
    width, height, data = page.eval_on_selector(selector, READ_PIXELS)
    rgba = np.frombuffer(base64.b64decode(data), np.uint8).reshape(height, width, 4)
    assert (rgba[..., 3] == 255).all()
    return rgba[..., :3]


def api_pixels(server, image: bytes, **fields) -> np.ndarray:
    """The JSON API's answer for the same inputs: base64 in, base64 PNG out."""
    body = {"image": base64.b64encode(image).decode(), "format": "json", **fields}
    r = server.client(TOKEN).post("/v1/stylize", json=body)
    assert r.status_code == 200, r.text
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["image"]))).convert("RGB"))


def api_error(server, files: dict, data: dict, token=TOKEN) -> tuple[int, str]:
    r = server.client(token).post("/v1/stylize", files=files, data=data)
    return r.status_code, r.json()["error"]


def visible_error(page) -> str:
    assert page.is_visible("#error")
    return page.inner_text("#error")


def test_page_and_its_files_come_from_the_service_alone(server):
    client = server.client()  # no token: the page itself is public, like /docs
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    csp = r.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp and "unsafe" not in csp
    links = re.findall(r'(?:src|href)="([^"]+)"', r.text)
    assert "/static/app.js" in links and "/static/app.css" in links
    assert not [link for link in links if "//" in link]  # no CDN, nothing from elsewhere
    for name, kind in (("app.js", "javascript"), ("app.css", "text/css")):
        asset = client.get(f"/static/{name}")
        assert asset.status_code == 200 and kind in asset.headers["content-type"]
    assert client.get("/static/%2e%2e/app.py").status_code == 404


# -- rendering ---------------------------------------------------------------------------------

def test_render_shows_exactly_what_the_api_returns(page, server):
    face = face_png(1)
    upload(page, "#image", face)
    assert page.is_visible("#input-view")
    page.fill("#seed", "5")
    click_and_wait(page, "#render")
    assert not page.is_visible("#error")
    shown = shown_pixels(page, "#result")
    assert shown.shape == (SIZE, SIZE, 3)
    assert np.array_equal(shown, api_pixels(server, face, seed=5))
    assert not np.array_equal(shown, api_pixels(server, face, seed=6))  # the seed reached the service
    assert "ms per image on the service" in page.inner_text("#timing")
    link = page.locator("#download")
    assert link.is_visible() and link.get_attribute("download") == "mmfs_fast_seed5.png"
    assert link.get_attribute("href") == page.get_attribute("#result", "src")

    # full size on click: the viewer shows the same image at its natural size
    page.click("#result-button")
    assert page.is_visible("#viewer-image")
    assert page.eval_on_selector("#viewer-image", "img => [img.naturalWidth, img.width]") == [SIZE, SIZE]
    assert np.array_equal(shown_pixels(page, "#viewer-image"), shown)
    page.click("#viewer-close")

    # a text style, then a reference image: the same as the API's
    pick_style(page, "text")
    page.fill("#text", "a watercolor portrait")
    click_and_wait(page, "#render")
    assert np.array_equal(shown_pixels(page, "#result"), api_pixels(server, face, text="a watercolor portrait"))
    pick_style(page, "reference")
    reference = png(random_image(4, 100))
    upload(page, "#reference", reference, "ref.png")
    click_and_wait(page, "#render")
    assert np.array_equal(shown_pixels(page, "#result"),
                          api_pixels(server, face, reference=base64.b64encode(reference).decode()))


def test_mixing_shows_what_the_api_returns_and_the_api_is_mmfs_mix(page, server):
    face = face_png(6)
    upload(page, "#image", face)
    page.fill("#seed", "5")
    assert not page.is_visible("#mix-panel")  # hidden until asked for
    page.check("#mix")
    assert page.is_visible("#mix-panel")
    page.fill("#mix-seed", "9")
    page.eval_on_selector("#crossover", "el => { el.value = '4'; el.dispatchEvent(new Event('input')); }")
    assert page.inner_text("#crossover-value") == "4"
    click_and_wait(page, "#render")
    assert not page.is_visible("#error")
    shown = shown_pixels(page, "#result")
    api = api_pixels(server, face, seed=5, mix_seed=9, crossover=4)
    assert np.array_equal(shown, api)
    assert page.get_attribute("#download", "download") == "mmfs_fast_seed5_mix9at4.png"
    assert np.abs(api.astype(int) - api_pixels(server, face, seed=5)).mean() > 1  # the mix took effect

    # the API's mix is MMFS.mix + render in Python (fp32 engine vs the Stylizer: one rounding step)
    mmfs = MMFS.load(server.ckpt, engine=False, device="cpu")
    w_plus = MMFS.mix(mmfs.style_from_seed(5), mmfs.style_from_seed(9), 4)
    with torch.no_grad():
        rendered = mmfs.render(mmfs.load_faces([Image.open(io.BytesIO(face))]), w_plus, noise="zero")
    assert np.abs(np.asarray(to_pil(rendered[0]), dtype=int) - api).max() <= 1

    page.uncheck("#mix")  # off again: the plain seed
    click_and_wait(page, "#render")
    assert np.array_equal(shown_pixels(page, "#result"), api_pixels(server, face, seed=5))


def test_photo_align_and_paste_back(page, server):
    photo = astronaut_png()
    upload(page, "#image", photo, "astronaut.png")
    assert page.is_disabled("#paste-back")
    page.check("#align")
    page.fill("#seed", "3")
    click_and_wait(page, "#render")
    faces = shown_pixels(page, "#result")
    assert faces.shape == (SIZE, SIZE, 3)  # one face found, aligned and stylized
    assert np.array_equal(faces, api_pixels(server, photo, seed=3, align=True))
    assert "1 face" in page.inner_text("#timing")

    page.check("#paste-back")
    click_and_wait(page, "#render")
    pasted = shown_pixels(page, "#result")
    assert pasted.shape == (512, 512, 3)  # the whole photo
    assert np.array_equal(pasted, api_pixels(server, photo, seed=3, align=True, paste_back=True))
    original = skimage_data.astronaut()
    assert np.array_equal(pasted[-40:, -40:], original[-40:, -40:])  # far from the face: untouched
    assert np.abs(pasted.astype(int) - original).max() > 50  # the face is stylized


def test_shuffle_renders_a_grid_of_distinct_seeds(page, server):
    face = face_png(2)
    upload(page, "#image", face)
    click_and_wait(page, "#shuffle")
    tiles = page.locator("#grid .tile")
    assert tiles.count() == GRID
    seeds = [tiles.nth(i).get_attribute("data-seed") for i in range(GRID)]
    images = [shown_pixels(page, f"#grid .tile:nth-child({i + 1}) img") for i in range(GRID)]
    assert len(set(seeds)) == GRID
    assert all(np.abs(a.astype(int) - b).mean() > 3 for i, a in enumerate(images) for b in images[:i])
    for seed, shown in zip(seeds, images):
        # rendered in micro-batches of two on the service, alone here: equal up to one rounding step
        assert np.abs(shown.astype(int) - api_pixels(server, face, seed=int(seed))).max() <= 1
    assert f"{GRID} seeds in" in page.inner_text("#timing")

    tiles.nth(3).click()  # pick one: it becomes the result and the seed
    assert page.input_value("#seed") == seeds[3]
    assert np.array_equal(shown_pixels(page, "#result"), images[3])
    assert page.get_attribute("#download", "download") == f"mmfs_fast_seed{seeds[3]}.png"


# -- errors ------------------------------------------------------------------------------------

BAD_UPLOADS = [
    ("notes.txt", "text/plain", b"this is not an image"),
    ("big.png", "image/png", png(Image.new("RGB", (600, 600), (90, 120, 200)))),  # above --max-pixels
]


@pytest.mark.parametrize("name,mime,data", BAD_UPLOADS, ids=["not-an-image", "too-many-pixels"])
def test_bad_upload_shows_the_services_message_then_a_good_request_works(page, server, name, mime, data):
    status, message = api_error(server, {"image": (name, data, mime)}, {"seed": "1"})
    assert 400 <= status < 500
    upload(page, "#image", data, name, mime)
    click_and_wait(page, "#render")
    assert visible_error(page) == f"{status} · {message}"
    assert not page.is_visible("#result")

    face = face_png(3)
    upload(page, "#image", face)
    page.fill("#seed", "1")
    click_and_wait(page, "#render")
    assert not page.is_visible("#error")
    assert np.array_equal(shown_pixels(page, "#result"), api_pixels(server, face, seed=1))


def test_empty_prompt_is_the_services_422(page, server):
    upload(page, "#image", face_png(4))
    pick_style(page, "text")
    page.fill("#text", "   ")
    click_and_wait(page, "#render")
    status, message = api_error(server, {"image": ("f.png", face_png(4))}, {"text": "   "})
    assert visible_error(page) == f"{status} · {message}" and status == 422


def test_token_is_asked_once_and_a_wrong_one_shows_the_401(browser, server):
    page = open_page(browser, server, token=None)
    messages = []
    page.on("console", lambda m: messages.append(m.text))
    requests = []
    page.on("request", lambda r: requests.append((r.url, r.headers.get("authorization"))))
    status, message = api_error(server, {"image": ("f.png", face_png(5))}, {"seed": "1"}, token="wrong")
    assert status == 401

    face = face_png(5)
    upload(page, "#image", face)
    page.click("#render")
    page.wait_for_selector("#token-dialog[open]")
    assert not page.is_visible("#token-error")  # first time: just asked
    page.fill("#token", "wrong")
    page.click("#token-form button[type=submit]")
    page.wait_for_selector("#token-dialog[open] #token-error:not([hidden])")
    assert page.inner_text("#token-error") == message  # the service's 401 message, as it is
    page.click("#token-cancel")
    page.wait_for_selector("#stage[aria-busy=false]")
    assert visible_error(page) == f"401 · {message}"

    page.click("#render")  # still usable: asked again, the right token this time
    page.wait_for_selector("#token-dialog[open]")
    page.fill("#token", TOKEN)
    page.click("#token-form button[type=submit]")
    page.wait_for_selector("#stage[aria-busy=false]")
    assert not page.is_visible("#error")
    assert np.array_equal(shown_pixels(page, "#result"), api_pixels(server, face, seed=42))

    click_and_wait(page, "#shuffle")  # kept for the tab: six more requests, no question
    assert page.locator("#grid .tile").count() == GRID
    assert not page.is_visible("#token-dialog")
    assert page.evaluate("sessionStorage.getItem('mmfs_fast.token')") == TOKEN
    assert all(TOKEN not in url for url, _ in requests) and all(TOKEN not in m for m in messages)
    stylize_auth = [auth for url, auth in requests if url.endswith("/v1/stylize")]
    assert stylize_auth[-GRID:] == [f"Bearer {TOKEN}"] * GRID
    page.context.close()


# -- layout ------------------------------------------------------------------------------------

def box(page, selector: str) -> dict:
    return page.locator(selector).bounding_box()


def test_phone_width_is_one_column(browser, server):
    page = open_page(browser, server, viewport=PHONE)
    controls, stage = box(page, ".controls"), box(page, ".stage")
    assert stage["y"] >= controls["y"] + controls["height"]  # stacked, not side by side
    assert abs(stage["x"] - controls["x"]) < 1 and controls["width"] > 300
    figures = page.locator(".pair figure")
    first, second = figures.nth(0).bounding_box(), figures.nth(1).bounding_box()
    assert second["y"] >= first["y"] + first["height"]
    assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]  # no sideways scrolling
    page.context.close()


def test_screenshot(browser, server, tmp_path):
    """The page as README shows it: a photo, faces pasted back, and a grid of seeds."""
    page = open_page(browser, server, viewport={"width": 1200, "height": 720})
    desktop_controls, desktop_stage = box(page, ".controls"), box(page, ".stage")
    assert desktop_stage["x"] >= desktop_controls["x"] + desktop_controls["width"]  # two columns here
    upload(page, "#image", astronaut_png(), "astronaut.png")
    page.check("#align")
    page.check("#paste-back")
    click_and_wait(page, "#shuffle")
    page.locator("#grid .tile").nth(0).click()
    assert not page.is_visible("#error")
    path = tmp_path / "webpage.png"
    page.screenshot(path=str(path))
    assert Image.open(path).size == (1200, 720)
    if os.environ.get("MMFS_FAST_SCREENSHOT"):  # 256 colours: a third of the bytes in the repository
        Image.open(path).convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT).save(
            os.environ["MMFS_FAST_SCREENSHOT"], optimize=True)
    page.context.close()
