"""``save`` and ``load``: checkpoints as ``.npz`` files, written atomically.

A checkpoint is a flat dict of name -> array. It is written to a temporary
file in the same folder and renamed over the target only once complete, so a
crash mid-write leaves the previous checkpoint intact. Loading never unpickles
(``allow_pickle=False``), so opening a checkpoint cannot run code.
"""

import os
import tempfile
import zipfile

import numpy as np

from minidet import backend
from minidet.autograd import Tensor


def save(state, path):
    """Write ``state`` (name -> NumPy/CuPy array, Tensor or number) to ``path`` atomically."""
    arrays = {}
    for name, value in state.items():
        if isinstance(value, Tensor):
            value = value.data
        value = backend.to_numpy(value)
        if value.dtype == object:
            raise TypeError(f"save: {name!r} is a {type(state[name]).__name__}, not an array or number; "
                            "checkpoints hold arrays only")
        arrays[name] = value
    write_atomically(path, lambda f: np.savez(f, **arrays))


def write_atomically(path, write):
    """Call ``write(file_object)`` on a temporary file beside ``path``, then rename it to ``path``.

    A crash halfway leaves ``path`` as it was, never half-written. The file gets the usual permissions (those
    of ``open``, after the umask), not the owner-only ones of a temporary file.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.splitext(path)[1], dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def load(path):
    """Read a checkpoint written by ``save``: a dict of name -> NumPy array."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist; check the path")
    if os.path.isdir(path):
        raise IsADirectoryError(f"checkpoint {path!r} is a folder; give the .npz file in it (e.g. last.npz)")
    try:
        archive = np.load(path, allow_pickle=False)
        if isinstance(archive, np.lib.npyio.NpzFile):
            with archive:
                return {name: archive[name] for name in archive.files}  # reads (and CRC-checks) every array now
    except (zipfile.BadZipFile, EOFError, ValueError, OSError, KeyError) as error:
        raise ValueError(f"checkpoint {path!r} cannot be read: it is corrupt, truncated or holds pickled "
                         f"objects ({error}); restore it from a backup or write it again") from error
    raise ValueError(f"checkpoint {path!r} holds a single array (a .npy file), not the named arrays of the .npz "
                     "file that minidet.save writes")
