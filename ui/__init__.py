"""The genreg web app, imported as ``genreg.ui``: ``genreg ui`` starts it; ``build_app`` and ``launch`` embed it."""

import os

# No usage analytics, whatever the environment says: set before gradio is first imported.
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"

from .app import build_app, launch  # noqa: E402
from .workspace import Workspace  # noqa: E402

__all__ = ["Workspace", "build_app", "launch"]
