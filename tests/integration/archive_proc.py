"""An archive as a process of its own, to be killed and restarted: a pynetdicom Storage SCP that writes a ledger.

    python -m tests.integration.archive_proc PORT LEDGER [AET]

Each line of LEDGER (JSON) is one association the archive saw through to a normal release, written only at
release: ``{"start": t0, "end": t1, "stored": [[study_uid, sop_uid], ...]}``. An association cut off by a kill
or an abort writes nothing: what it carried was not delivered, and the sender has to send it again. So the
ledger counts completed deliveries, and a duplicate in it is a real second delivery.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time

from pynetdicom import AE, AllStoragePresentationContexts, evt


def main(port: int, ledger: str, aet: str = "ARCHIVE") -> None:
    pending: dict[int, tuple[float, list[list[str]]]] = {}
    lock = threading.Lock()
    out = open(ledger, "a", buffering=1)  # noqa: SIM115 - for the life of the process

    def key(event) -> int:
        return id(event.assoc)

    def accepted(event) -> None:
        with lock:
            pending[key(event)] = (time.time(), [])

    def store(event) -> int:
        ds = event.dataset
        with lock:
            pending.setdefault(key(event), (time.time(), []))[1].append([str(ds.StudyInstanceUID),
                                                                        str(ds.SOPInstanceUID)])  # fmt: skip
        return 0x0000

    def released(event) -> None:
        with lock:
            start, stored = pending.pop(key(event), (time.time(), []))
            if stored:
                out.write(json.dumps({"start": start, "end": time.time(), "stored": stored}) + "\n")
                out.flush()
                os.fsync(out.fileno())

    def aborted(event) -> None:
        with lock:
            pending.pop(key(event), None)

    ae = AE(ae_title=aet)
    ae.maximum_associations = 32
    for context in AllStoragePresentationContexts:
        ae.add_supported_context(context.abstract_syntax)
    ae.add_supported_context("1.2.840.10008.1.1")  # C-ECHO
    handlers = [(evt.EVT_ACCEPTED, accepted), (evt.EVT_C_STORE, store), (evt.EVT_RELEASED, released),
                (evt.EVT_ABORTED, aborted)]  # fmt: skip
    print(f"archive {aet} listening on 127.0.0.1:{port}", flush=True)
    ae.start_server(("127.0.0.1", port), block=True, evt_handlers=handlers)


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2], *sys.argv[3:4])
