"""The HTTP service under a real uvicorn server on 127.0.0.1, driven with httpx."""

from __future__ import annotations

import base64
import io
import os
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from cxrfusion.errors import CxrError
from cxrfusion.inference.classifier import GRADCAM_TOP, Classifier
from cxrfusion.labels import LABELS
from cxrfusion.serving import ServeSettings, create_app
from cxrfusion.serving.server import background_server

TOKEN = "s3cret-token"
MAX_UPLOAD = 256 * 1024


@pytest.fixture(scope="module")
def classifier(mc_dropout_run) -> Classifier:
    return Classifier.load(mc_dropout_run, mc_samples=10)


@pytest.fixture(scope="module")
def server(classifier) -> str:
    settings = ServeSettings(max_upload_bytes=MAX_UPLOAD, queue_size=16, token=TOKEN)
    with background_server(create_app(classifier, settings)) as url:
        yield url


@pytest.fixture(scope="module")
def client(server) -> httpx.Client:
    with httpx.Client(base_url=server, timeout=60) as c:
        yield c


AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def radiograph(nih_sample) -> tuple[Path, bytes]:
    path = sorted((nih_sample / "images").glob("*.png"))[0]
    return path, path.read_bytes()


def png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def dicom_bytes(pixels: np.ndarray | None, shape: tuple[int, int] = (64, 64)) -> bytes:
    """A MONOCHROME2 secondary-capture DICOM of `pixels` (8 bit); None leaves PixelData out."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CR"
    ds.Rows, ds.Columns = pixels.shape if pixels is not None else shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    if pixels is not None:
        ds.PixelData = pixels.tobytes()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A valid PNG signature and IHDR claiming width x height pixels, then a tiny IDAT."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 16))
        + chunk(b"IEND", b"")
    )


def multipart(name: str, filename: str, data: bytes) -> dict:
    return {"files": {name: (filename, data, "application/octet-stream")}}


def test_health_answers_without_a_token(client):
    response = client.get("/health")
    assert response.status_code == 200
    assert response.json()["status"] == "ok"
    assert response.json()["auth"] is True


def test_model_card_lists_the_labels_and_says_it_is_not_a_medical_device(client, classifier):
    response = client.get("/model", headers=AUTH)
    assert response.status_code == 200
    card = response.json()
    assert list(card["labels"]) == list(LABELS)
    assert "not a medical device" in response.text.lower()
    assert card == classifier.card()


def test_predict_returns_what_the_python_api_gives_for_a_real_radiograph(
    client, classifier, radiograph
):
    path, data = radiograph
    response = client.post("/predict", headers=AUTH, **multipart("file", path.name, data))
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["source"] == path.name
    assert [p["label"] for p in result["pathologies"]] == list(LABELS)
    expected = classifier.predict(path)
    served = np.array([p["probability"] for p in result["pathologies"]])
    np.testing.assert_allclose(served, expected.probability, atol=1e-6)
    np.testing.assert_allclose([p["std"] for p in result["pathologies"]], expected.std, atol=1e-6)
    assert result["flag"] == (result["uncertainty"] > result["threshold"])
    assert "heatmaps" not in result


def test_predict_with_heatmap_returns_png_overlays_of_the_most_probable_pathologies(
    client, classifier, radiograph
):
    path, data = radiograph
    response = client.post(
        "/predict?heatmap=true&image=true", headers=AUTH, **multipart("file", path.name, data)
    )
    assert response.status_code == 200, response.text
    result = response.json()
    ranked = sorted(result["pathologies"], key=lambda p: -p["probability"])
    assert set(result["heatmaps"]) == {p["label"] for p in ranked[:GRADCAM_TOP]}
    size = (classifier.input_size, classifier.input_size)
    for overlay in result["heatmaps"].values():
        assert Image.open(io.BytesIO(base64.b64decode(overlay))).size == size
    seen = Image.open(io.BytesIO(base64.b64decode(result["image"])))
    assert seen.size == size and seen.mode == "L"


def test_a_dicom_of_the_same_pixels_predicts_like_the_png(client, radiograph):
    path, data = radiograph
    pixels = np.array(Image.open(path).convert("L"))
    answers = []
    for name, payload in (("same.png", png_bytes(pixels)), ("same.dcm", dicom_bytes(pixels))):
        response = client.post("/predict", headers=AUTH, **multipart("file", name, payload))
        assert response.status_code == 200, response.text
        answers.append([p["probability"] for p in response.json()["pathologies"]])
    np.testing.assert_allclose(answers[0], answers[1], atol=1e-4)


def test_page_and_its_files_come_from_the_server_itself(client):
    page = client.get("/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for asset in ("/static/app.js", "/static/style.css"):
        assert asset in page.text
        text = client.get(asset).text
        assert "http://" not in text and "https://" not in text  # no CDN, nothing from the web
    assert "https://" not in page.text and "http://" not in page.text
    assert client.get("/docs").status_code == 404  # FastAPI's docs page would load a CDN


def _streamed_upload(total: int):
    """A multipart upload of `total` bytes sent in chunks, without a Content-Length."""
    yield (
        b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="big.png"\r\n'
        b"Content-Type: image/png\r\n\r\n\x89PNG\r\n\x1a\n"
    )
    for _ in range(total // 65536):
        yield bytes(65536)


BAD_REQUESTS = {
    "empty body": (dict(content=b""), 400, "empty request body"),
    "text file": (multipart("file", "notes.txt", b"hello, not an image\n" * 10), 415, "not a PNG"),
    "truncated png": ("truncated", 422, "truncated"),
    "png header claiming 100000x100000": (
        multipart("file", "bomb.png", png_claiming(100_000, 100_000)),
        422,
        "too large",
    ),
    "wrong field name": ("wrong field", 400, "no multipart field 'file'"),
    "oversize by content-length": (
        multipart("file", "big.png", b"\x89PNG\r\n\x1a\n" + bytes(2 * MAX_UPLOAD)),
        413,
        "upload too large",
    ),
    "oversize streamed without length": ("streamed", 413, "upload too large"),
    "dicom without pixel data": (
        multipart("file", "empty.dcm", dicom_bytes(None)),
        422,
        "no PixelData",
    ),
    "unsupported content type": (
        dict(content=png_claiming(64, 64), headers={"Content-Type": "image/png"}),
        415,
        "multipart/form-data",
    ),
    "empty file field": (multipart("file", "nothing.png", b""), 400, "empty"),
    "malformed multipart": (
        dict(content=b"--nope", headers={"Content-Type": "multipart/form-data; boundary=xyz"}),
        400,
        "malformed multipart",
    ),
    "invalid heatmap option": ("bad option", 400, "heatmap must be true or false"),
    "part with 5000 headers": (
        dict(
            content=b"--xyz\r\n" + b"X-A: b\r\n" * 5000 + b"\r\nx\r\n--xyz--\r\n",
            headers={"Content-Type": "multipart/form-data; boundary=xyz"},
        ),
        400,
        "Maximum header count exceeded",
    ),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_a_bad_request_gets_a_4xx_with_a_clear_message_and_the_server_lives_on(
    case, client, radiograph
):
    request, status, message = BAD_REQUESTS[case]
    data = radiograph[1]
    if request == "truncated":
        request = multipart("file", "cut.png", data[: len(data) // 2])
    elif request == "wrong field":
        request = multipart("image", "x.png", data)
    elif request == "streamed":
        request = dict(
            content=_streamed_upload(4 * MAX_UPLOAD),
            headers={"Content-Type": "multipart/form-data; boundary=xyz"},
        )
    elif request == "bad option":
        request = dict(**multipart("file", "x.png", data), params={"heatmap": "maybe"})
    headers = {**AUTH, **request.pop("headers", {})}
    response = client.post("/predict", headers=headers, **request)
    assert response.status_code == status, response.text
    assert message in response.json()["detail"]
    assert client.get("/health").status_code == 200


@pytest.mark.parametrize(
    ("headers", "message"),
    [({}, "missing bearer token"), ({"Authorization": "Bearer wrong"}, "wrong bearer token")],
    ids=["missing token", "wrong token"],
)
def test_predict_and_model_card_refuse_a_request_without_the_right_token(
    client, radiograph, headers, message
):
    response = client.post("/predict", headers=headers, **multipart("file", "x.png", radiograph[1]))
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    assert message in response.json()["detail"]
    assert client.get("/model", headers=headers).status_code == 401
    assert client.get("/health").status_code == 200


class _WriteRecorder:
    """Records every file the process opens for writing while `recording` is set (audit hook)."""

    EVENTS = ("os.rename", "os.mkdir", "os.link", "os.symlink", "shutil.copyfile")
    WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

    def __init__(self) -> None:
        self.recording = threading.Event()
        self.paths: list[str] = []
        sys.addaudithook(self)

    def __call__(self, event: str, args: tuple) -> None:
        if not self.recording.is_set():
            return
        if event == "open":
            path, mode, flags = args
            if (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & self.WRITE_FLAGS
            ):
                self.paths.append(str(path))
        elif event in self.EVENTS:
            self.paths.append(f"{event} {args}")


def test_an_upload_with_a_path_like_name_is_never_written_to_disk(client, radiograph):
    recorder = _WriteRecorder()
    name = "../../etc/passwd.png"
    recorder.recording.set()
    try:
        response = client.post("/predict", headers=AUTH, **multipart("file", name, radiograph[1]))
    finally:
        recorder.recording.clear()
    assert response.status_code == 200, response.text
    assert response.json()["source"] == "passwd.png"
    assert recorder.paths == []
    assert not (Path.cwd() / name).exists()


def test_concurrent_requests_share_the_model_safely(client, radiograph):
    data = radiograph[1]

    def post(i: int) -> httpx.Response:
        return client.post("/predict", headers=AUTH, **multipart("file", f"{i}.png", data))

    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(post, range(8)))
    assert [r.status_code for r in responses] == [200] * 8
    first = [p["probability"] for p in responses[0].json()["pathologies"]]
    for response in responses[1:]:
        np.testing.assert_allclose(
            [p["probability"] for p in response.json()["pathologies"]], first, atol=1e-6
        )


class GatedClassifier:
    """The real classifier, held back until the test opens the gate: a deliberately slow model
    whose slowness the test controls (no timing races on a loaded machine)."""

    def __init__(self, inner: Classifier) -> None:
        self.inner = inner
        self.gate = threading.Event()

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def predict_prepared(self, images, seed=None, gradcam: bool = False, **options):
        if not self.gate.wait(timeout=60):
            raise RuntimeError("the test never opened the gate")
        return self.inner.predict_prepared(images, seed, gradcam, **options)


@pytest.fixture(scope="module")
def gated(classifier) -> GatedClassifier:
    return GatedClassifier(classifier)


@pytest.fixture(scope="module")
def queue_of_one(gated) -> str:
    with background_server(create_app(gated, ServeSettings(queue_size=1))) as url:
        yield url


def test_a_full_queue_answers_503_with_retry_after_while_the_model_is_busy(
    queue_of_one, gated, radiograph
):
    def post() -> httpx.Response:
        files = multipart("file", "x.png", radiograph[1])
        return httpx.post(f"{queue_of_one}/predict", timeout=60, **files)

    def held() -> int:
        return httpx.get(f"{queue_of_one}/health", timeout=10).json()["queue"]["held"]

    gated.gate.clear()
    with ThreadPoolExecutor(4) as pool:
        first = pool.submit(post)
        for _ in range(200):  # until the first request holds the only place (at most 10 s)
            if held() == 1:
                break
            time.sleep(0.05)
        refused = list(pool.map(lambda _: post(), range(3)))
        busy = not first.done()
        gated.gate.set()
        assert first.result().status_code == 200
    assert busy  # the refusals came while the model was still busy: nobody waited for it
    for response in refused:
        assert response.status_code == 503, response.text
        assert int(response.headers["Retry-After"]) >= 1
        assert "queue is full" in response.json()["detail"]
    assert held() == 0
    assert post().status_code == 200


class RecordingClassifier:
    """The real classifier, recording the sources of every model call; a batch holding the
    `poison` source fails as a bug in one image would, and `gate` (open by default) holds the
    model back while the test lines requests up."""

    def __init__(self, inner: Classifier, poison: str = "poison.png") -> None:
        self.inner = inner
        self.poison = poison
        self.batches: list[list[str]] = []
        self.gate = threading.Event()
        self.gate.set()

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def predict_prepared(self, images, seed=None, gradcam: bool = False, **options):
        if not self.gate.wait(timeout=60):
            raise RuntimeError("the test never opened the gate")
        sources = [image.source for image in images]
        self.batches.append(sources)
        if self.poison in sources:
            raise CxrError(f"{self.poison}: this image cannot be predicted")
        return self.inner.predict_prepared(images, seed, gradcam, **options)


# Long enough that a batch only ever closes by filling up: no test depends on timing.
PATIENT_MS = 60_000


@pytest.fixture(scope="module")
def recorded(classifier) -> RecordingClassifier:
    return RecordingClassifier(classifier)


@pytest.fixture(scope="module")
def batching(recorded) -> str:
    """A server that predicts 8 requests per model call, waiting as long as it takes for them."""
    settings = ServeSettings(max_batch=8, max_wait_ms=PATIENT_MS)
    with background_server(create_app(recorded, settings)) as url:
        yield url


@pytest.fixture(scope="module")
def one_by_one(classifier) -> tuple[str, RecordingClassifier]:
    recorder = RecordingClassifier(classifier)
    with background_server(create_app(recorder, ServeSettings(max_batch=1))) as url:
        yield url, recorder


@pytest.fixture(scope="module")
def eight_images(nih_sample) -> list[tuple[str, bytes]]:
    """Eight different real radiographs: the first is the `radiograph` fixture's."""
    paths = sorted((nih_sample / "images").glob("*.png"))[:8]
    return [(path.name, path.read_bytes()) for path in paths]


def post_all(url: str, images: list[tuple[str, bytes]], **kwargs) -> list[httpx.Response]:
    """POST every image at once, one connection each."""

    def post(image: tuple[str, bytes]) -> httpx.Response:
        return httpx.post(f"{url}/predict", files={"file": image}, timeout=120, **kwargs)

    with ThreadPoolExecutor(len(images)) as pool:
        return list(pool.map(post, images))


def answer(response: httpx.Response) -> dict:
    """The JSON of a 200 answer without its timing."""
    assert response.status_code == 200, response.text
    return {k: v for k, v in response.json().items() if k != "elapsed_ms"}


def assert_same_answer(got: dict, expected: dict) -> None:
    """The same decisions and text exactly; the same numbers but for the float32 rounding of a
    backbone run on a batch (oneDNN picks its kernels by the batch size: up to 1.2e-7 here), far
    below what other dropout masks would change (~1e-2). With the same features the numbers are
    the same to the last bit (tests/test_inference.py)."""
    numbers = ("probability", "std", "entropy", "mutual_information")

    def numeric(document: dict) -> np.ndarray:
        table = [[p[key] for key in numbers] for p in document["pathologies"]]
        return np.array([*np.ravel(table), document["uncertainty"]])

    def text(document: dict) -> dict:
        labels = [p["label"] for p in document["pathologies"]]
        return {**document, "pathologies": labels, "uncertainty": None}

    assert text(got) == text(expected)
    np.testing.assert_allclose(numeric(got), numeric(expected), rtol=0, atol=1e-6)


def test_an_image_in_a_batch_of_eight_gets_the_answer_it_gets_alone(
    batching, recorded, one_by_one, eight_images
):
    recorded.batches.clear()
    batched = [answer(r) for r in post_all(batching, eight_images, params={"image": "true"})]
    assert len(recorded.batches) == 1  # one model call for the 8 concurrent requests
    assert sorted(recorded.batches[0]) == sorted(name for name, _ in eight_images)

    url, _ = one_by_one
    for (name, data), in_batch in zip(eight_images, batched, strict=True):
        alone = answer(
            httpx.post(f"{url}/predict?image=true", files={"file": (name, data)}, timeout=120)
        )
        assert in_batch["source"] == name
        assert_same_answer(in_batch, alone)
    assert max(p["std"] for p in batched[0]["pathologies"]) > 1e-3  # the masks matter


def test_max_batch_1_calls_the_model_once_per_request_however_many_wait(one_by_one, eight_images):
    url, recorder = one_by_one
    recorder.batches.clear()
    recorder.gate.clear()  # the first request holds the model while the others line up
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(post_all, url, eight_images[:4])
        try:
            for _ in range(600):  # until all four are held (at most 30 s)
                lined_up = httpx.get(f"{url}/health", timeout=10).json()["queue"]["held"] == 4
                if lined_up:
                    break
                time.sleep(0.05)
        finally:
            recorder.gate.set()  # before the pool's exit, which waits for the requests
        responses = pending.result()
    assert lined_up
    assert [r.status_code for r in responses] == [200] * 4
    assert sorted(recorder.batches) == sorted([name] for name, _ in eight_images[:4])


def test_a_failing_image_in_a_batch_fails_only_its_own_request(
    batching, recorded, one_by_one, eight_images
):
    recorded.batches.clear()
    images = [*eight_images[:7], ("poison.png", eight_images[7][1])]
    responses = post_all(batching, images)
    assert len(recorded.batches[0]) == 8  # they were batched, and the batch failed
    assert sorted(len(batch) for batch in recorded.batches[1:]) == [1] * 8  # then one by one
    poisoned = responses.pop()
    assert poisoned.status_code == 422
    assert poisoned.json()["detail"] == "poison.png: this image cannot be predicted"
    url, _ = one_by_one
    for (name, data), response in zip(images, responses, strict=False):
        alone = httpx.post(f"{url}/predict", files={"file": (name, data)}, timeout=120)
        assert answer(response) == answer(alone)  # both predicted alone: to the last bit


def test_cli_serve_prints_its_url_and_serves_the_run_under_the_token_of_its_file(
    mc_dropout_run, tmp_path_factory
):
    where = tmp_path_factory.mktemp("serve_cwd")
    token_file = tmp_path_factory.mktemp("secrets") / "token"
    token_file.write_text(f"{TOKEN}\n")
    with socket.socket() as probe:  # a free port for the subprocess (closed again below)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "cxrfusion.cli", "serve", "--run", str(mc_dropout_run)]
    command += ["--port", str(port), "--mc-samples", "4", "--token-file", str(token_file)]
    environment = {k: v for k, v in os.environ.items() if k != "CXRFUSION_TOKEN"}
    process = subprocess.Popen(
        command,
        cwd=where,
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(600):  # up to 60 s to import torch and load the run
            if process.poll() is not None:
                break
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        assert httpx.get(f"{url}/health", timeout=5).json()["auth"] is True
        assert httpx.get(f"{url}/model", timeout=5).status_code == 401
        card = httpx.get(f"{url}/model", headers=AUTH, timeout=5).json()
        assert card["labels"] == list(LABELS)
    finally:
        process.terminate()
        output = process.communicate(timeout=30)[0]
    assert f"at {url}/" in output
    assert "warning" not in output
    assert list(where.iterdir()) == []  # the server wrote nothing where it ran


def test_cli_serve_warns_that_a_token_on_the_command_line_shows_in_the_process_list(
    mc_dropout_run,
):
    command = [sys.executable, "-m", "cxrfusion.cli", "serve", "--run", str(mc_dropout_run)]
    command += ["--token", TOKEN, "--queue", "0"]  # the bad queue stops it before serving
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    warning, error = result.stderr.strip().splitlines()
    assert warning.startswith("cxrfusion serve: warning: --token is visible to other users")
    assert "$CXRFUSION_TOKEN" in warning and "--token-file" in warning
    assert error.startswith("cxrfusion serve: error: queue size")


def test_cli_serve_refuses_a_bad_option_in_one_line(mc_dropout_run):
    command = [sys.executable, "-m", "cxrfusion.cli", "serve", "--run", str(mc_dropout_run)]
    result = subprocess.run(command + ["--queue", "0"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        == "cxrfusion serve: error: queue size (--queue) must be at least 1, got 0"
    )
