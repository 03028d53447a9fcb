"""Backends that compute the coarse pass (see ``optden.dispatch``). Each registers itself."""
from __future__ import annotations

from .. import dispatch
from .torch_blocked import TorchBackend

dispatch.register("torch", TorchBackend)
