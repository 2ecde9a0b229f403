"""An HL7 partner for tests: python-hl7's own asyncio MLLP server (code we did not write), on loopback, in a
thread. It keeps every message it received (raw bytes and parsed) and answers AA, or stays silent while
``silent`` is set."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from dataclasses import dataclass, field

import hl7
import hl7.mllp


@dataclass
class Partner:
    port: int
    encoding: str = "utf-8"
    received: list[hl7.Message] = field(default_factory=list)
    raw: list[bytes] = field(default_factory=list)
    accept: bool = True
    _loop: asyncio.AbstractEventLoop | None = None
    _thread: threading.Thread | None = None
    _server: asyncio.AbstractServer | None = None

    async def _handle(self, reader, writer) -> None:
        try:
            while not writer.is_closing():
                block = await reader.readblock()
                self.raw.append(block)
                message = hl7.parse(block.decode(self.encoding))
                self.received.append(message)
                if self.accept:
                    writer.writemessage(message.create_ack("AA"))
                    await writer.drain()
                else:
                    writer.close()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    def start(self) -> Partner:
        ready = threading.Event()

        async def main() -> None:
            self._server = await hl7.mllp.start_hl7_server(self._handle, "127.0.0.1", self.port,
                                                           encoding=self.encoding)  # fmt: skip
            ready.set()
            async with self._server:
                await self._server.serve_forever()

        def run() -> None:
            self._loop = asyncio.new_event_loop()
            with contextlib.suppress(asyncio.CancelledError):
                self._loop.run_until_complete(main())

        self._thread = threading.Thread(target=run, daemon=True, name="hl7-partner")
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("the HL7 partner did not start")
        return self

    def stop(self) -> None:
        if self._loop and self._server:
            self._loop.call_soon_threadsafe(self._server.close)
            for task in asyncio.all_tasks(self._loop):
                self._loop.call_soon_threadsafe(task.cancel)
        if self._thread:
            self._thread.join(10)
