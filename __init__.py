"""vlcache: precomputed Mask R-CNN, bottom-up region and grid feature stores for V&L training."""
__version__ = "0.1.0"
