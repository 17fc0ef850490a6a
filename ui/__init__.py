"""The genreg web app, imported as ``genreg.ui``."""
