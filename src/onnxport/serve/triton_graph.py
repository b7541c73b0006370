"""Triton Python-backend model for one graph of an onnxport bundle (an encoder, a vision tower,
a codec...): its manifest inputs in, its outputs out, run by onnxport's torch-free session (the
seal and input checks included). `onnxport triton` copies this file as `<graph>/1/model.py`.

With dynamic batching (the graph's first dim is its batch dim on every input and output), the
requests Triton merges into one `execute` run as one batch when their other dims agree, and one
by one otherwise; each reply gets its own rows back.
"""

from __future__ import annotations

import numpy as np
import triton_python_backend_utils as pb_utils  # provided by Triton's Python backend


class TritonPythonModel:
    def initialize(self, args):
        from onnxport.bundle import read_manifest
        from onnxport.runtime.session import GraphSession
        from onnxport.serve.triton import model_params

        bundle, params = model_params(args)
        config = params["_config"]
        manifest = read_manifest(bundle)
        entry = next(g for g in manifest.graphs if (g.name or g.file) == params["graph"])
        self.session = GraphSession(bundle, entry, int(params.get("threads") or 0) or None)
        self.inputs = [t.name for t in entry.inputs]
        self.outputs = entry.output_names
        self.batched = int(config.get("max_batch_size", 0)) > 0

    def _feeds(self, request) -> dict[str, np.ndarray]:
        return {n: pb_utils.get_input_tensor_by_name(request, n).as_numpy() for n in self.inputs}

    def _reply(self, outs: dict[str, np.ndarray]):
        return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(n, np.ascontiguousarray(outs[n]))
                                                          for n in self.outputs])

    def execute(self, requests):
        feeds, replies = [], {}
        for i, request in enumerate(requests):
            try:
                feeds.append((i, self._feeds(request)))
            except Exception as e:  # noqa: BLE001 - reported to that request's client
                replies[i] = pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(str(e)))
        same = len({tuple((n, f[n].shape[1:]) for n in self.inputs) for _, f in feeds}) == 1
        if self.batched and len(feeds) > 1 and same:
            rows = [f[self.inputs[0]].shape[0] for _, f in feeds]
            try:
                outs = self.session.run({n: np.concatenate([f[n] for _, f in feeds]) for n in self.inputs})
                starts = np.cumsum([0, *rows])
                for k, (i, _) in enumerate(feeds):
                    replies[i] = self._reply({n: v[starts[k]:starts[k + 1]] for n, v in outs.items()})
                feeds = []
            except Exception:  # noqa: BLE001 - run them one by one: each gets its own error
                pass
        for i, f in feeds:
            try:
                replies[i] = self._reply(self.session.run(f))
            except Exception as e:  # noqa: BLE001
                replies[i] = pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(str(e)))
        return [replies[i] for i in range(len(requests))]
