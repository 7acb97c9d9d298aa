"""The in-memory layer records of one store and the indexes over them.

:class:`LayerRecords` is the only owner of the record maps; :class:`~layerfs.store.layers.Store`
never edits an index, a record's ``id`` or its ``names`` except through it. Like every private
part of the store, it expects the caller to hold ``layers.lock`` (shared to read, exclusive
to change anything) and the store's in-process mutex.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from typing import Any

from layerfs.errors import CorruptStoreError, DuplicateIDError, NameInUseError
from layerfs.store.record import Layer

log = logging.getLogger(__name__)


class LayerRecords:
    """Every layer record of a store, by id, by name and by file.

    Invariants (true between any two method calls; ``check`` verifies them):

    * ``_by_id`` holds each record exactly once, keyed by its ``id``. Its order is the load
      order: the records of ``layers.json``, then those of ``volatile-layers.json``, then the
      records added since, oldest first (as containers/storage keeps its ``layers`` slice).
    * ``_by_name[n] is r`` exactly when ``r`` is in ``_by_id`` and ``n in r.names``: every
      name is held by one record only, and no record lists a name twice.
    * ``_volatile`` holds exactly the ids of records that live in ``volatile-layers.json``;
      it is a subset of ``_by_id``'s keys.
    """

    def __init__(self) -> None:
        self._by_id: dict[str, Layer] = {}
        self._by_name: dict[str, Layer] = {}
        self._volatile: set[str] = set()

    # ----------------------------------------------------------------- building

    @classmethod
    def from_files(
        cls,
        stable: list[Layer],
        volatile: list[Layer],
        *,
        source: str,
        volatile_source: str,
        strict_names: bool,
    ) -> tuple[LayerRecords, bool]:
        """Index decoded records; returns the records and whether a repair must be saved.

        The first record of an id wins (containers/storage HEAD skips later ones) and keeps
        the names of the dropped ones. A name held by two layers goes to the later one,
        unless ``strict_names`` (a read-only store, which cannot save the fix), where it
        raises :class:`CorruptStoreError`. An ``incomplete`` record also asks for a repair.
        """
        records = cls()
        repair = False
        for where, layers, is_volatile in (
            (source, stable, False),
            (volatile_source, volatile, True),
        ):
            for layer in layers:
                first = records._by_id.get(layer.id)
                if first is not None:
                    log.warning('%s: duplicate record for layer "%s" dropped', where, layer.id)
                    first.names.extend(n for n in layer.names if n not in first.names)
                    repair = True
                    continue
                records._by_id[layer.id] = layer
                if is_volatile:
                    records._volatile.add(layer.id)
        for layer in records._by_id.values():
            deduped = list(dict.fromkeys(layer.names))
            if deduped != layer.names:
                layer.names = deduped
                repair = True
            for name in layer.names:
                previous = records._by_name.get(name)
                if previous is not None and previous is not layer:
                    if strict_names:
                        raise CorruptStoreError(
                            f'{source}: name "{name}" is used by layers '
                            f'"{previous.id}" and "{layer.id}" (duplicate layer names)'
                        )
                    previous.names.remove(name)
                    repair = True
                records._by_name[name] = layer
            if layer.incomplete:
                repair = True
        return records, repair

    # ----------------------------------------------------------------- queries

    def __len__(self) -> int:
        return len(self._by_id)

    def __iter__(self) -> Iterator[Layer]:
        """Records in load order."""
        return iter(self._by_id.values())

    def __contains__(self, layer_id: object) -> bool:
        return layer_id in self._by_id

    def ids(self) -> set[str]:
        """The ids of every record (a new set)."""
        return set(self._by_id)

    def by_id(self, layer_id: str) -> Layer | None:
        """The record with this exact id."""
        return self._by_id.get(layer_id)

    def by_name(self, name: str) -> Layer | None:
        """The record that holds this name."""
        return self._by_name.get(name)

    def with_id_prefix(self, prefix: str) -> list[Layer]:
        """Records whose id starts with ``prefix``, in load order."""
        return [la for la in self._by_id.values() if la.id.startswith(prefix)]

    def children_of(self, layer_id: str) -> list[str]:
        """Ids of the records whose parent is ``layer_id``."""
        return [la.id for la in self._by_id.values() if la.parent == layer_id]

    def incomplete(self) -> list[Layer]:
        """Records flagged ``incomplete``."""
        return [la for la in self._by_id.values() if la.incomplete]

    def is_volatile(self, layer_id: str) -> bool:
        """Whether the record lives in ``volatile-layers.json``."""
        return layer_id in self._volatile

    def volatile_count(self) -> int:
        """How many records live in ``volatile-layers.json``."""
        return len(self._volatile)

    def in_file(self, *, volatile: bool) -> list[Layer]:
        """The records of one file, in load order."""
        return [la for la in self._by_id.values() if (la.id in self._volatile) == volatile]

    # ----------------------------------------------------------------- changes

    def add(self, layer: Layer, *, volatile: bool) -> None:
        """Add a new record; its id and names must be free (checked; nothing changes if not)."""
        if layer.id in self._by_id:
            raise DuplicateIDError(f'layer id "{layer.id}" is already in use')
        layer.names = list(dict.fromkeys(layer.names))
        for name in layer.names:
            owner = self._by_name.get(name)
            if owner is not None:
                raise NameInUseError(f'name "{name}" is already in use by layer "{owner.id}"')
        self._by_id[layer.id] = layer
        for name in layer.names:
            self._by_name[name] = layer
        if volatile:
            self._volatile.add(layer.id)

    def remove(self, layer: Layer) -> None:
        """Drop a record and its names (from memory only)."""
        self._by_id.pop(layer.id, None)
        for name in layer.names:
            if self._by_name.get(name) is layer:
                del self._by_name[name]
        self._volatile.discard(layer.id)

    def set_names(self, layer: Layer, names: Iterable[str]) -> list[Layer]:
        """Give ``layer`` exactly ``names``; a name held by another record moves to it.

        Returns the other records that lost a name (their files must be saved too).
        """
        wanted = list(dict.fromkeys(names))
        keep = set(wanted)
        for name in layer.names:
            if name not in keep and self._by_name.get(name) is layer:
                del self._by_name[name]
        losers: list[Layer] = []
        for name in wanted:
            owner = self._by_name.get(name)
            if owner is not None and owner is not layer:
                owner.names.remove(name)
                if owner not in losers:
                    losers.append(owner)
            self._by_name[name] = layer
        layer.names = wanted
        return losers

    def remove_names(self, layer: Layer, names: Iterable[str]) -> None:
        """Drop names from ``layer``; names it does not hold are ignored."""
        drop = set(names)
        self.set_names(layer, [n for n in layer.names if n not in drop])

    def check(self) -> None:
        """Raise AssertionError when an invariant of the class docstring does not hold."""
        for layer_id, layer in self._by_id.items():
            assert layer.id == layer_id, f"record {layer.id} filed under {layer_id}"
            assert len(set(layer.names)) == len(layer.names), f"{layer_id} repeats a name"
            for name in layer.names:
                assert self._by_name.get(name) is layer, f"name {name} not indexed to {layer_id}"
        for name, layer in self._by_name.items():
            assert self._by_id.get(layer.id) is layer, f"name {name} names a dropped record"
            assert name in layer.names, f"name {name} indexed to {layer.id}, which lacks it"
        assert self._volatile <= self._by_id.keys(), "a volatile id has no record"


def copy_layer(layer: Layer) -> Layer:
    """A copy that shares no mutable value with ``layer`` (nested flags included).

    Records hold JSON values only, so a JSON-shaped copy is a deep copy. Lists of strings
    or integers are copied with ``list()``; only the JSON-valued fields are walked.
    """
    state: dict[str, Any] = layer.__dict__.copy()
    state["names"] = layer.names[:]
    state["uidset"] = layer.uidset[:]
    state["gidset"] = layer.gidset[:]
    state["big_data_names"] = layer.big_data_names[:]
    state["uidmap"] = _json_copy(layer.uidmap) if layer.uidmap else []
    state["gidmap"] = _json_copy(layer.gidmap) if layer.gidmap else []
    state["flags"] = _json_copy(layer.flags) if layer.flags else {}
    state["extra"] = _json_copy(layer.extra) if layer.extra else {}
    new = object.__new__(Layer)
    new.__dict__ = state
    return new


def _json_copy(value: Any) -> Any:
    kind = type(value)
    if kind is dict:
        return {k: _json_copy(v) if type(v) in _CONTAINERS else v for k, v in value.items()}
    if kind is list:
        return [_json_copy(v) if type(v) in _CONTAINERS else v for v in value]
    return value


_CONTAINERS = frozenset({dict, list})
