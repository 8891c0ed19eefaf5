"""SQL from the schema's declarations (``storage.schema``, ``storage.views``): CREATE TABLE with the grain as
primary key, the comments that carry each grain and column doc into the file, and the views; and the lookup
of a table's declaration by name."""

from __future__ import annotations

from storage.schema import TABLES, Table, View
from storage.views import VIEWS


def quote_ident(name: str) -> str:
    """Quote an identifier; only ever called with names from TABLES/VIEWS, never with user input."""
    return '"' + name.replace('"', '""') + '"'


def _quote_literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def create_table_sql(table: Table) -> str:
    """CREATE TABLE IF NOT EXISTS with the grain as PRIMARY KEY."""
    lines = [f"{quote_ident(c.name)} {c.type} {c.constraint}".rstrip() for c in table.columns]
    lines += [f"CHECK ({check})" for check in table.checks]
    lines.append(f"PRIMARY KEY ({', '.join(quote_ident(g) for g in table.grain)})")
    body = ",\n  ".join(lines)
    return f"CREATE TABLE IF NOT EXISTS {quote_ident(table.name)} (\n  {body}\n)"


def table_comments_sql(table: Table) -> list[str]:
    """COMMENT ON TABLE (the grain) and COMMENT ON COLUMN for every documented column."""
    name = quote_ident(table.name)
    stmts = [f"COMMENT ON TABLE {name} IS {_quote_literal(table.comment)}"]
    stmts += [
        f"COMMENT ON COLUMN {name}.{quote_ident(c.name)} IS {_quote_literal(c.doc)}"
        for c in table.columns
        if c.doc
    ]
    return stmts


def view_ddl(view: View) -> list[str]:
    name = quote_ident(view.name)
    return [
        f"CREATE OR REPLACE VIEW {name} AS {view.sql}",
        f"COMMENT ON VIEW {name} IS {_quote_literal(view.comment)}",
    ]


def all_ddl() -> list[str]:
    """Every statement of the schema, tables before the views that read them (VIEWS is ordered)."""
    stmts: list[str] = []
    for table in TABLES.values():
        stmts += [create_table_sql(table), *table_comments_sql(table)]
    for view in VIEWS.values():
        stmts += view_ddl(view)
    return stmts


def table_spec(name: str) -> Table:
    """The declaration of table ``name``; a ValueError lists the tables (and says views are read-only)."""
    try:
        return TABLES[name]
    except KeyError:
        raise ValueError(
            f"unknown table {name!r}; the warehouse tables are {', '.join(TABLES)}"
            + (" (views are read-only)" if name in VIEWS else "")
        ) from None
