"""Patching a module-level function for one thread only, so that the concurrent sides of a diff each see their
own wrapper."""

from __future__ import annotations

import contextlib
import functools
import threading
from typing import Callable, Iterator

_lock = threading.Lock()
_installed: dict[tuple[int, str], "_Dispatcher"] = {}


# Capture wraps functions that models look up at call time (transformers' `apply_rotary_pos_emb`, a port's
# `torch.softmax`). A diff runs its sides concurrently, two of them possibly the same library: a plain `setattr`
# would hand one side's calls to the other side's wrapper. Here the attribute is replaced once by a dispatcher
# that routes each thread to its own wrapper, and every other thread to the original.
class _Dispatcher:
    def __init__(self, original: Callable):
        self.original = original
        self.by_thread: dict[int, Callable] = {}
        self.inherited = False  # set by patched(): the owner is a class that inherits the attribute

    def __call__(self, *args, **kwargs):
        fn = self.by_thread.get(threading.get_ident(), self.original)
        return fn(*args, **kwargs)

    def __get__(self, obj, owner=None):
        """Installed on a class (`torch.Tensor.softmax`), it binds as the method it replaces."""
        return self if obj is None else functools.partial(self, obj)


@contextlib.contextmanager
def patched(owner: object, attr: str, wrap: Callable[[Callable], Callable]) -> Iterator[Callable]:
    """Within the block, calls to `owner.attr` made by this thread go to `wrap(original)`; yields the original."""
    key, me = (id(owner), attr), threading.get_ident()
    with _lock:
        d = _installed.get(key)
        if d is None:
            d = _installed[key] = _Dispatcher(getattr(owner, attr))
            d.inherited = isinstance(owner, type) and attr not in vars(owner)
            setattr(owner, attr, d)
        assert me not in d.by_thread, f"{attr} is already patched by this thread"
        d.by_thread[me] = wrap(d.original)
    try:
        yield d.original
    finally:
        with _lock:
            del d.by_thread[me]
            if not d.by_thread:
                if d.inherited:  # a method the class inherits: uncover it again rather than copy it in
                    delattr(owner, attr)
                else:
                    setattr(owner, attr, d.original)
                del _installed[key]
