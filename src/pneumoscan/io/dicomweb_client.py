"""A DICOMweb archive as three calls: find instances (QIDO-RS), fetch one (WADO-RS), store objects (STOW-RS).

`Archive` wraps a `dicomweb_client.DICOMwebClient` (`pip install 'pneumoscan[dicomweb]'`) over one HTTP client
of requests that owns the transport: credentials (`credentials`: a bearer token or a user and password, read
from an environment variable or a file, never from the command line), TLS verified (against `ca_bundle` when
given), a timeout on every request, and retries with exponential backoff on 429 and 5xx answers and on
connections that fail (urllib3's `Retry`, which honours Retry-After; dicomweb-client's own retrying is turned
off so there is one). Whatever goes wrong comes out as one `DicomwebError` whose message is one line:
`kind` says whether it is the credentials ("auth"), the server out of reach ("unreachable") or still answering
429 or 5xx after the retries ("unavailable"), an answer that is not what DICOMweb promises ("malformed"), or
another HTTP failure ("http", with `status`).
"""

from __future__ import annotations

import io
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, TypeVar
from urllib.parse import urlsplit

from .fileio import optional_import

TOKEN_VARIABLE = "PNEUMOSCAN_DICOMWEB_TOKEN"
USER_VARIABLE, PASSWORD_VARIABLE = "PNEUMOSCAN_DICOMWEB_USER", "PNEUMOSCAN_DICOMWEB_PASSWORD"
RETRY_STATUSES = (429, 500, 502, 503, 504)
# UIDs of an instance in a QIDO-RS answer (DICOM JSON keys)
STUDY_UID, SERIES_UID, SOP_UID, SOP_CLASS_UID = "0020000D", "0020000E", "00080018", "00080016"
MODALITY, BODY_PART, STUDY_DATE = "00080060", "00180015", "00080020"

T = TypeVar("T")
log = logging.getLogger(__name__)


class DicomwebError(RuntimeError):
    """A request that failed, in one line; `kind` is auth, unreachable, unavailable, malformed or http, `status`
    the HTTP status."""

    def __init__(self, message: str, kind: str, status: int | None = None):
        super().__init__(message)
        self.kind, self.status = kind, status


@dataclass(frozen=True)
class Credentials:
    """A bearer token, or a user and password for HTTP basic authentication; `source` says where they came from."""

    token: str | None = None
    user: str | None = None
    password: str | None = None
    source: str = ""

    def __repr__(self) -> str:  # never the secret, whatever prints this
        return f"Credentials(from {self.source or 'nowhere'})"


def _read_secret(path: str | os.PathLike, what: str) -> str:
    try:
        text = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        reason = getattr(e, "strerror", None) or e
        raise ValueError(f"{path}: cannot read the {what} ({e.__class__.__name__}: {reason})") from None
    if not text or "\n" in text:
        raise ValueError(f"{path}: the {what} file must hold one line, not {'nothing' if not text else 'several'}")
    return text


def credentials(token_file: str | None = None, basic_auth_file: str | None = None,
                environ: Mapping[str, str] = os.environ) -> Credentials | None:
    """The credentials from `token_file` (a bearer token), `basic_auth_file` (USER:PASSWORD) or the environment
    ($PNEUMOSCAN_DICOMWEB_TOKEN, or $PNEUMOSCAN_DICOMWEB_USER with $PNEUMOSCAN_DICOMWEB_PASSWORD); None when
    none is given. ValueError when more than one is, or a file cannot be read."""
    given = [name for name, there in (("--token-file", token_file), ("--basic-auth-file", basic_auth_file),
                                      (f"${TOKEN_VARIABLE}", environ.get(TOKEN_VARIABLE)),
                                      (f"${USER_VARIABLE}", environ.get(USER_VARIABLE))) if there]
    if len(given) > 1:
        raise ValueError(f"credentials given twice ({' and '.join(given)}): give one")
    if token_file:
        return Credentials(token=_read_secret(token_file, "token"), source=f"--token-file {token_file}")
    if basic_auth_file:
        user, colon, password = _read_secret(basic_auth_file, "USER:PASSWORD").partition(":")
        if not colon or not user:
            raise ValueError(f"{basic_auth_file}: the basic-auth file must hold USER:PASSWORD on one line")
        return Credentials(user=user, password=password, source=f"--basic-auth-file {basic_auth_file}")
    if environ.get(TOKEN_VARIABLE):
        return Credentials(token=environ[TOKEN_VARIABLE].strip(), source=f"${TOKEN_VARIABLE}")
    if environ.get(USER_VARIABLE):
        if PASSWORD_VARIABLE not in environ:
            raise ValueError(f"${USER_VARIABLE} is set but ${PASSWORD_VARIABLE} is not")
        return Credentials(user=environ[USER_VARIABLE], password=environ[PASSWORD_VARIABLE], source=f"${USER_VARIABLE}")
    return None


def _short_reason(error: BaseException) -> str:
    """The useful end of a requests/urllib3 error: '[Errno 111] Connection refused', 'Read timed out', ..."""
    text = str(error)
    for pattern in (r"\[Errno -?\d+\] [^'\")\]]+", r"Read timed out", r"timed out",
                    r"certificate verify failed[^'\")\]]*", r"Connection aborted", r"RemoteDisconnected[^'\")\]]*"):
        found = re.search(pattern, text)
        if found:
            return found.group(0).strip()
    return type(error).__name__


def uid_of(item: Mapping[str, Any], tag: str) -> str | None:
    """The first value of `tag` in a DICOM JSON item, as text (None when absent or empty)."""
    values = (item.get(tag) or {}).get("Value") or []
    return str(values[0]) if values and values[0] is not None else None


def _adapter(ca_bundle: str | None, **kwargs: Any) -> Any:
    """requests' HTTP adapter (retries and pool as `kwargs` say) that verifies TLS against `ca_bundle` when one is
    given: requests lets $REQUESTS_CA_BUNDLE or $CURL_CA_BUNDLE override the `verify` its client object holds,
    so the bundle the user named is set here, on each request."""
    from requests.adapters import HTTPAdapter

    class VerifyingAdapter(HTTPAdapter):
        def send(self, request: Any, **send_kwargs: Any) -> Any:
            if ca_bundle is not None:
                send_kwargs["verify"] = ca_bundle
            return super().send(request, **send_kwargs)

    return VerifyingAdapter(**kwargs)


class Archive:
    """One DICOMweb service at `url`, reached through one HTTP client; thread-safe for the calls below."""

    def __init__(self, url: str, creds: Credentials | None = None, ca_bundle: str | None = None,
                 timeout_s: float = 60, attempts: int = 4, backoff_s: float = 1.0):
        requests = optional_import("requests", "dicomweb", "DICOMweb")
        web = optional_import("dicomweb_client", "dicomweb", "DICOMweb")
        from urllib3.util.retry import Retry

        if not re.match(r"https?://[^/\s]+", url):
            raise ValueError(f"--url must be an http:// or https:// address of a DICOMweb service, not {url!r}")
        if ca_bundle is not None and not Path(ca_bundle).is_file():
            raise ValueError(f"--ca-bundle {ca_bundle}: no such file")
        self.url, self.attempts, self.timeout_s = url.rstrip("/"), attempts, timeout_s
        host = urlsplit(url).hostname or ""
        if creds is not None and url.startswith("http://") and host not in ("localhost", "127.0.0.1", "::1"):
            log.warning("credentials (%s) go to %s unencrypted: use https:// beyond this machine", creds.source, host)
        self.requests = requests
        http = requests.Session()
        if creds is not None and creds.token:
            http.headers["Authorization"] = f"Bearer {creds.token}"
        elif creds is not None:
            http.auth = (creds.user, creds.password)
        # STOW-RS is retried too: a report's UIDs are fixed by its source, so a second copy replaces nothing new
        retry = Retry(total=attempts - 1, connect=attempts - 1, read=attempts - 1, status=attempts - 1,
                      backoff_factor=backoff_s, status_forcelist=RETRY_STATUSES, allowed_methods=["GET", "POST"],
                      respect_retry_after_header=True, raise_on_status=False)
        for scheme in ("http://", "https://"):
            http.mount(scheme, _adapter(ca_bundle, max_retries=retry, pool_maxsize=16))
        self.http = http
        self.client = web.DICOMwebClient(self.url, session=http, timeout=(min(timeout_s, 10), timeout_s))
        self.client.set_http_retry_params(retry=False)

    def _call(self, what: str, request: Callable[[], T]) -> T:
        """Run one client call; any failure as a one-line `DicomwebError` naming `what` and the server."""
        r = self.requests
        try:
            return request()
        except r.HTTPError as e:
            status = e.response.status_code if e.response is not None else None
            reason = e.response.reason if e.response is not None else ""
            if status in (401, 403):
                raise DicomwebError(f"{self.url} refused the credentials for {what} (HTTP {status} {reason}): check "
                                    f"${TOKEN_VARIABLE}, --token-file or --basic-auth-file", "auth", status) from None
            if status in RETRY_STATUSES:  # still busy or failing after every retry: the server, not this request
                raise DicomwebError(f"{self.url} answered {what} with HTTP {status} {reason} after {self.attempts} "
                                    "attempts", "unavailable", status) from None
            raise DicomwebError(f"{what} at {self.url} failed: HTTP {status} {reason}", "http", status) from None
        except r.exceptions.SSLError as e:
            raise DicomwebError(f"cannot verify the TLS certificate of {self.url} ({_short_reason(e)}): pass the "
                                "hospital's CA with --ca-bundle", "unreachable") from None
        except (r.ConnectionError, r.Timeout) as e:
            reason = _short_reason(e)
            if reason == "Read timed out":  # connected, asked, and no answer came
                raise DicomwebError(f"no answer from {self.url} to {what} within {self.timeout_s:g} s (--timeout)",
                                    "unreachable") from None
            raise DicomwebError(f"cannot reach {self.url} for {what} ({reason})", "unreachable") from None
        except (ValueError, KeyError, TypeError, AttributeError, IndexError, EOFError) as e:
            # requests' JSON errors are ValueErrors; a multipart or DICOM body that cannot be parsed raises the rest
            message = re.sub(r"\s+", " ", str(e))[:200]
            raise DicomwebError(f"malformed answer from {self.url} to {what} ({type(e).__name__}: {message})",
                                "malformed") from None

    def find_instances(self, filters: Mapping[str, str], fields: Sequence[str] = ()) -> list[dict]:
        """QIDO-RS /instances matching `filters` (every page), each checked to carry its study, series and
        SOP Instance UIDs."""
        found = self._call("QIDO-RS (search for instances)", lambda: self.client.search_for_instances(
            search_filters=dict(filters), fields=list(fields) or None, get_remaining=True))
        if not isinstance(found, list) or not all(isinstance(i, dict) for i in found):
            raise DicomwebError(f"malformed answer from {self.url} to QIDO-RS: not a list of DICOM JSON objects",
                                "malformed")
        for item in found:
            if not all(uid_of(item, tag) for tag in (STUDY_UID, SERIES_UID, SOP_UID)):
                raise DicomwebError(f"malformed answer from {self.url} to QIDO-RS: an instance without its study, "
                                    "series or SOP Instance UID", "malformed")
        return found

    def retrieve(self, study: str, series: str, sop: str) -> tuple[bytes, Any]:
        """WADO-RS one instance in the transfer syntax the archive holds it in (no transcoding): the Part 10 file
        and its pydicom dataset."""
        def fetch() -> tuple[bytes, Any]:
            ds = self.client.retrieve_instance(study, series, sop, media_types=(("application/dicom", "*"),))
            if getattr(ds, "file_meta", None) is None or "TransferSyntaxUID" not in ds.file_meta:
                raise ValueError("the instance has no File Meta Information (no transfer syntax)")
            buf = io.BytesIO()
            ds.save_as(buf, enforce_file_format=True)
            return buf.getvalue(), ds

        return self._call(f"WADO-RS of instance {sop}", fetch)

    def store(self, study: str, datasets: Sequence[Any]) -> list[str]:
        """STOW-RS `datasets` into `study`: the SOP Instance UIDs the archive says it stored. A failure it
        reports for any of them is an 'http' `DicomwebError` naming the reason."""
        answer = self._call("STOW-RS", lambda: self.client.store_instances(list(datasets), study_instance_uid=study))
        failed = list(answer.get("FailedSOPSequence", []) or [])
        if failed:
            reasons = ", ".join(f"{f.get('ReferencedSOPInstanceUID', '?')} (reason {f.get('FailureReason', '?')})"
                                for f in failed)
            raise DicomwebError(f"{self.url} did not store {reasons}", "http")
        stored = [str(r.ReferencedSOPInstanceUID) for r in answer.get("ReferencedSOPSequence", []) or []]
        wanted = {str(ds.SOPInstanceUID) for ds in datasets}
        if stored and not wanted <= set(stored):
            raise DicomwebError(f"malformed answer from {self.url} to STOW-RS: it names other instances than "
                                "those sent", "malformed")
        return stored or sorted(wanted)

    def close(self) -> None:
        self.http.close()
