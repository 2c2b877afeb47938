"""Views of results: the 4D point-cloud viewer (HTML and rerun) and shared plotting helpers."""

from .viewer import Frame, viewer_assets, viewer_data, viewer_fragment, write_viewer_html

__all__ = ["Frame", "viewer_assets", "viewer_data", "viewer_fragment", "write_viewer_html", "write_rerun_recording",
           "rerun_available"]


def __getattr__(name: str):
    if name in ("write_rerun_recording", "rerun_available"):  # rerun is imported only when a recording is written
        from . import recording

        return getattr(recording, name)
    raise AttributeError(name)
