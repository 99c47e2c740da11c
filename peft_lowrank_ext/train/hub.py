"""Fail fast when the Hugging Face Hub cannot be reached.

Without a network, ``huggingface_hub`` retries a failed request with back-off (1 + 2 + 4 + 8 + 8 s,
twice per file), so an unknown or uncached hub id costs about a minute before its error.
:func:`fail_fast_offline` is called before anything names a hub id: unless offline mode is already
requested (``HF_HUB_OFFLINE``, ``TRANSFORMERS_OFFLINE``, ``HF_DATASETS_OFFLINE``), it opens one TCP
connection to the Hub (or to the HTTPS proxy) with a short timeout and, if that fails, switches
``huggingface_hub``, ``transformers`` and ``datasets`` to offline mode: cached models and data sets
still load, anything else fails at once with one clear line.
"""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path
from urllib.parse import urlparse

OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
TRUE_VALUES = {"1", "ON", "YES", "TRUE"}
PROBE_TIMEOUT_S = 3.0

_probed: bool | None = None  # the probe's answer, once per process


def offline_requested() -> bool:
    """True when an offline variable is set (or :func:`go_offline` ran)."""
    return any(os.environ.get(k, "").upper() in TRUE_VALUES for k in OFFLINE_VARIABLES)


def is_hub_id(value: str | os.PathLike | None) -> bool:
    """True for a name that is not an existing local path (so it would be fetched from the Hub)."""
    return value is not None and str(value) != "" and not Path(str(value)).expanduser().exists()


def _probe_address() -> tuple[str, int]:
    proxy = next((os.environ[k] for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")
                  if os.environ.get(k)), None)
    url = proxy or os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    parsed = urlparse(url if "://" in url else f"http://{url}")
    return parsed.hostname or "huggingface.co", parsed.port or (443 if parsed.scheme == "https" else 80)


def hub_reachable(timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether one TCP connection to the Hub (or the proxy) opens within ``timeout`` seconds, name lookup
    included (run in a thread, so a hanging DNS lookup cannot hold the caller longer)."""
    host, port = _probe_address()
    answer: list[bool] = []

    def connect():
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            answer.append(True)
        except OSError:
            answer.append(False)

    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(answer and answer[0])


def go_offline() -> None:
    """Offline mode for ``huggingface_hub``/``transformers`` and ``datasets`` in this process (no requests, so no
    retries: cached files load, anything else fails at once)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    import huggingface_hub.constants as hub_constants

    hub_constants.HF_HUB_OFFLINE = True  # read at import; transformers asks huggingface_hub.is_offline_mode()
    try:
        import datasets.config as datasets_config
    except ImportError:  # pragma: no cover - datasets is a dependency
        return
    datasets_config.HF_HUB_OFFLINE = True
    datasets_config.HF_DATASETS_OFFLINE = True


def fail_fast_offline(*names: str | os.PathLike | None) -> bool:
    """Before loading ``names`` (models, data sets): if one is a hub id and the Hub cannot be reached, switch to
    offline mode. Returns True when offline mode is (now) on."""
    global _probed
    if offline_requested():
        return True
    if not any(is_hub_id(n) for n in names):
        return False
    if _probed is None:
        _probed = hub_reachable()
    if not _probed:
        go_offline()
    return not _probed


__all__ = ["fail_fast_offline", "go_offline", "hub_reachable", "is_hub_id", "offline_requested"]
