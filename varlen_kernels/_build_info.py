"""Source hash shared by setup.py (baked into `_C`) and the import-time check.

Standalone on purpose: setup.py runs it by path, before the package exists.
"""
import hashlib
import os


def source_hash(root):
    """Hash of every file under ``root/csrc`` (names and contents)."""
    h = hashlib.sha256()
    csrc = os.path.join(root, "csrc")
    paths = []
    for dirpath, _, files in os.walk(csrc):
        paths += [os.path.join(dirpath, f) for f in files]
    for path in sorted(paths):
        h.update(os.path.relpath(path, root).replace(os.sep, "/").encode())
        with open(path, "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:16]
