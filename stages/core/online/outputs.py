"""generate's and judge's output folders: is one finished with these settings? (Their manifest.json
records the settings it was made with; a re-run with the same settings keeps it.)"""

from __future__ import annotations

from stages.core import storage
from stages.core.config.engine import ConfigError


def finished(output: str, settings: dict, overwrite: bool) -> dict | None:
    """The manifest of a finished output made with these settings (None: make it). Other settings: an
    error naming the keys that differ, unless overwrite."""
    url = storage.join(output, "manifest.json")
    if not storage.exists(url):
        return None
    manifest = storage.read_json(url)
    differ = sorted(k for k in settings if manifest.get("settings", {}).get(k) != settings[k])
    if not differ:
        return manifest
    if not overwrite:
        raise ConfigError(f"{output} holds candidates made with other settings ({', '.join(differ)} differ: "
                          + "; ".join(f"{k} {manifest.get('settings', {}).get(k)!r} -> {settings[k]!r}"
                                      for k in differ[:4])
                          + "); use another --output, or --overwrite")
    return None
