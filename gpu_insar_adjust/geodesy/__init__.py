"""geodesy sub-package."""
