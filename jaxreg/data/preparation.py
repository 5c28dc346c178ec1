"""Preparing a dataset through TFDS: the builder, downloads refused until one
brief network probe says they can work, and the message that names the
missing files and the folder they belong in."""
from __future__ import annotations

import logging
import os
from pathlib import Path
import socket
import threading
import urllib.parse
import urllib.request

import ml_collections

from jaxreg.data import catalog

MANUAL_DIR_ENV = "JAXREG_MANUAL_DIR"

# Seconds the one network probe may take (connect to the download host, or to
# the proxy that requests would use) before a download is declared impossible.
PROBE_TIMEOUT_S = 3.0


class DatasetMissingError(FileNotFoundError):
  """The dataset is not prepared and cannot be prepared here."""


def builder(cfg: ml_collections.ConfigDict):
  import tensorflow_datasets as tfds  # Heavy import; only when data is needed.
  try:
    return tfds.builder(cfg.name, data_dir=cfg.data_dir,
                        file_format="array_record")
  except tfds.core.registered.DatasetNotFoundError as e:
    raise ValueError(
        f"unknown dataset {cfg.name!r} for config.dataset.name; jaxreg is "
        f"tested with {', '.join(catalog.OFFICIAL_FILES)} (any TFDS image "
        f"classification dataset with 'image' and 'label' features works). "
        f"TFDS said: {str(e).splitlines()[0]}") from None


def is_prepared(tfds_builder) -> bool:
  try:
    return (bool(tfds_builder.info.splits)
            and Path(tfds_builder.data_dir).exists())
  except Exception:  # Mocked or half-written builders.
    return False


# --- What to put where. --------------------------------------------------------


def _source_files(tfds_builder, name: str) -> list[tuple[str, str | None]]:
  """(file name, published URL) of each file the dataset is prepared from."""
  try:
    infos = tfds_builder.url_infos or {}
  except Exception:  # Mocked builders, or no checksums file.
    infos = {}
  files = [(getattr(info, "filename", None) or
            urllib.parse.urlsplit(url).path.rsplit("/", 1)[-1], url)
           for url, info in sorted(infos.items())]
  return files or [(f, None) for f in catalog.OFFICIAL_FILES.get(name, ())]


def _manual_target(name: str, manual_dir: str | None,
                   download_dir: Path) -> tuple[str, str]:
  """The exact folder the official files belong in, and why that one."""
  env = os.environ.get(MANUAL_DIR_ENV)
  env_dir = os.path.abspath(os.path.join(env, name)) if env else None
  if manual_dir is not None:
    why = (f"{MANUAL_DIR_ENV}={env} plus the dataset's name" if
           manual_dir == env_dir else "config.dataset.manual_dir")
    return manual_dir, why
  if env_dir is not None:
    return env_dir, (f"{MANUAL_DIR_ENV}={env} plus the dataset's name; the "
                     f"folder does not exist yet")
  return (str(download_dir / "manual"),
          f"TFDS's default manual folder, as neither config.dataset.manual_dir "
          f"nor {MANUAL_DIR_ENV} is set")


def files_and_folder(tfds_builder, name: str, manual_dir: str | None,
                     download_dir: Path) -> str:
  """Which files to put where, and how to choose another folder."""
  files = _source_files(tfds_builder, name)
  if files:
    what = (f"the official file{'s' if len(files) > 1 else ''} "
            + ", ".join(f"{f} ({url})" if url else f for f, url in files))
  else:
    what = f"the official files of {name!r} (see its TFDS catalog page)"
  folder, why = _manual_target(name, manual_dir, download_dir)
  return (f"Put {what} into {folder} ({why}) and rerun: TFDS then prepares "
          f"the dataset from {'them' if len(files) > 1 else 'it'}, offline. "
          f"Another folder: --config.dataset.manual_dir=DIR (the files "
          f"directly in DIR) or the environment variable "
          f"{MANUAL_DIR_ENV}=PARENT (the files in PARENT/{name}).")


def _missing_data_message(tfds_builder, name: str, manual_dir: str | None,
                          download_dir: Path, cause: str) -> str:
  return (f"dataset {name!r} is not prepared in {tfds_builder.data_dir} and "
          f"could not be prepared: {cause}. "
          + files_and_folder(tfds_builder, name, manual_dir, download_dir)
          + " With internet, TFDS downloads the files itself.")


# --- The network, probed once and briefly. ---------------------------------


def probe_target(url: str) -> tuple[str, int]:
  """The (host, port) a download of `url` connects to first: the proxy that
  requests/urllib would use, else the URL's own host."""
  parts = urllib.parse.urlsplit(url)
  host = parts.hostname or ""
  default_port = {"https": 443, "http": 80, "ftp": 21}.get(parts.scheme, 443)
  proxy = urllib.request.getproxies().get(parts.scheme)
  if proxy and not urllib.request.proxy_bypass(host):
    p = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    return p.hostname or "", p.port or 80
  return host, parts.port or default_port


def unreachable(url: str, timeout: float = PROBE_TIMEOUT_S) -> str | None:
  """None when a TCP connection to the download host (or proxy) opens within
  `timeout` seconds; else why not. One attempt, no retries: TFDS's own
  downloader retries ten times with backoff (over three minutes offline)."""
  host, port = probe_target(url)
  outcome: dict[str, str] = {}

  def connect():
    try:
      socket.create_connection((host, port), timeout=timeout).close()
      outcome["ok"] = ""
    except OSError as e:
      outcome["error"] = f"{type(e).__name__}: {e}"

  # Name resolution ignores socket timeouts, so the wait is bounded here.
  thread = threading.Thread(target=connect, daemon=True)
  thread.start()
  thread.join(timeout + 0.5)
  if "ok" in outcome:
    return None
  why = outcome.get("error", f"no answer within {timeout:g} s")
  return f"no network: {host}:{port} (for {url}) is unreachable ({why})"


class _DownloadNeeded(Exception):
  """Raised inside TFDS when a file would have to be downloaded."""

  def __init__(self, url: str):
    super().__init__(url)
    self.url = url


def _in_chain(exc: BaseException | None, cls: type) -> BaseException | None:
  seen = set()
  while exc is not None and id(exc) not in seen:
    if isinstance(exc, cls):
      return exc
    seen.add(id(exc))
    exc = exc.__cause__ or exc.__context__
  return None


def _refuse_downloads(tfds_builder) -> bool:
  """Makes `tfds_builder` raise _DownloadNeeded where TFDS would download a
  file (files in the manual folder or TFDS's download cache are still used).
  False where this TFDS's internals differ: downloads then stay enabled."""
  make = getattr(tfds_builder, "_make_download_manager", None)
  if make is None:
    return False

  def make_refusing(*args, **kwargs):
    manager = make(*args, **kwargs)
    if hasattr(manager, "_download"):
      def refuse(resource, *unused_args, **unused_kwargs):
        raise _DownloadNeeded(str(getattr(resource, "url", resource)))
      manager._download = refuse  # pylint: disable=protected-access
    return manager

  tfds_builder._make_download_manager = make_refusing  # pylint: disable=protected-access
  return True


class Offline(Exception):
  """A download is needed and the network is unreachable."""


def tfds_prepare(cfg, manual_dir: str | None, download_dir: Path,
                 tfds_builder=None) -> None:
  """builder.download_and_prepare, but offline it fails in seconds (Offline)
  instead of retrying each download for minutes."""
  import tensorflow_datasets as tfds
  kwargs = dict(download_dir=str(download_dir),
                download_config=tfds.download.DownloadConfig(
                    manual_dir=manual_dir))
  tfds_builder = tfds_builder or builder(cfg)
  if not _refuse_downloads(tfds_builder):
    logging.warning("this TFDS cannot be asked to prepare %s without "
                    "downloading; an offline failure may take minutes",
                    cfg.name)
    tfds_builder.download_and_prepare(**kwargs)
    return
  try:
    tfds_builder.download_and_prepare(**kwargs)
    return
  except Exception as e:  # pylint: disable=broad-except
    needed = _in_chain(e, _DownloadNeeded)
    if needed is None:
      raise
  why = unreachable(needed.url)
  if why is not None:
    raise Offline(why)
  # The network answers: download as TFDS always has.
  builder(cfg).download_and_prepare(**kwargs)


def prepare(cfg, tfds_builder, manual_dir: str | None,
            download_dir: Path) -> None:
  """Prepares the dataset unless it is; call with the dataset's lock held."""
  name = cfg.name
  if manual_dir is not None and not is_prepared(tfds_builder):
    files = catalog.OFFICIAL_FILES.get(name, ())
    missing = [f for f in files if not os.path.exists(os.path.join(manual_dir, f))]
    if missing:
      raise DatasetMissingError(_missing_data_message(
          tfds_builder, name, manual_dir, download_dir,
          f"{', '.join(missing)} missing in {manual_dir}"))
  try:
    tfds_prepare(cfg, manual_dir, download_dir, tfds_builder)
  except Offline as e:
    raise DatasetMissingError(_missing_data_message(
        tfds_builder, name, manual_dir, download_dir, str(e))) from None
  except Exception as e:  # TFDS raises many types for offline failures.
    raise DatasetMissingError(_missing_data_message(
        tfds_builder, name, manual_dir, download_dir,
        f"{type(e).__name__}: {e}")) from e
