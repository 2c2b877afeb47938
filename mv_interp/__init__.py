"""mv_interp — mechanistic interpretability for multi-view 3D transformers.

>>> import mv_interp
>>> model = mv_interp.load_model("dust3r-toy")            # bundled, trained on synthetic rooms
>>> with model.trace(img1, img2):
...     resid = model.dec_blocks2[1].hook_resid_mid.output.save()
>>> out, cache = model.run_with_cache(img1, img2, names_filter="*hook_resid_post")
"""

from . import _compat  # noqa: F401  (must come first: beartype before nnsight)

__version__ = "0.1.0"

_LAZY = {
    "load_model": ".api",
    "load_hooked": ".loading",
    "save_pretrained": ".loading",
    "parse_constructor": ".loading",
    "MVModel": ".model",
    "HookPoint": ".hooks",
    "ActivationCache": ".hooks",
    "load_images": ".images",
    "get_adapter": ".adapters",
    "list_adapters": ".adapters",
    "register_adapter": ".adapters",
    "list_models": ".api",
    "UserError": ".errors",
}


def __getattr__(name: str):
    target = _LAZY.get(name)
    if target is None:
        raise AttributeError(f"module 'mv_interp' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(target, __name__), name)
    globals()[name] = value
    return value


__all__ = sorted(_LAZY) + ["__version__"]
