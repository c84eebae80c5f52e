"""The host contract: what a host adapter declares and what it must provide (no host imports).

A host adapter (`po_plugins/hosts/<host>.py`) is the only module that knows that host's internals. It declares

* a `HostSpec`: the host's name, its distribution, the supported version range and its seams (`Seam`: a module
  attribute the adapter patches, subclasses or calls, the members it needs and the source fragments it relies on).
  `check_host(spec)` verifies all of it at start and raises one `HostError` naming the supported range;
* the options it honours, as `po_plugins.options.options_for(spec.key)` (one table: `options.HOST_ONLY`); an option
  another host owns is refused there with one line (`options.refuse_foreign`);

and it provides the `HostAdapter` duties below to the host-neutral `po_plugins.plugin.Plugin`, which owns the
objective, the monitor, the scoring cadence, the step accumulator, the loss call, the step end and the state.
docs/architecture.md has the layer picture and a worked example of adding a host.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, NamedTuple, Protocol

from ..errors import HostError


class Seam(NamedTuple):
    """One place of the host the adapter depends on: `module.attr` must import, have `members`, and its source must
    contain each of `fragments` (the lines the adapter's override or wrapper relies on)."""

    module: str
    attr: str
    members: tuple = ()
    fragments: tuple = ()


@dataclass(frozen=True)
class HostSpec:
    """A host as the plugin supports it. `key` names it in `options_for` and in the extra `po-plugins[<key>]`."""

    name: str  # as users write it: "OpenRLHF"
    key: str  # "openrlhf"
    dist: str  # the distribution whose version is checked
    lo: str  # supported: lo <= version < hi
    hi: str
    why: str  # why that range
    seams: tuple

    @property
    def fix(self) -> str:
        return f"install a supported release: pip install 'po-plugins[{self.key}]' ({self.dist}>={self.lo},<{self.hi})"


def installed_version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def check_host(spec: HostSpec, version: str | None = None) -> str:
    """The installed version of `spec`'s host when it is in range and has every seam; else one HostError that names
    the supported range and the install command."""
    import importlib
    import inspect

    from packaging.version import Version

    version = installed_version(spec.dist) if version is None else version
    if version is None:
        raise HostError(f"{spec.name} is not installed; {spec.fix}")
    if not (Version(spec.lo) <= Version(version) < Version(spec.hi)):
        raise HostError(f"{spec.name} {version} is not supported by po_plugins (needs >={spec.lo},<{spec.hi}: "
                        f"{spec.why}); {spec.fix}")
    for seam in spec.seams:
        mod_name, attr, members, fragments = seam
        try:
            obj = getattr(importlib.import_module(mod_name), attr, None)
        except ImportError as e:
            raise HostError(f"{spec.name} {version}: importing {mod_name} failed ({e}); {spec.fix}") from None
        obj = getattr(obj, "_po_replaces", obj)  # an adapter swapped it in: check the host's own
        if obj is None:
            raise HostError(f"{spec.name} {version}: seam {mod_name}.{attr} is missing; {spec.fix}")
        for m in members:
            if not hasattr(obj, m):
                raise HostError(f"{spec.name} {version}: seam {mod_name}.{attr}.{m} is missing; {spec.fix}")
        src = inspect.getsource(obj) if fragments else ""
        for f in fragments:
            if f not in src:
                raise HostError(f"{spec.name} {version}: {mod_name}.{attr} no longer contains `{f}`; {spec.fix}")
    return version


class HostAdapter(Protocol):
    """What a host's trainer gives the `Plugin` (every name is the adapter's own; the Plugin calls nothing else).

    Only the adapter knows these; everything else (objective, monitor, cadence, accumulator, loss call, step end,
    state) is the Plugin's."""

    def po_head_spec(self) -> contextlib.AbstractContextManager:
        """A context manager yielding the `scores.HeadSpec` of the policy's LM head (gathered under ZeRO-3)."""

    def po_rescore(self, inputs) -> tuple:
        """(z_w, z_l) of a micro-batch's inputs at the current weights, no grad (the monitor's re-checks)."""

    def po_print(self, msg: str) -> None:
        """Print once (rank 0), the host's way."""

    def po_is_rank_0(self) -> bool:
        """Whether this process writes the trace."""


# the keyword arguments of Plugin(...) that describe the host's run (one record, built by each adapter)
@dataclass
class RunInfo:
    """What the Plugin needs to know of the host's run: the accumulation window, the world size, where the trace
    goes by default, how the user spells a loss to suggest (`spell_loss("rc_dpo")` -> "--loss rc_dpo") and an option
    (`spell_option("shared_prefix", "detach")`), and the host's chosen-NLL setting ("" where it has none)."""

    accumulation: int
    world_size: int
    output_dir: str
    spell_loss: Callable[[str], str]
    nll_flag: str = ""
    spell_option: Callable[[str, str], str] = None  # (key, value) -> the user's spelling; default --po.<key> <value>

    def __post_init__(self):
        if self.spell_option is None:
            self.spell_option = _po_flag


def _po_flag(key: str, value) -> str:
    return f"--po.{key} {value}"
