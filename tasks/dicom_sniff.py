"""Tell ZIP archives, DICOMDIR media indexes and likely DICOM files apart from their first bytes.

Pure logic on a byte prefix. Orthanc decides what is valid DICOM; this module only decides what to do
before asking it: a ZIP is unpacked and judged entry by entry, a DICOMDIR is set aside (it indexes images
but holds none), everything else is offered to Orthanc.
"""

from __future__ import annotations

import struct
from enum import Enum

DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
HEAD_BYTES = 8192  # enough for the file meta group of any real file
_EXPLICIT_VRS = {
    b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FL", b"FD", b"IS", b"LO", b"LT", b"OB", b"OD", b"OF",
    b"OL", b"OV", b"OW", b"PN", b"SH", b"SL", b"SQ", b"SS", b"ST", b"SV", b"TM", b"UC", b"UI", b"UL", b"UN",
    b"UR", b"US", b"UT", b"UV",
}  # fmt: skip
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR", b"UT", b"SV", b"UV"}


class Kind(Enum):
    ZIP = "zip"
    DICOMDIR = "dicomdir"
    DICOM = "dicom"  # has the DICM marker, or starts like a DICOM data set without one
    UNKNOWN = "unknown"  # does not look like DICOM; Orthanc may still be asked


def _meta_elements(head: bytes, offset: int) -> dict[int, bytes]:
    """Read explicit-VR little-endian group 0002 elements starting at ``offset``."""
    found: dict[int, bytes] = {}
    while offset + 8 <= len(head):
        group, element = struct.unpack_from("<HH", head, offset)
        if group != 0x0002:
            break
        vr = head[offset + 4 : offset + 6]
        if vr in _LONG_VRS:
            if offset + 12 > len(head):
                break
            (length,) = struct.unpack_from("<I", head, offset + 8)
            value_at = offset + 12
        else:
            (length,) = struct.unpack_from("<H", head, offset + 6)
            value_at = offset + 8
        found[(group << 16) | element] = head[value_at : value_at + length]
        offset = value_at + length
    return found


def media_storage_sop_class(head: bytes) -> str | None:
    """MediaStorageSOPClassUID (0002,0002) from the file meta, or None if there is no readable meta."""
    for start in (132, 0) if head[128:132] == b"DICM" else (0,):
        value = _meta_elements(head, start).get(0x00020002)
        if value is not None:
            return value.rstrip(b"\x00 ").decode("ascii", "replace")
    return None


def _starts_like_dataset(head: bytes) -> bool:
    """A data set without preamble: a plausible first tag of group 0002/0008, explicit or implicit VR."""
    if len(head) < 8:
        return False
    group, _element = struct.unpack_from("<HH", head, 0)
    if group not in (0x0002, 0x0008):
        return False
    if head[4:6] in _EXPLICIT_VRS:
        return True
    (length,) = struct.unpack_from("<I", head, 4)
    return length < 1024  # implicit VR: the first elements are short strings


# Pixel Data, Float Pixel Data, Double Float Pixel Data; little and big endian tag bytes.
_PIXEL_TAGS = (b"\xe0\x7f\x10\x00", b"\xe0\x7f\x08\x00", b"\xe0\x7f\x09\x00", b"\x7f\xe0\x00\x10")


def is_image_sop_class(uid: str) -> bool:
    """True for the storage SOP classes of images (CT, MR, US, secondary capture, ...), by the standard's
    own names as pydicom knows them."""
    from pydicom.uid import UID

    name = UID(uid).name
    return "Image Storage" in name and "Retired" not in name


def incomplete_image(data: bytes) -> bool:
    """A whole file whose file meta names an image SOP class but which holds no pixel data element: a
    file cut short while its writer paused. Files without file meta are not judged."""
    sop = media_storage_sop_class(data)
    return bool(sop) and is_image_sop_class(sop) and not any(tag in data for tag in _PIXEL_TAGS)


def classify(name: str, head: bytes) -> Kind:
    """Classify a file from its name and its first bytes (at least HEAD_BYTES when the file is longer)."""
    if head[:4] == b"PK\x03\x04":
        return Kind.ZIP
    if media_storage_sop_class(head) == DICOMDIR_SOP_CLASS:
        return Kind.DICOMDIR
    if name.rsplit("/", 1)[-1].upper() == "DICOMDIR" and (head[128:132] == b"DICM" or not head):
        return Kind.DICOMDIR
    if head[128:132] == b"DICM" or _starts_like_dataset(head):
        return Kind.DICOM
    return Kind.UNKNOWN
