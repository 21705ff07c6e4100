"""Pull a variant from the Hugging Face Hub: the one module that downloads with ``huggingface_hub``.

:func:`download` fetches only the files of the checkpoint format (``config.json`` and
``model.safetensors``) with ``snapshot_download`` into the usual Hugging Face cache, and returns the
snapshot directory for :func:`surgery.checkpoint.load_local`. Nothing from the repo is unpickled or
run. With ``HF_HUB_OFFLINE=1`` it serves from the cache without any request.

Every way a pull can fail (Hub unreachable with nothing cached, missing repo, revision or file,
private or gated repo without a token, a repo in another format) raises one :class:`HubError`
that names the repo and says what to do, within the first request's deadline plus a moment
(:func:`metadata_deadline`: 3 s, or ``SURGERY_HUB_DEADLINE_S``): the first request runs under a hard
deadline, because DNS look-ups, the client's telemetry request and its retries are not bounded by
socket timeouts. A Hub that answers later than that counts as unreachable (a slow mirror, a loaded
machine: raise the setting there). Once the Hub has answered, the transfer itself runs
under the client's own timeouts (``HF_HUB_ETAG_TIMEOUT``, ``HF_HUB_DOWNLOAD_TIMEOUT``).

``huggingface_hub`` reads ``HF_ENDPOINT``, ``HF_HOME`` and ``HF_HUB_OFFLINE`` when it is imported,
so set them before the first import (``surgery.loading`` imports this module lazily for that reason).

Example:
    >>> from surgery.hub import download
    >>> folder = download("my-org/resnet18-shapes-int8", revision="main")
    >>> sorted(p.name for p in folder.iterdir())
    ['config.json', 'model.safetensors']
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import TypeVar

import httpx2
from huggingface_hub import HfApi, constants, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HFValidationError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.hf_api import ModelInfo
from huggingface_hub.utils import validate_repo_id

from surgery.checkpoint import FILES, FORMAT, PICKLE_SUFFIXES, CheckpointError

logger = logging.getLogger(__name__)

DEADLINE_ENV = "SURGERY_HUB_DEADLINE_S"
DEFAULT_DEADLINE_S = 3.0
_LOGIN_HINT = "log in with `hf auth login` or set HF_TOKEN"
T = TypeVar("T")


class HubError(CheckpointError):
    """A Hub repo that cannot be pulled as a variant; the message names the repo and what to do."""


def download(repo_id: str, revision: str | None = None) -> Path:
    """Download the checkpoint files of ``repo_id`` at ``revision``; returns the snapshot directory.

    Raises :class:`HubError` for every failure; see the module docstring.
    """
    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise HubError(f"{repo_id!r} is neither a local checkpoint directory nor a valid Hub repo id "
                       f"(ORG/NAME): {exc}") from None
    revision = revision or constants.DEFAULT_REVISION
    where = f"{repo_id}@{revision}"
    info = None if constants.is_offline_mode() else _model_info(repo_id, revision)
    if info is not None and info.siblings is not None:
        _check_files(where, [s.rfilename for s in info.siblings])
    try:
        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=list(FILES),
                                        local_files_only=info is None))
    except LocalEntryNotFoundError as exc:
        raise _not_cached(where, online=info is not None, cause=exc) from None
    except HfHubHTTPError as exc:
        raise _explain(exc, repo_id, revision) from None
    except EntryNotFoundError as exc:  # listed by the tree but gone when fetched
        raise HubError(f"{where}: a file of the checkpoint is missing on the Hub ({exc}); push the "
                       "variant again with `python -m hub_export push`") from None
    except httpx2.TransportError as exc:
        raise HubError(f"{where}: the connection to {constants.ENDPOINT} broke off during the download "
                       f"({exc}); try again") from None
    _check_files(where, [p.name for p in folder.iterdir()])
    logger.info("pulled %s into %s", where, folder)
    return folder


def metadata_deadline() -> float:
    """The first request's hard limit in seconds, past which the Hub counts as unreachable:
    ``$SURGERY_HUB_DEADLINE_S`` when set (read at each call), else 3."""
    text = os.environ.get(DEADLINE_ENV, "").strip()
    try:
        seconds = float(text) if text else DEFAULT_DEADLINE_S
    except ValueError:
        raise HubError(f"{DEADLINE_ENV}={text!r}: not a number of seconds") from None
    if seconds <= 0:
        raise HubError(f"{DEADLINE_ENV}={text!r}: the deadline must be positive")
    return seconds


def _model_info(repo_id: str, revision: str) -> ModelInfo | None:
    """The repo's metadata, or None when the Hub cannot be reached (then the cache is used)."""
    api, deadline = HfApi(), metadata_deadline()
    try:
        return _within(deadline, lambda: api.model_info(repo_id, revision=revision, timeout=deadline))
    except (TimeoutError, httpx2.TransportError, OfflineModeIsEnabled) as exc:
        logger.warning("cannot reach the Hub at %s (%s): looking for %s@%s in the cache",
                       constants.ENDPOINT, str(exc) or type(exc).__name__, repo_id, revision)
        return None
    except HfHubHTTPError as exc:
        if exc.response.status_code >= 500:
            logger.warning("the Hub at %s answered HTTP %d: looking for %s@%s in the cache",
                           constants.ENDPOINT, exc.response.status_code, repo_id, revision)
            return None
        raise _explain(exc, repo_id, revision) from None


def _within(seconds: float, fn: Callable[[], T]) -> T:
    """``fn()``, or ``TimeoutError`` after ``seconds``; a late call finishes alone in a daemon thread."""
    future: Future = Future()

    def run() -> None:
        try:
            future.set_result(fn())
        except BaseException as exc:  # handed to the caller, whatever it is
            future.set_exception(exc)

    threading.Thread(target=run, name="surgery-hub-metadata", daemon=True).start()
    try:
        return future.result(timeout=seconds)
    except TimeoutError:
        raise TimeoutError(f"no answer within {seconds:g} s") from None


def _explain(exc: HfHubHTTPError, repo_id: str, revision: str) -> HubError:
    where = f"{repo_id}@{revision}"
    if isinstance(exc, GatedRepoError):
        return HubError(f"{repo_id}: gated repo; request access on {constants.ENDPOINT}/{repo_id} "
                        f"and {_LOGIN_HINT}")
    if isinstance(exc, RevisionNotFoundError) or (
            isinstance(exc, RepositoryNotFoundError) and revision != constants.DEFAULT_REVISION
            and _exists(repo_id)):
        return HubError(f"{where}: no such revision (branch, tag or commit) in {repo_id}; check the "
                        "revision, or leave it out for the default branch")
    if isinstance(exc, RepositoryNotFoundError):
        return HubError(f"{repo_id}: no such model repo on {constants.ENDPOINT} (nor a local directory), "
                        f"or it is private and no valid token was sent; check the repo id, or {_LOGIN_HINT}")
    status = exc.response.status_code
    hint = f"; {_LOGIN_HINT}" if status in (401, 403) else ""
    return HubError(f"{where}: the Hub at {constants.ENDPOINT} answered HTTP {status} "
                    f"({exc.server_message or exc}){hint}")


def _exists(repo_id: str) -> bool:
    """Whether the repo answers at its default branch (some mirrors report a bad revision as 404)."""
    deadline = metadata_deadline()
    try:
        _within(deadline, lambda: HfApi().model_info(repo_id, revision=constants.DEFAULT_REVISION,
                                                     timeout=deadline))
    except Exception:  # any failure means "cannot tell": report the repo as missing
        return False
    return True


def _check_files(where: str, names: list[str]) -> None:
    missing = [f for f in FILES if f not in names]
    if not missing:
        return
    pickles = sorted(n for n in names if n.endswith(PICKLE_SUFFIXES))
    found = f"; it holds {', '.join(sorted(names))}" if names else "; it holds no files"
    hint = " (pickle files are never loaded)" if pickles else ""
    raise HubError(f"{where} is not a {FORMAT} checkpoint: {', '.join(missing)} missing{found}{hint}. "
                   "Push a variant with `python -m hub_export push CKPT_DIR --repo-id ORG/NAME`")


def _not_cached(where: str, *, online: bool, cause: Exception) -> HubError:
    cache = constants.HF_HUB_CACHE
    if online:  # the Hub answered but the files could not be fetched
        return HubError(f"{where}: download failed and the files are not in the cache {cache} ({cause})")
    if constants.is_offline_mode():
        return HubError(f"{where} is not in the local cache {cache} and HF_HUB_OFFLINE is set: pull it "
                        "once online (unset HF_HUB_OFFLINE), or load a local checkpoint directory")
    return HubError(f"cannot reach the Hub at {constants.ENDPOINT} and {where} is not in the local cache "
                    f"{cache}: check the network or HF_ENDPOINT; once pulled, it loads offline "
                    "(HF_HUB_OFFLINE=1)")
