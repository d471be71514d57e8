"""A real PACS for the tests and benchmarks that need one: Orthanc on loopback with a generated configuration
(optionally its DICOMweb plugin, authentication and a Lua script), and DX radiographs made by DCMTK from real
images of the data set."""

from __future__ import annotations

import json
import socket
import subprocess
import time
from pathlib import Path

from PIL import Image

ORTHANC = Path("/usr/sbin/Orthanc")
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")  # Debian's orthanc-dicomweb
PACS_AET = "ORTHANC"
# The DICOMweb plugin at /dicom-web/ (the configuration docs/dicom.md shows)
DICOMWEB_CONFIG = {"Plugins": [str(DICOMWEB_PLUGIN)], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Orthanc:
    """Orthanc on loopback with a generated configuration: its own storage folder, free HTTP and DICOM ports,
    remote access, authentication and plugins off, `modalities` registered by name. `extra` adds or replaces
    settings (`DICOMWEB_CONFIG` for DICOMweb); with `users` ({name: password}) authentication is on and this
    object's own requests log in as the first user."""

    def __init__(self, folder: Path, modalities: dict[str, tuple[str, str, int]] | None = None,
                 extra: dict | None = None, users: dict[str, str] | None = None):
        import httpx

        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.http_port, self.dicom_port = free_port(), free_port()
        config = {"Name": "pneumoscan-test", "StorageDirectory": str(folder / "storage"),
                  "IndexDirectory": str(folder / "storage"), "HttpPort": self.http_port, "DicomPort": self.dicom_port,
                  "DicomAet": PACS_AET, "RemoteAccessAllowed": False, "AuthenticationEnabled": bool(users),
                  "RegisteredUsers": users or {}, "Plugins": [],
                  "DicomModalities": {k: list(v) for k, v in (modalities or {}).items()}, "DicomScuTimeout": 60,
                  "StableAge": 60, "HttpTimeout": 120, "SaveJobs": False, "LimitJobs": 100, **(extra or {})}
        (folder / "orthanc.json").write_text(json.dumps(config, indent=2))
        self.log = open(folder / "orthanc.log", "ab")
        self.proc = subprocess.Popen([str(ORTHANC), str(folder / "orthanc.json")], stdout=self.log, stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.dicomweb_url = f"{self.url}/dicom-web"
        self.http = httpx.Client(base_url=self.url, timeout=120, auth=next(iter(users.items())) if users else None)
        deadline = time.monotonic() + 30
        while True:
            try:
                if self.http.get("/system").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"Orthanc did not start: see {folder / 'orthanc.log'}")
            time.sleep(0.2)

    def upload(self, data: bytes) -> dict:
        r = self.http.post("/instances", content=data)
        r.raise_for_status()
        return r.json()

    def store(self, modality: str, ids: list[str]):
        """C-STORE the instances to `modality` over one association; the REST response."""
        return self.http.post(f"/modalities/{modality}/store", json={"Resources": ids, "Synchronous": True})

    def study_instances(self, study_id: str) -> list[dict]:
        return self.http.get(f"/studies/{study_id}/instances").json()

    def wait_for_modality(self, study_id: str, modality: str, count: int, timeout: float) -> list[dict]:
        """Instances of `modality` in the study once there are `count` of them (TimeoutError otherwise)."""
        deadline = time.monotonic() + timeout
        while True:
            found = [i for i in self.study_instances(study_id) if self.series_modality(i) == modality]
            if len(found) >= count:
                return found
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(found)} of {count} {modality} instance(s) arrived in {timeout:g} s")
            time.sleep(0.2)

    def series_modality(self, instance: dict) -> str:
        return self.http.get(f"/series/{instance['ParentSeries']}").json()["MainDicomTags"].get("Modality", "")

    def stop(self) -> None:
        self.http.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def make_radiograph(jpeg: Path, out: Path, patient_id: str = "PNEUMO-1", codec: str = "jpls",
                    keys: tuple[str, ...] = ("Modality=DX", "BodyPartExamined=CHEST")) -> Path:
    """A DX radiograph of a real JPEG, made by DCMTK: grey JPEG -> img2dcm -> decompressed -> JPEG-LS
    (`dcmcjpls`) or JPEG lossless (`dcmcjpeg +el`). `keys` are img2dcm's -k settings beside the patient's."""
    out.parent.mkdir(parents=True, exist_ok=True)
    grey, plain = out.with_suffix(".grey.jpg"), out.with_suffix(".plain.dcm")
    Image.open(jpeg).convert("L").save(grey, quality=95)
    settings = [f"PatientID={patient_id}", "PatientName=Test^Chest", "SOPClassUID=1.2.840.10008.5.1.4.1.1.1.1", *keys]
    subprocess.run(["img2dcm", *[a for k in settings for a in ("-k", k)], str(grey), str(out)], check=True)
    subprocess.run(["dcmdjpeg", str(out), str(plain)], check=True)
    encode = ["dcmcjpls"] if codec == "jpls" else ["dcmcjpeg", "+el"]
    subprocess.run([*encode, str(plain), str(out)], check=True)
    grey.unlink()
    plain.unlink()
    return out
