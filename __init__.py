"""vlcache: precomputed Mask R-CNN, bottom-up region and grid feature stores for V&L training.

``vlcache.open(url)`` opens a store read-only for notebooks (see :class:`vlcache.storage.store.Store`).
"""

__version__ = "0.1.0"


def open(url, image_root=None, storage_options=None):  # noqa: A001 - the notebook API's name
    """Open a store (directory, .h5 file or fsspec URL) read-only: ``len(store)``, ``store.show(i)``..."""
    from .storage.store import open_store

    return open_store(url, image_root=image_root, storage_options=storage_options)
