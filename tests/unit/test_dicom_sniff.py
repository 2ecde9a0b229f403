"""classify() and media_storage_sop_class() on the real case files and on synthetic byte strings."""

from __future__ import annotations

import struct
import zipfile
from io import BytesIO
from pathlib import Path

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from tasks.dicom_sniff import DICOMDIR_SOP_CLASS, HEAD_BYTES, Kind, classify, media_storage_sop_class

CASES = Path(__file__).resolve().parent.parent / "data" / "cases"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


def head_of(relative: str) -> bytes:
    """The first HEAD_BYTES of a case file, as the ingest engine reads them."""
    with (CASES / relative).open("rb") as f:
        return f.read(HEAD_BYTES)


def part10(sop_class: str, *, preamble: bool = True, **elements: str) -> bytes:
    """A small DICOM Part 10 file written by pydicom."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    ds.preamble = b"\x00" * 128
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    data = buf.getvalue()
    assert data[128:132] == b"DICM"
    return data if preamble else data[132:]


def a_zip() -> bytes:
    buf = BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("IMG0001.dcm", b"not really")
    return buf.getvalue()


DICOMDIR_BYTES = part10(DICOMDIR_SOP_CLASS, FileSetID="SET1")
CT_BYTES = part10(CT_IMAGE_STORAGE, Modality="CT", PatientID="P1")


REAL_FILES = [
    ("C02_no_preamble_explicit.dcm", Kind.DICOM),
    ("C03_implicit_no_meta.dcm", Kind.DICOM),
    ("C04_folder/IMG0001", Kind.DICOM),
    ("C04_folder/sub/IMG0002.DCM", Kind.DICOM),
    ("C04_folder/corrupt.dcm", Kind.DICOM),  # has the DICM marker; Orthanc decides the rest
    ("C04_folder/report.pdf", Kind.UNKNOWN),
    ("C04_folder/scan_notes.txt", Kind.UNKNOWN),
    ("C04_folder/Thumbs.db", Kind.UNKNOWN),
    ("C04_folder/desktop.ini", Kind.UNKNOWN),
    ("C04_folder/.DS_Store", Kind.UNKNOWN),
    ("C04_folder/empty.dcm", Kind.UNKNOWN),
    ("C05_dicomdir_set/DICOMDIR", Kind.DICOMDIR),
    ("C05_dicomdir_set/PT000000/ST000000/SE000000/IM000000", Kind.DICOM),
    ("C06_study.zip", Kind.ZIP),
    ("C09_scenario.json", Kind.UNKNOWN),
]


@pytest.mark.parametrize(("relative", "expected"), REAL_FILES)
def test_classify_real_case_files(relative, expected):
    assert classify(relative, head_of(relative)) is expected


@pytest.mark.parametrize(("relative", "expected"), REAL_FILES)
def test_classify_does_not_depend_on_the_folder_part_of_the_name(relative, expected):
    name = relative.rsplit("/", 1)[-1]
    assert classify(name, head_of(relative)) is classify(f"some/deep/folder/{name}", head_of(relative)) is expected


REAL_SOP_CLASSES = [
    ("C04_folder/IMG0001", CT_IMAGE_STORAGE),
    ("C05_dicomdir_set/DICOMDIR", DICOMDIR_SOP_CLASS),
    ("C02_no_preamble_explicit.dcm", None),  # a data set without file meta
    ("C03_implicit_no_meta.dcm", None),
    ("C04_folder/corrupt.dcm", None),  # DICM followed by garbage
    ("C04_folder/report.pdf", None),
    ("C04_folder/empty.dcm", None),
    ("C06_study.zip", None),
]


@pytest.mark.parametrize(("relative", "expected"), REAL_SOP_CLASSES)
def test_media_storage_sop_class_real_case_files(relative, expected):
    assert media_storage_sop_class(head_of(relative)) == expected


def test_head_bytes_is_8192():
    assert HEAD_BYTES == 8192


@pytest.mark.parametrize(
    ("sop_class", "expected_kind"),
    [(CT_IMAGE_STORAGE, Kind.DICOM), (DICOMDIR_SOP_CLASS, Kind.DICOMDIR)],
)
def test_a_large_file_is_judged_from_its_first_head_bytes(sop_class, expected_kind):
    data = part10(sop_class, PatientComments="x" * 9000, ImageComments="y" * 9000)
    assert len(data) > 2 * HEAD_BYTES
    head = data[:HEAD_BYTES]
    assert media_storage_sop_class(head) == sop_class
    assert classify("IMG0001", head) is expected_kind


SYNTHETIC = [
    pytest.param("IMG0001.dcm", b"", Kind.UNKNOWN, id="empty"),
    pytest.param("IMG0001.dcm", b"\x08\x00\x05\x00CS", Kind.UNKNOWN, id="shorter-than-one-element"),
    pytest.param("IMG0001.dcm", b"\x00" * 131, Kind.UNKNOWN, id="preamble-only"),
    pytest.param("IMG0001.dcm", b"\x00" * 128 + b"DIC", Kind.UNKNOWN, id="truncated-marker"),
    pytest.param("IMG0001.dcm", b"\x00" * 128 + b"DICM", Kind.DICOM, id="marker-only"),
    pytest.param("IMG0001.dcm", b"\xff" * 128 + b"DICM" + b"\xff" * 64, Kind.DICOM, id="marker-any-preamble"),
    pytest.param("IMG0001.dcm", b"\x00" * 128 + b"dicm", Kind.UNKNOWN, id="marker-is-case-sensitive"),
    pytest.param("IMG0001.dcm", CT_BYTES, Kind.DICOM, id="pydicom-ct"),
    pytest.param("IMG0001.dcm", CT_BYTES[:HEAD_BYTES], Kind.DICOM, id="pydicom-ct-head"),
    pytest.param("IMG0001.dcm", CT_BYTES[132:], Kind.DICOM, id="meta-without-preamble"),
    pytest.param("anything.bin", DICOMDIR_BYTES, Kind.DICOMDIR, id="dicomdir-by-sop-class-any-name"),
    pytest.param("DICOMDIR", DICOMDIR_BYTES, Kind.DICOMDIR, id="dicomdir-by-sop-class-and-name"),
    pytest.param("x", DICOMDIR_BYTES[132:], Kind.DICOMDIR, id="dicomdir-without-preamble"),
    pytest.param("DICOMDIR", b"", Kind.DICOMDIR, id="named-dicomdir-empty-head"),
    pytest.param("cd/dicomdir", b"", Kind.DICOMDIR, id="named-dicomdir-lower-case-in-folder"),
    pytest.param("DICOMDIR", b"\x00" * 128 + b"DICM", Kind.DICOMDIR, id="named-dicomdir-with-marker"),
    pytest.param("DICOMDIR", b"just some text, not DICOM", Kind.UNKNOWN, id="named-dicomdir-but-text"),
    pytest.param("DICOMDIR.txt", b"", Kind.UNKNOWN, id="name-only-starts-with-dicomdir"),
    pytest.param("DICOMDIR/IMG0001", b"", Kind.UNKNOWN, id="dicomdir-is-a-folder-name"),
    pytest.param("NOTDICOMDIR", b"", Kind.UNKNOWN, id="name-only-ends-with-dicomdir"),
    pytest.param("study.zip", a_zip(), Kind.ZIP, id="zip"),
    pytest.param("IMG0001.dcm", a_zip(), Kind.ZIP, id="zip-whatever-the-name"),
    pytest.param("DICOMDIR", a_zip(), Kind.ZIP, id="zip-named-dicomdir"),
    pytest.param("x", b"PK\x03\x04", Kind.ZIP, id="zip-signature-only"),
    pytest.param("x", b"PK\x03\x05" + b"\x00" * 200, Kind.UNKNOWN, id="not-quite-zip"),
    pytest.param("x.pdf", b"%PDF-1.4\n1 0 obj<<>>endobj\n", Kind.UNKNOWN, id="pdf"),
    pytest.param("x.txt", b"Exam done, 2 images.\n", Kind.UNKNOWN, id="text"),
    pytest.param("Thumbs.db", b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + b"\x00" * 504, Kind.UNKNOWN, id="ole-thumbs"),
    pytest.param("x", b"\x08\x00\x05\x00CS\x0a\x00ISO_IR 100", Kind.DICOM, id="group-0008-explicit-vr"),
    pytest.param("x", b"\x02\x00\x00\x00UL\x04\x00\x10\x00\x00\x00", Kind.DICOM, id="group-0002-explicit-vr"),
    pytest.param("x", b"\x08\x00\x05\x00\x0a\x00\x00\x00ISO_IR 100", Kind.DICOM, id="group-0008-implicit-vr"),
    pytest.param("x", b"\x08\x00\x05\x00" + struct.pack("<I", 1023), Kind.DICOM, id="implicit-length-1023"),
    pytest.param("x", b"\x08\x00\x05\x00" + struct.pack("<I", 1024), Kind.UNKNOWN, id="implicit-length-1024"),
    pytest.param("x", b"\x10\x00\x10\x00PN\x04\x00DOE^", Kind.UNKNOWN, id="group-0010-first"),
    pytest.param("x", b"\x00\x08\x00\x05CS\x0a\x00ISO_IR 100", Kind.UNKNOWN, id="big-endian-group"),
]


@pytest.mark.parametrize(("name", "head", "expected"), SYNTHETIC)
def test_classify_synthetic(name, head, expected):
    assert classify(name, head) is expected


def element(group: int, elem: int, vr: bytes, value: bytes) -> bytes:
    """One explicit-VR little-endian element."""
    if vr in (b"OB", b"UN", b"UT", b"SQ", b"OW"):
        return struct.pack("<HH", group, elem) + vr + b"\x00\x00" + struct.pack("<I", len(value)) + value
    return struct.pack("<HH", group, elem) + vr + struct.pack("<H", len(value)) + value


META_VERSION = element(0x0002, 0x0001, b"OB", b"\x00\x01")
SOP_CLASS_EL = element(0x0002, 0x0002, b"UI", b"1.2.840.10008.1.3.10\x00")
PREAMBLE = b"\x00" * 128 + b"DICM"

SOP_CLASS_CASES = [
    pytest.param(DICOMDIR_BYTES, DICOMDIR_SOP_CLASS, id="pydicom-dicomdir"),
    pytest.param(DICOMDIR_BYTES[132:], DICOMDIR_SOP_CLASS, id="pydicom-dicomdir-no-preamble"),
    pytest.param(CT_BYTES, CT_IMAGE_STORAGE, id="pydicom-ct"),
    pytest.param(part10(SECONDARY_CAPTURE), SECONDARY_CAPTURE, id="pydicom-secondary-capture"),
    pytest.param(PREAMBLE + META_VERSION + SOP_CLASS_EL, DICOMDIR_SOP_CLASS, id="after-long-vr-ob"),
    pytest.param(PREAMBLE + SOP_CLASS_EL, DICOMDIR_SOP_CLASS, id="first-element"),
    pytest.param(PREAMBLE + element(0x0002, 0x0002, b"UI", b"1.2.3 "), "1.2.3", id="trailing-space-stripped"),
    pytest.param(PREAMBLE + META_VERSION, None, id="meta-without-sop-class"),
    pytest.param(PREAMBLE + element(0x0008, 0x0016, b"UI", b"1.2.840.10008.1.3.10\x00"), None, id="not-group-2"),
    pytest.param(PREAMBLE + META_VERSION[:10], None, id="truncated-long-element"),
    pytest.param(PREAMBLE, None, id="marker-only"),
    pytest.param(b"", None, id="empty"),
    pytest.param(b"PK\x03\x04" + b"\x00" * 200, None, id="zip"),
]


@pytest.mark.parametrize(("head", "expected"), SOP_CLASS_CASES)
def test_media_storage_sop_class(head, expected):
    assert media_storage_sop_class(head) == expected


def test_dicomdir_sop_class_constant():
    assert DICOMDIR_SOP_CLASS == "1.2.840.10008.1.3.10"
