"""kdpipe: offline knowledge distillation with cached teacher logits."""

__version__ = "0.1.0"

# kdpipe never relies on HDF5's file locks: shards are built in memory and renamed into place whole,
# and caches are opened read-only with h5py.File(..., locking=False). The user's
# HDF5_USE_FILE_LOCKING is left alone; set to TRUE, BEST_EFFORT or 1 it overrides locking=False, and
# a cache file that another process holds locked (or, for TRUE, one on a file system without locks)
# is refused with a one-line error that says to unset it (kdpipe.util.hdf5_open_error).


class KDPipeError(Exception):
    """An error caused by the user's input or files, reported as one line without a traceback."""


# The public Python API (kdpipe/api.py), importable from the package: kdpipe.open_cache(...),
# kdpipe.create_loss(...), kdpipe.create_model(...). Loaded on first use, so `import kdpipe` (and the
# CLI's start) does not import torch.
_API = ("open_cache", "CacheData", "create_loss", "create_model", "known_losses")


def __getattr__(name):
    if name in _API:
        from kdpipe import api
        return getattr(api, name)
    raise AttributeError(f"module 'kdpipe' has no attribute {name!r}")


def __dir__():  # dir(kdpipe) and tab completion list the lazily loaded API too
    return sorted(set(globals()) | set(_API))
