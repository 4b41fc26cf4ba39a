"""kdpipe: offline knowledge distillation with cached teacher logits."""

import os as _os

__version__ = "0.1.0"

# kdpipe never relies on HDF5's file locks: shards are built in memory and renamed into place whole,
# and caches are opened read-only. The locks only break things: on file systems without working
# locks (some NFS, Lustre), or when any other process holds a lock on a cache file. HDF5 reads this
# variable once, when h5py is first imported, and it overrides h5py.File(..., locking=False), so it
# is forced here, before any kdpipe module imports h5py.
_os.environ["HDF5_USE_FILE_LOCKING"] = "FALSE"


class KDPipeError(Exception):
    """An error caused by the user's input or files, reported as one line without a traceback."""
