"""The operator's view, in a real browser: headless Chromium (Debian package) driven by Playwright through the
Prefect UI our Prefect server serves. A study goes through the deployed pipeline (C-STORE, watcher, study run,
HL7); the operator finds its run by name, opens its report artifact (patient fields masked), looks at the
deployments, and reruns the study from the deployment's Run form with its Study Instance UID and "resend HL7".
Screenshots land in tests/output/ui/ (failure.png shows where a failing run got stuck)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest

from stack.synthetic import write_ct_series
from tests.integration.deployed import (
    cursor_exists,
    deployment_runs,
    make_stack,
    start_watcher,
    storescu,
    study_runs,
    wait_for,
)
from tests.integration.partner import Partner

pytestmark = pytest.mark.integration

OUT = Path(__file__).resolve().parents[1] / "output" / "ui"
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
                  "--disable-background-networking", "--disable-component-update"]  # fmt: skip


@dataclass
class ProcessedStudy:
    uid: str
    accession: str
    patient_name: str
    partner: Partner


@contextmanager
def study_through_pipeline(orthanc, tmp_path, accession: str, worker: str, accept: bool = True):
    """A study of 2 slices sent by C-STORE and taken through the deployed watcher and study flow (the HL7
    partner answering AA, or refusing when not ``accept``), yielded once its study run ended, before any browser
    opens (Prefect's sync calls must not run inside Playwright's event loop). The worker runs until the end."""
    _cfg, partner, start_worker = make_stack(orthanc, tmp_path)
    partner.accept = accept
    running = start_worker(worker)
    try:
        files = write_ct_series(tmp_path / accession, 2, accession=accession)
        ds = pydicom.dcmread(files[0])
        start_watcher()
        wait_for(cursor_exists, 90, "the watcher to start following the change log")
        storescu(orthanc, files)
        wait_for(lambda: any(r.state.is_final() for r in study_runs()), 120, "the study run to end")
        yield ProcessedStudy(ds.StudyInstanceUID, accession, str(ds.PatientName), partner)
    finally:
        running.stop()
        partner.stop()


@pytest.fixture
def processed_study(prefect_server, orthanc, tmp_path) -> Iterator[ProcessedStudy]:
    """A study whose run completed and notified the partner once."""
    with study_through_pipeline(orthanc, tmp_path, "UI-0001", "w-ui") as study:
        assert [r.state.type.value for r in study_runs()] == ["COMPLETED"]
        assert len(study.partner.received) == 1
        yield study


@pytest.fixture
def page(request):
    from playwright.sync_api import sync_playwright

    exe = shutil.which("chromium") or "/usr/bin/chromium"
    assert Path(exe).exists(), "chromium is missing: scripts/setup installs the Debian package"
    OUT.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(30_000)
        try:
            yield page
            call = getattr(request.node, "report_call", None)
            if call is not None and call.failed:  # where the operator would have been stuck
                page.screenshot(path=str(OUT / "failure.png"), full_page=True)
        finally:
            browser.close()


def open_run(page, ui: str, name: str) -> None:
    """What an operator does: Runs, search by name, open the run; the list is reloaded once if it does not
    show the run yet (as the operator would press reload)."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    page.goto(f"{ui}/runs")
    for attempt in (1, 2):
        page.get_by_role("searchbox", name="Search by flow run name").fill(name)
        link = page.get_by_role("link", name=name, exact=True).first
        try:
            link.click(timeout=20_000 if attempt == 1 else 30_000)
            break
        except PlaywrightTimeout:
            if attempt == 2:
                raise
            page.reload()
    page.wait_for_url("**/flow-run/**")


def test_operator_finds_a_study_run_sees_its_report_and_reruns_it_from_the_run_form(
    prefect_server, processed_study: ProcessedStudy, page
):
    from playwright.sync_api import expect

    ui = prefect_server.api_url.removesuffix("/api")
    study, run_name = processed_study, f"study-{processed_study.accession}"

    print("study runs:", [(r.name, r.state.type.value) for r in study_runs()])  # shown if the test fails

    # 1. find the study's run by its name (the accession number) and open its report
    open_run(page, ui, run_name)
    expect(page.get_by_text("Completed").first).to_be_visible()
    page.get_by_text("Artifacts", exact=True).click()
    expect(page.get_by_text(f"Report of {run_name}")).to_be_visible()
    expect(page.get_by_text("HL7 message", exact=False).first).to_be_visible()
    page.screenshot(path=str(OUT / "study-run.png"))
    page.get_by_text(f"Report of {run_name}").click()
    table = page.get_by_role("table")
    expect(table.get_by_role("row").filter(has_text="study_instance_uid")).to_contain_text(study.uid)
    # every UI user can read artifacts: the patient's name is masked there by default
    expect(table.get_by_role("row").filter(has_text="patient_name")).to_contain_text("(hidden)")
    assert study.patient_name not in page.content()
    page.screenshot(path=str(OUT / "study-report.png"))

    # 2. the deployments an operator sees
    page.goto(f"{ui}/deployments")
    expect(page.get_by_role("link", name="study-notify").first).to_be_visible()
    expect(page.get_by_role("link", name="watch-orthanc").first).to_be_visible()
    page.screenshot(path=str(OUT / "deployments.png"))

    # 3. rerun the study from the deployment's Run form, with its Study Instance UID and "resend HL7"
    page.get_by_role("link", name="study-notify").first.click()
    page.wait_for_url("**/deployment/**")
    page.get_by_role("button", name="Run", exact=True).click()
    page.get_by_text("Custom run").click()
    page.wait_for_url("**/run?**")
    page.get_by_role("textbox").nth(1).fill(study.uid)  # the first is the run name, then the study
    # the switches have no accessible name: take the one in resend_hl7's block of the form
    resend = page.locator(".schema-form-property").filter(has_text="resend_hl7").get_by_role("switch")
    resend.click()
    expect(resend).to_be_checked()
    page.wait_for_timeout(500)  # the switch animates: let the screenshot show it on
    page.screenshot(path=str(OUT / "run-form.png"), full_page=True)
    page.get_by_role("button", name="Submit").click()
    page.wait_for_url("**/deployments/deployment/**")  # back on the deployment, the new run is listed there
    wait_for(lambda: len(study.partner.received) >= 2, 120, "the rerun's HL7 message")
    wait_for(lambda: sum(r.state.is_completed() for r in study_runs()) >= 2, 60, "the rerun to complete")

    # 4. the rerun is found the same way, by what the operator typed, and it completed
    open_run(page, ui, f"study-{study.uid}")
    page.get_by_text("Parameters", exact=True).click()  # a tab only the run page has
    expect(page.get_by_text("resend_hl7").first).to_be_visible()
    expect(page.get_by_text("Completed").first).to_be_visible()
    page.screenshot(path=str(OUT / "rerun.png"))

    rerun = next(r for r in study_runs() if r.name == f"study-{study.uid}")
    assert rerun.parameters["study"] == study.uid and rerun.parameters["resend_hl7"] is True
    assert len(study.partner.received) == 2  # the original notification and the resend, nothing else
    assert all(r.state.is_completed() for r in study_runs())
    # run history per study: the tag filter finds the watcher's run and the operator's rerun alike
    assert all(f"study-uid:{study.uid}" in r.tags for r in study_runs())
    assert deployment_runs("watch-orthanc"), "the watcher ran as a deployment"


@pytest.fixture
def failed_study(prefect_server, orthanc, tmp_path) -> Iterator[ProcessedStudy]:
    """A study whose run failed because the HL7 partner refused it (it closes the connection without an ACK).
    The partner accepts again once the fixture returns."""
    with study_through_pipeline(orthanc, tmp_path, "UI-RETRY", "w-retry", accept=False) as study:
        assert [r.state.type.value for r in study_runs()] == ["FAILED"]
        study.partner.accept = True
        yield study


def test_retry_of_a_failed_study_run_in_the_ui_delivers_the_kept_message_once(
    prefect_server, failed_study: ProcessedStudy, page
):
    from playwright.sync_api import expect

    ui = prefect_server.api_url.removesuffix("/api")
    study, run_name = failed_study, f"study-{failed_study.accession}"
    refused = len(study.partner.raw)
    assert refused >= 1 and study.partner.received, "the partner saw the message and refused it"

    print("study runs:", [(r.name, r.state.type.value) for r in study_runs()])  # shown if the test fails
    open_run(page, ui, run_name)
    expect(page.get_by_text("Failed").first).to_be_visible()
    # the reason, in words an operator understands, and what a rerun will do
    expect(page.get_by_text("HL7 notification not delivered").first).to_be_visible()
    page.screenshot(path=str(OUT / "failed-run.png"), full_page=True)

    page.get_by_role("button", name="Retry").click()
    page.get_by_role("dialog").get_by_role("button", name="Retry").click()  # "Retry study-UI-RETRY?"
    wait_for(lambda: study_runs()[0].state.is_completed(), 120, "the retried run to complete")
    page.reload()
    expect(page.get_by_text("Completed").first).to_be_visible()
    page.screenshot(path=str(OUT / "retried-run.png"))

    runs = study_runs()
    assert len(runs) == 1 and runs[0].name == run_name, "Retry runs the same run again, no new run"
    assert len(study.partner.raw) == refused + 1, "delivered once after the retry, nothing else"
    assert study.partner.raw[-1] == study.partner.raw[0], "the kept message, byte for byte (same control id)"
