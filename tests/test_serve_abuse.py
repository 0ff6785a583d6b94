"""The attacks of the security review (issue 19) against a real server: each test builds its input.

A JPEG whose decoding never ends, a form of 355k parts, a page on a rebound DNS name, a bug in
the model: each costs its own request only, and the answer says little and carries the security
headers.
"""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from PIL import Image

from cxrfusion.inference.classifier import Classifier
from cxrfusion.serving import ServeSettings, create_app
from cxrfusion.serving.app import SECURITY_HEADERS
from cxrfusion.serving.server import background_server

PAGE = 4096


@pytest.fixture(scope="module")
def classifier(mc_dropout_run) -> Classifier:
    return Classifier.load(mc_dropout_run, mc_samples=4)


@pytest.fixture(scope="module")
def server(classifier) -> str:
    """Default limits (a 20 MB upload), answering one extra host name."""
    settings = ServeSettings(allowed_hosts=("127.0.0.1", "localhost", "cxr.example.org"))
    with background_server(create_app(classifier, settings)) as url:
        yield url


@pytest.fixture(scope="module")
def png(nih_sample) -> bytes:
    return sorted((nih_sample / "images").glob("*.png"))[0].read_bytes()


def jpeg_with_scans(side: int, scans: int) -> bytes:
    """A black progressive JPEG of side x side pixels, its last scan repeated up to `scans`
    scans: each one, though empty, makes libjpeg walk every block of the image again."""
    buffer = io.BytesIO()
    Image.new("L", (side, side)).save(buffer, format="JPEG", progressive=True)
    data = buffer.getvalue()
    last_scan = data[data.rindex(b"\xff\xda") : -2]  # up to the end-of-image marker
    return data[:-2] + last_scan * (scans - data.count(b"\xff\xda")) + b"\xff\xd9"


def post(url: str, name: str, data: bytes, **kwargs) -> httpx.Response:
    return httpx.post(f"{url}/predict", files={"file": (name, data)}, timeout=120, **kwargs)


def held(url: str) -> int:
    return httpx.get(f"{url}/health", timeout=10).json()["queue"]["held"]


def test_a_jpeg_of_3000_scans_is_refused_before_decoding(server):
    bomb = jpeg_with_scans(2048, 3000)  # 11 s of decoding on 2 busy cores
    response = post(server, "scans.jpg", bomb)
    assert response.status_code == 422, response.text
    assert response.json()["detail"] == (
        "scans.jpg: JPEG with 3000 scans (the limit is 100): refused before decoding"
    )


def test_a_progressive_jpeg_as_encoders_write_it_is_predicted(server, png):
    buffer = io.BytesIO()
    Image.open(io.BytesIO(png)).save(buffer, format="JPEG", progressive=True, quality=95)
    response = post(server, "x.jpg", buffer.getvalue())
    assert response.status_code == 200, response.text
    assert response.json()["source"] == "x.jpg"


@pytest.fixture(scope="module")
def unguarded_server(classifier) -> str:
    """No scan limit, so that crafted JPEGs reach the decoders and meet their 5 s limit."""
    settings = ServeSettings(max_jpeg_scans=10**6, decode_timeout_s=5, decode_workers=2)
    with background_server(create_app(classifier, settings)) as url:
        yield url


def test_decodes_over_their_time_limit_cost_their_own_requests_only(unguarded_server, png):
    bomb = jpeg_with_scans(7745, 3000)  # 60 MP: minutes of decoding, 16 s on a fast core
    with ThreadPoolExecutor(8) as pool:
        bombs = [pool.submit(post, unguarded_server, "bomb.jpg", bomb) for _ in range(4)]
        for _ in range(600):  # until the 4 bombs are held (at most 30 s)
            if held(unguarded_server) == 4:
                break
            time.sleep(0.05)
        normal = [pool.submit(post, unguarded_server, f"{i}.png", png) for i in range(4)]
        assert [r.result().status_code for r in normal] == [200] * 4
        for refused in bombs:
            response = refused.result()
            assert response.status_code == 422, response.text
            assert "decoding took longer than 5 s" in response.json()["detail"]
    assert post(unguarded_server, "after.png", png).status_code == 200  # decoders replaced
    assert held(unguarded_server) == 0


def _form_of_many_fields(count: int) -> Iterator[bytes]:
    """A multipart body of `count` one-byte fields (~50 bytes each), in chunks of 1,000 fields:
    streamed, so that the client holds no copy of it in this process."""
    for start in range(0, count, 1000):
        fields = range(start, min(start + 1000, count))
        yield "".join(
            f'--b\r\nContent-Disposition: form-data; name="f{i}"\r\n\r\nx\r\n' for i in fields
        ).encode()
    yield b"--b--\r\n"


def _rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * PAGE


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs Linux /proc")
def test_a_form_of_355k_fields_is_refused_short_and_costs_no_memory(server):
    assert sum(map(len, _form_of_many_fields(355_000))) < 20 * 2**20  # the parser sees it all
    peak, baseline, done = [0], _rss_bytes(), threading.Event()

    def sample() -> None:  # the server runs in this process: its growth is ours
        while not done.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        response = httpx.post(
            f"{server}/predict",
            content=_form_of_many_fields(355_000),
            headers={"Content-Type": "multipart/form-data; boundary=b"},
            timeout=120,
        )
    finally:
        done.set()
        sampler.join()
    assert response.status_code == 400
    assert response.json()["detail"] == "too many form fields: at most 8 are accepted"
    assert peak[0] - baseline < 50 * 2**20


def test_a_missing_file_field_is_named_without_echoing_the_clients_fields(server, png):
    fields = {"<script>alert(1)</script>": "x", "heatmap": "true"}
    response = httpx.post(
        f"{server}/predict", data=fields, files={"image": ("x.png", png)}, timeout=60
    )
    assert response.status_code == 400
    assert response.json()["detail"] == (
        "no multipart field 'file': send the image as the form field 'file'"
    )


@pytest.mark.parametrize("path", ["/model", "/health", "/"])
def test_a_foreign_host_header_is_refused_with_the_security_headers(server, path):
    response = httpx.get(f"{server}{path}", headers={"Host": "rebound.attacker.example"})
    assert response.status_code == 400
    assert {k: response.headers[k] for k in SECURITY_HEADERS} == SECURITY_HEADERS
    assert httpx.get(f"{server}{path}", headers={"Host": "cxr.example.org"}).status_code == 200


class BrokenClassifier:
    """The real classifier whose model call fails like a bug would."""

    def __init__(self, inner: Classifier) -> None:
        self.inner = inner

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def predict_prepared(self, images, seed=None, gradcam: bool = False, **options):
        raise RuntimeError("a bug in the model call")


def test_an_internal_error_answers_500_with_the_security_headers(classifier, png):
    with background_server(create_app(BrokenClassifier(classifier))) as url:
        response = post(url, "x.png", png)
    assert response.status_code == 500
    assert response.json()["detail"] == "internal error; see the server log"
    assert {k: response.headers[k] for k in SECURITY_HEADERS} == SECURITY_HEADERS
