"""The model config of a launcher preset, whatever its layout: callers that build "the preset's
model" (the trainer, the HF import) ask here and need not know the layouts."""
from __future__ import annotations

from launcher.contract.presets import PRESETS


def model_config_for_preset(preset_name: str, **overrides):
    """An ElmConfig for a GPT-2-layout preset, a LlamaElmConfig for a Llama-layout one."""
    if PRESETS[preset_name].layout == "llama":
        from fairseq_ext.models.llama import llama_config_for_preset

        return llama_config_for_preset(preset_name, **overrides)
    from fairseq_ext.models.elm import elm_config_for_preset

    return elm_config_for_preset(preset_name, **overrides)
