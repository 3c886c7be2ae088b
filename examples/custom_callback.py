"""A complete compression callback on the shared contract, in under 100 lines (see docs/architecture.md).

``OneShotStructuredPruning`` removes a fraction of every layer's attention heads and MLP neurons once, in ``setup``:
Lightning runs ``setup`` before ``configure_optimizers``, so the optimizer is built over the smaller model and nothing
has to be rebuilt. A resumed fit does not prune again: the checkpoint already holds the pruned shapes, and the
load pre-hook shrinks the fresh model to them before its weights load.

Run it (real MiniLM-L6 on Rotten Tomatoes, about a minute): ``python -m examples.custom_callback``.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from lightning_latency import CompressionCallback, PruningConfig, prune_step
from lightning_latency.pruning import reshape_to_state_dict, structure


class OneShotStructuredPruning(CompressionCallback):
    """Remove ``sparsity`` of the heads and MLP neurons once, before training; the fit then recovers accuracy.

    Args:
        sparsity: fraction of each layer's heads and neurons to remove, in [0, 1).
        importance: ``"l2"`` or ``"l1"`` (weight magnitude); gradient-based scores need a backward pass first.
        exclude: patterns of blocks to leave whole (fnmatch, or ``"re:<regex>"``).
        model_attr: the submodule to prune (None: ``compression_target`` or the LightningModule).
    """

    compresses = True  # LatencyMonitor times the deployment form at fit end

    def __init__(self, sparsity: float = 0.25, importance: str = "l2", exclude: tuple[str, ...] = (),
                 model_attr: str | None = None) -> None:
        super().__init__(model_attr)
        if importance not in ("l1", "l2"):
            raise ValueError(f"`importance` must be 'l1' or 'l2' (no gradients exist before training), got "
                             f"{importance!r}. Use importance='l2'.")
        self.config = PruningConfig(mode="structured", importance=importance, exclude=tuple(exclude))
        self.sparsity = sparsity
        self.pruned: dict[str, dict[str, int]] = {}  # block -> shapes after pruning: the state a resume needs

    def strategy_problem(self, kind: str, pl_module: nn.Module | None = None) -> str | None:
        if kind == "fsdp":
            return "pruning changes parameter shapes, which FSDP cannot follow: prune before wrapping."
        return None

    def validate(self, trainer: Any, pl_module: Any, target: nn.Module, stage: str) -> None:
        if not structure(target):
            raise ValueError(f"`model_attr`={self.model_attr!r}: {type(target).__name__} has no attention or MLP "
                             "block this pruner recognises (BERT, Llama, GPT-2 families).")

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        super().setup(trainer, pl_module, stage)  # contract: strategy check, validate, old hooks removed
        target = self.target(pl_module)
        self.add_hook(target.register_load_state_dict_pre_hook(
            lambda module, state, prefix, *args: reshape_to_state_dict(module, state, prefix)))
        if stage != "fit" or self.pruned or trainer.ckpt_path is not None:
            return  # resuming: the checkpoint brings the pruned shapes
        result = prune_step(target, self.config, self.sparsity)
        self.pruned = result.structure
        self.info(f"removed {result.sparsity:.0%} of the heads and neurons before training.")
        self.log_metrics(trainer, {"oneshot/sparsity": result.sparsity})

    def state_dict(self) -> dict[str, Any]:
        return {"pruned": self.pruned}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.pruned = dict(state_dict.get("pruned", {}))


if __name__ == "__main__":
    from torch.utils.data import DataLoader

    from examples._support import assets, tasks
    from examples._support.modules import SentimentClassifier

    model, tokenizer = assets.load_minilm(num_labels=2)
    train, held_out = tasks.rotten_tomatoes_splits(tokenizer, n_train=256, n_test=256)
    before = tasks.accuracy(model, held_out)
    module = SentimentClassifier(model)
    tasks.fit(module, DataLoader(train, batch_size=16, shuffle=True), steps=32, seed=0,
              callbacks=[OneShotStructuredPruning(0.5, model_attr="model")])
    print(f"held-out accuracy {before:.1%} -> {tasks.accuracy(model, held_out):.1%}; block shapes now "
          f"{next(iter(structure(model).values()))}")
