"""CUDA graphs for the language model's decoder layers in training (spec train.cuda_graphs).

Why: at the 7B shape, batch 4, 448 px, the training step is bound by host time: the GPU waits
while Python dispatches thousands of small kernels, most of them in LoRA layers. A CUDA graph
records a layer's kernels once and replays them with one launch. Priced on a stack of 64 PEFT
LoRA layers at the 7B width (bench/lora_overhead.py, H200): 66.0 ms per forward+backward eager
over a 4-bit base, 20.6 ms as a graph; bf16 base 30.6 vs 18.0 ms.

How: each decoder layer's `forward` is replaced by a GraphedLayerForward. In training it
flattens the call's tensors (hidden states, mask, cos and sin, ...) into positional arguments
and keys the call on its structure: every tensor's shape, dtype, device and requires_grad, the
constants (None, bools), and the autocast state. The first call with a new key captures the
layer's forward and backward with torch.cuda.make_graphed_callables (on detached clones of the
inputs); later calls copy their inputs into the graph's static inputs and replay it.

Each graph has its own memory pool. Sharing one across layers is not safe when layers are
captured one at a time: the backward capture frees the forward's saved activations back to the
pool, the next layer's capture may be given that memory, and at replay the next layer's forward
would overwrite them before this layer's backward reads them. (Sharing is safe when all layers
are captured in one make_graphed_callables call, forwards in order and backwards in reverse;
that needs every layer's inputs at once, a possible next step to save memory.)

What stays eager (the original forward, unchanged): eval mode, no_grad, calls with a KV cache
(generation), CPU tensors, layers under activation checkpointing (a checkpoint runs the forward
again in the backward, which would overwrite the graph's saved activations before its own
backward read them: train.checkpoint_scope: vision keeps the language layers out), calls inside
a backward pass or under saved-tensor hooks, and any key whose capture failed (one warning, then
eager for that key).

Gradient accumulation is fine: each micro-batch runs every layer's forward once and then its
backward once, so no graph is replayed twice before its backward has read what it saved. One
catch is handled here: autograd would keep a graph's static gradient buffer as a parameter's
`.grad` (it takes the first gradient without copying), and the next micro-batch's replay would
then overwrite it before adding to it; the first gradient of each trainable parameter is copied.

Memory: every key holds its graphs for the whole run: each layer's saved activations (as eager
keeps them during a step) plus its static input and output, the gradient buffers for its input,
output and trainable weights, and the largest temporaries of its forward and backward (which
eager shares between layers). Each distinct padded length is a key:
train.pad_to_multiple_of keeps them few. At most MAX_GRAPHS_PER_LAYER keys per layer are
captured; later keys run eager.
"""

from __future__ import annotations

import functools
import logging
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from vlm_ray.models.submodules import inner_module

log = logging.getLogger(__name__)

MAX_GRAPHS_PER_LAYER = 8
# transformers hands the loss's token count to every layer through **kwargs; no layer reads it,
# and as a Python int it would make every step a new key.
IGNORED_KWARGS = frozenset({"num_items_in_batch"})
_CONSTANT_TYPES = (type(None), bool, int, float, str)
_TENSOR, _SEQUENCE, _CONSTANT = "tensor", "sequence", "constant"


def language_decoder_layers(model: Any) -> list[Any]:
    """The language model's decoder layers (`language_model.layers`), outside the vision tower."""
    text = inner_module(model, "language_model")
    layers = getattr(text, "layers", None)
    if layers is None:  # a language model with its own inner model (`language_model.model.layers`)
        layers = getattr(getattr(text, "model", None), "layers", None)
    return list(layers) if layers is not None else []


def _describe(value: Any, tensors: list[Any]) -> tuple:
    """A hashable description of `value`, appending its tensors to `tensors` in order."""
    import torch

    if isinstance(value, torch.Tensor):
        tensors.append(value)
        return (_TENSOR, tuple(value.shape), value.dtype, value.device, value.requires_grad)
    if isinstance(value, (tuple, list)):
        return (_SEQUENCE, type(value), tuple(_describe(v, tensors) for v in value))
    if isinstance(value, _CONSTANT_TYPES):
        return (_CONSTANT, type(value), value)  # the type: True and 1 are different calls
    raise TypeError(f"cannot graph an argument of type {type(value).__name__}")


def _rebuild(description: tuple, tensors: Iterator[Any]) -> Any:
    kind = description[0]
    if kind == _TENSOR:
        return next(tensors)
    if kind == _SEQUENCE:
        return description[1](_rebuild(d, tensors) for d in description[2])
    return description[2]


def describe_call(args: Sequence[Any], kwargs: dict[str, Any]) -> tuple[tuple, list[Any]] | None:
    """(key, tensors) of a layer call, or None when an argument is neither a tensor, a constant
    nor a tuple/list of them (a KV cache, a mask object).

    The key holds everything a graph bakes in: the nesting, the constants' values, and each
    tensor's shape, dtype, device and requires_grad; the tensors are the graph's inputs.
    """
    tensors: list[Any] = []
    try:
        key = (
            tuple(_describe(a, tensors) for a in args),
            tuple((name, _describe(v, tensors)) for name, v in kwargs.items()),
        )
    except TypeError:
        return None
    return key, tensors


def rebuild_call(key: tuple, tensors: Sequence[Any]) -> tuple[tuple, dict[str, Any]]:
    """The (args, kwargs) that describe_call took apart, with `tensors` in its tensors' places."""
    it = iter(tensors)
    args = tuple(_rebuild(d, it) for d in key[0])
    kwargs = {name: _rebuild(d, it) for name, d in key[1]}
    return args, kwargs


def _saved_tensor_hooks_active() -> bool:
    """Whether saved-tensor hooks are on (a non-reentrant checkpoint, activation offloading)."""
    import torch

    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    if top is None:
        return False
    try:
        return top(False) is not None
    except TypeError:  # torch versions without the ignore_is_tracing argument
        return top() is not None


def eager_reason(layer: Any, args: Sequence[Any], kwargs: dict[str, Any]) -> str | None:
    """Why this call of `layer` must run its original forward, or None when a graph may serve it."""
    import torch

    if not layer.training:
        return "eval mode"
    if getattr(layer, "gradient_checkpointing", False):
        return "activation checkpointing"
    if not torch.is_grad_enabled():
        return "grad disabled"
    if torch._C._current_graph_task_id() != -1:
        return "inside a backward pass (a checkpoint's recomputation)"
    if _saved_tensor_hooks_active():
        return "saved-tensor hooks (checkpointing or offloading)"
    if any(kwargs.get(k) is not None for k in ("past_key_values", "past_key_value", "layer_past")):
        return "KV cache"
    first = args[0] if args else kwargs.get("hidden_states")
    if not isinstance(first, torch.Tensor) or not first.is_cuda:
        return "not on CUDA"
    if torch.cuda.is_current_stream_capturing() or torch.compiler.is_compiling():
        return "inside another capture or compilation"
    return None


def guard_first_gradient(parameter: Any) -> None:
    """Make `parameter`'s first gradient after each zero_grad a copy, never a graph's buffer.

    Autograd keeps an incoming gradient as `.grad` without copying when `.grad` is None and no
    one else holds it, which is the case for a graph's static gradient buffer; the next replay
    of that graph (the next micro-batch) would overwrite `.grad` and then add the new gradient
    to it. Later gradients are added into `.grad`, so they are not copied.
    """
    ref = weakref.ref(parameter)

    def copy_if_first(grad):
        p = ref()
        return grad.clone() if p is not None and p.grad is None else grad

    parameter.register_hook(copy_if_first)


@functools.cache
def _graphing_takes_capture_error_mode() -> bool:
    """Whether this torch's make_graphed_callables has capture_error_mode (asked once, not per capture)."""
    import inspect

    import torch

    return "capture_error_mode" in inspect.signature(torch.cuda.make_graphed_callables).parameters


@functools.cache
def _flat_layer_call_class() -> type:
    import torch

    class FlatLayerCall(torch.nn.Module):
        """A layer's original forward over positional tensors (what make_graphed_callables
        takes), returning its output's tensors; the layer is a child, so its parameters are
        the graph's parameters."""

        def __init__(self, layer: Any, forward: Callable[..., Any], key: tuple) -> None:
            super().__init__()
            self.layer = layer
            self.original = forward
            self.key = key
            self.output_key: tuple | None = None

        def forward(self, *tensors: Any) -> tuple[Any, ...]:
            args, kwargs = rebuild_call(self.key, tensors)
            out: list[Any] = []
            description = _describe(self.original(*args, **kwargs), out)
            if self.output_key not in (None, description):
                raise RuntimeError("the layer's output changed structure between calls")
            self.output_key = description
            return tuple(out)

    return FlatLayerCall


def flat_layer_call(layer: Any, forward: Callable[..., Any], key: tuple) -> Any:
    """A module whose forward(*tensors) is `forward` called as describe_call's `key` says, and
    returns the output's tensors as a tuple (what make_graphed_callables captures)."""
    return _flat_layer_call_class()(layer, forward, key)


class _Shared:
    """What the wrapped layers of one model share: the layer list, one-time messages."""

    def __init__(self, layers: list[Any]) -> None:
        self.layers = layers
        self.said: set[str] = set()

    def once(self, tag: str, level: int, message: str, *args: Any) -> None:
        """Log `message` the first time `tag` comes up for this model."""
        if tag not in self.said:
            self.said.add(tag)
            log.log(level, message, *args)


class GraphedLayerForward:
    """A decoder layer's forward that, in training on CUDA, replays one CUDA graph per call key."""

    def __init__(self, layer: Any, index: int, shared: _Shared) -> None:
        self.layer = layer
        self.index = index
        self.original = layer.forward
        self.shared = shared
        self.graphs: dict[tuple, Callable[..., Any] | None] = {}  # None: eager for that key
        self._guarded = False
        functools.update_wrapper(self, self.original)  # name and signature, for introspection

    @property
    def captured(self) -> int:
        """How many graphs this layer replays (keys whose capture succeeded)."""
        return sum(g is not None for g in self.graphs.values())

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        reason = eager_reason(self.layer, args, kwargs)
        if reason is not None:
            if reason == "activation checkpointing":
                self._say_checkpointed()
            elif reason not in ("eval mode", "grad disabled"):  # why training calls run eager
                self.shared.once(reason, logging.INFO, "cuda graphs: calls run eager: %s", reason)
            return self.original(*args, **kwargs)
        import torch

        call = {k: v for k, v in kwargs.items() if k not in IGNORED_KWARGS}
        described = describe_call(args, call)
        if described is None:
            kinds = sorted({type(v).__name__ for v in (*args, *call.values())})
            self.shared.once(
                "arguments",
                logging.WARNING,
                "cuda graphs: calls with arguments of types %s cannot be graphed; they run eager",
                kinds,
            )
            return self.original(*args, **kwargs)
        call_key, tensors = described
        key = (call_key, torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"))
        if key not in self.graphs:
            if len(self.graphs) >= MAX_GRAPHS_PER_LAYER:
                self.shared.once(
                    "too many keys",
                    logging.WARNING,
                    "cuda graphs: more than %d call shapes per layer; new ones run eager "
                    "(train.pad_to_multiple_of makes fewer)",
                    MAX_GRAPHS_PER_LAYER,
                )
                return self.original(*args, **kwargs)
            self.graphs[key] = self._capture(key, tensors)
        graphed = self.graphs[key]
        return self.original(*args, **kwargs) if graphed is None else graphed(*tensors)

    def _capture(self, key: tuple, tensors: list[Any]) -> Callable[..., Any] | None:
        """make_graphed_callables for this key, or None (logged) when capture fails."""
        import torch

        call_key, autocast_on, autocast_dtype = key
        samples = tuple(t.detach().clone().requires_grad_(t.requires_grad) for t in tensors)
        runner = flat_layer_call(self.layer, self.original, call_key)
        options: dict[str, Any] = {"allow_unused_input": True}
        if _graphing_takes_capture_error_mode():
            # Only this thread's unsafe calls fail the capture, not the data loader's pinning.
            options["capture_error_mode"] = "thread_local"
        shape = list(tensors[0].shape)
        reserved = torch.cuda.memory_reserved()
        stream = torch.cuda.current_stream()
        start = time.perf_counter()
        try:
            # make_graphed_callables refuses autocast's weight cache; same autocast without it.
            with torch.autocast(
                "cuda", dtype=autocast_dtype, enabled=autocast_on, cache_enabled=False
            ):
                torch.cuda.make_graphed_callables(runner, samples, **options)
        except Exception as error:
            # A capture that fails in torch.cuda.graph's exit leaves its side stream current.
            if torch.cuda.current_stream() != stream:
                torch.cuda.set_stream(stream)
            first_line = (str(error).splitlines() or [""])[0][:300]
            self.shared.once(
                f"{type(error).__name__}: {first_line}",
                logging.WARNING,
                "cuda graphs: capture failed, those calls run eager: %s: %s",
                type(error).__name__,
                first_line,
            )
            log.debug("cuda graphs: language layer %d eager for %s", self.index, shape)
            return None
        if not self._guarded:
            for p in self.layer.parameters():
                if p.requires_grad:
                    guard_first_gradient(p)
            self._guarded = True
        log.info(
            "cuda graphs: language layer %d/%d captured for hidden states %s %s in %.2fs "
            "(+%.2f GiB reserved)",
            self.index,
            len(self.shared.layers),
            shape,
            str(tensors[0].dtype).removeprefix("torch."),
            time.perf_counter() - start,
            (torch.cuda.memory_reserved() - reserved) / 2**30,
        )

        def replay(*inputs: Any) -> Any:
            return _rebuild(runner.output_key, iter(runner(*inputs)))

        return replay

    def _say_checkpointed(self) -> None:
        if "checkpointed" in self.shared.said:
            return
        checkpointed = sum(
            bool(getattr(layer, "gradient_checkpointing", False)) for layer in self.shared.layers
        )
        self.shared.once(
            "checkpointed",
            logging.WARNING,
            "cuda graphs: %d of %d language layers are under activation checkpointing and stay "
            "eager (train.checkpoint_scope: vision leaves them out)",
            checkpointed,
            len(self.shared.layers),
        )


def enable_graphed_decoder_layers(model: Any) -> int:
    """Give every language decoder layer a GraphedLayerForward; returns how many were wrapped.

    Safe on any device: off CUDA, in eval or under no_grad each layer runs its original forward.
    """
    layers = language_decoder_layers(model)
    shared = _Shared(layers)
    wrapped = 0
    for index, layer in enumerate(layers):
        if not isinstance(layer.forward, GraphedLayerForward):  # enabling twice wraps nothing
            layer.forward = GraphedLayerForward(layer, index, shared)
            wrapped += 1
    if wrapped:
        log.info(
            "cuda graphs: %d language decoder layers wrapped (captured per call shape in training)",
            wrapped,
        )
    return wrapped


def graphed_forwards(model: Any) -> list[GraphedLayerForward]:
    """The GraphedLayerForward of each wrapped language decoder layer."""
    return [
        layer.forward
        for layer in language_decoder_layers(model)
        if isinstance(layer.forward, GraphedLayerForward)
    ]
