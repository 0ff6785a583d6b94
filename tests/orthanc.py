"""A real Orthanc with its DICOMweb plugin on 127.0.0.1 for the PACS tests, started and stopped by
PID. Debian's `orthanc` and `orthanc-dicomweb` packages (.ci/run installs them): where apt-get
exists but Orthanc does not, the tests fail rather than skip."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from dicomweb_client.api import DICOMwebClient

PLUGIN_DIRS = (Path("/usr/share/orthanc/plugins"), Path("/usr/lib/orthanc"))
USER, PASSWORD = "cxr", "test-secret"


@dataclass(frozen=True)
class Orthanc:
    url: str  # REST root
    dicom_port: int
    aet: str = "ORTHANC"

    @property
    def dicomweb(self) -> str:
        return f"{self.url}/dicom-web"

    def get(self, path: str) -> requests.Response:
        response = requests.get(f"{self.url}{path}", auth=(USER, PASSWORD), timeout=30)
        response.raise_for_status()
        return response

    def post(self, path: str, body: dict) -> requests.Response:
        response = requests.post(f"{self.url}{path}", json=body, auth=(USER, PASSWORD), timeout=120)
        response.raise_for_status()
        return response

    def store_to(self, modality: str, ids: list[str]) -> None:
        """C-STORE instances (Orthanc ids) to a configured modality; returns once sent."""
        self.post(f"/modalities/{modality}/store", {"Resources": ids, "Synchronous": True})

    def client(self) -> DICOMwebClient:
        """A DICOMweb client with the test user."""
        client = DICOMwebClient(self.dicomweb)
        client._session.auth = (USER, PASSWORD)
        return client

    def upload(self, data: bytes) -> str:
        response = requests.post(
            f"{self.url}/instances", data=data, auth=(USER, PASSWORD), timeout=30
        )
        response.raise_for_status()
        return response.json()["ID"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def orthanc_binary() -> str:
    binary = shutil.which("Orthanc") or shutil.which("Orthanc", path="/usr/sbin")
    if binary is None:
        if shutil.which("apt-get") is None:
            pytest.skip("Orthanc is not installed and no package manager is here to install it")
        pytest.fail("Orthanc is not installed: apt-get install orthanc orthanc-dicomweb")
    return binary


def dicomweb_plugin() -> Path:
    for folder in PLUGIN_DIRS:
        if (folder / "libOrthancDicomWeb.so").exists():
            return folder / "libOrthancDicomWeb.so"
    pytest.fail("the DICOMweb plugin is not installed: apt-get install orthanc-dicomweb")


@contextmanager
def running_orthanc(folder: Path, modalities: dict | None = None) -> Iterator[Orthanc]:
    """Orthanc on free loopback ports, storing into `folder`, with a test user."""
    http, dicom = free_port(), free_port()
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "Name": "cxrfusion-test",
        "HttpPort": http,
        "DicomPort": dicom,
        "DicomAet": "ORTHANC",
        "StorageDirectory": str(folder / "storage"),
        "IndexDirectory": str(folder / "storage"),
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": True,
        "RegisteredUsers": {USER: PASSWORD},
        "Plugins": [str(dicomweb_plugin())],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        "DicomModalities": modalities or {},
        "DicomAlwaysAllowStore": True,
        "DicomCheckCalledAet": False,
    }
    (folder / "config.json").write_text(json.dumps(config))
    log = (folder / "orthanc.log").open("w")
    process = subprocess.Popen(
        [orthanc_binary(), str(folder / "config.json")], stdout=log, stderr=subprocess.STDOUT
    )
    server = Orthanc(f"http://127.0.0.1:{http}", dicom)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                server.get("/system")
                break
            except requests.RequestException:
                if process.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(
                        f"Orthanc did not start: {(folder / 'orthanc.log').read_text()[-2000:]}"
                    )
                time.sleep(0.2)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def study_modalities(client: DICOMwebClient, study_uid: str) -> list[str]:
    """The sorted modalities of a study's instances (QIDO-RS)."""
    found = client.search_for_instances(study_instance_uid=study_uid, fields=["00080060"])
    return sorted(item["00080060"]["Value"][0] for item in found)


def sr_probabilities(client: DICOMwebClient, study_uid: str) -> tuple[object, dict[str, float]]:
    """The study's one SR, read by highdicom, and its mean probability per tracking identifier
    (the pathology groups, in order)."""
    import highdicom as hd

    from cxrfusion.dicom import codes

    [item] = client.search_for_instances(study_uid, search_filters={"Modality": "SR"})
    series, sop = item["0020000E"]["Value"][0], item["00080018"]["Value"][0]
    sr = hd.sr.Comprehensive3DSR.from_dataset(client.retrieve_instance(study_uid, series, sop))
    means = {}
    for group in sr.content.get_image_measurement_groups()[:-1]:  # the last: the whole image
        [mean] = [
            m for m in group.get_measurements(codes.PROBABILITY) if m.derivation == codes.MEAN
        ]
        means[group.tracking_identifier] = mean.value
    return sr, means
