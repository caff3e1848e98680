"""Registered versions other than the champion, served by name (the Open Inference Protocol's
/v2/models/equipoise/versions/{version}): loaded on demand through the registry, checked like a new champion
(hashes, probe), and kept loaded, at most `MAX_LOADED_VERSIONS` of them, the least recently used making room.

Each loaded version has its own micro-batcher (and model thread) and its own `Predictor`, so its requests are
limited, logged (under their own model version) and refused exactly as the champion's are; shadow scoring
(api/shadow.py) uses a version's batcher alone. A version pushed out while requests are using it is stopped
when the last of them finishes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass

from api.batcher import MicroBatcher
from api.metrics import Metrics
from api.prediction_log import PredictionLogger
from api.predictor import Predictor
from api.reload import LoadedModel, ModelHolder, ModelLoader, log_load, probe
from core.settings import Settings
from model.registry import ModelRegistry

log = logging.getLogger(__name__)
MAX_LOADED_VERSIONS = 2  # besides the champion: each holds its ONNX sessions in memory (about 200 MB for the default)


class VersionUnavailable(RuntimeError):
    """The version is registered but cannot be served: its artifact does not verify or it fails the probe."""


@dataclass(eq=False)
class _Loaded:
    model: LoadedModel
    batcher: MicroBatcher
    predictor: Predictor
    users: int = 0
    evicted: bool = False


class VersionPool:
    def __init__(
        self,
        registry: ModelRegistry,
        loader: ModelLoader,
        logger: PredictionLogger,
        metrics: Metrics,
        settings: Settings,
        capacity: int = MAX_LOADED_VERSIONS,
    ) -> None:
        self._registry = registry
        self._loader = loader
        self._logger = logger
        self._metrics = metrics
        self._settings = settings
        self._capacity = capacity
        self._loaded: OrderedDict[str, _Loaded] = OrderedDict()
        self._loading = asyncio.Lock()

    @property
    def versions(self) -> list[str]:
        """Loaded now, least recently used first."""
        return list(self._loaded)

    @contextlib.asynccontextmanager
    async def predictor(self, version: str) -> AsyncIterator[tuple[LoadedModel, Predictor]]:
        """The version's model and predictor, loaded first if need be; model.registry.UnknownVersion when it is not
        registered, VersionUnavailable when it cannot be loaded."""
        async with self._using(version) as entry:
            yield entry.model, entry.predictor

    @contextlib.asynccontextmanager
    async def batcher(self, version: str) -> AsyncIterator[MicroBatcher]:
        """The version's micro-batcher alone, for scoring that is neither answered nor logged as a prediction
        (api/shadow.py); loaded and refused as `predictor`."""
        async with self._using(version) as entry:
            yield entry.batcher

    @contextlib.asynccontextmanager
    async def _using(self, version: str) -> AsyncIterator[_Loaded]:
        entry = await self._get(version)
        entry.users += 1
        try:
            yield entry
        finally:
            entry.users -= 1
            if entry.evicted and entry.users == 0:
                await entry.batcher.stop()

    async def close(self) -> None:
        for entry in self._loaded.values():
            await entry.batcher.stop()
        self._loaded.clear()

    async def _get(self, version: str) -> _Loaded:
        entry = self._loaded.get(version)
        if entry is None:
            async with self._loading:  # one load at a time: two requests for a new version load it once
                entry = self._loaded.get(version)
                if entry is None:
                    entry = self._loaded[version] = await self._load(version)
                    await self._make_room()
        self._loaded.move_to_end(version)
        return entry

    async def _load(self, version: str) -> _Loaded:
        row = await asyncio.to_thread(self._registry.get, version)
        try:
            runtime = await asyncio.to_thread(self._loader, row)
            await asyncio.to_thread(probe, runtime)
        except Exception as error:
            log.warning("cannot serve model %s on demand: %s", version, error)
            raise VersionUnavailable(f"model version {version} cannot be served: {error}") from error
        model = LoadedModel(runtime, row.version, row.artifact_sha256)
        holder = ModelHolder()
        holder.current = model
        batcher = MicroBatcher.from_settings(holder, self._metrics, self._settings)
        batcher.start()
        log_load(version, runtime, "on demand")
        return _Loaded(model, batcher, Predictor(batcher, self._logger, self._metrics, self._settings))

    async def _make_room(self) -> None:
        while len(self._loaded) > self._capacity:
            version, entry = self._loaded.popitem(last=False)
            log.info("unloading model %s (least recently used of %d)", version, self._capacity + 1)
            entry.evicted = True
            if entry.users == 0:
                await entry.batcher.stop()
