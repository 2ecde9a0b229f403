"""Synthetic DICOM instances for tests, benchmarks and the demo: small CT slices with made-up people."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid


def ct_dataset(study_uid: str, series_uid: str, index: int, side: int = 128, patient_id: str = "SYN-0001",
               patient_name: str = "Synthetic^Patient", accession: str = "ACC0001") -> Dataset:  # fmt: skip
    """One CT slice of ``side`` x ``side`` 16-bit pixels (side 128 gives about 33 KB)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.AccessionNumber = accession
    ds.StudyDate = "20240315"
    ds.StudyTime = "101500"
    ds.Modality = "CT"
    ds.InstitutionName = "Synthetic Hospital"
    ds.SeriesNumber = 1
    ds.InstanceNumber = index + 1
    ds.Rows = ds.Columns = side
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    rng = np.random.default_rng(index)
    ds.PixelData = rng.integers(0, 4095, size=(side, side), dtype=np.uint16).tobytes()
    return ds


def write_ct_series(folder: Path, count: int, side: int = 128, prefix: str = "IMG", **kw: str) -> list[Path]:
    """Write ``count`` slices of one new study into ``folder``; return their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    study, series = generate_uid(), generate_uid()
    paths = []
    for i in range(count):
        ds = ct_dataset(study, series, i, side, **kw)
        path = folder / f"{prefix}{i:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
