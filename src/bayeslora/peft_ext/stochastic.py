"""Per-sample-group stochastic LoRA ``A`` factors plugged into PEFT's LoRA layers."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn


def device_generator(generator: torch.Generator | None, device: torch.device) -> torch.Generator | None:
    """A generator that draws directly on ``device``: on CPU ``generator`` itself; on an accelerator a generator of
    that device seeded with one draw from ``generator`` (deterministic given it).

    Drawing on the host and copying the noise over would make each stochastic layer wait for the device (a blocking
    copy), which on a GPU cost more than the layers' own arithmetic (``bench speed``: BLoB's training step was
    2.35x MLE's on a Llama-2-7B shape).
    """
    if device.type == "cpu":
        return generator
    seed = int(torch.randint(0, 2**63 - 1, (1,), generator=generator))
    return torch.Generator(device=device).manual_seed(seed)


@dataclass
class SamplingState:
    """Active sampling: *question* ``q`` uses weight sample ``groups[q]`` (of ``n_groups``); ``groups=None``: question
    ``q`` uses sample ``q`` (one sample per question, as in training).

    A forward pass's rows are mapped to questions by ``rows`` (set by the scorer with :func:`row_questions`; when
    unset, row ``i`` is question ``i``), so all rows of a question (its cloze choices, its prompt and its
    continuation) share one weight sample. Noise is drawn once per layer per context (from ``generator``) and
    cached, so several forwards inside one context see the same sample. ``antithetic``: the second half of the
    groups uses the negated noise of the first half (group ``g + ceil(n_groups / 2)`` mirrors group ``g``), so
    the odd-order terms of a sample average cancel exactly. ``center``: the last group has no noise (the posterior
    mean), and the others are drawn as above; a linearized predictive reads the mean and the pairs from one forward.

    The row-to-sample index is computed once per forward (not once per layer), and not at all when it is the
    identity (``groups=None`` and no ``rows``): each layer then uses its per-sample noise as it is, with no gather
    and no scatter in its backward. Nothing here reads a device tensor back to the host.
    """

    groups: torch.Tensor | None  # (B,) long: sample group of each question; None: question q uses sample q
    n_groups: int
    generator: torch.Generator | None
    rows: torch.Tensor | None = None  # (R,) long: question of each row of the current forward
    cache: dict = field(default_factory=dict)
    antithetic: bool = False
    center: bool = False
    #: ``(index, count)`` of this process among ``count`` data-parallel ones that split each batch by striding (its
    #: questions are the global batch's ``index, index + count, ...``): every process draws the noise of the whole
    #: global batch from the same stream and keeps its own questions', so a question's sample does not depend on
    #: the number of processes, and every process's generator stays in the same state (one checkpoint resumes all)
    shard: tuple[int, int] = (0, 1)

    def row_index(self, n_rows: int, device) -> torch.Tensor | None:
        """Sample group of each of the ``n_rows`` rows of the current forward, shape (R,), on ``device``; ``None``
        when row ``i`` uses sample ``i``."""
        if self.rows is None:
            if self.groups is None:
                if n_rows != self.n_groups:
                    raise RuntimeError(f"The sampling context has {self.n_groups} samples (one per question) but "
                                       f"the batch has {n_rows} rows and no row-to-question map")
                return None
            if self.groups.shape[0] != n_rows:
                raise RuntimeError(f"The sampling context maps {self.groups.shape[0]} questions but the batch has "
                                   f"{n_rows} rows")
            return self.groups.to(device)
        if self.rows.shape[0] != n_rows:
            raise RuntimeError(f"The sampling context maps {self.rows.shape[0]} rows but the batch has {n_rows}")
        key = ("rows", n_rows, torch.device(device))
        hit = self.cache.get(key)
        if hit is None or hit[0] is not self.rows:  # keyed on the rows object: forwards may map rows differently
            rows = self.rows.to(device)
            hit = (self.rows, rows if self.groups is None else self.groups.to(device)[rows])
            self.cache[key] = hit
        return hit[1]

    def row_groups(self, n_rows: int) -> torch.Tensor:
        """Sample group of each of the ``n_rows`` rows of the current forward, shape (R,)."""
        device = (self.rows if self.rows is not None else self.groups if self.groups is not None
                  else torch.empty(0)).device
        index = self.row_index(n_rows, device)
        return torch.arange(n_rows, device=device) if index is None else index

    def per_row(self, per_group: torch.Tensor, n_rows: int) -> torch.Tensor:
        """``per_group`` (G, ...) gathered to the rows of the current forward (R, ...); as it is for the identity."""
        index = self.row_index(n_rows, per_group.device)
        return per_group if index is None else per_group.index_select(0, index)

    def draw(self, fn: Callable, shape: tuple[int, ...], device) -> torch.Tensor:
        """``fn(shape)`` (``torch.randn`` / ``torch.rand``) in float32 on ``device``, from the context's randomness
        (see :func:`device_generator`; one device generator per context)."""
        device = torch.device(device)
        key = ("generator", device)
        if key not in self.cache:
            self.cache[key] = device_generator(self.generator, device)
        return fn(shape, generator=self.cache[key], device=device, dtype=torch.float32)

    def draw_groups(self, fn: Callable, n: int, tail: tuple[int, ...], device) -> torch.Tensor:
        """``(n, *tail)`` draws of :meth:`draw` for this process's ``n`` groups (see ``shard``)."""
        index, count = self.shard
        if count == 1:
            return self.draw(fn, (n, *tail), device)
        if self.antithetic or self.center:
            raise RuntimeError("Mirrored or centred samples are drawn for prediction, not for sharded training")
        return self.draw(fn, (n * count, *tail), device)[index::count]

    def noise(self, layer: nn.Module, shape: tuple[int, ...], device, dtype) -> torch.Tensor:
        key = id(layer)
        if key not in self.cache:
            g = self.n_groups - self.center
            n = (g + 1) // 2 if self.antithetic else g
            eps = self.draw_groups(torch.randn, n, shape, device)
            if self.antithetic:
                eps = torch.cat([eps, -eps])[:g]
            if self.center:
                eps = torch.cat([eps, eps.new_zeros((1, *shape))])
            self.cache[key] = eps.to(dtype=dtype)
        return self.cache[key]


class StochasticLoraA(nn.Module):
    """Base of stochastic ``lora_A`` replacements: ``weight`` (r, d_in) is the mean; subclasses add noise.

    Parameters other than ``weight`` are the layer's *posterior* state: they are saved in
    ``posterior.safetensors``, not in the PEFT adapter file.
    """

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.weight = linear.weight  # shares the PEFT parameter: same name, same storage
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self._sampling: SamplingState | None = None

    def noise_term(self, x: torch.Tensor, state: SamplingState) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = nn.functional.linear(x, self.weight)
        state = self._sampling
        if state is None:
            return out
        return out + self.noise_term(x, state)


class GaussianLoraA(StochasticLoraA):
    """``A ~ N(weight, std^2)`` elementwise with ``std = std_fn(rho)``; one sample per group.

    Each group's weight sample ``A_g = weight + std * eps_g`` (``eps_g ~ N(0, I)``, shape (r, d_in)) is formed
    explicitly and its rows run through one batched matmul ``(R, T, d_in) x (R, d_in, r)``: an exact weight sample
    per group. Forming ``A_g`` (one ``addcmul``) instead of adding ``x @ (std * eps_g)^T`` to ``x @ weight^T``
    saves a matmul, a product and a sum in the forward and their backward: one layer's forward and backward
    dispatch 29 aten ops instead of 40 (a plain Linear: 17), and a launch-bound step on a GPU pays per op
    (``scripts/count_step_ops.py`` counts a whole step).
    """

    def __init__(self, linear: nn.Linear, rho: torch.Tensor, std_fn: Callable[[torch.Tensor], torch.Tensor],
                 trainable: bool = True):
        super().__init__(linear)
        self.rho = nn.Parameter(rho.to(device=linear.weight.device, dtype=linear.weight.dtype).clone(),
                                requires_grad=trainable)
        self.std_fn = std_fn

    def std(self) -> torch.Tensor:
        return self.std_fn(self.rho)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        state = self._sampling
        if state is None:
            return nn.functional.linear(x, self.weight)
        eps = state.noise(self, tuple(self.weight.shape), x.device, x.dtype)  # (G, r, d_in)
        samples = torch.addcmul(self.weight.to(x.dtype), self.std().to(x.dtype), eps)  # (G, r, d_in)
        per_row = state.per_row(samples, x.shape[0])  # (R, r, d_in)
        flat = x.reshape(x.shape[0], -1, x.shape[-1])  # (R, T, d_in)
        return torch.bmm(flat, per_row.transpose(1, 2)).reshape(*x.shape[:-1], per_row.shape[1])


def lora_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """PEFT LoRA layers (modules with a ``lora_A`` ModuleDict) with their qualified names."""
    for name, module in model.named_modules():
        if isinstance(getattr(module, "lora_A", None), nn.ModuleDict):
            yield name, module


def replace_lora_A(model: nn.Module, factory: Callable[[str, nn.Linear], StochasticLoraA],
                   adapter_name: str = "default",
                   include: Callable[[str], bool] | None = None) -> list[StochasticLoraA]:
    """Swap each LoRA layer's ``lora_A[adapter_name]`` for ``factory(layer_name, linear)``.

    ``include(layer_name)`` (optional) selects the LoRA layers to swap; the others keep their plain Linear.
    """
    return _replace_factor(model, "lora_A", factory, adapter_name, include)


def replace_lora_B(model: nn.Module, factory: Callable[[str, nn.Linear], StochasticLoraA],
                   adapter_name: str = "default",
                   include: Callable[[str], bool] | None = None) -> list[StochasticLoraA]:
    """Like :func:`replace_lora_A` for the ``lora_B`` factor (``weight`` (d_out, r)); for methods that make both
    LoRA factors stochastic (``sgp``)."""
    return _replace_factor(model, "lora_B", factory, adapter_name, include)


def _replace_factor(model: nn.Module, factor: str, factory: Callable[[str, nn.Linear], StochasticLoraA],
                    adapter_name: str, include: Callable[[str], bool] | None) -> list[StochasticLoraA]:
    replaced = []
    for name, layer in lora_layers(model):
        if adapter_name not in getattr(layer, factor) or (include is not None and not include(name)):
            continue
        current = getattr(layer, factor)[adapter_name]
        linear = current if isinstance(current, nn.Linear) else _as_linear(current)
        new = factory(name, linear)
        getattr(layer, factor)[adapter_name] = new
        replaced.append(new)
    if not replaced:
        raise ValueError(f"The model has no LoRA layers with adapter {adapter_name!r} to make stochastic")
    return replaced


def _as_linear(module: StochasticLoraA) -> nn.Linear:
    linear = nn.Linear(module.in_features, module.out_features, bias=False)
    linear.weight = module.weight
    return linear


def stochastic_layers(model: nn.Module) -> list[StochasticLoraA]:
    return [m for m in model.modules() if isinstance(m, StochasticLoraA)]


def posterior_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and buffers of the stochastic layers other than ``weight`` (keyed by full name)."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, StochasticLoraA):
            for pname, tensor in [*module.named_parameters(recurse=True), *module.named_buffers(recurse=True)]:
                if pname != "weight":
                    out[f"{name}.{pname}"] = tensor
    return out


@contextlib.contextmanager
def sample_groups(model: nn.Module, groups: torch.Tensor | None, n_groups: int | None = None,
                  generator: torch.Generator | None = None, antithetic: bool = False,
                  center: bool = False, shard: tuple[int, int] = (0, 1)) -> Iterator[SamplingState]:
    """Within the context, every stochastic layer of ``model`` samples one weight per group of questions.

    ``groups`` (B,) gives each question's sample group; ``None`` (with ``n_groups`` = B) draws one sample per
    question (training; or prediction on a batch repeated S times with :meth:`EncodedBatch.repeat`) without any
    index. ``antithetic``: mirrored noise pairs (see :class:`SamplingState`); with a batch repeated an even S
    times, copy ``s + S / 2`` mirrors copy ``s``. ``center``: the last group is the posterior mean (see
    :class:`SamplingState`). Pass ``n_groups`` when ``groups`` is on an accelerator: otherwise
    it is read back from the device (a synchronization). ``shard``: this process's place among data-parallel ones
    (see :class:`SamplingState`).
    """
    if groups is None and n_groups is None:
        raise ValueError("sample_groups(groups=None) needs n_groups (the number of questions)")
    layers = stochastic_layers(model)
    state = SamplingState(groups=groups, n_groups=int(n_groups if n_groups is not None else groups.max() + 1),
                          generator=generator, antithetic=antithetic, center=center, shard=shard)
    for layer in layers:
        layer._sampling = state
    try:
        yield state
    finally:
        for layer in layers:
            layer._sampling = None


@contextlib.contextmanager
def row_questions(model: nn.Module, rows: torch.Tensor) -> Iterator[None]:
    """Tell the active sampling or adapter-routing contexts (if any) which question each row of the next forwards
    belongs to."""
    states = {}
    for module in model.modules():
        for state in (getattr(module, "_sampling", None), getattr(module, "_adapter_routing", None)):
            if state is not None:
                states[id(state)] = state
    previous = {k: st.rows for k, st in states.items()}
    for st in states.values():
        st.rows = rows
    try:
        yield
    finally:
        for k, st in states.items():
            st.rows = previous[k]
