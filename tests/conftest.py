"""Fixtures that start the real servers (Orthanc, Samba, Prefect) on loopback, on free ports.

They use the project's own launchers (stack.services), stop every process by PID, and keep their state in
pytest's temporary folders.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from stack.services import OrthancServer, PrefectServer, SambaServer, free_port, prefect_env

CASES = Path(__file__).parent / "data" / "cases"

# Prefect reads its settings when it is first imported, and threads started by tests do not inherit a
# temporary settings context. So the test session's Prefect server gets its port and home now, before
# anything imports prefect; the prefect_server fixture starts it there.
_PREFECT_PORT = free_port()
_PREFECT_HOME = Path(tempfile.mkdtemp(prefix="owf-test-prefect-"))
os.environ.update(prefect_env(_PREFECT_HOME, _PREFECT_PORT))
os.environ.setdefault("OWF_TEST_SMB_PASSWORD", "unused: tests pass the password directly")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Keeps each phase's report on the test item, so fixtures can tell after ``yield`` whether the test failed
    (the browser fixture saves a screenshot of where the operator would have been stuck)."""
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"report_{report.when}", report)


@pytest.fixture(scope="session")
def cases() -> Path:
    return CASES


@pytest.fixture(scope="session")
def orthanc_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancServer]:
    server = OrthancServer(tmp_path_factory.mktemp("orthanc"), free_port(), free_port(), stable_age=2)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def orthanc(orthanc_server: OrthancServer) -> OrthancServer:
    """The session's Orthanc, emptied before the test."""
    for patient in httpx.get(orthanc_server.url + "/patients", timeout=10).json():
        httpx.delete(f"{orthanc_server.url}/patients/{patient}", timeout=30).raise_for_status()
    return orthanc_server


@pytest.fixture
def own_orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancServer]:
    """An Orthanc of the test's own, for tests that stop and restart it."""
    server = OrthancServer(tmp_path_factory.mktemp("orthanc"), free_port(), free_port(), stable_age=2)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def samba_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SambaServer]:
    server = SambaServer(tmp_path_factory.mktemp("samba"), free_port())
    server.start()
    yield server
    server.stop()


@pytest.fixture
def samba(samba_server: SambaServer) -> Iterator[SambaServer]:
    """The session's Samba server with an empty share folder."""
    for child in samba_server.share_dir.iterdir():
        shutil.rmtree(child) if child.is_dir() else child.unlink()
    yield samba_server


@pytest.fixture(scope="session")
def prefect_server() -> Iterator[PrefectServer]:
    """A real Prefect server (SQLite) for the whole session, at the address set above."""
    server = PrefectServer(_PREFECT_HOME, _PREFECT_PORT)
    server.start()
    yield server
    server.stop()
    shutil.rmtree(_PREFECT_HOME, ignore_errors=True)


def orthanc_instances(server: OrthancServer) -> list[str]:
    return httpx.get(server.url + "/instances", timeout=10).json()
