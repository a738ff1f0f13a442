"""`--cand module:FILE.py:factory` or `module:pkg.mod:factory`: any PyTorch port, tapped through a TOML mapping."""

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

from qwen3dbg.model.config import Qwen3Config
from qwen3dbg.model.model_dir import open_model
from qwen3dbg.run.candidate import Candidate, DictSink
from qwen3dbg.tapstore.schema import OPS_BY_NAME, axis_sizes, layer_ops, parse_tap_name, step_taps
from qwen3dbg.tapstore.store import TapSink
from qwen3dbg.util.dtypes import parse_dtype
from qwen3dbg.util.errors import UserError
from qwen3dbg.util.patching import patched

RERUN_NOTE = "no KV cache: each decode step re-runs the whole prefix and its last position is compared"


# ---- the mapping ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class TapOrigin:
    """Where one tap comes from in the port: a module's output/input or a function's output/argument
    (a tensor method is the function torch.Tensor.<name>, its argument 0 the tensor itself)."""

    module: str | None = None
    function: str | None = None
    input: int | None = None  # module: take this positional input instead of the output
    arg: int | None = None  # function: take this argument instead of the output
    select: str = ""  # then index into what was taken: "[0]", ".indices", "[1].k"
    within: str | None = None  # count only calls made while this module runs
    call: int = 0  # the n-th counted call of the step (per run of `within`)
    calls: int | None = None  # how often the source runs per step (per `within`); default: highest call + 1
    transform: tuple[str, ...] = ()

    @property
    def site(self) -> tuple[str, str, str | None]:
        """What is hooked and counted: taps sharing a site share one hook and one call counter."""
        return (
            ("module", self.module, self.within)
            if self.module is not None
            else ("function", self.function, self.within)
        )

    def describe(self) -> str:
        what = f"module {self.module!r}" if self.module is not None else f"function {self.function!r}"
        return what + (f" within {self.within!r}" if self.within else "")


@dataclass(frozen=True)
class Mapping:
    taps: dict[str, TapOrigin]  # concrete tap names ({i} expanded)
    kv_cache: bool
    reset: str | None
    positions: str | None  # keyword under which the port takes the step's positions [T]
    path: Path

    @property
    def ops(self) -> set[str]:
        return {parse_tap_name(n)[1] for n in self.taps}

    def expected_calls(self, site) -> int:
        """How many times a site must run per step: its stated `calls`, else its highest mapped call + 1."""
        sources = [s for s in self.taps.values() if s.site == site]
        stated = {s.calls for s in sources if s.calls is not None}
        return max(stated) if stated else max(s.call for s in sources) + 1


_SOURCE_KEYS = {"module", "function", "method", "input", "arg", "select", "within", "call", "calls", "transform"}
_INT_KEYS = ("input", "arg", "call", "calls")
_SELECT = re.compile(r"^(\[-?\d+\]|\.[A-Za-z_]\w*)*$")


def _source(key: str, value, layer: int | None, sizes: dict[str, int], where: str) -> TapOrigin:
    """One tap's table with `{i}` filled in and its integer expressions (call = "2*i+1") evaluated."""
    if isinstance(value, str):
        value = {"module": value}
    kinds = [k for k in ("module", "function", "method") if k in value] if isinstance(value, dict) else []
    if not isinstance(value, dict) or set(value) - _SOURCE_KEYS or len(kinds) != 1:
        raise UserError(
            f"{where}: tap {key!r} needs a module path or a table with exactly one of "
            f"module/function/method and only the keys {', '.join(sorted(_SOURCE_KEYS))}"
        )
    fill = {
        k: (v.replace("{i}", str(layer)) if isinstance(v, str) and layer is not None else v) for k, v in value.items()
    }
    if "method" in fill:  # x.softmax(...) is torch.Tensor.softmax(x, ...)
        fill["function"] = "torch.Tensor." + fill.pop("method")
    at = f"{where}: tap {key!r}"
    local = {**sizes, **({"i": layer} if layer is not None else {})}
    for k in _INT_KEYS:
        if k in fill:
            try:
                fill[k] = _size(str(fill[k]), local)
            except (ValueError, SyntaxError, ZeroDivisionError):
                raise UserError(
                    f"{at}: {k} = {value[k]!r} is not an integer expression over i and the model's "
                    f"sizes ({', '.join(sorted(local))})"
                ) from None
    if not _SELECT.match(str(fill.get("select", ""))):
        raise UserError(f'{at}: select = {fill["select"]!r} is not a chain of [n] and .name, e.g. "[0]" or ".indices"')
    fill["transform"] = tuple(fill.get("transform", ()))
    return TapOrigin(**fill)


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
    model_sizes = {k: v for k, v in axis_sizes(config, 1, 1, 1).items() if k not in ("B", "T", "S")}
    taps: dict[str, TapOrigin] = {}
    for key, value in raw.get("taps", {}).items():
        for t in value.get("transform", []) if isinstance(value, dict) else []:
            parse_transform(t, axis_sizes(config, 1, 1, 1), where=f"{path}: tap {key!r}")
        op = parse_tap_name(key.replace("{i}", "0"))[1]
        if op not in OPS_BY_NAME:
            raise UserError(f"{path}: {key!r} is not a tap name of the schema (see qwen3dbg/tapstore/schema.py)")
        # `{i}` covers the layers that have the op: one mapping serves dense, MoE and mixed models
        layers = (
            [i for i in range(config.num_hidden_layers) if op in {o.op for o in layer_ops(config, i)}]
            if "{i}" in key
            else [None]
        )
        for i in layers:
            name = key.replace("{i}", str(i))
            taps[name] = _source(key, value, i, model_sizes, str(path))
    if not taps:
        raise UserError(f"{path} maps no taps: add a [taps] table")
    if call.get("kv_cache") and not (call.get("reset") or call.get("positions")):
        raise UserError(
            f'{path}: [call] kv_cache = true needs reset = "<method that empties the port\'s cache>", '
            'or positions = "<keyword>" for a port that writes its cache where the positions say'
        )
    return Mapping(taps, bool(call.get("kv_cache", False)), call.get("reset"), call.get("positions"), path)


# ---- transforms -----------------------------------------------------------------------------------

_TRANSFORM = re.compile(r"^\s*(transpose|reshape|slice)\s*\((.*)\)\s*$")
_ARITH = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
    ast.FloorDiv: lambda a, b: a // b,
}


def _size(expr: str, sizes: dict[str, int]) -> int:
    """Evaluate '2*nKV*D' or 'nH/nKV' style size expressions: integers, axis names, + - * // and a `/`
    that must divide exactly (a size is never fractional)."""

    def ev(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.Name) and node.id in sizes:
            return sizes[node.id]
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -ev(node.operand)
        if isinstance(node, ast.BinOp) and type(node.op) in _ARITH:
            return _ARITH[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            a, b = ev(node.left), ev(node.right)
            if a % b:
                raise ValueError(f"{expr}: {a}/{b} is not a whole number")
            return a // b
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
    except (ValueError, SyntaxError, ZeroDivisionError):
        raise UserError(
            f"{where}: transform {text!r} is not transpose(a,b), reshape(...) or slice(dim,start,stop) "
            f"over integers and the axes {', '.join(sorted(sizes))} (+ - * // and exact /)"
        ) from None
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


def select(value, path: str):
    """Index into a module's or function's result: '[0]' takes item 0, '.indices' an attribute."""
    for part in re.findall(r"\[-?\d+\]|\.[A-Za-z_]\w*", path):
        value = value[int(part[1:-1])] if part.startswith("[") else getattr(value, part[1:])
    return value


def keep_last_positions(x: torch.Tensor, op: str, tokens: int) -> torch.Tensor:
    """A re-run over the whole prefix: keep the step's last `tokens` positions on the T axis, if any."""
    axes = OPS_BY_NAME[op].axes
    if "T" not in axes:
        return x  # k_cache, v_cache: the whole prefix is the cache
    dim = axes.index("T")
    return x.narrow(dim, x.shape[dim] - tokens, tokens)


# ---- capturing one run ----------------------------------------------------------------------------


class _Recorder:
    """Hooks and function wrappers for one forward call, handing each tap to `emit(name, value)` the moment
    the port computes it (so a forward's taps are never all held at once); `seen` names the taps handed out.

    Each site (a module or function, with its `within`) has one hook and one call counter; after the
    forward, every site must have run as often as the mapping says (`check_counts`)."""

    def __init__(self, model: torch.nn.Module, code_module, mapping: Mapping, wanted: set[str], emit):
        self.model, self.code_module, self.mapping, self.emit = model, code_module, mapping, emit
        self.sites: dict[tuple, list[tuple[str, TapOrigin]]] = {}
        for name, src in mapping.taps.items():  # the mapping's order: the first mistake reported is stable
            if name in wanted:
                self.sites.setdefault(src.site, []).append((name, src))
        self.seen: set[str] = set()
        self.scopes: list[str] = []
        self.counts = dict.fromkeys(self.sites, 0)

    def _submodule(self, path: str) -> torch.nn.Module:
        try:
            return self.model.get_submodule(path) if path else self.model
        except AttributeError:
            raise UserError(f"the mapping names module {path!r}, which the port does not have") from None

    def _function_owner(self, name: str):
        """(object holding the function, attribute name): the model's code module, or a dotted path whose
        longest importable prefix is a module and the rest attributes ("torch.Tensor.softmax")."""
        if "." not in name:
            if not hasattr(self.code_module, name):
                raise UserError(f"the mapping names function {name!r}, which {self.code_module.__name__} lacks")
            return self.code_module, name
        parts = name.split(".")
        for cut in range(len(parts) - 1, 0, -1):
            try:
                obj = importlib.import_module(".".join(parts[:cut]))
            except ImportError:
                continue
            for attr in parts[cut:-1]:
                obj = getattr(obj, attr, None)
            if obj is not None and hasattr(obj, parts[-1]):
                return obj, parts[-1]
            break
        raise UserError(f"the mapping names function {name!r}, which cannot be imported")

    @contextlib.contextmanager
    def active(self):
        with contextlib.ExitStack() as stack:
            for scope in {site[2] for site in self.sites if site[2]}:
                stack.enter_context(self._scope(scope))
            functions: dict[str, list[tuple]] = {}
            for site in self.sites:
                if site[0] == "module":
                    stack.enter_context(self._module_hook(site))
                else:
                    functions.setdefault(site[1], []).append(site)
            for fname, sites in functions.items():
                stack.enter_context(self._wrap(fname, sites))
            yield self

    def _fired(self, site, args, out) -> None:
        """One run of a site: if it is in scope, count it and keep what each tap mapped to this call takes."""
        within = site[2]
        if within is not None and within not in self.scopes:
            return
        n = self.counts[site]
        self.counts[site] += 1
        for name, src in self.sites[site]:
            if src.call == n:
                self.seen.add(name)
                self.emit(name, self._take(name, src, args, out))

    def _take(self, name: str, src: TapOrigin, args: tuple, out):
        """What a tap reads from one call: the output or a positional input, then its `select`."""
        position = src.input if src.module is not None else src.arg
        if position is not None and not -len(args) <= position < len(args):
            raise UserError(
                f"{self.mapping.path}: {name} takes positional input {position} of {src.describe()}, "
                f"which was called with {len(args)}: pass-by-keyword inputs cannot be taken"
            )
        value = out if position is None else args[position]
        try:
            return select(value, src.select)
        except (IndexError, KeyError, AttributeError, TypeError) as e:
            raise UserError(
                f"{self.mapping.path}: {name}: select = {src.select!r} does not apply to the "
                f"{type(value).__name__} {src.describe()} gives ({e})"
            ) from None

    def check_counts(self) -> None:
        for site, fired in self.counts.items():
            expected = self.mapping.expected_calls(site)
            if fired != expected:
                src = self.sites[site][0][1]
                raise UserError(
                    f"{self.mapping.path}: {src.describe()} ran {fired} times in one step, but the "
                    f"mapping takes {expected} (calls 0..{expected - 1}): give each call its tap with "
                    'call = N (e.g. "2*i+1" for a module shared by all layers), narrow it with '
                    f"within, or say calls = {fired}"
                )

    @contextlib.contextmanager
    def _module_hook(self, site):
        handle = self._submodule(site[1]).register_forward_hook(lambda _m, args, out: self._fired(site, args, out))
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
    def _wrap(self, fname: str, sites: list[tuple]):
        """One wrapper per function, whatever the number of sites (layers, scopes) that read it."""
        owner, attr = self._function_owner(fname)

        def wrap(original):
            def wrapper(*args, **kwargs):
                out = original(*args, **kwargs)
                for site in sites:
                    self._fired(site, args, out)
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
        raise UserError(
            f"module:{spec} has no tap mapping: pass module:{spec}@mapping.toml or set TAP_MAPPING in the port's module"
        )
    loaded = load_mapping(mapping, config)
    unknown = sorted(set(loaded.taps) - {t.name for t in step_taps(config, 1, 1, 1)})
    if unknown:
        raise UserError(f"{loaded.path} maps {unknown[0]}, which this model does not have")
    return factory, loaded


# `factory(model_dir, dtype)` returns an nn.Module called as `module(ids)` (ids [B,T]), or with the step's
# positions as a keyword the mapping names. The mapping (grammar: docs/ports.md) says which module output or
# input, function or tensor-method call holds each tap, and how to bring it to the schema's layout; a trial
# forward checks every tap's shape before any real run. A port without a KV cache is re-run on the whole prefix
# at every decode step; its last positions are kept.
class ModuleCandidate(Candidate):
    """A PyTorch port run through its mapping. Options: mapping=PATH (else `spec@mapping.toml`, else the
    port module's TAP_MAPPING)."""

    def __init__(self, spec: str, model_dir, dtype="float32", *, mapping: str | Path | None = None):
        spec, _, at = spec.partition("@")
        self.name = f"module:{spec}"
        model = open_model(model_dir, check_layout=False)
        self.config = model.config
        self.dtype = parse_dtype(dtype)
        factory, self.mapping = _port(spec, at, mapping, self.config)
        self.missing_taps = frozenset({t.op for t in step_taps(self.config, 1, 1, 1)} - self.mapping.ops)
        try:
            self.model = factory(model.path, self.dtype)
        except UserError:
            raise
        except Exception as e:  # the port's own loader: say whose failure it is
            raise UserError(f"{self.name} failed to build the model: {type(e).__name__}: {e}") from None
        if not isinstance(self.model, torch.nn.Module):
            raise UserError(f"{self.name} returned {type(self.model).__name__}, not a torch.nn.Module")
        self.model.eval()
        if self.mapping.reset and not callable(getattr(self.model, self.mapping.reset, None)):
            raise UserError(f"{self.mapping.path}: the port has no method {self.mapping.reset}() to empty its cache")
        # Bare function names in the mapping live where the model's code does, not where the factory does.
        self.code_module = sys.modules[type(self.model).__module__]
        self.trial_forward()

    def trial_forward(self) -> None:
        """One short prefill before any real work, so that a wrong call count, selector or layout is
        said up front, naming the tap. Its length T differs from every other axis, so no swap hides."""
        sizes = set(axis_sizes(self.config, 1, 1, 1).values())
        tokens = next(t for t in range(2, 2 + len(sizes) + 1) if t not in sizes)
        self.reset()
        self.step(torch.arange(tokens)[None] % self.config.vocab_size, torch.arange(tokens)[None], DictSink())
        self.reset()

    @staticmethod
    def check(spec: str, model_dir, dtype="float32", *, mapping: str | Path | None = None) -> None:
        """All but building the model (`qwen3dbg.run.registry.check_candidate`): the port imports, and its
        factory and mapping resolve."""
        spec, _, at = spec.partition("@")
        _port(spec, at, mapping, open_model(model_dir, check_layout=False).config)

    def manifest_extra(self) -> dict:
        return {"mapping": str(self.mapping.path), "notes": [] if self.mapping.kv_cache else [RERUN_NOTE]}

    def reset(self) -> None:
        self.history: torch.Tensor | None = None
        if self.mapping.kv_cache and self.mapping.reset:
            getattr(self.model, self.mapping.reset)()

    @torch.no_grad()
    def step(self, ids: torch.Tensor, positions: torch.Tensor, sink: TapSink) -> torch.Tensor:
        tokens = ids.shape[1]
        if self.mapping.kv_cache:
            run_ids, run_positions = ids, positions[0]
        else:
            self.history = ids if self.history is None else torch.cat((self.history, ids), dim=1)
            run_ids, run_positions = self.history, torch.arange(self.history.shape[1])
        cache_len = int(positions[0, -1]) + 1
        wanted = {n for n in self.mapping.taps if sink.wants(n)}
        sizes = axis_sizes(self.config, ids.shape[0], run_ids.shape[1], cache_len)
        # A re-run gives every position of the prefix: its shapes are checked before the last ones are kept.
        shapes = {t.name: t for t in step_taps(self.config, ids.shape[0], run_ids.shape[1], cache_len)}

        def emit(name: str, value) -> None:
            # in the dtype the port computed it in (docs/taps.md); the sink copies it now (fresh_taps is
            # False: a port may change the tensor later in its forward), so no forward's taps pile up here
            sink(name, self._to_schema(name, value, shapes[name], sizes, tokens))

        recorder = _Recorder(self.model, self.code_module, self.mapping, wanted, emit)
        kwargs = {self.mapping.positions: run_positions} if self.mapping.positions else {}
        with recorder.active():
            logits = _logits_of(self.model(run_ids, **kwargs), self.name)
        recorder.check_counts()
        never = sorted(wanted - recorder.seen)
        if never:
            raise UserError(
                f"{self.name}: the mapping's source of {never[0]} ({self.mapping.taps[never[0]].describe()}) "
                "never ran in the forward pass"
            )
        return logits[:, -tokens:]

    def _to_schema(self, name: str, value, spec, sizes: dict[str, int], tokens: int) -> torch.Tensor:
        """A recorded value through its transforms, checked against the schema's shape; a mistake names the
        tap, what the port gave and the layout expected."""
        src = self.mapping.taps[name]
        want = f"[{', '.join(spec.axes)}] = {list(spec.shape)}"
        if not isinstance(value, torch.Tensor):
            raise UserError(
                f"{self.mapping.path}: {name} takes a {type(value).__name__} from {src.describe()}, "
                f'not a tensor: pick one with select = "[0]" or ".name" (the schema wants {want})'
            )
        given = list(value.shape)
        try:
            value = apply_transforms(value, src.transform, sizes)
        except (RuntimeError, IndexError) as e:
            raise UserError(
                f"{self.mapping.path}: {name}: the transforms {list(src.transform)} fail on the port's "
                f"{given} ({e}); the schema wants {want}"
            ) from None
        if tuple(value.shape) != spec.shape:
            gave = f" (the port gave {given})" if src.transform else ""
            raise UserError(
                f"{self.mapping.path}: {name} comes out {list(value.shape)}{gave}, but the schema wants "
                f"{want}: fix its transform"
            )
        return value if self.mapping.kv_cache else keep_last_positions(value, spec.op, tokens)


def _logits_of(out, name: str) -> torch.Tensor:
    """What the port's forward returned, as logits [B, T, V]: the tensor itself, or the `.logits` of an object
    holding them (transformers' ModelOutput, a dataclass of the port's own)."""
    logits = out if isinstance(out, torch.Tensor) else getattr(out, "logits", None)
    if not isinstance(logits, torch.Tensor):
        raise UserError(
            f"{name}: the port's forward returned a {type(out).__name__}, not logits: return the logits tensor "
            "[B, T, V], or an object with a .logits tensor"
        )
    return logits
