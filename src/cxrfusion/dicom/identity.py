"""Who made a result: the model's identity, as the SR's device observer and algorithm record it."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from pydicom.uid import generate_uid

from cxrfusion.errors import CxrError

MANUFACTURER = "cxrfusion"
# pydicom's root for generated UIDs: usable by anyone, so set your organisation's with --uid-root.
DEFAULT_UID_ROOT = "1.2.826.0.1.3680043.8.498."
MAX_ROOT_CHARS = 40  # a UID is at most 64 characters; the rest holds the generated part
_ROOT = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*\.$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def check_uid_root(root: str) -> str:
    """`root` if it is a valid UID prefix (digits and dots, ending with a dot), else CxrError."""
    if not _ROOT.match(root) or len(root) > MAX_ROOT_CHARS:
        raise CxrError(
            f"--uid-root {root!r}: expected a UID prefix such as 1.2.840.99999. (digits and dots, "
            f"no leading zeros, ending with a dot, at most {MAX_ROOT_CHARS} characters)"
        )
    return root


@dataclass(frozen=True, kw_only=True)
class ModelIdentity:
    """The model behind a result.

    Attributes:
        run: the run's id (its folder's name).
        architecture: the registry name of the model (the device's model name).
        sha256: SHA-256 of the weights: the checkpoint, or the export's graphs.
        uid_root: the UID prefix of everything we write.
        manufacturer: what our outputs' Manufacturer says (and how we recognise them).
    """

    run: str
    architecture: str
    sha256: str
    uid_root: str = DEFAULT_UID_ROOT
    manufacturer: str = MANUFACTURER

    def __post_init__(self) -> None:
        if not _SHA256.match(self.sha256):
            raise ValueError(f"sha256 must be 64 lower-case hex digits, got {self.sha256!r}")
        if not self.run or not self.architecture:
            raise ValueError("run and architecture must not be empty")
        check_uid_root(self.uid_root)

    @property
    def version(self) -> str:
        """The run's id and the first 16 hex digits of the weights' hash."""
        return f"{self.run} sha256:{self.sha256[:16]}"

    @property
    def device_uid(self) -> str:
        """The device observer's UID: one per set of weights."""
        return generate_uid(self.uid_root, ["device", self.sha256])


def identify(
    run: Path, engine: str, architecture: str, uid_root: str | None = None
) -> ModelIdentity:
    """The identity of what `Classifier.load(run, engine)` loaded: the run's folder name (an
    export folder is named after its run), the architecture, and the weights' hash."""
    folder = Path(run).resolve()
    name = folder.parent.name if folder.name == "export" or folder.is_file() else folder.name
    return ModelIdentity(
        run=name,
        architecture=architecture,
        sha256=weights_sha256(folder, engine),
        uid_root=uid_root or DEFAULT_UID_ROOT,
    )


def weights_sha256(run: Path, engine: str) -> str:
    """SHA-256 of what an engine loads from `run`: best.ckpt (torch), or the export's
    model.json and the features and head graphs it names, in that order (onnx)."""
    run = Path(run)
    if engine == "onnx":
        folder = run if (run / "model.json").is_file() else run / "export"
        try:
            graphs = json.loads((folder / "model.json").read_text())["files"]
        except (OSError, ValueError, KeyError) as error:
            raise CxrError(f"{folder / 'model.json'}: no graph files named ({error})") from None
        files = [folder / "model.json", folder / graphs["features"], folder / graphs["head"]]
    else:
        files = [run / "best.ckpt" if run.is_dir() else run]
    digest = hashlib.sha256()
    for path in files:
        try:
            with path.open("rb") as handle:
                while block := handle.read(2**20):
                    digest.update(block)
        except OSError as error:
            raise CxrError(f"{path}: cannot hash the model ({error.strerror})") from None
    return digest.hexdigest()
