"""Input selection: which DICOM instances to read, as data (rules.yaml) checked on load, and one pure
`evaluate(rules, header)` that says accept or reject, with every reason and warning."""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import yaml
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from cxrfusion.dicom.identity import ModelIdentity
from cxrfusion.errors import CxrError

MISSING = ("reject", "warn", "accept")
_TESTS = ("in", "regex")
_OUR_CLASSES = frozenset(
    {"1.2.840.10008.5.1.4.1.1.88.34", "1.2.840.10008.5.1.4.1.1.7"}  # Comprehensive 3D SR, SC
)


@dataclass(frozen=True)
class Check:
    """One attribute's test: its value in `allowed`, or matching `pattern` in full."""

    attribute: str
    allowed: frozenset[str] | None = None
    pattern: re.Pattern[str] | None = None
    missing: str = "reject"

    def verdict(self, header: Dataset) -> tuple[str, str] | None:
        """None when the header passes, else (reject|warn, the reason)."""
        value = _text(header.get(self.attribute))
        if not value:
            if self.missing == "accept":
                return None
            return self.missing, f"{self.attribute} missing"
        if self.allowed is not None and value not in self.allowed:
            return "reject", f"{self.attribute} {value} not in {', '.join(sorted(self.allowed))}"
        if self.pattern is not None and not self.pattern.fullmatch(value):
            return "reject", f"{self.attribute} {value} does not match {self.pattern.pattern}"
        return None


@dataclass(frozen=True)
class Rules:
    """The checks of a rules file, and where it came from."""

    checks: tuple[Check, ...]
    origin: str


@dataclass(frozen=True)
class Decision:
    """What `evaluate` says about one header."""

    accepted: bool
    reasons: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()

    @property
    def reason(self) -> str:
        """The rejection reasons on one line ("" when accepted)."""
        return "; ".join(self.reasons)


def default_rules_path() -> Path:
    """The rules file shipped with the package."""
    return Path(str(resources.files("cxrfusion.dicom") / "rules.yaml"))


def load_rules(path: Path | None = None) -> Rules:
    """Read and check a rules file (default: the shipped one).

    Raises:
        CxrError: unreadable YAML, an unknown key or keyword, a bad regex or `missing` value;
            the message names the file and the check.
    """
    path = Path(path) if path is not None else default_rules_path()
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise CxrError(f"{path}: not a readable rules file ({error})") from None
    if (
        not isinstance(data, dict)
        or set(data) != {"checks"}
        or not isinstance(data["checks"], list)
    ):
        raise CxrError(f"{path}: a rules file holds one key, `checks`, a list")
    return Rules(tuple(_check(path, i, item) for i, item in enumerate(data["checks"])), str(path))


def _check(path: Path, index: int, item: object) -> Check:
    where = f"{path}: check {index + 1}"
    if not isinstance(item, dict):
        raise CxrError(f"{where}: expected a mapping with `attribute`")
    unknown = set(item) - {"attribute", "missing", *_TESTS}
    if unknown:
        raise CxrError(f"{where}: unknown key(s) {', '.join(sorted(map(str, unknown)))}")
    attribute = item.get("attribute")
    if not isinstance(attribute, str) or tag_for_keyword(attribute) is None:
        raise CxrError(f"{where}: attribute {attribute!r} is not a DICOM keyword")
    missing = item.get("missing", "reject")
    if missing not in MISSING:
        raise CxrError(f"{where}: missing must be one of {', '.join(MISSING)}, got {missing!r}")
    tests = [key for key in _TESTS if key in item]
    if len(tests) != 1:
        raise CxrError(f"{where} ({attribute}): give exactly one of {', '.join(_TESTS)}")
    if tests[0] == "in":
        values = item["in"]
        if not isinstance(values, list) or not values:
            raise CxrError(f"{where} ({attribute}): `in` must be a non-empty list")
        return Check(attribute, allowed=frozenset(str(v).strip() for v in values), missing=missing)
    try:
        pattern = re.compile(str(item["regex"]))
    except re.error as error:
        raise CxrError(f"{where} ({attribute}): bad regex ({error})") from None
    return Check(attribute, pattern=pattern, missing=missing)


def evaluate(rules: Rules, header: Dataset, model: ModelIdentity | None = None) -> Decision:
    """Accept or reject one instance from its header, with every reason.

    Args:
        rules: the checks (`load_rules`).
        header: the instance's dataset (pixels not needed).
        model: when given, our own outputs (its manufacturer, or an SR/SC under its UID root)
            are rejected whatever the checks say.
    """
    reasons, warnings = [], []
    if model is not None and (own := own_output(header, model)):
        reasons.append(own)
    for check in rules.checks:
        verdict = check.verdict(header)
        if verdict is not None:
            (reasons if verdict[0] == "reject" else warnings).append(verdict[1])
    return Decision(not reasons, tuple(reasons), tuple(warnings))


def own_output(header: Dataset, model: ModelIdentity) -> str:
    """Why `header` is one of our outputs, or "" if it is not."""
    if _text(header.get("Manufacturer")) == model.manufacturer:
        return f"our own output (Manufacturer {model.manufacturer})"
    uid = _text(header.get("SOPInstanceUID"))
    if _text(header.get("SOPClassUID")) in _OUR_CLASSES and uid.startswith(model.uid_root):
        return f"our own output (SR/SC under the UID root {model.uid_root})"
    return ""


def _text(value: object) -> str:
    """An element's value as text: multi-values joined with a backslash, as DICOM writes them."""
    if value is None:
        return ""
    if isinstance(value, MultiValue | list | tuple):
        return "\\".join(str(v).strip() for v in value)
    return str(value).strip()
