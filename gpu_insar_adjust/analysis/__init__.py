"""analysis sub-package."""
