"""Loads the compiled extension, or says plainly how to build it."""
import os

import torch

from ._build_info import source_hash

_HOW = (
    "Build it from the repository root with `make test` (creates .venv and builds), or "
    "`pip install --no-build-isolation -e .` in an environment that already has torch."
)


def load_extension():
    try:
        from . import _C
    except ImportError as e:
        raise ImportError(f"varlen_kernels._C is not built or cannot be loaded ({e}). {_HOW}") from e
    if _C.TORCH_VERSION != torch.__version__:
        raise ImportError(
            f"varlen_kernels._C was built against torch {_C.TORCH_VERSION} but torch "
            f"{torch.__version__} is installed. Rebuild it. {_HOW}"
        )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if os.path.isdir(os.path.join(root, "csrc")):  # a source checkout: check freshness
        current = source_hash(root)
        if current != _C.SOURCE_HASH:
            raise ImportError(
                "varlen_kernels._C is stale: it was built from other sources than those in "
                f"{os.path.join(root, 'csrc')} (build {_C.SOURCE_HASH}, sources {current}). "
                f"Rebuild it. {_HOW}"
            )
    return _C
