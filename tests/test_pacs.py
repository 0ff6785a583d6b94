"""`cxrfusion pacs poll` against a real Orthanc (Debian's orthanc + orthanc-dicomweb on 127.0.0.1):
frontal radiographs get one SR and one capture each in their study, decoys nothing, and a second
poll writes nothing."""

from __future__ import annotations

import json

import numpy as np
import pytest
from dicoms import dicom_bytes, pacs_sources
from orthanc import PASSWORD, USER, running_orthanc, sr_probabilities, study_modalities

from cxrfusion import Classifier
from cxrfusion.cli import main


@pytest.fixture(scope="module")
def pacs(mc_dropout_run, nih_sample, tmp_path_factory):
    """Orthanc holding two frontal DX radiographs and three decoys, polled once."""
    folder = tmp_path_factory.mktemp("pacs")
    with running_orthanc(folder) as server:
        sources = pacs_sources(nih_sample / "images")
        ids = {key: server.upload(dicom_bytes(ds)) for key, ds in sources.items()}
        before = {key: server.get(f"/instances/{i}/file").content for key, i in ids.items()}
        files = {}
        for key, ds in sources.items():
            files[key] = folder / f"{key}.dcm"
            files[key].write_bytes(dicom_bytes(ds))
        state = folder / "state.sqlite"
        args = ["pacs", "poll", "--run", str(mc_dropout_run), "--dicomweb", server.dicomweb]
        args += ["--user", USER, "--password", PASSWORD, "--once", "--state", str(state)]
        first = main(args)
        yield {
            "server": server,
            "client": server.client(),
            "sources": sources,
            "ids": ids,
            "before": before,
            "files": files,
            "state": state,
            "args": args,
            "first": first,
            "run": mc_dropout_run,
        }


def _modalities(pacs, key) -> list[str]:
    return study_modalities(pacs["client"], pacs["sources"][key].StudyInstanceUID)


def test_each_frontal_radiograph_gets_one_sr_and_one_capture_in_its_study(pacs) -> None:
    assert pacs["first"] == 0
    for key in ("frontal0", "frontal1"):
        assert _modalities(pacs, key) == ["DX", "OT", "SR"]


def test_decoys_get_nothing_and_are_recorded_as_skipped_with_their_reason(pacs) -> None:
    for key, modality in (("lateral", "DX"), ("ct", "CT"), ("sr", "SR")):
        assert _modalities(pacs, key) == [modality]
    from cxrfusion.dicom.state import State

    rows = {row["sop_instance_uid"]: row for row in State(pacs["state"]).rows()}
    reasons = {key: rows[pacs["sources"][key].SOPInstanceUID] for key in ("lateral", "ct", "sr")}
    assert all(row["status"] == "skipped" for row in reasons.values())
    assert "ViewPosition LL" in reasons["lateral"]["reason"]
    assert "Modality CT" in reasons["ct"]["reason"]
    assert "Modality SR" in reasons["sr"]["reason"]
    done = [rows[pacs["sources"][k].SOPInstanceUID]["status"] for k in ("frontal0", "frontal1")]
    assert done == ["processed", "processed"]


def test_the_sr_is_tid_1500_with_the_probabilities_predict_gives(pacs) -> None:
    classifier = Classifier.load(pacs["run"])
    for key in ("frontal0", "frontal1"):
        expected = classifier.predict(pacs["files"][key])
        uid = pacs["sources"][key].StudyInstanceUID
        sr, means = sr_probabilities(pacs["client"], uid)
        assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
        assert sr.VerificationFlag == "UNVERIFIED"
        assert list(means) == list(classifier.labels)
        assert np.abs(np.array(list(means.values())) - expected.probability).max() < 1e-6


def test_a_second_poll_writes_nothing_and_sources_are_unchanged(pacs, capsys) -> None:
    server = pacs["server"]
    count = len(server.get("/instances").json())
    assert main(pacs["args"]) == 0
    assert "nothing new" in capsys.readouterr().out
    assert len(server.get("/instances").json()) == count == 9
    for key, orthanc_id in pacs["ids"].items():
        assert server.get(f"/instances/{orthanc_id}/file").content == pacs["before"][key]


def test_the_audit_log_has_one_line_per_instance_and_no_patient_names(pacs) -> None:
    lines = pacs["state"].with_suffix(".audit.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert len(records) == 5
    assert {r["status"] for r in records} == {"processed", "skipped"}
    processed = [r for r in records if r["status"] == "processed"]
    assert all(len(r["outputs"]) == 2 and r["model"]["sha256"] for r in processed)
    text = "\n".join(lines)
    assert "Test^" not in text and "P0" not in text.replace("PA", "")


def test_wrong_credentials_give_one_line_and_exit_2(pacs, tmp_path, capsys) -> None:
    args = list(pacs["args"])
    args[args.index(PASSWORD)] = "wrong"
    args[args.index(str(pacs["state"]))] = str(tmp_path / "state.sqlite")
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "401" in err
