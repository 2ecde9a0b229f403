"""Where files come from: a local or mounted folder, or an SMB2/3 share read natively with smbprotocol.

Both kinds offer the same small interface (``Share``) to the ingest engine. Paths given to and returned by
a share are relative to its root and use ``/``. SMB and OS errors are translated here into the domain's
``ShareError`` tree, or into two expected outcomes: ``FileBusy`` (another program still holds the file:
try next scan) and ``FileGone`` (it vanished since the scan: someone else handled it).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, Protocol

from tasks.config import LocalShareConfig, SmbShareConfig
from tasks.errors import ShareAuthError, ShareConfigError, ShareUnavailable
from tasks.readiness import Entry

log = logging.getLogger(__name__)


class FileBusy(Exception):
    """Another program holds the file open (SMB sharing violation): it is still being written."""


class FileGone(Exception):
    """The file disappeared between the scan and now."""


class FileChanged(Exception):
    """The file is not what the scan saw (size or modification time differ): it is still being written."""


class Share(Protocol):
    name: str
    source: str

    def describe(self) -> str:
        """Where the share is, for messages (never includes credentials)."""
        ...

    def scan(self, skip_folder: str, under: str = "") -> list[Entry]:
        """Every regular file below the root (or below the folder ``under``), recursively, except those
        under ``skip_folder``. Paths are relative to the root."""
        ...

    def stat(self, path: str) -> Entry:
        """Size and mtime of one file now. Raises FileGone."""
        ...

    exclusive_reads: bool
    """True when an open file cannot be changed by others until it is closed (SMB exclusive open)."""

    def open_read(self, path: str, expected: Entry) -> contextlib.AbstractContextManager[BinaryIO]:
        """Open for reading, refusing if a writer still holds it (FileBusy), if it vanished (FileGone),
        or if its size or mtime are no longer those of ``expected`` (FileChanged)."""
        ...

    def remove(self, path: str) -> None: ...

    def remove_open(self, f: BinaryIO, path: str) -> None:
        """Delete the file ``f`` (opened by ``open_read``) and close it."""
        ...

    def move(self, src: str, dst: str) -> None:
        """Rename within the share, creating parent folders; ``dst`` must not exist."""
        ...

    def exists(self, path: str) -> bool: ...

    def write_bytes(self, path: str, data: bytes) -> None: ...

    def read_bytes(self, path: str) -> bytes: ...

    def reset(self) -> None:
        """Drop cached connections so that the next call reconnects."""
        ...

    def close(self) -> None: ...


def _check_relative(path: str) -> str:
    parts = path.split("/")
    if not path or path.startswith("/") or ".." in parts or "" in parts:
        raise ValueError(f"not a path relative to the share root: {path!r}")
    return path


class LocalShare:
    """A folder on this host: local disk, or an NFS/SMB mount made by the operating system."""

    exclusive_reads = False  # a local or NFS writer can still append while we read

    def __init__(self, cfg: LocalShareConfig) -> None:
        self.name = cfg.name
        self.source = cfg.source
        self.root = Path(cfg.path)

    def describe(self) -> str:
        return f"folder {self.root}"

    def _abs(self, path: str) -> Path:
        return self.root / _check_relative(path)

    def scan(self, skip_folder: str, under: str = "") -> list[Entry]:
        if not self.root.is_dir():
            raise ShareConfigError(f"share {self.name!r}: folder {self.root} does not exist or is not a folder")
        out: list[Entry] = []
        skip = self.root / skip_folder
        stack = [self._abs(under) if under else self.root]
        while stack:
            folder = stack.pop()
            try:
                it = os.scandir(folder)
            except FileNotFoundError:
                continue  # removed while we walked
            except PermissionError as e:
                raise ShareConfigError(f"share {self.name!r}: no permission to list {folder}") from e
            with it:
                for d in it:
                    try:
                        if d.is_dir(follow_symlinks=False):
                            if Path(d.path) != skip:
                                stack.append(Path(d.path))
                        elif d.is_file(follow_symlinks=False):
                            st = d.stat(follow_symlinks=False)
                            rel = Path(d.path).relative_to(self.root).as_posix()
                            out.append(Entry(rel, st.st_size, st.st_mtime))
                    except FileNotFoundError:
                        continue
        return out

    def stat(self, path: str) -> Entry:
        try:
            st = self._abs(path).stat()
        except FileNotFoundError as e:
            raise FileGone(path) from e
        return Entry(path, st.st_size, st.st_mtime)

    @contextlib.contextmanager
    def open_read(self, path: str, expected: Entry) -> Iterator[BinaryIO]:
        try:
            f = open(self._abs(path), "rb")  # noqa: SIM115 - closed below
        except FileNotFoundError as e:
            raise FileGone(path) from e
        with f:
            st = os.fstat(f.fileno())
            if (st.st_size, st.st_mtime) != (expected.size, expected.mtime):
                raise FileChanged(path)
            yield f

    def remove(self, path: str) -> None:
        try:
            self._abs(path).unlink()
        except FileNotFoundError as e:
            raise FileGone(path) from e

    def remove_open(self, f: BinaryIO, path: str) -> None:
        f.close()
        self.remove(path)

    def move(self, src: str, dst: str) -> None:
        target = self._abs(dst)
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            raise FileExistsError(dst)
        try:
            os.rename(self._abs(src), target)
        except FileNotFoundError as e:
            raise FileGone(src) from e
        except OSError as e:
            if e.errno != errno.EXDEV:
                raise
            shutil.move(self._abs(src), target)

    def exists(self, path: str) -> bool:
        return self._abs(path).exists()

    def write_bytes(self, path: str, data: bytes) -> None:
        target = self._abs(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".writing")
        tmp.write_bytes(data)
        os.replace(tmp, target)

    def read_bytes(self, path: str) -> bytes:
        try:
            return self._abs(path).read_bytes()
        except FileNotFoundError as e:
            raise FileGone(path) from e

    def reset(self) -> None:
        pass

    def close(self) -> None:
        pass


class SmbShare:
    """An SMB2/3 share, read with smbprotocol's ``smbclient`` (no mount needed).

    The connection is cached per share object and dropped on any network-level error, so that an expired
    session or a restarted server is recovered on the next scan.
    """

    exclusive_reads = True

    def __init__(self, cfg: SmbShareConfig, password: str | None) -> None:
        self.name = cfg.name
        self.source = cfg.source
        self._cfg = cfg
        self._password = password
        self._cache: dict = {}
        folder = cfg.folder.strip("/\\").replace("/", "\\")
        self._root = f"\\\\{cfg.server}\\{cfg.share}" + (f"\\{folder}" if folder else "")

    def describe(self) -> str:
        folder = self._cfg.folder.strip("/\\")
        return f"smb://{self._cfg.server}:{self._cfg.port}/{self._cfg.share}" + (f"/{folder}" if folder else "")

    # The port and the private connection cache must go with every call: smbclient otherwise dials 445
    # and shares one global pool between shares.
    @property
    def _kw(self) -> dict:
        return {
            "port": self._cfg.port,
            "username": self._user,
            "password": self._password,
            "encrypt": self._cfg.encrypt or None,
            "connection_cache": self._cache,
            "connection_timeout": self._cfg.connection_timeout_seconds,
        }

    @property
    def _user(self) -> str | None:
        c = self._cfg
        if c.username and c.domain:
            return f"{c.domain}\\{c.username}"
        return c.username

    def _abs(self, path: str) -> str:
        return self._root + "\\" + _check_relative(path).replace("/", "\\")

    @contextlib.contextmanager
    def _translate(self, path: str) -> Iterator[None]:
        from smbprotocol.exceptions import (
            SMBAuthenticationError,
            SMBConnectionClosed,
            SMBException,
            SMBOSError,
            SMBResponseException,
        )
        from smbprotocol.header import NtStatus

        try:
            yield
        except SMBOSError as e:
            status = e.ntstatus
            if status == NtStatus.STATUS_SHARING_VIOLATION:
                raise FileBusy(path) from None
            if status in (NtStatus.STATUS_OBJECT_NAME_NOT_FOUND, NtStatus.STATUS_NOT_FOUND):
                raise FileGone(path) from None
            if status == NtStatus.STATUS_DELETE_PENDING:
                raise FileGone(path) from None
            if status == NtStatus.STATUS_OBJECT_NAME_COLLISION:
                raise FileExistsError(path) from None
            self._raise_for_status(status, e)
        except SMBResponseException as e:
            self._raise_for_status(e.status, e)
        except SMBAuthenticationError as e:
            self.reset()
            raise ShareAuthError(
                f"share {self.name!r}: {self.describe()} refused the configured user "
                f"{self._user or '(anonymous)'}: check the username, domain and password"
            ) from e
        except (SMBConnectionClosed, ConnectionError, TimeoutError, OSError, SMBException) as e:
            self.reset()
            raise ShareUnavailable(f"share {self.name!r}: {self.describe()} unreachable: {_short(e)}") from e
        except ValueError as e:
            # smbprotocol raises ValueError("Failed to connect to ...") when the server cannot be reached.
            self.reset()
            raise ShareUnavailable(f"share {self.name!r}: {self.describe()} unreachable: {_short(e)}") from e

    def _raise_for_status(self, status: int, err: Exception) -> None:
        from smbprotocol.header import NtStatus

        name = f"0x{status:08X}"
        if status in (NtStatus.STATUS_LOGON_FAILURE, NtStatus.STATUS_WRONG_PASSWORD,
                      NtStatus.STATUS_PASSWORD_EXPIRED, NtStatus.STATUS_ACCESS_DENIED):  # fmt: skip
            self.reset()
            raise ShareAuthError(
                f"share {self.name!r}: {self.describe()} refused access for user "
                f"{self._user or '(anonymous)'} ({name}): check the username, domain, password and share rights"
            ) from err
        if status == NtStatus.STATUS_BAD_NETWORK_NAME:
            raise ShareConfigError(
                f"share {self.name!r}: server {self._cfg.server} has no share named {self._cfg.share!r}"
            ) from err
        if status == NtStatus.STATUS_OBJECT_PATH_NOT_FOUND:
            raise ShareConfigError(
                f"share {self.name!r}: folder {self._cfg.folder!r} does not exist in {self.describe()}"
            ) from err
        if status in (NtStatus.STATUS_PATH_NOT_COVERED, NtStatus.STATUS_FS_DRIVER_REQUIRED,
                      NtStatus.STATUS_DFS_UNAVAILABLE):  # fmt: skip
            raise ShareConfigError(
                f"share {self.name!r}: {self.describe()} is a DFS path that could not be followed ({name}); "
                "configure the file server that holds the folder directly, or set up DFS referrals"
            ) from err
        self.reset()
        raise ShareUnavailable(f"share {self.name!r}: {self.describe()} failed with SMB status {name}") from err

    def _walk(self, folder: str, skip: str, out: list[Entry], rel: str) -> None:
        import smbclient
        from smbprotocol.exceptions import SMBOSError
        from smbprotocol.header import NtStatus

        try:
            with smbclient.scandir(folder, **self._kw) as entries:
                items = list(entries)
        except SMBOSError as e:
            if e.ntstatus in (NtStatus.STATUS_OBJECT_NAME_NOT_FOUND, NtStatus.STATUS_OBJECT_PATH_NOT_FOUND):
                return  # the sub-folder was removed while we walked
            raise
        for d in items:
            rel_path = f"{rel}/{d.name}" if rel else d.name
            if d.is_dir():
                if rel_path != skip:
                    self._walk(f"{folder}\\{d.name}", skip, out, rel_path)
            elif d.is_file():
                info = d.smb_info  # not d.stat(): it forgets the port and dials 445
                out.append(Entry(rel_path, int(info.end_of_file), info.last_write_time.timestamp()))

    def scan(self, skip_folder: str, under: str = "") -> list[Entry]:
        out: list[Entry] = []
        import smbclient

        # Listing the root first turns a missing share or folder into a clear error, not an empty scan.
        try:
            with self._translate(""), smbclient.scandir(self._root, **self._kw) as it:
                for _ in it:
                    break
        except FileGone:
            raise self._missing_root() from None
        with self._translate(""):
            if under:
                self._walk(self._abs(under), skip_folder, out, under)
            else:
                self._walk(self._root, skip_folder, out, "")
        return out

    def _missing_root(self) -> ShareConfigError:
        import smbclient

        try:
            share_root = f"\\\\{self._cfg.server}\\{self._cfg.share}"
            with self._translate(""), smbclient.scandir(share_root, **self._kw) as it:
                next(iter(it), None)
        except (FileGone, ShareConfigError):
            return ShareConfigError(
                f"share {self.name!r}: server {self._cfg.server} has no share named {self._cfg.share!r}"
            )
        return ShareConfigError(f"share {self.name!r}: folder {self._cfg.folder!r} does not exist in {self.describe()}")

    def stat(self, path: str) -> Entry:
        import smbclient

        # Read the same directory information the scan reads, so that times compare exactly.
        parent, _, name = path.rpartition("/")
        folder = self._root + ("\\" + parent.replace("/", "\\") if parent else "")
        from smbprotocol.exceptions import SMBOSError

        with self._translate(path):
            try:
                with smbclient.scandir(folder, search_pattern=name, **self._kw) as it:
                    for d in it:
                        if d.name == name and d.is_file():
                            info = d.smb_info
                            return Entry(path, int(info.end_of_file), info.last_write_time.timestamp())
            except SMBOSError as e:
                if e.errno != errno.ENOENT:
                    raise
        raise FileGone(path)

    @contextlib.contextmanager
    def open_read(self, path: str, expected: Entry) -> Iterator[BinaryIO]:
        import smbclient
        from smbprotocol.exceptions import SMBOSError
        from smbprotocol.header import NtStatus
        from smbprotocol.open import FilePipePrinterAccessMask as Access

        read = Access.FILE_READ_DATA | Access.FILE_READ_ATTRIBUTES
        with self._translate(path):
            # share_access=None asks for exclusive access: a writer that still holds the file makes this
            # fail with a sharing violation, which is our "not ready yet". Nobody can change the file
            # until we close it, so the attributes of this open are the ones that count. DELETE access
            # lets the engine delete through this handle once Orthanc confirmed (one round trip instead
            # of a second open); a user who may read but not delete still gets the file read.
            try:
                f = smbclient.open_file(self._abs(path), mode="rb", share_access=None, buffering=0,
                                        desired_access=read | Access.DELETE, **self._kw)  # fmt: skip
                deletable = True
            except SMBOSError as e:
                if e.ntstatus != NtStatus.STATUS_ACCESS_DENIED:
                    raise
                f = smbclient.open_file(self._abs(path), mode="rb", share_access=None, buffering=0,
                                        desired_access=read, **self._kw)  # fmt: skip
                deletable = False
        try:
            opened = f.fd
            if (int(opened.end_of_file), opened.last_write_time.timestamp()) != (expected.size, expected.mtime):
                raise FileChanged(path)
            yield _TranslatedReader(f, self, path, deletable)  # type: ignore[misc]
        finally:
            with contextlib.suppress(Exception):
                f.close()

    def remove_open(self, f: BinaryIO, path: str) -> None:
        if isinstance(f, _TranslatedReader) and f.deletable:
            f.delete()
        else:
            f.close()
            self.remove(path)

    def remove(self, path: str) -> None:
        import smbclient

        with self._translate(path):
            smbclient.remove(self._abs(path), **self._kw)

    def _makedirs(self, rel_folder: str) -> None:
        import smbclient

        if rel_folder:
            with self._translate(rel_folder):
                smbclient.makedirs(self._abs(rel_folder), exist_ok=True, **self._kw)

    def move(self, src: str, dst: str) -> None:
        import smbclient

        if self.exists(dst):
            raise FileExistsError(dst)
        self._makedirs(dst.rpartition("/")[0])
        with self._translate(src):
            smbclient.rename(self._abs(src), self._abs(dst), **self._kw)

    def exists(self, path: str) -> bool:
        try:
            self.stat(path)
        except FileGone:
            return False
        return True

    def write_bytes(self, path: str, data: bytes) -> None:
        import smbclient

        self._makedirs(path.rpartition("/")[0])
        with self._translate(path), smbclient.open_file(self._abs(path), mode="wb", **self._kw) as f:
            f.write(data)

    def read_bytes(self, path: str) -> bytes:
        import smbclient

        with self._translate(path), smbclient.open_file(self._abs(path), mode="rb", **self._kw) as f:
            return f.read()

    def reset(self) -> None:
        from smbclient import reset_connection_cache

        with contextlib.suppress(Exception):
            reset_connection_cache(fail_on_error=False, connection_cache=self._cache)
        self._cache.clear()

    def close(self) -> None:
        self.reset()


READ_REQUEST = 1024 * 1024


class _TranslatedReader:
    """A read-only SMB file whose errors are translated like every other share call."""

    def __init__(self, raw: BinaryIO, share: SmbShare, path: str, deletable: bool = False) -> None:
        self._raw, self._share, self._path = raw, share, path
        self.deletable = deletable

    def delete(self) -> None:
        """Mark the file delete-pending and close the handle, in one compound request: the file is gone
        when this returns."""
        from smbclient._io import SMBFileTransaction, set_info
        from smbprotocol.file_info import FileDispositionInformation

        info = FileDispositionInformation()
        info["delete_pending"] = True
        with self._share._translate(self._path):
            transaction = SMBFileTransaction(self._raw)
            set_info(transaction, info)
            self._raw.close(transaction=transaction)  # type: ignore[call-arg]
            transaction.commit()

    def read(self, n: int = -1) -> bytes:
        # One SMB read request per READ_REQUEST bytes: a single request for a whole large file asks for
        # credits in proportion to its size, and a few parallel ones exhaust the session's credits
        # ("Request requires 1 credits but only 0 credits are available").
        with self._share._translate(self._path):
            if 0 <= n <= READ_REQUEST:
                return self._raw.read(n)
            parts = []
            left = n
            while left != 0:
                chunk = self._raw.read(READ_REQUEST if left < 0 else min(READ_REQUEST, left))
                if not chunk:
                    break
                parts.append(chunk)
                left = left - len(chunk) if left > 0 else left
            return b"".join(parts)

    def seek(self, offset: int, whence: int = 0) -> int:
        with self._share._translate(self._path):
            return self._raw.seek(offset, whence)

    def tell(self) -> int:
        return self._raw.tell()

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        self._raw.close()


def _short(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:200]


def open_share(cfg: LocalShareConfig | SmbShareConfig, password: str | None = None) -> Share:
    """Build the share client for a configured share. SMB needs the resolved password (or None)."""
    if isinstance(cfg, LocalShareConfig):
        return LocalShare(cfg)
    return SmbShare(cfg, password)
