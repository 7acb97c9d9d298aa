"""Walk a view as the calling process sees it and print one JSON object: for every path met,
its lstat (type, mode, uid, gid, size) or the errno name, its listing or the errno name (dirs),
its content digest or the errno name (files).

Run by the rootless tests as another user or inside a user namespace (standard library only):
``python view_probe.py ROOT [ROOT...]`` prints ``{ROOT: {path: record}}``; the paths in
``$VIEW_PROBE_ALSO`` (``:``-separated, relative) are probed too (names below a directory that
cannot be listed).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
import sys


def _err(e: OSError) -> str:
    return errno.errorcode.get(e.errno or 0, str(e.errno))


def probe(root: str) -> dict[str, dict[str, object]]:
    out: dict[str, dict[str, object]] = {}
    todo = [""] + [p for p in os.environ.get("VIEW_PROBE_ALSO", "").split(":") if p]
    while todo:
        rel = todo.pop()
        if rel in out:
            continue
        path = os.path.join(root, rel) if rel else root
        rec: dict[str, object] = {}
        out[rel] = rec
        try:
            st = os.lstat(path)
        except OSError as e:
            rec["stat"] = _err(e)
            continue
        rec["stat"] = [stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid]
        if stat.S_ISDIR(st.st_mode):
            try:
                names = sorted(os.listdir(path))
            except OSError as e:
                rec["list"] = _err(e)
                names = []
            else:
                rec["list"] = names
            todo += [os.path.join(rel, n) if rel else n for n in names]
        elif stat.S_ISREG(st.st_mode):
            rec["size"] = st.st_size
            try:
                with open(path, "rb") as f:
                    rec["data"] = hashlib.sha256(f.read()).hexdigest()
            except OSError as e:
                rec["data"] = _err(e)
    return out


def main() -> int:
    print(json.dumps({root: probe(root) for root in sys.argv[1:]}, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
