"""What the SR and the capture share: their UIDs, their creation time, their series' words."""

from __future__ import annotations

import datetime
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pydicom.valuerep import DA, DT, TM

from cxrfusion.dicom.identity import ModelIdentity

DISCLAIMER = "RESEARCH USE ONLY - not for diagnosis - UNVERIFIED model output"
SERIES_NOTE = "RESEARCH USE ONLY, not for diagnosis"  # fits a 64-character LO
SR_SERIES = 9901  # series numbers of our outputs, high so that they sort after the modality's
SC_SERIES = 9902
_CREATED = ("InstanceCreation", "Content", "Series")


@dataclass(frozen=True)
class ResultUids:
    """The new UIDs of one source's results: a new series for each, one instance in it."""

    sr_series: str
    sr_instance: str
    sc_series: str
    sc_instance: str


def result_uids(source_uid: str, model: ModelIdentity, settings: str) -> ResultUids:
    """UIDs derived from the source, the weights and the settings under the model's root: the
    same input always gives the same UIDs, so a retry resends the very objects it sent before
    and a PACS keeps one copy."""

    def uid(kind: str) -> str:
        return generate_uid(model.uid_root, [source_uid, model.sha256, settings, kind])

    return ResultUids(uid("sr-series"), uid("sr"), uid("sc-series"), uid("sc"))


def stamp(dataset: Dataset, created: datetime.datetime) -> Dataset:
    """Set every creation date and time highdicom took from the clock to `created`."""
    for prefix in _CREATED:
        setattr(dataset, f"{prefix}Date", DA(created.date()))
        setattr(dataset, f"{prefix}Time", TM(created.time()))
    for equipment in dataset.get("ContributingEquipmentSequence", []):  # highdicom names itself
        equipment.ContributionDateTime = DT(created)
    return dataset
