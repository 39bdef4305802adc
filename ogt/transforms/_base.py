"""Transform, TransformResult, Pipeline and the name registry shared by the API and the CLI."""

from __future__ import annotations

import abc
import dataclasses
import logging
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import ClassVar, Protocol

from ..errors import InvalidGraphError, OgtError, TransformError, UnsupportedModelError
from ..graph.model import Model
from ..graph.validate import validate

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Skip:
    """A node a transform matched but left alone, and why."""

    node: str
    op_type: str
    reason: str

    def as_dict(self) -> dict[str, str]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class TransformResult:
    """What a transform did.

    ``changed`` is a promise: running the transform again on ``graph`` reports ``changed=False``
    and leaves the model byte-identical. ``counts`` keys are ``"<transform>.<what>"``.
    """

    graph: Model
    changed: bool
    counts: dict[str, int] = dataclasses.field(default_factory=dict)
    skipped: list[Skip] = dataclasses.field(default_factory=list)
    name: str = ""
    seconds: float = 0.0
    children: list[TransformResult] = dataclasses.field(default_factory=list)

    def as_dict(self) -> dict:
        out = {
            "transform": self.name,
            "changed": self.changed,
            "seconds": round(self.seconds, 6),
            "counts": dict(self.counts),
            "skipped": [s.as_dict() for s in self.skipped],
        }
        if self.children:
            out["steps"] = [c.as_dict() for c in self.children]
        return out


class Instrument(Protocol):
    """Hooks run around every transform: timing, graph dumps, numeric checks."""

    def before(self, transform: Transform, model: Model) -> None: ...

    def after(self, transform: Transform, result: TransformResult) -> None: ...


@dataclasses.dataclass(frozen=True)
class TransformContext:
    """Run-wide settings. ``validate`` checks the graph invariants after each transform."""

    validate: bool = True
    instruments: Sequence[Instrument] = ()


class Transform(abc.ABC):
    """Base class. Subclasses are frozen dataclasses whose fields are the options.

    Implement ``apply``: match, check (a reason per rejected node), compute everything,
    then mutate. Call the transform (``t(model)``) rather than ``apply`` to get validation,
    timing and instruments.
    """

    name: ClassVar[str] = ""

    @abc.abstractmethod
    def apply(self, model: Model, ctx: TransformContext) -> TransformResult: ...

    def preconditions(self, model: Model) -> None:
        """Raise an OgtError if the transform cannot run on ``model`` at all."""

    def __call__(self, model: Model, ctx: TransformContext | None = None) -> TransformResult:
        ctx = ctx or TransformContext()
        if not isinstance(model, Model):
            raise TypeError(f"{self.name}: expected ogt.Model, got {type(model).__name__} (use ogt.load or ogt.Model(proto))")
        self.preconditions(model)
        for inst in ctx.instruments:
            inst.before(self, model)
        start = time.perf_counter()
        result = self.apply(model, ctx)
        if not isinstance(result, TransformResult):
            raise TransformError(f"{self.name}: apply() returned {type(result).__name__}, not TransformResult")
        result.seconds = time.perf_counter() - start
        result.name = result.name or self.name
        if ctx.validate and result.changed:
            try:
                validate(result.graph)
            except (InvalidGraphError, UnsupportedModelError) as exc:
                raise TransformError(f"transform '{self.name}' produced an invalid graph: {exc}") from exc
        for inst in ctx.instruments:
            inst.after(self, result)
        log.info("%s: changed=%s counts=%s skipped=%d", self.name, result.changed, result.counts, len(result.skipped))
        return result


_REGISTRY: dict[str, type[Transform]] = {}


def register(cls: type[Transform]) -> type[Transform]:
    """Class decorator: make a transform available by its kebab-case ``name``."""
    if not cls.name or cls.name != cls.name.lower() or " " in cls.name or "_" in cls.name:
        raise ValueError(f"{cls.__name__}.name must be kebab-case, got {cls.name!r}")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"transform name '{cls.name}' registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def available() -> list[str]:
    return sorted(_REGISTRY)


def create(name: str, **options) -> Transform:
    """Instantiate a registered transform by name with its default (or given) options."""
    try:
        cls = _REGISTRY[name]
    except KeyError:
        raise OgtError(f"unknown transform '{name}'; available: {', '.join(available())}") from None
    return cls(**options)


@dataclasses.dataclass(frozen=True)
class Pipeline(Transform):
    """Runs its members in order; itself a Transform, so pipelines nest."""

    name: ClassVar[str] = "pipeline"
    transforms: tuple[Transform, ...] = ()

    def __init__(self, transforms: Iterable[Transform | str] = ()):
        members = tuple(create(t) if isinstance(t, str) else t for t in transforms)
        for t in members:
            if not isinstance(t, Transform):
                raise TypeError(f"Pipeline members must be Transforms, got {type(t).__name__}")
        object.__setattr__(self, "transforms", members)

    def apply(self, model: Model, ctx: TransformContext) -> TransformResult:
        counts: Counter[str] = Counter()
        skipped: list[Skip] = []
        children: list[TransformResult] = []
        for t in self.transforms:
            try:
                res = t(model, ctx)
            except Exception as exc:  # noqa: BLE001 - wrapped with context, original chained
                ran = [c.name for c in children]
                before = f" after {', '.join(ran)}" if ran else " as the first step"
                detail = exc.args[0] if isinstance(exc, TransformError) and exc.args else f"{type(exc).__name__}: {exc}"
                raise TransformError(f"transform '{t.name}' failed{before}: {detail}") from exc
            model = res.graph
            children.append(res)
            counts.update(res.counts)
            skipped.extend(res.skipped)
        return TransformResult(
            graph=model,
            changed=any(c.changed for c in children),
            counts=dict(counts),
            skipped=skipped,
            children=children,
        )

    def __repr__(self) -> str:
        return f"Pipeline([{', '.join(repr(t) for t in self.transforms)}])"


def counts_of(prefix: str, counter: Counter[str]) -> dict[str, int]:
    return {f"{prefix}.{k}": v for k, v in sorted(counter.items()) if v}


__all__ = [
    "Instrument",
    "Pipeline",
    "Skip",
    "Transform",
    "TransformContext",
    "TransformResult",
    "available",
    "create",
    "register",
    "counts_of",
]
