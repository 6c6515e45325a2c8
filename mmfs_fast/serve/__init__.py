"""HTTP service over the engine, with its web page at / (static/): a FastAPI app
(:func:`create_app`), run by uvicorn (``mmfs-fast serve``) or by Ray Serve
(:mod:`mmfs_fast.serve.ray`). Needs the 'serve' extra: ``pip install 'mmfs_fast[serve]'``."""
from mmfs_fast.serve.app import ServeSettings, create_app
from mmfs_fast.serve.server import add_cli_parser, load_engine

__all__ = ["ServeSettings", "add_cli_parser", "create_app", "load_engine"]
