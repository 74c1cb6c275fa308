"""Routing statistics of a MoE model: for each evaluation domain and layer, the share of the
domain's token-to-expert assignments (each token has ``top_k`` of them) that went to each expert
slot. Returned as rows of the ``routing`` table (launcher.contract.moe_tables.ROUTING); the launcher
files them and the report draws them as a table and a heatmap."""
from __future__ import annotations

from launcher.contract.errors import BtmError


def routing_statistics(checkpoint, data_dir, domains: list[str], split: str, *, expert_names: list[str],
                       run: str, device: str = "cpu", max_tokens: int | None = None,
                       batch_size: int = 8, trust_pickle: bool = False) -> list[dict]:
    """Rows ``{run, eval_domain, split, layer, slot, expert, share, tokens}`` of the MoE
    ``checkpoint`` on ``domains``' ``split`` (every target token once, padding excluded)."""
    import torch

    from fairseq_ext.checkpoint import load_model
    from fairseq_ext.moe.router_init import domain_blocks
    from fairseq_ext.streams import IGNORED_TARGET

    loaded = load_model(checkpoint, device, trust_pickle=trust_pickle)
    model, pad = loaded.model, loaded.dictionary.pad()
    if not hasattr(model, "moe_blocks"):
        raise BtmError(f"{checkpoint} is not a MoE model (model {loaded.cfg['model'].get('_name')!r})")
    blocks = model.moe_blocks()
    if len(expert_names) != blocks[0].num_experts:
        raise BtmError(f"{checkpoint} has {blocks[0].num_experts} experts per layer, but "
                       f"{len(expert_names)} names were given ({', '.join(expert_names)})")
    rows = []
    for domain in domains:
        inputs, targets = domain_blocks(data_dir, domain, split, max_tokens, model.max_positions(), pad)
        for block in blocks:
            block.start_counting()
        with torch.no_grad():
            for start in range(0, len(inputs), batch_size):
                x, y = inputs[start:start + batch_size], targets[start:start + batch_size]
                full = (y != IGNORED_TARGET).all(dim=1)
                if full.any():
                    model(x[full].to(device))
                for row in torch.nonzero(~full).flatten().tolist():  # padded: its real tokens only
                    valid = int((y[row] != IGNORED_TARGET).sum())
                    if valid:
                        model(x[row:row + 1, :valid].to(device))
        routed = int((targets != IGNORED_TARGET).sum())
        for layer, block in enumerate(blocks):
            counts = block.routing_counts.double()
            block.routing_counts = None
            for slot, name in enumerate(expert_names):
                rows.append({"run": run, "eval_domain": domain, "split": split, "layer": layer,
                             "slot": slot, "expert": name,
                             "share": float(counts[slot] / counts.sum().clamp_min(1)),
                             "tokens": routed})
    return rows
