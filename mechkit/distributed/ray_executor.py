"""Task-parallel work on a Ray cluster: long-lived actors that each load the model once.

Sweeps are embarrassingly parallel: every (entry, batch, chunk of cells) of a patching sweep is
independent of the others. :class:`RayExecutor` runs such tasks on Ray (Moritz et al. 2018,
"Ray: A Distributed Framework for Emerging AI Applications") actors: each actor holds one copy of
the model on its own device (one GPU per actor where the cluster has GPUs, CPUs otherwise) and
runs a task function ``fn(model, cache, *args)`` on it; ``cache`` is a dict the actor keeps
between tasks (a sweep keeps its prepared reference runs there). :meth:`RayExecutor.map` yields
each task's result as it completes; the caller, on the driver, is the only one to write results
anywhere, so a resumable sweep's journal stays exactly as safe as in one process.

A task whose actor dies (killed, out of memory, its node lost) is submitted again to another
actor, at most ``max_retries`` times; the dead actor leaves the pool, and a new one is started
only when none is left (``max_restarts`` times). An error raised by the task itself is not
retried: it is raised on the driver as the original exception (a mechkit error stays one).

Ray is an optional dependency (``pip install mechkit[ray]``); :func:`require_ray` imports it or
raises :class:`~mechkit.errors.MissingDependencyError` saying how to install it.
"""

from __future__ import annotations

import collections
import dataclasses
import importlib
import math
import os
from collections.abc import Callable, Iterator, Sequence
from types import ModuleType
from typing import Any

import torch

from mechkit.core.types import Model
from mechkit.errors import (
    InvalidArgumentError,
    MissingDependencyError,
    WorkerError,
    check_positive_int,
)
from mechkit.models import load_model

__all__ = ["RayExecutor", "InlineExecutor", "ModelWorker", "require_ray"]

TaskFunction = Callable[..., Any]  # fn(model, cache, *args) -> picklable result


def require_ray() -> ModuleType:
    """Import Ray, or say how to install it.

    Raises:
        MissingDependencyError: Ray is not installed.

    Example:
        >>> require_ray().__name__
        'ray'
    """
    try:
        return importlib.import_module("ray")
    except ImportError:
        raise MissingDependencyError(
            "Expected Ray to be installed to run on a Ray cluster; it is not importable here. "
            "Hint: pip install 'mechkit[ray]' (or pip install 'ray>=2.9'), or run without "
            "executor= / --ray."
        ) from None


class ModelWorker:
    """What each Ray actor holds: one model, loaded once, and a cache kept between tasks.

    :class:`RayExecutor` makes it a Ray actor; used directly it runs tasks in this process.

    Args:
        source: a model name or path for :func:`~mechkit.load_model`, or a model (moved to
            ``device`` when one is given).
        device: where the model runs (None: CUDA when the actor has a GPU, else CPU).
        dtype: the model's dtype for a name (None: float32).

    Example:
        >>> worker = ModelWorker("attn-only-2l", device="cpu")
        >>> worker.call(lambda model, cache, n: model.cfg.n_layers * n, 3)
        6
    """

    def __init__(
        self, source: str | Model, device: str | None = None, dtype: str | None = None
    ) -> None:
        self.load(source, device, dtype)

    def load(
        self, source: str | Model, device: str | None = None, dtype: str | None = None
    ) -> bool:
        """Hold another model (the cache emptied): an actor keeps its process, and the
        libraries it imported, from one model to the next."""
        self.model = None  # the old model freed before the new one loads
        if isinstance(source, str):
            self.model = load_model(source, device=device, dtype=dtype)
        else:
            self.model = source if device is None else source.to(device)
        self.cache: dict[Any, Any] = {}
        return True

    def call(self, fn: TaskFunction, *args: Any) -> Any:
        """Run ``fn(model, cache, *args)`` and return its result."""
        return fn(self.model, self.cache, *args)

    def ready(self) -> bool:
        """True once the model is loaded (the executor waits on it)."""
        return True


@dataclasses.dataclass
class RayExecutor:
    """Run mechkit's task-parallel work on a Ray cluster's actors.

    Args:
        address: a running cluster's address (``"auto"``, ``"ray://head:10001"``,
            ``"head:6379"``); None starts a local cluster on this machine (or uses the one
            this process already joined with ``ray.init``).
        actors: how many actors (model copies); None: one per GPU of the cluster, else one per
            ``cpus_per_actor`` CPUs.
        cpus_per_actor: CPUs Ray reserves for each actor.
        gpus_per_actor: GPUs Ray reserves for each actor; None: 1 when the cluster has GPUs,
            else 0.
        max_retries: how often one task may be resubmitted after its actor died.
        max_restarts: how often a new actor may be started when every actor has died.
        object_store_memory: bytes of Ray's object store when this executor starts a local
            cluster (None: 200 MB; tasks pass only prompts and scores through it).

    The executor keeps its actors (and a local cluster it started) until :meth:`close`, or the
    end of a ``with`` block, so several calls reuse the loaded models.

    Example (:class:`InlineExecutor` runs the same calls in this process; a Ray cluster
    would take ``mk.RayExecutor(actors=2)`` in its place):

        >>> model = mk.load_model("attn-only-2l")
        >>> pairs = mk.PromptPairs.from_tokens([[1, 2, 3], [1, 4, 5]], [[1, 6, 3], [1, 7, 5]],
        ...                                    [2, 3], [4, 5])
        >>> with mk.InlineExecutor() as executor:
        ...     result = mk.activation_patch(model, pairs, site="z", executor=executor,
        ...                                  progress=False)
        >>> result.axes, RayExecutor(actors=2).actors
        (('layer', 'head'), 2)
    """

    address: str | None = None
    actors: int | None = None
    cpus_per_actor: float = 1.0
    gpus_per_actor: float | None = None
    max_retries: int = 3
    max_restarts: int = 2
    object_store_memory: int | None = None
    _started_ray: bool = dataclasses.field(default=False, init=False, repr=False)
    _pool: list[Any] = dataclasses.field(default_factory=list, init=False, repr=False)
    _source: Any = dataclasses.field(default=None, init=False, repr=False)
    _restarts: int = dataclasses.field(default=0, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.actors is not None:
            check_positive_int("actors", self.actors)
        if self.cpus_per_actor < 0 or (self.gpus_per_actor or 0) < 0:
            raise InvalidArgumentError(
                f"Expected cpus_per_actor and gpus_per_actor >= 0; got {self.cpus_per_actor} "
                f"and {self.gpus_per_actor}."
            )
        for name in ("max_retries", "max_restarts"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise InvalidArgumentError(f"Expected {name} >= 0 (an integer); got {value!r}.")

    # ------------------------------------------------------------------------------ lifecycle

    def __enter__(self) -> RayExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Kill this executor's actors, and shut down the local cluster if it started one."""
        ray = require_ray()
        pool, self._pool, self._source = self._pool, [], None
        for actor in pool:
            ray.kill(actor)
        if self._started_ray and ray.is_initialized():
            ray.shutdown()
        self._started_ray = False

    def _connect(self) -> ModuleType:
        ray = require_ray()
        if not ray.is_initialized():
            options: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
            if self.address is None:
                options["object_store_memory"] = self.object_store_memory or 200_000_000
            ray.init(address=self.address, **options)
            self._started_ray = True
        return ray

    def _gpus(self, ray: ModuleType) -> float:
        if self.gpus_per_actor is not None:
            return self.gpus_per_actor
        return 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0

    def _size(self, ray: ModuleType) -> int:
        if self.actors is not None:
            return self.actors
        resources = ray.cluster_resources()
        if self._gpus(ray) > 0:
            return max(1, int(resources.get("GPU", 1) // self._gpus(ray)))
        return max(1, int(resources.get("CPU", 1) // max(self.cpus_per_actor, 1e-9)))

    def _key(self, source: str | Model, device: str | None, dtype: Any) -> tuple:
        return (source if isinstance(source, str) else id(source), device, str(dtype))

    def _start(self, ray: ModuleType, spec: tuple) -> Any:
        worker = ray.remote(ModelWorker).options(
            num_cpus=self.cpus_per_actor, num_gpus=self._gpus(ray), max_restarts=0
        )
        return worker.remote(*spec)

    def _actors_for(
        self, ray: ModuleType, source: str | Model, device: str | None, dtype: Any
    ) -> list[Any]:
        """The pool of actors holding ``source``; started (and waited for) if not yet."""
        key = self._key(source, device, dtype)
        if self._source is not None and self._source[0] == key and self._pool:
            return self._pool
        self._check_fits(ray)
        shipped = source if isinstance(source, str) else ray.put(source)
        spec = (shipped, device, None if dtype is None else str(dtype).removeprefix("torch."))
        self._pool = self._reload(ray, spec)  # another model: the live actors load it
        self._pool += [self._start(ray, spec) for _ in range(self._size(ray) - len(self._pool))]
        self._source, self._restarts = (key, spec), 0
        self._wait_ready(ray)
        return self._pool

    def _reload(self, ray: ModuleType, spec: tuple) -> list[Any]:
        """The live actors of the pool, each now holding the model of ``spec``."""
        loads = {actor.load.remote(*spec): actor for actor in self._pool}
        alive = []
        for ref, actor in loads.items():
            try:
                ray.get(ref)
                alive.append(actor)
            except ray.exceptions.RayActorError:
                continue  # died meanwhile: started anew below
            except ray.exceptions.RayTaskError as exc:
                cause = getattr(exc, "cause", None)
                raise cause if isinstance(cause, BaseException) else exc from None
        return alive

    def _check_fits(self, ray: ModuleType) -> None:
        """Refuse a pool the whole cluster could never hold (it would wait forever)."""
        resources, n = ray.cluster_resources(), self._size(ray)
        for name, each in (("CPU", self.cpus_per_actor), ("GPU", self._gpus(ray))):
            if n * each > resources.get(name, 0) + 1e-9:
                raise InvalidArgumentError(
                    f"Expected the cluster to hold {n} actors of {each:g} {name}(s) each; it "
                    f"has {resources.get(name, 0):g} {name}(s) in all. Hint: pass fewer actors "
                    f"or a smaller {name.lower()}s_per_actor."
                )

    def _wait_ready(self, ray: ModuleType) -> None:
        """Wait until the actors have loaded their model; raise if none could."""
        refs = {actor.ready.remote(): actor for actor in self._pool}
        alive, last = [], None
        for ref, actor in refs.items():
            try:
                ray.get(ref)
                alive.append(actor)
            except ray.exceptions.RayActorError as exc:
                last = exc
        self._pool = alive
        if not alive:
            raise WorkerError(
                "Expected the Ray actors to load the model; every one failed. Hint: check that "
                f"the model loads in one process first. The last error: {last}"
            )

    # ---------------------------------------------------------------------------------- tasks

    def share(self, value: Any) -> Any:
        """Put ``value`` in Ray's object store once; pass the handle in many tasks' arguments.

        Example (an :class:`InlineExecutor` shares the value itself):
            >>> with InlineExecutor() as ex:
            ...     tokens = ex.share(torch.zeros(4, 8, dtype=torch.long))
            >>> tokens.shape
            torch.Size([4, 8])
        """
        return self._connect().put(value)

    def map(
        self,
        model: str | Model,
        fn: TaskFunction,
        tasks: Sequence[tuple[Any, ...]],
        *,
        device: str | None = None,
        dtype: str | torch.dtype | None = None,
    ) -> Iterator[tuple[int, Any]]:
        """Run ``fn(model, cache, *task)`` for each task on the actors; yield ``(index,
        result)`` in the order the tasks finish.

        Args:
            model: a model name or path (each actor loads it), or a model (shipped once through
                the object store and moved to each actor's ``device``).
            fn: a module-level function (Ray sends it by reference).
            tasks: each task's extra arguments.
            device: the actors' device (None: their GPU when they have one, else CPU).
            dtype: the model's dtype when ``model`` is a name.

        Raises:
            WorkerError: a task's actors died more than ``max_retries`` times, or every actor
                died and ``max_restarts`` new ones did too. An error inside ``fn`` is raised
                as itself.

        Example (in this process; ``RayExecutor(actors=2)`` gives the same on a cluster):
            >>> with InlineExecutor() as ex:
            ...     sorted(ex.map("attn-only-2l", lambda m, c, n: n * m.cfg.n_layers, [(1,), (2,)]))
            [(0, 2), (1, 4)]
        """
        ray = self._connect()
        pool = self._actors_for(ray, model, device, dtype)
        queue = collections.deque(range(len(tasks)))
        attempts: collections.Counter[int] = collections.Counter()
        idle = list(pool)
        running: dict[Any, tuple[int, Any]] = {}
        try:
            while queue or running:
                while queue and idle:
                    index, actor = queue.popleft(), idle.pop()
                    running[actor.call.remote(fn, *tasks[index])] = (index, actor)
                (ref,), _ = ray.wait(list(running), num_returns=1)
                index, actor = running.pop(ref)
                try:
                    result = ray.get(ref)
                except ray.exceptions.RayActorError as exc:
                    attempts[index] += 1
                    self._drop(actor, exc, attempts[index], idle, running)
                    queue.appendleft(index)
                    continue
                except ray.exceptions.RayTaskError as exc:
                    cause = getattr(exc, "cause", None)
                    if isinstance(cause, BaseException):
                        raise cause from None
                    raise
                idle.append(actor)
                yield index, result
        finally:
            for ref in running:  # the caller stopped early (an error, a kill): stop the rest
                ray.cancel(ref, force=False)

    def each_batch(
        self,
        model: str | Model,
        function: Callable[..., Any],
        n_prompts: int,
        size: int | None,
        arguments: Callable[[slice], tuple[tuple[Any, ...], dict[str, Any]]],
    ) -> list[tuple[slice, Any]]:
        """The executor's :func:`~mechkit.core.each_batch`: ``function(model, *args, **kwargs)``
        for consecutive slices of at most ``size`` prompts, each batch one task, with
        ``(args, kwargs) = arguments(rows)`` made here; ``(rows, result)`` in the batches' order.

        A method run this way (:func:`~mechkit.path_patch`, :func:`~mechkit.edge_attribution`,
        ...) combines the batches' results as it does in one process.

        Example:
            >>> with InlineExecutor() as ex:
            ...     ex.each_batch("attn-only-2l", lambda m, rows: rows.stop - rows.start, 5, 2,
            ...                   lambda rows: ((rows,), {}))
            [(slice(0, 2, None), 2), (slice(2, 4, None), 2), (slice(4, 5, None), 1)]
        """
        step = size or max(1, n_prompts)
        batches = [slice(i, min(i + step, n_prompts)) for i in range(0, n_prompts, step)]
        tasks = [(function, *arguments(rows)) for rows in batches]
        results: list[Any] = [None] * len(tasks)
        for index, result in self.map(model, _call, tasks):
            results[index] = result
        return list(zip(batches, results, strict=True))

    def _drop(
        self, actor: Any, exc: Exception, attempt: int, idle: list, running: dict[Any, tuple]
    ) -> None:
        """Remove a dead actor from the pool; start a new one if none is left."""
        ray = require_ray()
        if attempt > self.max_retries:
            raise WorkerError(
                f"Expected a task to finish on a Ray actor; its actor died {attempt} times "
                f"(max_retries={self.max_retries}). Hint: check the actors' memory and logs. "
                f"The last error: {exc}"
            ) from None
        if actor in self._pool:
            self._pool.remove(actor)
        if actor in idle:
            idle.remove(actor)
        busy = {a for _, a in running.values()}
        if not self._pool and not busy:
            if self._restarts >= self.max_restarts:
                raise WorkerError(
                    f"Expected a Ray actor to run the remaining tasks; all died, and "
                    f"max_restarts={self.max_restarts} new ones were started already. The last "
                    f"error: {exc}"
                ) from None
            self._restarts += 1
            self._pool = [self._start(ray, self._source[1])]
            self._wait_ready(ray)
            idle.extend(self._pool)

    def pids(self) -> list[int]:
        """The process ids of the live actors (to check that none outlives :meth:`close`).

        Example:
            >>> RayExecutor().pids()  # no actors before the first task
            []
        """
        if not self._pool:
            return []
        ray = require_ray()
        return list(ray.get([a.call.remote(_pid) for a in self._pool]))

    @property
    def size(self) -> int:
        """How many live actors hold a model now.

        Example:
            >>> RayExecutor(actors=2).size  # started by the first task
            0
        """
        return len(self._pool)

    def chunks(self, n: int, units: int) -> int:
        """Into how many tasks to split each of ``units`` units of ``n`` items: enough for two
        tasks per actor overall, none smaller than one item.

        Example:
            >>> RayExecutor(actors=2).chunks(n=10, units=1), RayExecutor(actors=2).chunks(10, 8)
            (4, 1)
        """
        actors = self.size or self.actors or 1
        return max(1, min(n, math.ceil(2 * actors / max(units, 1))))


@dataclasses.dataclass
class InlineExecutor(RayExecutor):
    """A :class:`RayExecutor` that runs every task here, in this process, one after another: the
    same calls and results without a cluster (Ray's deprecated ``local_mode``), for examples,
    debugging and checks on a machine without Ray.

    One :class:`ModelWorker` holds the model: a name is loaded once; a model object is used
    itself, not a copy (with ``device=`` it is moved there). Nothing is retried: an error in a
    task is raised as it is.

    Example:
        >>> model = mk.load_model("attn-only-2l")
        >>> pairs = mk.PromptPairs.from_tokens([[1, 2, 3], [1, 4, 5]], [[1, 6, 3], [1, 7, 5]],
        ...                                    [2, 3], [4, 5])
        >>> with InlineExecutor() as ex:
        ...     there = mk.activation_patch(model, pairs, site="z", executor=ex, progress=False)
        >>> here = mk.activation_patch(model, pairs, site="z", progress=False)
        >>> bool(torch.allclose(there.scores, here.scores, atol=1e-6)), ex.size
        (True, 0)
    """

    actors: int | None = 1

    def close(self) -> None:
        """Drop the worker (and the model it loaded)."""
        self._pool, self._source = [], None

    def share(self, value: Any) -> Any:
        """``value`` itself (every task runs in this process).

        Example:
            >>> InlineExecutor().share(3)
            3
        """
        return value

    def map(
        self,
        model: str | Model,
        fn: TaskFunction,
        tasks: Sequence[tuple[Any, ...]],
        *,
        device: str | None = None,
        dtype: str | torch.dtype | None = None,
    ) -> Iterator[tuple[int, Any]]:
        """``(index, fn(model, cache, *task))`` for each task in turn, as :meth:`RayExecutor.map`.

        Example:
            >>> list(InlineExecutor().map("attn-only-2l", lambda m, c, n: n * m.cfg.n_layers,
            ...                           [(1,), (2,)]))
            [(0, 2), (1, 4)]
        """
        key = self._key(model, device, dtype)
        if self._source != key or not self._pool:
            name = None if dtype is None else str(dtype).removeprefix("torch.")
            self._pool, self._source = [ModelWorker(model, device, name)], key
        worker = self._pool[0]
        for index, task in enumerate(tasks):
            yield index, worker.call(fn, *task)

    def pids(self) -> list[int]:
        """This process's id once the worker holds a model.

        Example:
            >>> InlineExecutor().pids()
            []
        """
        return [os.getpid()] if self._pool else []


def _pid(model: Model, cache: dict) -> int:
    return os.getpid()


def _call(
    model: Model, cache: dict, function: Callable[..., Any], args: tuple, kwargs: dict
) -> Any:
    return function(model, *args, **kwargs)
