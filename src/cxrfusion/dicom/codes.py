"""Every coded concept the DICOM results use, in one table (listed in docs/dicom.md).

DCM, SCT and UCUM codes where DICOM or SNOMED CT has the concept; the private scheme
`PRIVATE_SCHEME` where neither does (the review flag, the referral, the uncertainty score, pleural
thickening as NIH labels it).
"""

from __future__ import annotations

from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

PRIVATE_SCHEME = "99CXRF"


def _private(value: str, meaning: str) -> Code:
    return Code(value, PRIVATE_SCHEME, meaning)


# The 14 ChestX-ray14 labels as findings (finding type of each measurement group).
PATHOLOGY_CODES: dict[str, Code] = {
    "Atelectasis": Code("46621007", "SCT", "Atelectasis"),
    "Cardiomegaly": codes.SCT.Cardiomegaly,
    "Consolidation": Code("95436008", "SCT", "Lung consolidation"),
    "Edema": Code("19242006", "SCT", "Pulmonary edema"),
    "Effusion": codes.SCT.PleuralEffusion,
    "Emphysema": Code("87433001", "SCT", "Pulmonary emphysema"),
    "Fibrosis": Code("51615001", "SCT", "Fibrosis of lung"),
    "Hernia": Code("84089009", "SCT", "Hiatal hernia"),
    "Infiltration": Code("112121", "DCM", "Infiltrate"),
    "Mass": codes.SCT.Mass,
    "Nodule": codes.SCT.Nodule,
    "Pleural_Thickening": _private("CXRF014", "Pleural thickening"),
    "Pneumonia": Code("233604007", "SCT", "Pneumonia"),
    "Pneumothorax": codes.SCT.Pneumothorax,
}

REPORT_TITLE = codes.DCM.ImagingMeasurementReport
PROCEDURE = Code("399208008", "SCT", "Plain chest X-ray")
DEVICE = codes.DCM.Device
PROBABILITY = codes.DCM.Probability
MEAN = codes.SCT.Mean
STANDARD_DEVIATION = codes.DCM.StandardDeviation
THRESHOLD = codes.DCM.ThresholdValue
UNITY = codes.UCUM.NoUnits
PRESENT = codes.SCT.Present
ABSENT = codes.SCT.Absent
YES = codes.SCT.Yes
NO = codes.SCT.No

# Private concepts: what the model decides, and its whole-image uncertainty.
DECISION = _private("CXRF001", "Finding at the operating point")
IMAGE_FINDING = _private("CXRF002", "Whole-image model output")
UNCERTAINTY = _private("CXRF003", "MC-dropout uncertainty score (mean of the 14 stds)")
REVIEW_FLAG = _private("CXRF004", "Flagged for human review")
REFERRED = _private("CXRF005", "Referred under the conformal guarantee")
