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

from sqlalchemy import JSON, Connection
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import DBAPIError
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.expression import ClauseElement

Row = dict[str, Any]


class Prepared:
    """A Core statement, compiled on first use per dialect; `columns` limits an INSERT to the
    columns it names (the parameters given must then be exactly those). IN lists must be
    fixed in the statement: a list given as a parameter is not expanded."""

    def __init__(self, statement: ClauseElement, columns: Sequence[str] | None = None) -> None:
        self.statement = statement
        self.columns = list(columns) if columns is not None else None
        self._compiled: dict[str, _Compiled] = {}

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
    def __init__(self, compiled: SQLCompiler, json_results: set[str]) -> None:
        self.compiled = compiled
        self.sql = str(compiled)
        self.positions = compiled.positiontup  # None for named parameter styles
        self.json_params = {
            name for name, bind in compiled.binds.items() if isinstance(bind.type, JSON)
        }
        self.json_results = json_results

    def arguments(self, params: Mapping[str, Any]) -> Sequence[Any] | Mapping[str, Any]:
        values = self.compiled.construct_params(params)  # adds the statement's own literals
        for name in self.json_params.intersection(values):
            if values[name] is not None:
                values[name] = json.dumps(values[name], separators=(",", ":"))
        if self.positions is None:
            return values
        return tuple(values[name] for name in self.positions)


def _json_columns(statement: ClauseElement) -> set[str]:
    columns: Iterable[Any] = (
        getattr(statement, "selected_columns", None)
        or getattr(statement, "exported_columns", None)
        or ()
    )
    return {column.name for column in columns if isinstance(column.type, JSON)}
