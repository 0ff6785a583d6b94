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
