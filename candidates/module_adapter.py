"""`--cand module:FILE.py:factory` or `module:pkg.mod:factory`: any PyTorch port, tapped through a TOML mapping.

`factory(model_dir, dtype)` returns an nn.Module called as `module(ids)` (ids [B,T]). The mapping
(format: candidates/mappings/standalone_qwen3.toml) says which module output, module input or
function call holds each tap, and how to bring it to the schema's layout. A port without a KV
cache is re-run on the whole prefix at every decode step; its last positions are kept.
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import importlib.util
import re
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import torch

from qwen3dbg.candidate import Candidate
from qwen3dbg.config import Qwen3Config, load_config
from qwen3dbg.dtypes import parse_dtype
from qwen3dbg.errors import UserError
from qwen3dbg.patching import patched
from qwen3dbg.store import TapSink
from qwen3dbg.taps import OPS_BY_NAME, axis_sizes, parse_tap_name, step_taps

RERUN_NOTE = "no KV cache: each decode step re-runs the whole prefix and its last position is compared"


# ---- the mapping ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Source:
    """Where one tap comes from in the port: a module's output/input or a function's output/argument."""

    module: str | None = None
    function: str | None = None
    input: int | None = None  # module: take this positional input instead of the output
    arg: int | None = None  # function: take this argument instead of the output
    within: str | None = None  # function: count only calls made inside this module
    call: int = 0  # function: the n-th counted call of the step
    transform: tuple[str, ...] = ()


@dataclass(frozen=True)
class Mapping:
    taps: dict[str, Source]  # concrete tap names ({i} expanded)
    kv_cache: bool
    reset: str | None
    path: Path

    @property
    def ops(self) -> set[str]:
        return {parse_tap_name(n)[1] for n in self.taps}


_SOURCE_KEYS = {"module", "function", "input", "arg", "within", "call", "transform"}


def load_mapping(path: str | Path, config: Qwen3Config) -> Mapping:
    """Parse a mapping TOML for a model; every tap name, key and transform is checked here, once."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"mapping file {path} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"mapping file {path} is not valid TOML: {e}") from None
    call = raw.get("call", {})
    taps: dict[str, Source] = {}
    for key, value in raw.get("taps", {}).items():
        if isinstance(value, str):
            value = {"module": value}
        if not isinstance(value, dict) or set(value) - _SOURCE_KEYS or ("module" in value) == ("function" in value):
            raise UserError(f"{path}: tap {key!r} needs a module path or a table with exactly one of module/function "
                            f"and only the keys {', '.join(sorted(_SOURCE_KEYS))}")
        for t in value.get("transform", []):
            parse_transform(t, axis_sizes(config, 1, 1, 1), where=f"{path}: tap {key!r}")
        layers = range(config.num_hidden_layers) if "{i}" in key else [None]
        for i in layers:
            name = key.replace("{i}", str(i))
            if parse_tap_name(name)[1] not in OPS_BY_NAME:
                raise UserError(f"{path}: {key!r} is not a tap name of the schema (see qwen3dbg/taps.py)")
            fill = {k: (v.replace("{i}", str(i)) if isinstance(v, str) else v) for k, v in value.items()}
            fill["transform"] = tuple(fill.get("transform", ()))
            taps[name] = Source(**fill)
    if not taps:
        raise UserError(f"{path} maps no taps: add a [taps] table")
    if call.get("kv_cache") and not call.get("reset"):
        raise UserError(f"{path}: [call] kv_cache = true needs reset = \"<method that empties the port's cache>\"")
    return Mapping(taps, bool(call.get("kv_cache", False)), call.get("reset"), path)


# ---- transforms -----------------------------------------------------------------------------------

_TRANSFORM = re.compile(r"^\s*(transpose|reshape|slice)\s*\((.*)\)\s*$")


def _size(expr: str, sizes: dict[str, int]) -> int:
    """Evaluate '2*nKV*D' style size expressions: integers, axis names, + - *."""
    def ev(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.Name) and node.id in sizes:
            return sizes[node.id]
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -ev(node.operand)
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub, ast.Mult)):
            a, b = ev(node.left), ev(node.right)
            return a + b if isinstance(node.op, ast.Add) else a - b if isinstance(node.op, ast.Sub) else a * b
        raise ValueError(expr)
    return ev(ast.parse(expr.strip(), mode="eval").body)


def parse_transform(text: str, sizes: dict[str, int], *, where: str = "mapping") -> tuple[str, list[int]]:
    """'reshape(B,T,nH,D)' -> ('reshape', [ints]) with the axis sizes of the current run."""
    m = _TRANSFORM.match(text)
    try:
        if not m:
            raise ValueError(text)
        args = [_size(a, sizes) for a in m.group(2).split(",")] if m.group(2).strip() else []
        arity = {"transpose": (2,), "slice": (3,), "reshape": tuple(range(1, 9))}[m.group(1)]
        if len(args) not in arity:
            raise ValueError(text)
    except (ValueError, SyntaxError):
        raise UserError(f"{where}: transform {text!r} is not transpose(a,b), reshape(...) or slice(dim,start,stop) "
                        f"over integers and the axes {', '.join(sorted(sizes))}") from None
    return m.group(1), args


def apply_transforms(x: torch.Tensor, transforms: tuple[str, ...], sizes: dict[str, int]) -> torch.Tensor:
    """Apply a mapping's transforms in order. x: the port's tensor; sizes: axis name -> length."""
    for t in transforms:
        kind, args = parse_transform(t, sizes)
        if kind == "transpose":
            x = x.transpose(*args)
        elif kind == "reshape":
            x = x.reshape(*args)
        else:
            dim, start, stop = args
            x = x.narrow(dim, start, stop - start)
    return x


def keep_last_positions(x: torch.Tensor, op: str, tokens: int) -> torch.Tensor:
    """A re-run over the whole prefix: keep the step's last `tokens` positions on the T axis, if any."""
    axes = OPS_BY_NAME[op].axes
    if "T" not in axes:
        return x  # k_cache, v_cache: the whole prefix is the cache
    dim = axes.index("T")
    return x.narrow(dim, x.shape[dim] - tokens, tokens)


# ---- capturing one run ----------------------------------------------------------------------------

class _Recorder:
    """Hooks and function wrappers for one forward call; `values[tap]` holds what each tap saw."""

    def __init__(self, model: torch.nn.Module, code_module, sources: dict[str, Source]):
        self.model, self.code_module, self.sources = model, code_module, sources
        self.values: dict[str, torch.Tensor] = {}
        self.scopes: list[str] = []
        self.calls = {name: 0 for name, src in sources.items() if src.function}  # counted calls per tap

    def _submodule(self, path: str) -> torch.nn.Module:
        try:
            return self.model.get_submodule(path) if path else self.model
        except AttributeError:
            raise UserError(f"the mapping names module {path!r}, which the port does not have") from None

    def _function_owner(self, name: str):
        """(object holding the function, attribute name): the model's code module, or a dotted import."""
        if "." not in name:
            if not hasattr(self.code_module, name):
                raise UserError(f"the mapping names function {name!r}, which {self.code_module.__name__} lacks")
            return self.code_module, name
        owner, _, attr = name.rpartition(".")
        try:
            obj = importlib.import_module(owner)
        except ImportError:
            raise UserError(f"the mapping names function {name!r}, whose module {owner!r} cannot be imported") from None
        if not hasattr(obj, attr):
            raise UserError(f"the mapping names function {name!r}, which does not exist")
        return obj, attr

    @contextlib.contextmanager
    def active(self):
        with contextlib.ExitStack() as stack:
            for name, src in self.sources.items():
                if src.module is not None:
                    stack.enter_context(self._module_hook(name, src))
            scopes = {src.within for src in self.sources.values() if src.function and src.within}
            for scope in scopes:
                stack.enter_context(self._scope(scope))
            for fname in {src.function for src in self.sources.values() if src.function}:
                stack.enter_context(self._wrap(fname))
            yield self

    @contextlib.contextmanager
    def _module_hook(self, name: str, src: Source):
        def hook(_mod, args, out):
            value = out if src.input is None else args[src.input]
            self.values[name] = value.detach().clone()

        handle = self._submodule(src.module).register_forward_hook(hook)
        try:
            yield
        finally:
            handle.remove()

    @contextlib.contextmanager
    def _scope(self, path: str):
        mod = self._submodule(path)
        def enter(*_):
            self.scopes.append(path)

        def leave(*_):  # a forward hook's return value would replace the output: return None
            self.scopes.pop()

        pre, post = mod.register_forward_pre_hook(enter), mod.register_forward_hook(leave)
        try:
            yield
        finally:
            pre.remove(), post.remove()

    @contextlib.contextmanager
    def _wrap(self, fname: str):
        owner, attr = self._function_owner(fname)
        wanted = [(n, s) for n, s in self.sources.items() if s.function == fname]

        def wrap(original):
            def wrapper(*args, **kwargs):
                out = original(*args, **kwargs)
                scope = self.scopes[-1] if self.scopes else None
                for name, src in wanted:
                    if src.within is None or src.within == scope:
                        if self.calls[name] == src.call:
                            value = out if src.arg is None else args[src.arg]
                            self.values[name] = value.detach().clone()
                        self.calls[name] += 1
                return out
            return wrapper

        with patched(owner, attr, wrap):  # this thread's calls only: a diff runs its sides concurrently
            yield


# ---- the candidate --------------------------------------------------------------------------------

def _import_factory(spec: str):
    """'path/to/file.py:factory' or 'pkg.mod:factory' -> (module object, factory)."""
    target, _, attr = spec.rpartition(":")
    if not target or not attr:
        raise UserError(f"module:{spec} must be module:path/to/file.py:factory or module:package.module:factory")
    if target.endswith(".py"):
        path = Path(target).resolve()
        if not path.is_file():
            raise UserError(f"module:{spec}: {path} does not exist")
        name = f"qwen3dbg_port_{abs(hash(str(path)))}"
        loader = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(loader)
        sys.modules[name] = module
        try:
            loader.loader.exec_module(module)
        except Exception as e:  # the port's own code: say whose failure it is
            raise UserError(f"module:{spec}: importing {path} failed: {type(e).__name__}: {e}") from None
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as e:
            raise UserError(f"module:{spec}: cannot import {target} ({e})") from None
    if not callable(getattr(module, attr, None)):
        raise UserError(f"module:{spec}: {target} has no function {attr}")
    return module, getattr(module, attr)


def _port(spec: str, at: str, mapping, config: Qwen3Config):
    """The port's factory and its tap mapping (option, else `spec@mapping.toml`, else TAP_MAPPING)."""
    factory_module, factory = _import_factory(spec)
    mapping = mapping or at or getattr(factory_module, "TAP_MAPPING", None)
    if not mapping:
        raise UserError(f"module:{spec} has no tap mapping: pass module:{spec}@mapping.toml "
                        "or set TAP_MAPPING in the port's module")
    loaded = load_mapping(mapping, config)
    unknown = sorted(set(loaded.taps) - {t.name for t in step_taps(config, 1, 1, 1)})
    if unknown:
        raise UserError(f"{loaded.path} maps {unknown[0]}, which this model does not have")
    return factory, loaded


class ModuleCandidate(Candidate):
    """A PyTorch port run through its mapping. Options: mapping=PATH (else `spec@mapping.toml`, else the
    port module's TAP_MAPPING)."""

    def __init__(self, spec: str, model_dir, dtype="float32", *, mapping: str | Path | None = None):
        spec, _, at = spec.partition("@")
        self.name = f"module:{spec}"
        self.config = load_config(model_dir)
        self.dtype = parse_dtype(dtype)
        factory, self.mapping = _port(spec, at, mapping, self.config)
        self.missing_taps = frozenset({t.op for t in step_taps(self.config, 1, 1, 1)} - self.mapping.ops)
        try:
            self.model = factory(model_dir, self.dtype)
        except Exception as e:  # the port's own loader: say whose failure it is
            raise UserError(f"{self.name} failed to build the model: {type(e).__name__}: {e}") from None
        if not isinstance(self.model, torch.nn.Module):
            raise UserError(f"{self.name} returned {type(self.model).__name__}, not a torch.nn.Module")
        self.model.eval()
        if self.mapping.kv_cache and not callable(getattr(self.model, self.mapping.reset, None)):
            raise UserError(f"{self.mapping.path}: the port has no method {self.mapping.reset}() to empty its cache")
        # Bare function names in the mapping live where the model's code does, not where the factory does.
        self.code_module = sys.modules[type(self.model).__module__]
        self.reset()

    @staticmethod
    def check(spec: str, model_dir, dtype="float32", *, mapping: str | Path | None = None) -> None:
        """All but building the model (`qwen3dbg.registry.check_candidate`): the port imports, and its
        factory and mapping resolve."""
        spec, _, at = spec.partition("@")
        _port(spec, at, mapping, load_config(model_dir))

    def manifest_extra(self) -> dict:
        return {"mapping": str(self.mapping.path), "notes": [] if self.mapping.kv_cache else [RERUN_NOTE]}

    def reset(self) -> None:
        self.history: torch.Tensor | None = None
        if self.mapping.kv_cache:
            getattr(self.model, self.mapping.reset)()

    @torch.no_grad()
    def step(self, ids: torch.Tensor, positions: torch.Tensor, sink: TapSink) -> torch.Tensor:
        tokens = ids.shape[1]
        if self.mapping.kv_cache:
            run_ids = ids
        else:
            self.history = ids if self.history is None else torch.cat((self.history, ids), dim=1)
            run_ids = self.history
        cache_len = int(positions[0, -1]) + 1
        wanted = {n: s for n, s in self.mapping.taps.items() if sink.wants(n)}
        recorder = _Recorder(self.model, self.code_module, wanted)
        with recorder.active():
            logits = self.model(run_ids)
        sizes = axis_sizes(self.config, ids.shape[0], run_ids.shape[1], cache_len)
        for name, src in wanted.items():
            if name not in recorder.values:
                raise UserError(f"{self.name}: the mapping's source of {name} ({src.module or src.function}) "
                                "never ran in the forward pass")
            value = apply_transforms(recorder.values[name], src.transform, sizes)
            if not self.mapping.kv_cache:
                value = keep_last_positions(value, parse_tap_name(name)[1], tokens)
            sink(name, value.to(self.dtype) if value.is_floating_point() else value)
        return logits[:, -tokens:]
