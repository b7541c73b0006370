"""The torch.onnx driver: cache flattening, dynamic dims, graph finalisation, weight accounting."""


import sys as _sys
import types as _types


class _CallablePackage(_types.ModuleType):
    """`onnxport.export(...)` is the API function (onnxport.api.export), but importing this
    package of the same name rebinds the attribute `onnxport.export` to the package; calls on
    the package forward to the function, so the documented call works either way."""

    def __call__(self, *args, **kwargs):
        import onnxport

        return onnxport.call_api("export", *args, **kwargs)


_sys.modules[__name__].__class__ = _CallablePackage
