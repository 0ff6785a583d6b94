"""`cxrfusion pacs listen` against a real Orthanc, which knows the listener as a modality and
C-STOREs to it as a routing rule would: each frontal radiograph gets one SR and one capture back in
its study, decoys nothing, strangers are refused, and what a stopped listener left in its spool is
handled on the next start without sending anything twice.

The command runs in this process, as a user runs it (its Ctrl-C handler included): a driver
thread waits until it answers a C-ECHO, acts, waits for the outcome, then sends it SIGINT."""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Callable

import numpy as np
import pytest
import requests
from dicoms import chest_dx, dicom_bytes, pacs_sources
from orthanc import free_port, running_orthanc, sr_probabilities, study_modalities
from PIL import Image
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from cxrfusion import Classifier
from cxrfusion.cli import main
from cxrfusion.dicom.audit import AuditLog
from cxrfusion.dicom.dimse import Destination
from cxrfusion.dicom.identity import identify
from cxrfusion.dicom.listener import Listener, ListenSettings, Spool
from cxrfusion.dicom.pipeline import Intake, Processor, Transient
from cxrfusion.dicom.rules import load_rules
from cxrfusion.dicom.state import State
from cxrfusion.errors import CxrError

MODALITY = "cxrfusion"


def _wait(condition: Callable[[], bool], what: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up waiting for {what}")
        time.sleep(0.1)


def _echoes(server) -> bool:
    try:
        server.post(f"/modalities/{MODALITY}/echo", {})
        return True
    except requests.HTTPError:
        return False


def listen_while(args: list[str], server, act: Callable[[], object]) -> tuple[int, object]:
    """Run `cxrfusion ARGS` here; once it answers Orthanc's C-ECHO, `act()` runs in a driver
    thread, then Ctrl-C. The exit status and what `act` returned."""
    outcome: dict = {}
    main_thread = threading.get_ident()
    lock, finished = threading.Lock(), threading.Event()

    def drive() -> None:
        try:
            _wait(lambda: finished.is_set() or _echoes(server), "the listener", 180)
            if not finished.is_set():
                outcome["value"] = act()
        except BaseException as error:
            outcome["error"] = error
        finally:
            with lock:
                if not finished.is_set():
                    signal.pthread_kill(main_thread, signal.SIGINT)

    # A SIGINT landing after the command returned must not stop the test session.
    previous = signal.signal(signal.SIGINT, lambda *_: None)
    driver = threading.Thread(target=drive)
    driver.start()
    try:
        code = main(args)
    finally:
        with lock:
            finished.set()
        driver.join()
        signal.signal(signal.SIGINT, previous)
    if "error" in outcome:
        raise outcome["error"]
    return code, outcome.get("value")


def _spooled(folder) -> list:
    return sorted(folder.glob("*.dcm")) if folder.is_dir() else []


def _intruder_refused(port: int) -> bool:
    ae = AE(ae_title="INTRUDER")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="CXRFUSION")
    refused = assoc.is_rejected
    if assoc.is_established:
        assoc.release()
    return refused


@pytest.fixture(scope="module")
def listening(mc_dropout_run, nih_sample, tmp_path_factory):
    """Orthanc sends two frontal radiographs and three decoys to the listener; a stranger tries
    to connect; then, after a stop, a radiograph is left in the spool beside a copy of one
    already done, and the listener is started again while Orthanc sends it one of its SRs."""
    folder = tmp_path_factory.mktemp("listen")
    port = free_port()
    with running_orthanc(folder, {MODALITY: ["CXRFUSION", "127.0.0.1", port]}) as server:
        sources = pacs_sources(nih_sample / "images")
        ids = {key: server.upload(dicom_bytes(ds)) for key, ds in sources.items()}
        state, spool = folder / "state.sqlite", folder / "state.spool"
        args = ["pacs", "listen", "--run", str(mc_dropout_run), "--port", str(port)]
        args += ["--send-to", f"ORTHANC@127.0.0.1:{server.dicom_port}", "--state", str(state)]

        def first_run() -> bool:
            server.store_to(MODALITY, list(ids.values()))
            _wait(lambda: len(server.get("/instances").json()) == 9, "2 SRs and 2 captures")
            _wait(lambda: not _spooled(spool), "an empty spool")
            return _intruder_refused(port)

        first, intruder_refused = listen_while(args, server, first_run)

        # What a crash leaves: a radiograph received but not processed, and a resent one.
        pixels = np.asarray(Image.open(nih_sample / "images" / "00000001_000.png").convert("L"))
        late = chest_dx(pixels, patient="P5")
        server.upload(dicom_bytes(late))
        spool.mkdir(exist_ok=True)
        for ds in (late, sources["frontal0"]):
            (spool / f"{ds.SOPInstanceUID}.dcm").write_bytes(dicom_bytes(ds))
        client = server.client()
        own_sr = client.search_for_instances(
            sources["frontal1"].StudyInstanceUID, search_filters={"Modality": "SR"}
        )[0]["00080018"]["Value"][0]
        query = {"Level": "Instance", "Query": {"SOPInstanceUID": own_sr}}
        [own_sr_id] = server.post("/tools/find", query).json()

        def second_run() -> None:
            _wait(lambda: not _spooled(spool), "the spool left by the first run")
            server.store_to(MODALITY, [own_sr_id])  # a routing rule sending ours back
            _wait(lambda: not _spooled(spool), "our own SR to be dropped")

        second, _ = listen_while(args, server, second_run)
        yield {
            "server": server,
            "client": client,
            "sources": sources,
            "late": late,
            "state": state,
            "spool": spool,
            "first": first,
            "second": second,
            "intruder_refused": intruder_refused,
            "run": mc_dropout_run,
            "folder": folder,
        }


def test_each_frontal_radiograph_sent_gets_one_sr_and_one_capture_in_its_study(listening):
    assert listening["first"] == 0
    for key in ("frontal0", "frontal1"):
        uid = listening["sources"][key].StudyInstanceUID
        assert study_modalities(listening["client"], uid) == ["DX", "OT", "SR"]


def test_the_sr_carries_the_probabilities_predict_gives(listening, tmp_path):
    classifier = Classifier.load(listening["run"])
    for key in ("frontal0", "frontal1"):
        source = listening["sources"][key]
        (tmp_path / f"{key}.dcm").write_bytes(dicom_bytes(source))
        expected = classifier.predict(tmp_path / f"{key}.dcm")
        _, means = sr_probabilities(listening["client"], source.StudyInstanceUID)
        assert list(means) == list(classifier.labels)
        assert np.abs(np.array(list(means.values())) - expected.probability).max() < 1e-6


def test_decoys_get_nothing_and_are_recorded_as_skipped_with_their_reason(listening):
    sources = listening["sources"]
    for key, modality in (("lateral", "DX"), ("ct", "CT"), ("sr", "SR")):
        assert study_modalities(listening["client"], sources[key].StudyInstanceUID) == [modality]
    rows = {row["sop_instance_uid"]: row for row in State(listening["state"]).rows()}
    reasons = {key: rows[sources[key].SOPInstanceUID] for key in ("lateral", "ct", "sr")}
    assert all(row["status"] == "skipped" for row in reasons.values())
    assert "ViewPosition LL" in reasons["lateral"]["reason"]
    assert "Modality CT" in reasons["ct"]["reason"]
    assert "Modality SR" in reasons["sr"]["reason"]


def test_an_unknown_calling_ae_title_is_refused(listening):
    assert listening["intruder_refused"]


def test_a_file_left_in_the_spool_is_handled_on_the_next_start_and_nothing_twice(listening):
    assert listening["second"] == 0
    client, late = listening["client"], listening["late"]
    assert study_modalities(client, late.StudyInstanceUID) == ["DX", "OT", "SR"]
    # frontal0 came back through the spool and its SR through a routing rule: nothing new.
    frontal0 = listening["sources"]["frontal0"].StudyInstanceUID
    assert study_modalities(client, frontal0) == ["DX", "OT", "SR"]
    assert len(listening["server"].get("/instances").json()) == 9 + 3
    assert not listening["spool"].exists() or not any(listening["spool"].iterdir())


def test_the_audit_log_has_one_line_per_instance_handled(listening):
    lines = listening["state"].with_suffix(".audit.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    statuses = sorted(r["status"] for r in records)
    assert statuses == ["processed"] * 3 + ["skipped"] * 3
    processed = [r for r in records if r["status"] == "processed"]
    assert all(len(r["outputs"]) == 2 and r["timings"]["store_s"] > 0 for r in processed)
    assert "Test^" not in "\n".join(lines)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("ORTHANC@127.0.0.1:4242", ("ORTHANC", "127.0.0.1", 4242)),
        ("MAIN PACS@pacs.example.org:104", ("MAIN PACS", "pacs.example.org", 104)),
        ("STORE@[::1]:11112", ("STORE", "::1", 11112)),
    ],
)
def test_send_to_reads_aet_at_host_colon_port(text, expected):
    destination = Destination.parse(text)
    assert (destination.ae_title, destination.host, destination.port) == expected


@pytest.mark.parametrize(
    "text", ["127.0.0.1:4242", "PACS@host", "PACS@host:0", f"{'A' * 17}@host:104", "A\\B@h:104"]
)
def test_a_malformed_send_to_is_refused_with_its_form(text):
    with pytest.raises(CxrError, match="--send-to"):
        Destination.parse(text)


@pytest.fixture
def spooled(mc_dropout_run, nih_sample, tmp_path):
    """A listener's worker side (no server): its intake, settings and a radiograph."""
    classifier = Classifier.load(mc_dropout_run)
    model = identify(mc_dropout_run, "torch", classifier.spec.model)
    state = State(tmp_path / "state.sqlite")
    intake = Intake(Processor(classifier, model, load_rules()), state, AuditLog(None))
    settings = ListenSettings(
        destination=Destination.parse("PACS@127.0.0.1:104"), spool=tmp_path / "spool"
    )
    yield intake, settings, pacs_sources(nih_sample / "images")["frontal0"]
    state.close()


def test_results_not_sent_stay_in_the_spool_and_go_later_as_the_same_objects(spooled):
    intake, settings, source = spooled
    uid = source.SOPInstanceUID
    path = Spool(settings.spool).write(uid, dicom_bytes(source))

    def refuse(_):
        raise Transient("association rejected")

    assert Listener(settings, intake, sender=refuse).handle(path) == "retry"
    assert path.exists() and intake.state.status(uid) == "processing"
    sent = []
    assert Listener(settings, intake, sender=sent.append).handle(path) == "processed"
    assert not path.exists()
    [row] = [r for r in intake.state.rows() if r["sop_instance_uid"] == uid]
    assert json.loads(row["outputs"]) == [sent[0].sr.SOPInstanceUID, sent[0].sc.SOPInstanceUID]
    assert row["attempts"] == 1
    # The same instance received again is dropped, not sent twice.
    again = Spool(settings.spool).write(uid, dicom_bytes(source))
    assert Listener(settings, intake, sender=sent.append).handle(again) is None
    assert len(sent) == 1 and not again.exists()


def test_an_unreadable_file_fails_at_once_and_is_set_aside(spooled):
    intake, settings, _ = spooled
    path = Spool(settings.spool).write("1.2.3.4", b"not DICOM at all")
    assert Listener(settings, intake, sender=pytest.fail).handle(path) == "failed"
    assert not path.exists() and (settings.spool / "failed" / path.name).exists()
    assert "not a readable DICOM" in intake.state.rows()[0]["reason"]


def test_an_unexpected_error_fails_its_instance_and_the_worker_goes_on(spooled):
    """pynetdicom raises ValueError when the destination accepted none of our SOP classes."""
    intake, settings, source = spooled
    path = Spool(settings.spool).write(source.SOPInstanceUID, dicom_bytes(source))

    def no_context(_):
        raise ValueError("no presentation context for the SR")

    listener = Listener(settings, intake, sender=no_context)
    assert listener.handle(path) == "failed"
    assert not path.exists() and (settings.spool / "failed" / path.name).exists()
    assert "ValueError: no presentation context" in intake.state.rows()[0]["reason"]
    assert listener.progress.error is None
