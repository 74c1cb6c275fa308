"""fairseq models of the btm plugin (imported by fairseq's ``--user-dir`` loader).

Two layouts of the expert LM (``launcher.contract.presets.Preset.layout``): ``elm`` (GPT-2,
the paper's) and ``elm_llama`` (Llama). ``preset_config.model_config_for_preset`` gives either layout's
config for a preset name.
"""
from fairseq_ext.models import elm  # noqa: F401
from fairseq_ext.models import llama  # noqa: F401
from fairseq_ext.moe import model as _moe_model  # noqa: F401,E402  (models elm_moe, elm_llama_moe)
