"""The statements on every request, run on the DBAPI cursor with SQL that SQLAlchemy compiled.

SQLAlchemy's execution path (execution context, parameter and result processing) costs 30-40 us
per statement, more than SQLite takes to run one; a submission runs three and a poll one
(docs/benchmarks.md). For those few statements SQLAlchemy still writes the SQL, once per
dialect, from the same Core constructs as everything else; `Prepared` hands the parameters to
the driver itself and does the one type conversion our columns need (JSON).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import orjson
from sqlalchemy import JSON, Connection
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import DBAPIError, InvalidRequestError
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.expression import ClauseElement, ColumnElement, Insert

Row = dict[str, Any]


class Prepared:
    """A Core statement, compiled on first use per dialect; `columns` limits an INSERT to the
    columns it names (the parameters given must then be exactly those). IN lists must be
    fixed in the statement: a list given as a parameter is not expanded."""

    def __init__(self, statement: ClauseElement, columns: Sequence[str] | None = None) -> None:
        self.statement = statement
        self.columns = list(columns) if columns is not None else None
        self._compiled: dict[str, _Compiled] = {}
        self._plain_insert: Prepared | None = None  # the INSERT without RETURNING, for SQLite

    @classmethod
    def inserting(
        cls, statement: Insert, key: ColumnElement[Any], columns: Sequence[str]
    ) -> Prepared:
        """An INSERT whose `insert_id` is the new row's `key` (an integer primary key): taken
        with RETURNING, except on SQLite, where the driver's lastrowid is the same number for
        a statement with a row less to step through and fetch."""
        prepared = cls(statement.returning(key), columns)
        prepared._plain_insert = cls(statement, columns)
        return prepared

    def insert_id(self, conn: Connection, params: Mapping[str, Any]) -> int:
        """Run an INSERT made by `inserting`: the id of the row it made."""
        assert self._plain_insert is not None, "not an INSERT made by Prepared.inserting"
        if conn.dialect.name == "sqlite":
            cursor = self._plain_insert.execute(conn, params)
            new_id = cursor.lastrowid
        else:
            cursor = self.execute(conn, params)
            (new_id,) = cursor.fetchone()
        cursor.close()
        return int(new_id)

    def execute(self, conn: Connection, params: Mapping[str, Any]) -> Any:
        """Run with `params`; the DBAPI cursor, for `rowcount` or rows."""
        compiled = self._compiled.get(conn.dialect.name) or self._compile(conn.dialect)
        driver = conn.connection.driver_connection
        assert driver is not None
        cursor = driver.cursor()
        arguments = compiled.arguments(params)
        try:
            cursor.execute(compiled.sql, arguments)
        except conn.dialect.loaded_dbapi.Error as error:
            # The exceptions callers catch are SQLAlchemy's (IntegrityError...), as on
            # SQLAlchemy's own execution path.
            cursor.close()
            raise DBAPIError.instance(
                compiled.sql, arguments, error, conn.dialect.loaded_dbapi.Error
            ) from error
        return cursor

    def rowcount(self, conn: Connection, params: Mapping[str, Any]) -> int:
        cursor = self.execute(conn, params)
        count = int(cursor.rowcount)
        cursor.close()
        return count

    def first(self, conn: Connection, params: Mapping[str, Any]) -> Row | None:
        """The first row as a dict by column name (JSON columns decoded), or None."""
        cursor = self.execute(conn, params)
        row = cursor.fetchone()
        names = [column[0] for column in cursor.description] if row is not None else []
        cursor.close()
        if row is None:
            return None
        compiled = self._compiled[conn.dialect.name]
        return {
            name: json.loads(value)
            if name in compiled.json_results and isinstance(value, str)
            else value
            for name, value in zip(names, row, strict=True)
        }

    def _compile(self, dialect: Dialect) -> _Compiled:
        compiled = self.statement.compile(
            dialect=dialect,
            column_keys=self.columns,
            compile_kwargs={"render_postcompile": True},  # IN lists of literals, bound as such
        )
        assert isinstance(compiled, SQLCompiler)
        prepared = _Compiled(compiled, _json_columns(self.statement))
        self._compiled[dialect.name] = prepared
        return prepared


class _Compiled:
    """The SQL, and how to lay the parameters out for the driver: the compiled statement's
    bind names in their order, with the statement's own literals, worked out once."""

    def __init__(self, compiled: SQLCompiler, json_results: set[str]) -> None:
        self.compiled = compiled
        self.sql = str(compiled)
        self.positional = compiled.positiontup is not None  # else named (psycopg)
        self.json_results = json_results
        literals = compiled.construct_params(_check=False)
        self.names = list(compiled.positiontup or literals)
        # Names missing from `binds` are the items of an IN list, rendered one by one.
        binds = {name: compiled.binds[name] for name in self.names if name in compiled.binds}
        self.literals = {
            name: literals[name]
            for name in self.names
            if name not in binds or not binds[name].required
        }
        # A bind whose value is computed per execution needs SQLAlchemy's own assembly.
        self.dynamic = any(bind.callable is not None for bind in binds.values())
        self.json_at = [
            position
            for position, name in enumerate(self.names)
            if name in binds and isinstance(binds[name].type, JSON)
        ]

    def arguments(self, params: Mapping[str, Any]) -> Sequence[Any] | Mapping[str, Any]:
        if self.dynamic:
            values = self.compiled.construct_params(params)
            ordered = [values[name] for name in self.names]
        else:
            literals = self.literals
            try:
                ordered = [
                    params[name] if name in params else literals[name] for name in self.names
                ]
            except KeyError as missing:
                raise InvalidRequestError(
                    f"A value is required for bind parameter {missing}"
                ) from None
        for position in self.json_at:
            if ordered[position] is not None:
                ordered[position] = orjson.dumps(ordered[position]).decode()
        return tuple(ordered) if self.positional else dict(zip(self.names, ordered, strict=True))


def _json_columns(statement: ClauseElement) -> set[str]:
    columns: Iterable[Any] = (
        getattr(statement, "selected_columns", None)
        or getattr(statement, "exported_columns", None)
        or ()
    )
    return {column.name for column in columns if isinstance(column.type, JSON)}
