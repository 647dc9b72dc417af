"""The transformer's variants as small components chosen by name: norms, positions,
MLPs and attentions.

`model.norm`, `model.position`, `model.mlp` and `model.attention` name an entry of
`NORMS`, `POSITIONS`, `MLPS` and `ATTENTIONS`. Each component carries what the rest
of lmforge asks about it:

- its parameter count and FLOPs (`lmforge.model.arith`, `lmforge plan`, the scaler),
  from the config alone;
- what the model builds or computes for it (`lmforge.model.transformer`);
- its one-token decode form (`lmforge.model.decode`), where one faster than the
  module exists;
- what exporters need (the Hugging Face activation name of an MLP).

Adding a variant is one class here (or in any file, a test included) decorated with
`@NORMS.register` (or `POSITIONS`, `MLPS`, `ATTENTIONS`); config validation reads the
registries, so `model.norm=<new name>` is accepted once the class is registered.

This module imports nothing from lmforge and torch only inside methods: the config
validates names against it without loading torch (`lmforge config` stays light).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

if TYPE_CHECKING:
    import torch
    from torch import nn

Tensor = Any  # torch.Tensor, without importing torch here
T = TypeVar("T")


class Registry(Generic[T]):
    """Components of one kind by name; `register` is a class decorator."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, cls: type[T]) -> type[T]:
        name = cls.name  # type: ignore[attr-defined]
        if name in self._items and type(self._items[name]) is not cls:
            raise ValueError(f"model.{self.kind}: {name!r} is registered already")
        self._items[name] = cls()
        return cls

    def unregister(self, name: str) -> None:
        self._items.pop(name, None)

    def __getitem__(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise KeyError(self.problem(name)) from None

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def problem(self, name: str) -> str | None:
        """None for a registered name, else what is wrong with it, for a config error."""
        if name in self._items:
            return None
        known = ", ".join(repr(n) for n in self._items)
        return f"is not one of {known} (the registered {self.kind}s, `lmforge.components`)"


NORMS: Registry[Norm] = Registry("norm")
POSITIONS: Registry[Position] = Registry("position")
MLPS: Registry[MLP] = Registry("mlp")
ATTENTIONS: Registry[Attention] = Registry("attention")


# --------------------------------------------------------------------------- norms


class Norm:
    """Normalisation over the last dimension (width `dim`).

    A new norm usually states its parameters (`weights`) and its formula (`forward`,
    with tensor methods, so this module stays torch-free); the model wraps them in a
    module (`lmforge.model.transformer.ComponentNorm`) whose parameters `init_weights`
    starts at 1 ("bias": 0). A norm with a module of its own overrides `module`, and
    `params` to match it.
    """

    name: ClassVar[str]

    def weights(self, cfg: Any, dim: int) -> dict[str, int]:
        """Parameters by name and length, for `forward` and the parameter count."""
        return {"weight": dim}

    def params(self, cfg: Any, dim: int) -> int:
        return sum(self.weights(cfg, dim).values())

    def forward(self, x: Tensor, p: dict[str, Tensor], eps: float) -> Tensor:
        """The norm of x (..., dim) with parameters `p` (as `weights` names them)."""
        raise NotImplementedError

    def module(self, cfg: Any, dim: int) -> nn.Module | None:
        """The module, or None to let the model build one from `weights` and `forward`."""
        return None

    def decode_fn(self, module: nn.Module) -> Callable[[Tensor], Tensor]:
        """The function the decoder applies for `module`; calling the module by default."""
        return module


@NORMS.register
class LayerNorm(Norm):
    """LayerNorm (Ba et al. 2016; GPT-2): a bias too when `model.bias`."""

    name = "layernorm"

    def weights(self, cfg: Any, dim: int) -> dict[str, int]:
        return {"weight": dim, "bias": dim} if cfg.bias else {"weight": dim}

    def module(self, cfg: Any, dim: int) -> nn.Module:
        from torch import nn

        return nn.LayerNorm(dim, eps=cfg.norm_eps, bias=cfg.bias)

    def decode_fn(self, module: nn.Module) -> Callable[[Tensor], Tensor]:
        import torch
        from torch import nn

        if type(module) is not nn.LayerNorm:  # replaced: keep its own forward
            return module
        w, b = module.weight.detach(), None if module.bias is None else module.bias.detach()
        shape, eps = tuple(module.normalized_shape), module.eps
        return lambda x: torch.layer_norm(x, shape, w, b, eps)


@NORMS.register
class RMSNorm(Norm):
    """RMSNorm (Zhang & Sennrich 2019; Llama): a weight, no bias."""

    name = "rmsnorm"

    def module(self, cfg: Any, dim: int) -> nn.Module:
        from torch import nn

        return nn.RMSNorm(dim, eps=cfg.norm_eps)

    def decode_fn(self, module: nn.Module) -> Callable[[Tensor], Tensor]:
        import torch
        from torch import nn

        if type(module) is not nn.RMSNorm or module.weight is None:
            return module
        w, shape, eps = module.weight.detach(), tuple(module.normalized_shape), module.eps
        return lambda x: torch.rms_norm(x, shape, w, eps)


# ----------------------------------------------------------------------- positions


class Position:
    """How a token's position enters the model: an embedding added to the input, or a
    rotation of queries and keys (`rotary`)."""

    name: ClassVar[str]
    rotary: ClassVar[bool] = False

    def params(self, cfg: Any) -> int:
        return 0

    def embedding(self, cfg: Any) -> nn.Module | None:
        """A module mapping positions (...,) to (..., d_model) added to the input, or None."""
        return None

    def check(self, cfg: Any) -> str | None:
        """What is wrong with this position scheme in `cfg`, for `model.position`; None if fine."""
        return None


@POSITIONS.register
class LearnedPosition(Position):
    """Learned absolute embeddings (GPT-2), one row per position of the context."""

    name = "learned"

    def params(self, cfg: Any) -> int:
        return cfg.context_length * cfg.d_model

    def embedding(self, cfg: Any) -> nn.Module | None:
        from torch import nn

        return nn.Embedding(cfg.context_length, cfg.d_model)


@POSITIONS.register
class Rope(Position):
    """Rotary embeddings (Su et al. 2021); tables in `lmforge.model.transformer.rope_tables`."""

    name = "rope"
    rotary = True

    def check(self, cfg: Any) -> str | None:
        if (cfg.head_dim or cfg.d_model // cfg.n_heads) % 2:
            return (
                f"= rope needs an even head dimension (model.head_dim, or model.d_model / "
                f"model.n_heads = {cfg.d_model} / {cfg.n_heads})"
            )
        return None


# ---------------------------------------------------------------------------- MLPs


class MLP:
    """x → down(act(up(x))): `up` is C → gates·hidden, `down` hidden → C.

    A gated MLP (`gates` = 2) splits up's output into gate and value halves. The
    component chooses the hidden width and the activation; the layers are the
    transformer's `MLP` module, so weights keep their names for export and optimizers.
    """

    name: ClassVar[str]
    gates: ClassVar[int] = 1
    hf_activation: ClassVar[str] = ""  # `hidden_act` / `activation_function` in an HF config

    def hidden(self, cfg: Any) -> int:
        """Hidden width: `d_ff`, or 4·C when it is 0 (GPT-2)."""
        return cfg.d_ff or 4 * cfg.d_model

    def matmul_params(self, cfg: Any) -> int:
        hidden = self.hidden(cfg)
        return cfg.d_model * hidden * self.gates + hidden * cfg.d_model

    def params(self, cfg: Any) -> int:
        bias = (self.hidden(cfg) * self.gates + cfg.d_model) if cfg.bias else 0
        return self.matmul_params(cfg) + bias

    def flops(self, cfg: Any) -> int:
        """Forward matmul FLOPs per token."""
        return 2 * self.matmul_params(cfg)

    def kept_activations(self, cfg: Any) -> int:
        """Hidden-width values per token kept for the backward pass (up's output and the
        activation's output, each `gates` wide for a gated MLP)."""
        return 2 * self.gates * self.hidden(cfg)

    def activation(self, cfg: Any) -> Callable[[Tensor], Tensor]:
        """up's output (..., gates·hidden) → (..., hidden)."""
        raise NotImplementedError


@MLPS.register
class Gelu(MLP):
    """GELU, tanh form (GPT-2's gelu_new)."""

    name = "gelu"
    hf_activation = "gelu_new"
    approximate: ClassVar[str] = "tanh"

    def activation(self, cfg: Any) -> Callable[[Tensor], Tensor]:
        from functools import partial

        import torch.nn.functional as F

        return partial(F.gelu, approximate=self.approximate)


@MLPS.register
class GeluExact(Gelu):
    """GELU, erf form (nanoGPT's nn.GELU(), HF "gelu")."""

    name = "gelu_exact"
    hf_activation = "gelu"
    approximate = "none"


@MLPS.register
class SquaredRelu(MLP):
    """Squared ReLU (So et al. 2021, "Primer")."""

    name = "relu2"
    hf_activation = "relu2"

    def activation(self, cfg: Any) -> Callable[[Tensor], Tensor]:
        return _relu2


@MLPS.register
class SwiGLU(MLP):
    """Gated: act(gate)·up with silu (SwiGLU, Shazeer 2020) or tanh-GELU (GeGLU, Gemma),
    as `model.gate_act` says. Hidden width 8/3·C rounded up to a multiple of 64 when
    `d_ff` is 0: the parameters of a 4·C GELU MLP, in matmul-friendly shapes."""

    name = "swiglu"
    gates = 2
    hf_activation = "silu"

    def hidden(self, cfg: Any) -> int:
        return cfg.d_ff or 64 * math.ceil(8 * cfg.d_model / 3 / 64)

    def activation(self, cfg: Any) -> Callable[[Tensor], Tensor]:
        from functools import partial

        import torch.nn.functional as F

        gate_act = F.silu if cfg.gate_act == "silu" else partial(F.gelu, approximate="tanh")
        return partial(_glu, gate_act)


# ----------------------------------------------------------------------- attention


class Attention:
    """How queries meet keys and values: the scores, their normalisation, the mix.

    The block keeps what surrounds it (the q/k/v and output projections, RoPE, QK-norm,
    the KV cache), so a variant has no parameters of its own. It states its formula in
    `attend` and its cost in `flops`. The model runs the built-in "softmax" through
    `lmforge.model.attend.attend` (SDPA, the CPU paths, the C kernel); the one-token
    decoder (`lmforge.model.decode`) runs "softmax" only, and
    decodes other variants through the model's forward.
    """

    name: ClassVar[str]

    def flops(self, cfg: Any, seq_len: int) -> int:
        """Forward FLOPs per token and layer besides the projections: q·kᵀ and the mix of
        values over a full (unmasked) T×T score matrix, 2·2·T·H·D (PaLM's convention)."""
        return 4 * seq_len * cfg.n_heads * (cfg.head_dim or cfg.d_model // cfg.n_heads)

    def attend(
        self, q: Tensor, k: Tensor, v: Tensor, *, causal: bool, start: int,
        mask: Tensor | None, scale: float | None, softcap: float, dropout_p: float,
    ) -> Tensor:  # fmt: skip
        """Queries q (B, H, T, D) at positions start.. over keys and values (B, K, T', D)
        (T' = start + T with a cache; K divides H, heads h·K/H share a key head). `mask`:
        bool, True = may attend, broadcasting to (B, H, T, T') (packed examples), or None
        with `causal`; `scale` None = 1/√D; `softcap` 0 = none. Returns (B, T, H, D)."""
        raise NotImplementedError


@ATTENTIONS.register
class SoftmaxAttention(Attention):
    """softmax(q·kᵀ·scale)·v (Vaswani et al. 2017), with the model's GQA, scale and
    soft-capping: `lmforge.model.attend`."""

    name = "softmax"


# Module-level, not closures: a model holding them pickles (torch.save, spawn).
def _relu2(h: torch.Tensor) -> torch.Tensor:
    return h.relu().square()


def _glu(gate_act: Callable[[Tensor], Tensor], h: torch.Tensor) -> torch.Tensor:
    gate, up = h.chunk(2, dim=-1)
    return gate_act(gate) * up


REGISTRIES: dict[str, Registry[Any]] = {
    "norm": NORMS,
    "position": POSITIONS,
    "mlp": MLPS,
    "attention": ATTENTIONS,
}
