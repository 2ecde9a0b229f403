"""A DICOM archive for tests that is not Orthanc: a pynetdicom Storage SCP on loopback that accepts only the
transfer syntaxes it is given (by default Implicit and Explicit VR Little Endian, as old archives do, C21)
and keeps every dataset it received, with the transfer syntax it arrived in."""

from __future__ import annotations

from dataclasses import dataclass, field

from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, AllStoragePresentationContexts, evt


@dataclass
class StorageScp:
    port: int
    aet: str = "LEGACY"
    transfer_syntaxes: tuple[str, ...] = (ImplicitVRLittleEndian, ExplicitVRLittleEndian)
    received: list[tuple[str, Dataset]] = field(default_factory=list)  # (transfer syntax, dataset)

    def _store(self, event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        self.received.append((str(event.context.transfer_syntax), ds))
        return 0x0000

    def start(self) -> StorageScp:
        ae = AE(ae_title=self.aet)
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax, list(self.transfer_syntaxes))
        ae.add_supported_context("1.2.840.10008.1.1")  # C-ECHO
        self._server = ae.start_server(("127.0.0.1", self.port), block=False,
                                       evt_handlers=[(evt.EVT_C_STORE, self._store)])  # fmt: skip
        return self

    def stop(self) -> None:
        self._server.shutdown()
