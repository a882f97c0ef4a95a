"""``edgekv serve``: an OpenAI-compatible HTTP server (needs the ``serve`` extra:
``pip install edgekv[serve]``).

    from edgekv.server import create_app, serve
"""

from .app import create_app
from .run import serve

__all__ = ["create_app", "serve"]
