"""generate's and judge's output folders: is one finished with these settings? (Their manifest.json
records the settings it was made with; a re-run with the same settings keeps it.)"""

from __future__ import annotations

from stages.core import storage
from stages.core.refs.identity import check_same, differences


def finished(output: str, settings: dict, overwrite: bool, holds: str = "candidates") -> dict | None:
    """The manifest of a finished output made with these settings (None: make it). Other settings: an
    error naming the keys that differ (refs.identity's, as precompute's), unless overwrite. `holds`: what the
    output holds, for the message."""
    url = storage.join(output, "manifest.json")
    if not storage.exists(url):
        return None
    manifest = storage.read_json(url)
    if overwrite:
        return manifest if not differences(manifest.get("settings", {}), settings) else None
    check_same(output, holds, manifest.get("settings", {}), dict(sorted(settings.items())),
               "use another --output, or --overwrite")
    return manifest
