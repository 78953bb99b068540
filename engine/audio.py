"""Audio resampling on builds without torchaudio.

vLLM resamples a clip to its model's rate with torchaudio unless a model asks for
another method; no torchaudio build matches the CPU build's torch 2.13.0+cpu (the
one PyPI has fails to load), so a clip at any rate but the model's failed with a
message about vLLM's package metadata. Without torchaudio, resampling falls back
to soxr, one of vLLM's own methods (in its `audio` extra). Where torchaudio loads
(vLLM's CUDA image), nothing changes."""

from __future__ import annotations

import inspect
import logging

log = logging.getLogger("engine.audio")


def resample_without_torchaudio() -> None:
    try:
        import torchaudio.transforms  # noqa: F401
        return
    except Exception:  # absent, or a build that does not match torch
        pass
    try:
        from vllm.multimodal.audio import AudioResampler
    except ImportError:
        return
    init = AudioResampler.__init__
    signature = inspect.signature(init)  # once: a resampler is made per request
    if "method" not in signature.parameters:
        log.warning("vLLM's AudioResampler takes no method: audio resampling without torchaudio is not patched")
        return

    def without_torchaudio(self, *args, **kwargs) -> None:
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        if bound.arguments["method"] == "torchaudio":
            bound.arguments["method"] = "soxr"
        init(*bound.args, **bound.kwargs)

    AudioResampler.__init__ = without_torchaudio  # type: ignore[method-assign]
