"""Branch-Train-MiX: a forest turned into one Mixture-of-Experts model (issue #19).

- ``layer.py``: the MoE feed-forward block (router + N FFNs, top-k routing, load-balancing loss);
- ``model.py``: the registered fairseq models ``elm_moe`` and ``elm_llama_moe`` (either expert
  layout with every layer's FFN replaced by the MoE block);
- ``build.py``: forest -> MoE checkpoint, streamed one expert at a time;
- ``router_init.py``: the router's start from data (each expert's mean hidden states);
- ``weights.py``: the averaging weights of the shared parameters (uniform or posterior);
- ``routing.py``: which experts each domain's tokens go to, per layer;
- ``speed.py``: inference tokens/s against one expert and the full ensemble;
- ``export_mixtral.py``: a Llama-layout MoE as transformers' ``MixtralForCausalLM``.

docs/moe.md describes the whole step.

Importing this package imports nothing (the modules import fairseq or torch themselves).
"""
