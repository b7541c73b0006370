"""Version gates for recipes that rely on a transformers feature."""

from __future__ import annotations

from onnxport.errors import UnsupportedModelError


def require_transformers(major: int, why: str) -> None:
    import transformers

    have = int(transformers.__version__.split(".")[0])
    if have < major:
        raise UnsupportedModelError(f"this recipe needs transformers >= {major} ({why}); installed {transformers.__version__}",
                                    f"pip install 'transformers>={major},<{major + 1}'")
