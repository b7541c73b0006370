"""The bundle: `manifest` (typed manifest.json, the only speller of its keys) and `folder`
(atomic write, lock, paths kept inside the bundle). Torch-free: the runtime reads bundles too."""

from onnxport.bundle.folder import (
    atomic_bundle,
    bundle_file,
    check_external_data,
    check_target,
    external_locations,
    resolve_inside,
)
from onnxport.bundle.manifest import (
    DECODER,
    ENCODER,
    GQA_ATTENTION,
    MODULES,
    MONOLITHIC,
    RIGHT_PADDING,
    SCHEMA_VERSION,
    SPLIT,
    ExportInfo,
    Graph,
    KVCache,
    Layout,
    Manifest,
    ModelInfo,
    Part,
    Pipeline,
    Source,
    read_manifest,
    record_files,
    write_manifest,
)

__all__ = ["DECODER", "ENCODER", "GQA_ATTENTION", "MODULES", "RIGHT_PADDING", "MONOLITHIC", "SCHEMA_VERSION", "SPLIT", "ExportInfo", "Graph", "KVCache",
           "Layout", "Manifest", "ModelInfo", "Part", "Pipeline", "Source", "atomic_bundle", "bundle_file", "check_target", "read_manifest",
           "check_external_data", "external_locations", "record_files", "resolve_inside", "write_manifest"]
