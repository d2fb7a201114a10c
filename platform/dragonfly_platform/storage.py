"""Where data lives: local folders or ``s3://`` buckets (AWS or any S3-compatible store).

One ``StorageConfig`` gives both file-system flavours the platform needs: an fsspec file system
(s3fs) for reading manifests and image bytes, and a pyarrow file system for Parquet and Ray Train
checkpoints. Unset fields fall back to the usual AWS environment variables *in the process that
opens the file system*, so a config written on a laptop carries no secrets and a Ray worker uses its
node's credentials. Secrets are ``SecretStr``: ``repr``, ``str`` and ``model_dump`` show ``**********``.

Errors: a missing object is ``FileNotFoundError`` (the data pipeline counts it as a bad record); an
object store that does not answer after ``retries`` attempts is ``StorageUnavailableError`` (the job
stops: skipping every record of an unreachable bucket would only hide the outage).
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import tempfile
from collections.abc import Iterator
from functools import lru_cache
from typing import Any
from urllib.parse import urlparse

import fsspec
import pyarrow.fs
from pydantic import BaseModel, ConfigDict, SecretStr


class StorageUnavailableError(OSError):
    """The object store could not be reached or kept failing after retries."""


# Errors of ``read_bytes`` that concern one object while the store works: its record is skipped.
RECORD_READ_ERRORS = (FileNotFoundError, IsADirectoryError, PermissionError)


def read_error_reason(err: OSError) -> str:
    """The bad-record reason of a ``RECORD_READ_ERRORS`` error."""
    return "unreadable_file" if isinstance(err, PermissionError) else "missing_file"


class StorageConfig(BaseModel):
    """Credentials and endpoint for ``s3://`` URLs; local paths need none of it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # None -> AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL (unset: AWS itself).
    endpoint_url: str | None = None
    # None -> AWS_REGION / AWS_DEFAULT_REGION.
    region: str | None = None
    # None -> AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN, then botocore's chain
    # (profiles, instance roles).
    access_key: SecretStr | None = None
    secret_key: SecretStr | None = None
    session_token: SecretStr | None = None
    anon: bool = False
    # Path-style URLs (endpoint/bucket/key), what S3-compatible stores (SeaweedFS, MinIO) expect;
    # None: path style when a custom endpoint is set, AWS's default otherwise.
    path_style: bool | None = None
    # Attempts per request (botocore "standard" retry mode: connection errors, throttling, 5xx).
    retries: int = 5
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 30.0

    # -- resolved settings (explicit value, else this process's environment) ---------------------

    def resolved_endpoint(self) -> str | None:
        return (
            self.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        )

    def resolved_region(self) -> str | None:
        return self.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")

    def _credentials(self) -> tuple[str | None, str | None, str | None]:
        def pick(field: SecretStr | None, env: str) -> str | None:
            return field.get_secret_value() if field is not None else os.environ.get(env)

        return (
            pick(self.access_key, "AWS_ACCESS_KEY_ID"),
            pick(self.secret_key, "AWS_SECRET_ACCESS_KEY"),
            pick(self.session_token, "AWS_SESSION_TOKEN"),
        )

    # -- file systems ------------------------------------------------------------------------------

    def filesystem(self, url: str) -> fsspec.AbstractFileSystem:
        """s3fs for ``s3://`` URLs, the local file system otherwise (cached per process)."""
        if not is_s3(url):
            return fsspec.filesystem("file")
        key, secret, token = self._credentials()
        return _s3fs(
            self.anon,
            self.resolved_endpoint(),
            self.resolved_region(),
            key,
            secret,
            token,
            self.retries,
            self.connect_timeout_s,
            self.read_timeout_s,
            self._path_style(),
        )

    def _path_style(self) -> bool:
        return self.path_style if self.path_style is not None else self.resolved_endpoint() is not None

    def pyarrow_filesystem(self, url: str | None = None) -> pyarrow.fs.FileSystem:
        """pyarrow's S3 (``url`` None or ``s3://``) or local file system, for Parquet and checkpoints.
        Pass paths to it without the ``s3://`` scheme (``strip_scheme``)."""
        if url is not None and not is_s3(url):
            return pyarrow.fs.LocalFileSystem()
        key, secret, token = self._credentials()
        kwargs: dict[str, Any] = {
            "anonymous": self.anon,
            "region": self.resolved_region(),
            "connect_timeout": self.connect_timeout_s,
            "request_timeout": self.read_timeout_s,
            "retry_strategy": pyarrow.fs.AwsStandardS3RetryStrategy(max_attempts=self.retries),
            "force_virtual_addressing": self.path_style is False,  # pyarrow: path style with an endpoint
        }
        endpoint = self.resolved_endpoint()
        if endpoint:
            parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
            kwargs["endpoint_override"] = parsed.netloc
            kwargs["scheme"] = parsed.scheme
        if key and secret and not self.anon:
            kwargs.update(access_key=key, secret_key=secret, session_token=token)
        return pyarrow.fs.S3FileSystem(**{k: v for k, v in kwargs.items() if v is not None})

    # -- reading -------------------------------------------------------------------------------------

    def read_bytes(self, url: str) -> bytes:
        """The whole object. ``FileNotFoundError`` if it is not there; ``StorageUnavailableError``
        if the object store keeps failing. A local file raises its own ``OSError`` (a
        ``PermissionError`` is that file's problem, not an outage)."""
        if not is_s3(url):
            with open(url, "rb") as f:
                return f.read()
        fs = self.filesystem(url)
        try:
            return fs.cat_file(strip_scheme(url))
        except (FileNotFoundError, IsADirectoryError):
            raise
        except Exception as err:  # botocore/aiohttp errors share no base class with OSError
            raise self._unavailable(url, err) from err

    def open(self, url: str, mode: str = "rb", **kwargs: Any):
        """A file object for ``url`` (local path or ``s3://``)."""
        fs = self.filesystem(url)
        try:
            return fs.open(strip_scheme(url) if is_s3(url) else url, mode, **kwargs)
        except (FileNotFoundError, IsADirectoryError):
            raise
        except Exception as err:
            raise self._unavailable(url, err) from err

    def _unavailable(self, url: str, err: Exception) -> StorageUnavailableError:
        where = self.resolved_endpoint() or "AWS S3"
        return StorageUnavailableError(
            f"could not read {url} from {where} after {self.retries} attempts "
            f"({type(err).__name__}: {err}); is the object store up and the endpoint right?"
        )


@lru_cache(maxsize=16)
def _s3fs(anon, endpoint, region, key, secret, token, retries, connect_timeout, read_timeout, path_style):
    # Cached per process: map tasks reuse one client (and its connection pool) for every batch.
    import s3fs  # imported here so that local-only runs do not pay for aiobotocore

    client_kwargs = {"region_name": region} if region else {}
    return s3fs.S3FileSystem(
        anon=anon,
        endpoint_url=endpoint,
        key=key,
        secret=secret,
        token=token,
        client_kwargs=client_kwargs,
        config_kwargs={
            "retries": {"max_attempts": retries, "mode": "standard"},
            "connect_timeout": connect_timeout,
            "read_timeout": read_timeout,
            "s3": {"addressing_style": "path" if path_style else "auto"},
        },
        # fsspec's own instance cache would ignore our lru key; one cache is enough.
        skip_instance_cache=True,
    )


@contextlib.contextmanager
def fetched_dir(url: str, storage: StorageConfig, download_dir: str | None = None) -> Iterator[str]:
    """A local folder holding ``url`` (a local folder or an ``s3://`` prefix) for the duration:
    itself when local, else a download into a temporary folder (under ``download_dir``) that is
    removed afterwards. Models also come from MLflow URIs: ``evaluate.fetched_model``."""
    if not is_s3(url):
        if not os.path.isdir(url):
            raise FileNotFoundError(f"{url}: no such folder")
        yield url
        return
    if download_dir:
        os.makedirs(download_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="dragonfly-fetch-", dir=download_dir) as local:
        pyarrow.fs.copy_files(strip_scheme(url), local, source_filesystem=storage.pyarrow_filesystem(url))
        yield local


def is_s3(url: str) -> bool:
    return url.startswith("s3://")


def strip_scheme(url: str) -> str:
    """``s3://bucket/key`` -> ``bucket/key`` (what pyarrow and s3fs path arguments expect)."""
    return url[len("s3://") :] if is_s3(url) else url


def is_absolute(path: str) -> bool:
    return is_s3(path) or "://" in path or os.path.isabs(path)


def join(root: str | None, path: str) -> str:
    """``path`` under ``root`` (a folder or an ``s3://`` prefix); absolute paths and URLs are kept."""
    if root is None or is_absolute(path):
        return path
    if is_s3(root):
        return f"{root.rstrip('/')}/{path.lstrip('/')}"
    return os.path.join(root, path)


def parent(url: str) -> str:
    """The folder (or prefix) holding ``url``."""
    return posixpath.dirname(url.rstrip("/")) if is_s3(url) else os.path.dirname(os.path.abspath(url))


__all__ = [
    "StorageConfig",
    "StorageUnavailableError",
    "RECORD_READ_ERRORS",
    "read_error_reason",
    "fetched_dir",
    "is_s3",
    "is_absolute",
    "strip_scheme",
    "join",
    "parent",
]
