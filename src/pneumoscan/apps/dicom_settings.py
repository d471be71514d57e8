"""What a DICOM node is told before it starts: where it listens and stores reports (`NodeSettings`,
`Destination`), which calling AE titles and hosts it accepts (`CallingPeer`), and which transfer syntaxes
it can decode here (`decodable_syntaxes`).
"""

from __future__ import annotations

import ipaddress
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any


AE_TITLE_RULE = "an AE title of 1 to 16 printable ASCII characters, no backslash"


def _is_ae_title(text: str) -> bool:
    """Whether `text` is an AE title as DICOM defines one (and pynetdicom accepts), leading and trailing spaces aside."""
    title = text.strip()
    return 0 < len(title) <= 16 and title.isascii() and title.isprintable() and "\\" not in title


@dataclass(frozen=True)
class Destination:
    """Where reports are stored: an AE title at a host and port."""

    ae_title: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Destination:
        """'AE@HOST:PORT' -> Destination; ValueError naming what is wrong."""
        m = re.fullmatch(r"([^@]+)@(.+):(\d{1,5})", text.strip())
        if not m or not _is_ae_title(m.group(1)) or not 0 < int(m.group(3)) < 65536:
            raise ValueError(f"--send-to must be AE@HOST:PORT ({AE_TITLE_RULE}), not {text!r}")
        return cls(m.group(1).strip(), m.group(2).strip("[]"), int(m.group(3)))

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


@dataclass(frozen=True)
class CallingPeer:
    """A calling AE title the node accepts (`--allow-calling`), and the addresses of the host it may come from,
    looked up once, at start."""

    ae_title: str
    host: str
    addresses: frozenset

    @classmethod
    def parse(cls, text: str) -> CallingPeer:
        """'AE@HOST' -> CallingPeer, HOST an address or a name looked up now; ValueError naming what is wrong."""
        m = re.fullmatch(r"([^@]+)@(.+)", text.strip())
        if not m or not _is_ae_title(m.group(1)):
            raise ValueError(f"--allow-calling must be AE@HOST ({AE_TITLE_RULE}), not {text!r}")
        host = m.group(2).strip().strip("[]")
        try:
            found = {info[4][0] for info in socket.getaddrinfo(host, None)}
        except (OSError, UnicodeError) as e:
            raise ValueError(f"--allow-calling {text}: cannot look up the host {host!r} ({e})") from None
        return cls(m.group(1).strip(), host, frozenset(_address(a) for a in found))

    def allows(self, ae_title: str, address: str) -> bool:
        return ae_title.strip() == self.ae_title and _address(address) in self.addresses

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}"


def _address(text: str) -> Any:
    """An IP address as one value whether a peer reaches an IPv6 socket over IPv4 or not (::ffff:a.b.c.d)."""
    ip = ipaddress.ip_address(text.split("%")[0])  # an IPv6 scope (%eth0) is not part of the address
    return getattr(ip, "ipv4_mapped", None) or ip


@dataclass(frozen=True)
class NodeSettings:
    out: Path
    ae_title: str = "PNEUMOSCAN"
    bind: str = "127.0.0.1"
    port: int = 11112
    send_to: Destination | None = None
    secondary_capture: bool = False
    max_associations: int = 8
    max_instance_mb: float = 64
    keep_instances: bool = True
    send_attempts: int = 3
    retry_wait_s: float = 2.0
    score_timeout_s: float = 120.0
    max_batch: int = 16
    allow_calling: tuple[CallingPeer, ...] = ()  # none: any calling AE title, from any host

    def __post_init__(self) -> None:
        if self.max_associations < 1 or self.send_attempts < 1 or not self.max_instance_mb > 0:
            raise ValueError("--max-associations and --send-attempts must be at least 1, --max-instance-mb above 0")


def decodable_syntaxes() -> list[str]:
    """Transfer syntaxes pydicom (and so the loader) can decode in this environment, uncompressed first."""
    import pydicom.uid as u
    from pydicom.pixels import get_decoder

    always = [u.ExplicitVRLittleEndian, u.ImplicitVRLittleEndian, u.DeflatedExplicitVRLittleEndian]
    compressed = [u.RLELossless, u.JPEGBaseline8Bit, u.JPEGExtended12Bit, u.JPEGLossless, u.JPEGLosslessSV1,
                  u.JPEGLSLossless, u.JPEGLSNearLossless, u.JPEG2000Lossless, u.JPEG2000]
    usable = []
    for uid in compressed:
        try:
            if get_decoder(uid).is_available:
                usable.append(uid)
        except (NotImplementedError, ValueError):  # no decoder at all for this syntax
            continue
    return [str(s) for s in always + usable]
