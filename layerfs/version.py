"""``layerfs --version``: the package version and the pyfuse3/libfuse it runs on.

Needs neither FUSE nor root: pyfuse3 is imported (not initialised) and libfuse is asked for
its version through ``fuse_pkgversion()``. Whether pyfuse3 carries the layerfs patches is
decided by :func:`layerfs.fs.ops.pyfuse3_features`, the same detection the daemon logs at
start-up.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys


def _libfuse_version() -> str:
    """libfuse's own version string (``3.14.0``), or why it cannot be told."""
    for name in ("libfuse3.so.3", ctypes.util.find_library("fuse3")):
        if not name:
            continue
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        func = getattr(lib, "fuse_pkgversion", None)
        if func is not None:
            func.restype = ctypes.c_char_p
            value = func()
            if isinstance(value, bytes):
                return value.decode("ascii", "replace")
        func = getattr(lib, "fuse_version", None)
        if func is not None:
            num = int(func())
            return f"{num // 100}.{num % 100}"
    return "not found"


def _pyfuse3_line() -> str:
    try:
        import pyfuse3

        from layerfs.fs.ops import pyfuse3_features
    except ImportError as e:
        return f"pyfuse3: not importable ({e})"
    version = getattr(pyfuse3, "__version__", "?")
    missing = pyfuse3_features().missing
    if missing:
        kind = f"stock: no layerfs patches, no {', '.join(missing)}"
    else:
        kind = "patched: kernel readdir and symlink caches, zero-message open"
    return f"pyfuse3 {version} ({kind}) on {pyfuse3.__file__}"


def version_text() -> str:
    """The lines ``layerfs --version`` prints."""
    from layerfs import __version__

    py = sys.version.split()[0]
    return "\n".join(
        [
            f"layerfs {__version__} (Python {py})",
            _pyfuse3_line(),
            f"libfuse {_libfuse_version()}",
        ]
    )
