"""The one guarded import of the compiled extension ``optden._C``.

``C`` is the module, or None with ``error`` saying why (not built, import failure).
Importing this file never initialises CUDA.
"""
from __future__ import annotations

C = None
error: str | None = None
try:
    from . import _C as C  # type: ignore[attr-defined]
except ImportError as exc:  # built without the extension, or a broken build
    error = f"optden._C could not be imported: {exc}"


def features() -> dict:
    """What the compiled extension reports about itself (CPU features, CUDA build)."""
    if C is None:
        return {}
    return dict(C.build_info())
