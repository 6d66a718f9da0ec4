"""adjust sub-package."""
