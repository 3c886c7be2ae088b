"""Structured pruning of Hugging Face transformers: remove whole attention heads and MLP neurons.

Heads and neurons are ranked by a torch-pruning importance (``tp.importance.*``) evaluated on a coupling group we
build by hand for each block (q/k/v output rows + output-projection input columns; MLP input rows + output-projection
columns), and removed with torch-pruning's layer pruners (``tp.prune_linear_out_channels`` / ``..._in_channels``).
We build the groups ourselves instead of tracing a ``DependencyGraph`` because torch-pruning 1.6.1 (a) does not see
GPT-2's ``Conv1D`` and fused qkv, (b) applies cumulative head ratios to the *current* head count when pruning
iteratively (4→3→2→1→0 heads, then ZeroDivisionError), and (c) does not update the HF attributes (``num_heads``,
``num_key_value_groups``, ``split_size``…) that ``forward``/``generate`` read. The number of heads/neurons kept is
computed from the ORIGINAL counts and the scheduled sparsity, so iterative steps land exactly on the target.

Supported families: BERT-like encoders (``query/key/value`` + ``output.dense``, ``intermediate.dense``), Llama-like
decoders incl. grouped-query attention (``q/k/v/o_proj``, ``gate/up/down_proj``) and GPT-2 (``c_attn``/``c_proj``,
``c_fc``). The hidden size (residual stream) is kept.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import torch
import torch_pruning as tp
from torch import nn
from torch_pruning.dependency import Dependency, Group, Node

from lightning_latency.pruning.config import PruningConfig
from lightning_latency.pruning.targets import effective, entry_matches

_ORIGINAL_ATTR = "_lightning_latency_original_structure"


@dataclass
class _Attention:
    name: str
    module: nn.Module  # the module whose attributes describe the heads
    family: str  # "bert" | "llama" | "gpt2"
    head_dim: int
    o: nn.Linear
    q: nn.Linear | None = None
    k: nn.Linear | None = None
    v: nn.Linear | None = None
    qkv: nn.Linear | None = None  # GPT-2 fused projection, rows [q | k | v]

    @property
    def num_heads(self) -> int:
        rows = _out_features(self.qkv) // 3 if self.qkv is not None else _out_features(self.q)
        return rows // self.head_dim

    @property
    def num_kv_heads(self) -> int:
        return self.num_heads if self.k is None else _out_features(self.k) // self.head_dim


@dataclass
class _MLP:
    name: str
    ins: list[nn.Linear] = field(default_factory=list)  # up (and gate) projections: output rows = neurons
    out: nn.Linear | None = None  # down projection: input columns = neurons
    module: nn.Module | None = None  # the block itself (holds the recorded original width)

    @property
    def num_neurons(self) -> int:
        return _out_features(self.ins[0])


def _out_features(layer: nn.Module) -> int:
    # GPT-2's Conv1D stores its weight as (in, out)
    return layer.weight.shape[1] if type(layer).__name__ == "Conv1D" else layer.weight.shape[0]


def conv1d_to_linear(conv: nn.Module) -> nn.Linear:
    """An ``nn.Linear`` computing the same as transformers' GPT-2 ``Conv1D`` (whose weight is ``(in, out)``)."""
    in_features, out_features = conv.weight.shape
    linear = nn.Linear(in_features, out_features, bias=conv.bias is not None, device=conv.weight.device,
                       dtype=conv.weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(conv.weight.t())
        if conv.bias is not None:
            linear.bias.copy_(conv.bias)
    return linear


def _linear(parent: nn.Module, attr: str, convert: bool) -> nn.Linear:
    module = getattr(parent, attr)
    if type(module).__name__ == "Conv1D" and convert:
        module = conv1d_to_linear(module)
        setattr(parent, attr, module)
    return module


def find_blocks(model: nn.Module, convert: bool = True) -> tuple[list[_Attention], list[_MLP]]:
    """Locate the attention and MLP blocks of a supported HF model (GPT-2 ``Conv1D`` become ``nn.Linear``)."""
    attns: list[_Attention] = []
    mlps: list[_MLP] = []
    for name, mod in model.named_modules():
        sub = getattr(mod, "self", None)
        out = getattr(mod, "output", None)
        if sub is not None and all(hasattr(sub, a) for a in ("query", "key", "value")) and hasattr(out, "dense"):
            attns.append(_Attention(name, sub, "bert", sub.attention_head_size, o=out.dense, q=sub.query,
                                    k=sub.key, v=sub.value))
        elif all(isinstance(getattr(mod, a, None), nn.Linear) for a in ("q_proj", "k_proj", "v_proj", "o_proj")):
            head_dim = getattr(mod, "head_dim", None) or mod.q_proj.weight.shape[0] // mod.num_heads
            attns.append(_Attention(name, mod, "llama", head_dim, o=mod.o_proj, q=mod.q_proj, k=mod.k_proj,
                                    v=mod.v_proj))
        elif hasattr(mod, "c_attn") and hasattr(mod, "split_size") and not getattr(mod, "is_cross_attention", False):
            qkv, o = _linear(mod, "c_attn", convert), _linear(mod, "c_proj", convert)
            attns.append(_Attention(name, mod, "gpt2", mod.head_dim, o=o, qkv=qkv))
        inter = getattr(mod, "intermediate", None)
        if hasattr(inter, "dense") and hasattr(out, "dense") and isinstance(inter.dense, nn.Linear):
            mlps.append(_MLP(name, [inter.dense], out.dense, mod))
        elif isinstance(getattr(mod, "up_proj", None), nn.Linear) and isinstance(getattr(mod, "down_proj", None),
                                                                                 nn.Linear):
            ins = [mod.up_proj] + ([mod.gate_proj] if isinstance(getattr(mod, "gate_proj", None), nn.Linear) else [])
            mlps.append(_MLP(name, ins, mod.down_proj, mod))
        elif hasattr(mod, "c_fc") and hasattr(mod, "c_proj") and not hasattr(mod, "c_attn"):
            mlps.append(_MLP(name, [_linear(mod, "c_fc", convert)], _linear(mod, "c_proj", convert), mod))
    return attns, mlps


def _model_type(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    return f"{type(model).__name__} (model_type={getattr(config, 'model_type', None)!r})"


def _unrecognised_params(block: nn.Module, known: list[nn.Module], sizes: set[int], keep: set[int]) -> list[str]:
    """Parameters of ``block`` outside the ``known`` layers that have a dimension we would shrink (``sizes``)."""
    known_ids = {id(p) for layer in known for p in layer.parameters()}
    found = []
    for name, param in block.named_parameters():
        if id(param) not in known_ids and any(d in sizes and d not in keep for d in param.shape):
            found.append(f"{name} {tuple(param.shape)}")
    return found


def _support_problem(model: nn.Module, config: PruningConfig, attns: list[_Attention], mlps: list[_MLP]) -> str:
    """Why structured pruning cannot shrink ``model`` consistently ('' when it can). Looks only, changes nothing."""
    found_attn = {id(a.module) for a in attns} | {id(a.o) for a in attns}
    found_mlp = {id(m.module) for m in mlps}
    if config.prune_heads and len(attns) != len(mlps) and mlps:
        missing = sorted({type(mod).__name__ for name, mod in model.named_modules()
                          if re.search(r"(attention|attn)$", name) and id(mod) not in found_attn
                          and not any(id(c) in found_attn for c in mod.modules())})
        return (f"found {len(mlps)} MLP blocks but {len(attns)} attention blocks; attention modules not "
                f"recognised: {missing or 'unknown'}")
    if config.prune_neurons and len(mlps) != len(attns) and attns:
        missing = sorted({type(mod).__name__ for name, mod in model.named_modules()
                          if re.search(r"(mlp|ffn|feed_forward)$", name) and id(mod) not in found_mlp})
        return (f"found {len(attns)} attention blocks but {len(mlps)} MLP blocks; MLP modules not recognised: "
                f"{missing or 'unknown'}")
    for a in attns:
        layers = [x for x in (a.q, a.k, a.v, a.o, a.qkv) if x is not None]
        rows = {_out_features(x) for x in layers if x is not a.o}
        extra = _unrecognised_params(a.module, layers, rows, {a.head_dim})
        if config.prune_heads and extra:
            return f"attention block {a.name!r} ({type(a.module).__name__}) has parameters sized by its heads that " \
                   f"would not be shrunk: {extra}"
    for m in mlps:
        if m.module is None or not config.prune_neurons:
            continue
        # the residual width is never shrunk, so a norm of that size is fine even when it equals the MLP width
        extra = _unrecognised_params(m.module, [*m.ins, m.out], {m.num_neurons}, {_out_features(m.out)})
        extra = [e for e in extra if not any(e.startswith(p) for p in ("attention.", "self_attn.", "attn."))]
        if extra:
            return f"MLP block {m.name!r} ({type(m.module).__name__}) has parameters sized by its width that " \
                   f"would not be shrunk: {extra}"
    return ""


def blocks_or_raise(model: nn.Module, config: PruningConfig, convert: bool = True) -> tuple[list, list]:
    """The blocks to shrink; raises before any weight changes when the model is not a supported family."""
    attns, mlps = find_blocks(model, convert=False)
    problem = ""
    if not ((config.prune_heads and attns) or (config.prune_neurons and mlps)):
        problem = (f"found no {'attention heads' if config.prune_heads else ''}"
                   f"{' or ' if config.prune_heads and config.prune_neurons else ''}"
                   f"{'MLP blocks' if config.prune_neurons else ''} it can shrink")
    problem = problem or _support_problem(model, config, attns, mlps)
    if problem:
        raise ValueError(
            f"mode='structured' does not support {_model_type(model)}: {problem}. Supported: "
            f"BERT-family encoders, Llama-family decoders (incl. GQA) and GPT-2. For other models use "
            f"mode='unstructured' or mode='nm' (masks), or prune with torch-pruning's DependencyGraph directly."
        )
    return find_blocks(model, convert=convert) if convert else (attns, mlps)


def structure(model: nn.Module) -> dict[str, dict[str, int]]:
    """``{block name: {"heads", "kv_heads", "head_dim"} or {"neurons"}}`` for every supported block."""
    attns, mlps = find_blocks(model, convert=False)
    out: dict[str, dict[str, int]] = {}
    for a in attns:
        out[a.name] = {"heads": a.num_heads, "kv_heads": a.num_kv_heads, "head_dim": a.head_dim}
    for m in mlps:
        out.setdefault(m.name, {})["neurons"] = m.num_neurons
    return out


def _has_conv1d(model: nn.Module) -> bool:
    return any(type(m).__name__ == "Conv1D" for m in model.modules())


def original_structure(model: nn.Module) -> dict[str, dict[str, int]]:
    """The structure before the first pruning step.

    Recorded on each attention / MLP module the first time it is asked for (so it follows the blocks into
    ``deepcopy``, into a LightningModule wrapping the model, or out of one), and restored by :func:`load_pruned`.
    """
    attns, mlps = find_blocks(model, convert=False)
    out: dict[str, dict[str, int]] = {}
    for a in attns:
        rec = _record(a.module, {"heads": a.num_heads, "kv_heads": a.num_kv_heads, "head_dim": a.head_dim})
        out.setdefault(a.name, {}).update(rec)
    for m in mlps:
        out.setdefault(m.name, {}).update(_record(m.module, {"neurons": m.num_neurons}))
    return out


def _record(module: nn.Module, current: dict[str, int]) -> dict[str, int]:
    recorded = module.__dict__.get(_ORIGINAL_ATTR)
    if recorded is None:
        recorded = dict(current)
        object.__setattr__(module, _ORIGINAL_ATTR, recorded)  # a plain attribute: not a parameter or buffer
    return dict(recorded)


def set_original_structure(model: nn.Module, value: dict[str, dict[str, int]]) -> None:
    """Declare ``value`` (as returned by :func:`original_structure`) the pre-pruning structure of ``model``."""
    attns, mlps = find_blocks(model, convert=False)
    for a in attns:
        if a.name in value:
            keys = ("heads", "kv_heads", "head_dim")
            object.__setattr__(a.module, _ORIGINAL_ATTR, {k: value[a.name][k] for k in keys if k in value[a.name]})
    for m in mlps:
        if "neurons" in value.get(m.name, {}):
            object.__setattr__(m.module, _ORIGINAL_ATTR, {"neurons": value[m.name]["neurons"]})


# ----------------------------------------------------------------------------------------------- importance


def _importance(config: PruningConfig) -> Any:
    if config.importance == "l1":
        return tp.importance.GroupMagnitudeImportance(p=1, normalizer=None)
    if config.importance == "l2":
        return tp.importance.GroupMagnitudeImportance(p=2, normalizer=None)
    if config.importance == "taylor":
        return tp.importance.GroupTaylorImportance(normalizer=None)
    if config.importance == "activation":
        raise ValueError("`importance`='activation' needs statistics recorded on calibration data: pass "
                         "importance=ActivationImportance(model, batches) (lightning_latency.pruning.activation), "
                         "or use student_from_pruned_teacher(teacher, sparsity, importance='activation', "
                         "calibration=batches).")
    return config.importance


def _group(items: list[tuple[nn.Linear, Any, list[int], list[int]]]) -> Group:
    """A torch-pruning ``Group`` built by hand: ``(layer, pruning fn, channel idxs, root idxs)`` per item."""
    group = Group()
    root = Node(items[0][0], None, "root")
    for layer, fn, idxs, root_idxs in items:
        group.add_dep(Dependency(items[0][1], fn, root, Node(layer, None, str(id(layer)))), list(idxs))
        group[len(group) - 1].root_idxs = list(root_idxs)
    return group


def _scores(imp: Any, items: list[tuple[nn.Linear, Any, list[int], list[int]]]) -> torch.Tensor:
    try:
        scores = imp(_group(items))
    except AttributeError as err:
        if any(layer.weight.grad is None for layer, *_ in items):
            raise RuntimeError(
                "importance='taylor' needs gradients on the weights: run loss.backward() before prune_step "
                "(the callback prunes at on_train_batch_end, where they exist)."
            ) from err
        raise
    if scores is None:
        raise RuntimeError(f"importance {type(imp).__name__} returned no scores for a group of nn.Linear layers.")
    return scores.detach().float()


def _head_scores(a: _Attention, imp: Any, with_kv: bool) -> torch.Tensor:
    n, d = a.num_heads, a.head_dim
    ch = list(range(n * d))
    out, inp = tp.prune_linear_out_channels, tp.prune_linear_in_channels
    if a.qkv is not None:
        e = n * d
        # the root (first item) must span exactly the n*d head channels: torch-pruning reduces onto its length
        items = [(a.o, inp, ch, ch), (a.qkv, out, ch + [e + c for c in ch] + [2 * e + c for c in ch], ch * 3)]
    else:
        items = [(a.q, out, ch, ch)]
        if with_kv:
            items += [(a.k, out, ch, ch), (a.v, out, ch, ch)]
        items.append((a.o, inp, ch, ch))
    return _scores(imp, items).view(n, d).sum(1)


def _neuron_scores(m: _MLP, imp: Any) -> torch.Tensor:
    ch = list(range(m.num_neurons))
    items = [(lin, tp.prune_linear_out_channels, ch, ch) for lin in m.ins]
    items.append((m.out, tp.prune_linear_in_channels, ch, ch))
    return _scores(imp, items)


# ----------------------------------------------------------------------------------------------- shrinking


def shrink_attention(a: _Attention, keep_q: list[int], keep_kv: list[int]) -> None:
    """Keep query heads ``keep_q`` and key/value heads ``keep_kv``; update the module's head attributes."""
    n, kv, d = a.num_heads, a.num_kv_heads, a.head_dim
    drop_q = [h * d + t for h in range(n) if h not in set(keep_q) for t in range(d)]
    drop_kv = [h * d + t for h in range(kv) if h not in set(keep_kv) for t in range(d)]
    if a.qkv is not None:
        e = n * d
        if drop_q:
            tp.prune_linear_out_channels(a.qkv, drop_q + [e + c for c in drop_q] + [2 * e + c for c in drop_q])
    else:
        if drop_q:
            tp.prune_linear_out_channels(a.q, drop_q)
        if drop_kv:
            tp.prune_linear_out_channels(a.k, drop_kv)
            tp.prune_linear_out_channels(a.v, drop_kv)
    if drop_q:
        tp.prune_linear_in_channels(a.o, drop_q)
    _fix_attention_attributes(a)


def _fix_attention_attributes(a: _Attention) -> None:
    mod, n, kv = a.module, a.num_heads, a.num_kv_heads
    if a.family == "bert":
        mod.num_attention_heads = n
        mod.all_head_size = n * a.head_dim
    elif a.family == "llama":
        mod.num_key_value_groups = n // kv
        for attr, value in (("num_heads", n), ("num_attention_heads", n), ("num_key_value_heads", kv)):
            if hasattr(mod, attr):
                setattr(mod, attr, value)
    else:
        mod.num_heads = n
        mod.split_size = n * a.head_dim


def shrink_mlp(m: _MLP, keep: list[int]) -> None:
    drop = [i for i in range(m.num_neurons) if i not in set(keep)]
    if not drop:
        return
    for lin in m.ins:
        tp.prune_linear_out_channels(lin, drop)
    tp.prune_linear_in_channels(m.out, drop)


def _lowest(scores: torch.Tensor, n_drop: int) -> set[int]:
    # stable tie-break by index, so every rank and every run picks the same units
    order = sorted(range(len(scores)), key=lambda i: (float(scores[i]), i))
    return set(order[:n_drop])


def _keep_count(original: int, sparsity: float, max_layer_sparsity: float) -> int:
    floor = max(1, math.ceil(original * (1.0 - max_layer_sparsity) - 1e-9))
    # round half up (Python's round() sends 2.5 to 2): 50% of 5 heads removes 3
    return max(floor, original - math.floor(sparsity * original + 0.5))


@torch.no_grad()
def prune_structured(model: nn.Module, config: PruningConfig, sparsity: float) -> dict[str, dict[str, int]]:
    """Shrink heads and MLP width of every supported block to ``sparsity`` of the ORIGINAL counts.

    Returns the new :func:`structure`. Idempotent at a given sparsity; never grows a layer back.
    """
    attns, mlps = blocks_or_raise(model, config)
    skip = effective(model, config.exclude_patterns, "exclude")
    attns = [a for a in attns if not any(entry_matches(p, a.name, a.module) for p in skip)]
    mlps = [m for m in mlps if not any(entry_matches(p, m.name, m.module) for p in skip)]
    original = original_structure(model)
    imp = _importance(config)
    if config.prune_heads:
        for a in attns:
            orig = original.get(a.name, {"heads": a.num_heads, "kv_heads": a.num_kv_heads})
            h0, kv0 = orig["heads"], orig["kv_heads"]
            n, kv = a.num_heads, a.num_kv_heads
            if kv0 == h0:  # multi-head attention: a unit is one head with its q, k, v rows and o columns
                keep_n = _keep_count(h0, sparsity, config.max_layer_sparsity)
                if n <= keep_n:
                    continue
                drop = _lowest(_head_scores(a, imp, with_kv=True), n - keep_n)
                keep = [h for h in range(n) if h not in drop]
                shrink_attention(a, keep, keep)
            else:  # grouped-query: drop the same number of query heads in every KV group, keep all KV heads
                rep0, rep = h0 // kv0, n // kv
                keep_rep = _keep_count(rep0, sparsity, config.max_layer_sparsity)
                if rep <= keep_rep:
                    continue
                scores = _head_scores(a, imp, with_kv=False)
                keep = []
                for g in range(kv):
                    members = list(range(g * rep, (g + 1) * rep))
                    drop = _lowest(scores[members], rep - keep_rep)
                    keep += [h for j, h in enumerate(members) if j not in drop]
                shrink_attention(a, keep, list(range(kv)))
    if config.prune_neurons:
        for m in mlps:
            n0 = original.get(m.name, {}).get("neurons", m.num_neurons)
            keep_n = _keep_count(n0, sparsity, config.max_layer_sparsity)
            if m.num_neurons > keep_n:
                drop = _lowest(_neuron_scores(m, imp), m.num_neurons - keep_n)
                shrink_mlp(m, [i for i in range(m.num_neurons) if i not in drop])
    update_hf_config(model)
    return structure(model)


def unshrunk_blocks(model: nn.Module, config: PruningConfig, sparsity: float) -> list[str]:
    """Targeted blocks left larger than ``sparsity`` asks (a shrink that did not take), as ``"<block> heads 4 > 2"``."""
    attns, mlps = find_blocks(model, convert=False)
    skip = effective(model, config.exclude_patterns, "exclude")
    original, cap, out = original_structure(model), config.max_layer_sparsity, []
    for a in attns if config.prune_heads else ():
        orig = original.get(a.name, {})
        h0, kv0 = orig.get("heads", a.num_heads), orig.get("kv_heads", a.num_kv_heads)
        want = _keep_count(h0, sparsity, cap) if kv0 == h0 else kv0 * _keep_count(h0 // kv0, sparsity, cap)
        if a.num_heads > want and not any(entry_matches(p, a.name, a.module) for p in skip):
            out.append(f"{a.name} heads {a.num_heads} > {want}")
    for m in mlps if config.prune_neurons else ():
        want = _keep_count(original.get(m.name, {}).get("neurons", m.num_neurons), sparsity, cap)
        if m.num_neurons > want and not any(entry_matches(p, m.name, m.module) for p in skip):
            out.append(f"{m.name} neurons {m.num_neurons} > {want}")
    return out


def update_hf_config(model: nn.Module) -> None:
    """Write the (uniform) head count, KV heads, head_dim and MLP width into every HF config of ``model``.

    With per-layer differences the config keeps its values; use :func:`save_pruned`, which stores every shape.
    """
    shapes = structure(model)
    heads = {(v["heads"], v["kv_heads"], v["head_dim"]) for v in shapes.values() if "heads" in v}
    neurons = {v["neurons"] for v in shapes.values() if "neurons" in v}
    configs = {id(c): c for m in model.modules() if (c := getattr(m, "config", None)) is not None
               and hasattr(c, "to_dict") and hasattr(c, "num_attention_heads")}
    for cfg in configs.values():
        if len(heads) == 1:
            n, kv, d = next(iter(heads))
            cfg.num_attention_heads = n
            if hasattr(cfg, "num_key_value_heads"):
                cfg.num_key_value_heads = kv
            cfg.head_dim = d
        if len(neurons) == 1:
            width = next(iter(neurons))
            if getattr(cfg, "model_type", "") == "gpt2":
                cfg.n_inner = width
            else:
                cfg.intermediate_size = width


# ----------------------------------------------------------------------------------------------- reshape


def reshape_to_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor], prefix: str = "") -> bool:
    """Shrink ``model``'s heads/MLP widths (and skip removed layers) so its shapes match ``state_dict``.

    Used before ``load_state_dict`` when resuming a structurally pruned checkpoint into a freshly built model,
    and by :func:`load_pruned`. Returns True if anything changed.
    """
    if not any(k.startswith(prefix) for k in state_dict):
        return False
    from lightning_latency.pruning.depth import restore_skips  # depth builds on this module

    original_structure(model)  # record the fresh shapes as the original ones before shrinking
    changed = restore_skips(model, state_dict, prefix)  # layers the checkpoint has no weights for were removed
    names = {id(m): n for n, m in model.named_modules()}
    conv = _has_conv1d(model)
    attns, mlps = find_blocks(model, convert=False) if not conv else ([], [])
    if conv:  # GPT-2: convert only if the checkpoint holds converted (nn.Linear-layout) weights
        probe = _conv_layout_differs(model, state_dict, prefix)
        attns, mlps = find_blocks(model, convert=probe)
        names = {id(m): n for n, m in model.named_modules()}
        changed |= probe
    for a in attns:
        lin = a.qkv if a.qkv is not None else a.q
        key = f"{prefix}{names[id(lin)]}.weight"
        if key not in state_dict or type(lin).__name__ == "Conv1D":
            continue
        rows = state_dict[key].shape[0] // (3 if a.qkv is not None else 1)
        n = rows // a.head_dim
        kv = n if a.k is None else state_dict[f"{prefix}{names[id(a.k)]}.weight"].shape[0] // a.head_dim
        if (n, kv) != (a.num_heads, a.num_kv_heads):
            shrink_attention(a, list(range(n)), list(range(kv)))
            changed = True
    for m in mlps:
        key = f"{prefix}{names[id(m.ins[0])]}.weight"
        if key in state_dict and type(m.ins[0]).__name__ != "Conv1D" and state_dict[key].shape[0] != m.num_neurons:
            shrink_mlp(m, list(range(state_dict[key].shape[0])))
            changed = True
    if changed:
        update_hf_config(model)
    return changed


def _conv_layout_differs(model: nn.Module, state_dict: dict[str, torch.Tensor], prefix: str) -> bool:
    for name, mod in model.named_modules():
        if type(mod).__name__ == "Conv1D" and name.endswith("c_attn"):
            key = f"{prefix}{name}.weight"
            if key in state_dict:
                # Conv1D stores (hidden, 3*hidden); converted nn.Linear stores (3*heads*head_dim, hidden).
                return tuple(state_dict[key].shape) != tuple(mod.weight.shape)
    return False
