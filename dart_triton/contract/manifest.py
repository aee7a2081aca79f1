"""The manifest a built repository carries (``dart_repository.json``): its name, how to
read it, and the version check `dart-triton serve` makes before starting.

`export.manifest` writes it and compares builds with it; serving only reads it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

MANIFEST = "dart_repository.json"


class ManifestError(ValueError):
    """A manifest that cannot be read."""


def read_manifest(repo: str | Path) -> dict[str, Any] | None:
    """The manifest, or None when the repository has none (not built by `dart-triton build`)."""
    path = Path(repo) / MANIFEST
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ManifestError(f"{path} is unreadable ({exc})") from None
    if not isinstance(data, dict):
        raise ManifestError(f"{path} is not a manifest")
    return data


def version_refusal(repositories: Iterable[str | Path], version: str) -> str | None:
    """One line when a repository was built by a dart-triton other than `version`, else
    None: the generated ``model.py`` entry points import that version's modules and its
    configs follow that version's specs.

    A repository without a manifest (written by hand, or by another tool) is not refused.
    """
    for repo in repositories:
        try:
            manifest = read_manifest(repo)
        except ManifestError as exc:
            return f"{exc}: rebuild the repository with `dart-triton build`"
        if manifest is None:
            continue
        built = manifest.get("dart_triton_version")
        if built != version:
            by = f"dart-triton {built}" if built else "an earlier dart-triton"
            return (f"{repo} was built by {by} and this is {version}: rebuild it with "
                    "`dart-triton build`")
    return None
