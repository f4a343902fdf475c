"""Real Django applications under gunicorn through real PgBouncer: what transaction pooling breaks (server-side
cursors, prepared statements) counted once per failure in each log and told with what to change; what it does
not break (no server-side cursors, session mode, PgBouncer 1.24 keeping prepared statements) stays quiet."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator

import psycopg
import pytest
from datadog_checks.base import AgentCheck

from datadog_checks.django_db import DjangoDbCheck
from datadog_checks.django_db.evaluate.session_state import version_tuple
from datadog_checks.django_db.evaluate.signatures import classify_error
from django_db_tools import debian
from django_db_tools.sandbox import SUPERUSER, Sandbox
from django_db_tools.webapp.harness import Database, Webapp

from .conftest import APP_PASSWORD, matrix, metric_values, run_health

PREFIX = "%m [%p] %q%u@%d/%a "
# PostgreSQL's own error lines, as an operator would grep them
PG_ERRORS = {
    "server_side_cursor_lost": re.compile(r' ERROR:  (?:cursor|portal) "[^"]*" (?:does not exist|already exists)$'),
    "prepared_statement_lost": re.compile(
        r' ERROR:  (?:prepared statement "[^"]*" (?:does not exist|already exists)|bind message supplies \d+ )'
    ),
}
SIGNATURES = tuple(PG_ERRORS)


@pytest.fixture
def postgres_log(sandbox: Sandbox):
    """PostgreSQL's log with the application's name in each line (%a), and every statement (log_statement):
    statements quote cursors' names, which is no error."""
    sandbox.psql(f"ALTER SYSTEM SET log_line_prefix = '{PREFIX}'")
    sandbox.psql("ALTER SYSTEM SET log_statement = 'all'")
    sandbox.psql("SELECT pg_reload_conf()")
    yield sandbox.postgres.logfile
    sandbox.psql("ALTER SYSTEM RESET log_line_prefix")
    sandbox.psql("ALTER SYSTEM RESET log_statement")
    sandbox.psql("SELECT pg_reload_conf()")


def failures_told(signature: str, lines: list[str]) -> int:
    """The failures PostgreSQL's error lines tell (each followed by its statement): a cursor's CLOSE that fails
    after its FETCH failed is the same failure; a prepared statement once per session in a row."""
    told = 0
    if signature == "server_side_cursor_lost":
        failed: list[str] = []
        for error, statement in zip(lines, [*lines[1:], ""], strict=True):
            if not PG_ERRORS[signature].search(error):
                continue
            name = re.search(r'"([^"]+)"', error).group(1)
            if f'STATEMENT:  CLOSE "{name}"' in statement and name in failed:
                failed.remove(name)
            else:
                failed.append(name)
                told += 1
        return told
    errors = [line for line in lines if PG_ERRORS[signature].search(line)]
    keys = [(re.search(r"\[(\d+)\]", line).group(1), re.search(r'"([^"]+)"', line).group(1)) for line in errors]
    return sum(1 for i, key in enumerate(keys) if i == 0 or keys[i - 1] != key)


def errors(aggregator, signature: str, log) -> float:
    return sum(metric_values(aggregator, "django_db.errors", f"signature:{signature}", f"log_file:{log}"))


@pytest.mark.parametrize(
    "signature, path, env",
    [
        ("server_side_cursor_lost", "/iterate/", {"WEBAPP_SERVER_SIDE_CURSORS": "1"}),
        ("prepared_statement_lost", "/prepared/", {"WEBAPP_PREPARE_THRESHOLD": "0"}),
    ],
)
def test_what_transaction_pooling_breaks_is_counted_and_told(
    aggregator, dd_run_check, sandbox, webapps, postgres_log, signature, path, env
):
    app_name = signature.replace("_", "-")
    app = webapps(through="pgbouncer", app_name=app_name, workers=2, threads=4, conn_max_age=None, env=env)
    hold = 2  # seconds a finding stays after its last line
    instance = {**sandbox.instance(), "log_files": [str(app.log_file), str(postgres_log)], "finding_hold_seconds": hold}
    check = DjangoDbCheck("django_db", {}, [instance])
    status, text = run_health(aggregator, dd_run_check, check)
    assert signature not in text
    logged = postgres_log.stat().st_size
    replies = app.drive(path, count=40, concurrency=8)
    failed = sum(r.status == 500 for r in replies)
    read_at = time.monotonic()
    status, text = run_health(aggregator, dd_run_check, check)
    version = check.pgbouncer.version if check.pgbouncer is not None else None
    counted = errors(aggregator, signature, postgres_log), errors(aggregator, signature, app.log_file)
    routed = metric_values(aggregator, "django_db.finding", f"finding:{signature}", f"app:{app_name}")
    _, held = run_health(aggregator, dd_run_check, check)  # no new line: the finding holds
    held_for = time.monotonic() - read_at
    time.sleep(max(0.0, hold - held_for) + 0.5)
    _, gone = run_health(aggregator, dd_run_check, check)
    check.cancel()
    assert held_for < hold, held_for
    assert f"{signature} seen 0 s ago (" in held or f"{signature} seen 1 s ago (" in held, held
    assert signature not in gone
    assert failed >= 3 and {r.status for r in replies} <= {200, 500}
    assert app.django_log().count("ERROR django.request") == failed
    with open(postgres_log, "rb") as handle:
        handle.seek(logged)
        lines = handle.read().decode(errors="replace").splitlines()
    in_postgres = sum(bool(PG_ERRORS[signature].search(line)) for line in lines)
    assert in_postgres >= failed // 2
    failures = failures_told(signature, lines)
    assert any(f"/{app_name} LOG:  " in line for line in lines)  # the statements were logged, and count nothing

    # One failed request once in Django's log; in PostgreSQL's, lines that tell the same failure once
    assert counted == (failures, failed)
    assert routed == [1]  # the application PostgreSQL's lines named (%a) is the finding's subject
    if signature == "server_side_cursor_lost":
        assert in_postgres > failures  # a cursor's failure told twice, by its FETCH and by its CLOSE
    other = next(s for s in SIGNATURES if s != signature)
    assert other not in text and not metric_values(aggregator, "django_db.errors", f"signature:{other}")

    assert status >= AgentCheck.WARNING
    [finding] = [f for f in text.split("; WARNING: ") if f"{signature} seen" in f]
    assert f"({failed} in django.log, {failures} in postgres.log; a failure can show in each log; " in finding
    assert f"; app={app_name} {failures}): " in finding  # named from PostgreSQL's lines (%a)
    assert "(pools in transaction mode: " in finding and "appdb/app transaction" in finding
    if signature == "server_side_cursor_lost":
        assert finding.endswith(
            "Set DISABLE_SERVER_SIDE_CURSORS = True in the DATABASES entry that goes through PgBouncer"
        )
    else:
        assert (version_tuple(version) or (0,)) < (1, 21)  # the machine's PgBouncer: 1.18
        assert f"PgBouncer {version} cannot keep prepared statements across server connections: remove " in finding
        assert "server_side_binding and prepare_threshold" in finding and "max_prepared_statements above 0" in finding


@pytest.fixture
def session_pool(sandbox: Sandbox):
    """appdb again at PgBouncer, in session mode: each client keeps its server connection."""
    pgbouncer = sandbox.pgbouncer
    pgbouncer.databases["appdb_session"] = f"host=127.0.0.1 port={sandbox.postgres.port} dbname=appdb pool_mode=session"
    pgbouncer.reload()
    yield "appdb_session"
    del pgbouncer.databases["appdb_session"]
    pgbouncer.reload()


def test_what_transaction_pooling_keeps_stays_quiet(
    aggregator, dd_run_check, sandbox, webapps, postgres_log, session_pool
):
    """Transaction mode without server-side cursors; session mode with them (and prepared statements): every
    request answers, statements quoting cursors fill PostgreSQL's log, and nothing is counted or told."""
    healthy = webapps(through="pgbouncer", app_name="nocursor-web", workers=2, threads=4, conn_max_age=None)
    session = webapps(
        through="pgbouncer", app_name="session-web", workers=2, threads=2, conn_max_age=None,
        env={"WEBAPP_SERVER_SIDE_CURSORS": "1", "WEBAPP_PREPARE_THRESHOLD": "0", "WEBAPP_DB_NAME": session_pool},
    )  # fmt: skip
    logs = [str(healthy.log_file), str(session.log_file), str(postgres_log)]
    # other tests' connections are not this test's business
    instance = {**sandbox.instance(), "log_files": logs, "applications": {"include": ["^(nocursor|session)-web$"]}}
    check = DjangoDbCheck("django_db", {}, [instance])
    run_health(aggregator, dd_run_check, check)
    logged = postgres_log.stat().st_size
    replies = healthy.drive("/iterate/", count=40, concurrency=8)
    for path in ("/iterate/", "/prepared/"):
        replies += session.drive(path, count=20, concurrency=4)
    status, text = run_health(aggregator, dd_run_check, check)
    check.cancel()
    assert {r.status for r in replies} == {200}
    with open(postgres_log, "rb") as handle:
        handle.seek(logged)
        logged_text = handle.read().decode(errors="replace")
    assert "/session-web LOG:  " in logged_text and 'FROM "_django_curs_' in logged_text  # cursors in session mode
    assert status == AgentCheck.OK, text
    assert not [m for m in aggregator.metrics("django_db.errors") if any(s in t for t in m.tags for s in SIGNATURES)]


def test_the_errors_a_client_meets_are_named_by_their_sqlstate(clients):
    """As the check names an error it meets itself: psycopg's exception, by SQLSTATE and primary message."""
    conn = clients.connect(app="own-errors")
    named = []
    for statement in ("FETCH 1 FROM nope", "EXECUTE nope", "PREPARE twice AS SELECT 1", "CLOSE nope"):
        try:
            conn.execute(statement)
            conn.execute(statement)
        except psycopg.Error as e:
            named.append((type(e).__name__, classify_error(e).name))
    assert named == [
        ("InvalidCursorName", "server_side_cursor_lost"),
        ("InvalidSqlStatementName", "prepared_statement_lost"),
        ("DuplicatePreparedStatement", "prepared_statement_lost"),
        ("InvalidCursorName", "server_side_cursor_lost"),
    ]


@pytest.fixture(scope="module", params=matrix(("pgbouncer-1.24",)))
def tracking_bouncer(request) -> Iterator[Sandbox]:
    """PgBouncer 1.24 (Debian trixie's, fetched once into the user's cache) in transaction mode, with
    max_prepared_statements 0 to begin with."""
    build = debian.fetch(debian.PGBOUNCER["1.24"])  # a failure names the suite and package
    with debian.runnable(build) as runnable:
        program = runnable.command("pgbouncer")
        with Sandbox(max_connections=40, default_pool_size=5, max_prepared_statements=0,
                     pgbouncer_program=program) as box:  # fmt: skip
            box.psql(f"CREATE ROLE app LOGIN PASSWORD '{APP_PASSWORD}'")
            box.psql("CREATE DATABASE appdb OWNER app")
            box.pgbouncer.users["app"] = APP_PASSWORD
            box.pgbouncer.reload()
            yield box


def set_max_prepared_statements(box: Sandbox, value: int) -> None:
    """Reload PgBouncer with it; return once its console shows it."""
    box.pgbouncer.settings["max_prepared_statements"] = value
    box.pgbouncer.reload()
    admin = box.pgbouncer.instance(SUPERUSER)
    with psycopg.connect(
        host="127.0.0.1", port=admin["port"], user=SUPERUSER, password=admin["password"], dbname="pgbouncer",
        autocommit=True, cursor_factory=psycopg.ClientCursor, prepare_threshold=None,
    ) as console:  # fmt: skip
        deadline = time.monotonic() + 10
        while {row[0]: row[1] for row in console.execute("SHOW CONFIG")}.get("max_prepared_statements") != str(value):
            assert time.monotonic() < deadline, "PgBouncer never took max_prepared_statements"
            time.sleep(0.05)


def test_pgbouncer_that_keeps_prepared_statements_makes_the_failures_go(
    aggregator, dd_run_check, tracking_bouncer, tmp_path
):
    """PgBouncer 1.24 with max_prepared_statements 0 fails as 1.18 does, and the finding asks for the setting;
    failures read after a reload that set it are told with the value now set; set above 0, the same application
    under the same load fails no request and nothing is told."""
    box = tracking_bouncer
    database = Database("127.0.0.1", box.pgbouncer.port, "appdb", "app", APP_PASSWORD)
    log = tmp_path / "django.log"
    log.touch()
    settings: dict = {"app_name": "tracked-web", "workers": 2, "threads": 4, "conn_max_age": None, "log_file": log}
    settings["env"] = {"WEBAPP_PREPARE_THRESHOLD": "0"}
    # Findings from errors held for no time: the run after the fix is judged on its own lines.
    check = DjangoDbCheck("django_db", {}, [{**box.instance(), "log_files": [str(log)], "finding_hold_seconds": 0}])
    try:
        run_health(aggregator, dd_run_check, check)
        with Webapp(database, **settings) as app:
            failed = sum(r.status == 500 for r in app.drive("/prepared/", count=40, concurrency=8))
        status, text = run_health(aggregator, dd_run_check, check)
        assert failed >= 3 and errors(aggregator, "prepared_statement_lost", log) == failed
        assert status == AgentCheck.WARNING
        [finding] = [f for f in text.split("; WARNING: ") if "prepared_statement_lost seen" in f]
        version = check.pgbouncer.version if check.pgbouncer is not None else None
        assert (version or "").startswith("1.24.")
        assert (
            f"PgBouncer {version} keeps protocol-level prepared statements only with max_prepared_statements "
            "above 0, and it is 0: set it (200, say) in pgbouncer.ini and reload" in finding
        )

        # Failures logged before a reload that sets it, read after: never asked to set what is set now
        with Webapp(database, **settings) as app:
            failed = sum(r.status == 500 for r in app.drive("/prepared/", count=40, concurrency=8))
        set_max_prepared_statements(box, 200)
        status, text = run_health(aggregator, dd_run_check, check)
        assert failed >= 3 and errors(aggregator, "prepared_statement_lost", log) == failed
        [finding] = [f for f in text.split("; WARNING: ") if "prepared_statement_lost seen" in f]
        assert "keeps protocol-level prepared statements already (max_prepared_statements = 200)" in finding
        assert "or before the setting was loaded" in finding and "set it" not in finding

        with Webapp(database, **settings) as app:
            replies = app.drive("/prepared/", count=40, concurrency=8)
        status, text = run_health(aggregator, dd_run_check, check)
    finally:
        check.cancel()
    assert {r.status for r in replies} == {200}
    assert status == AgentCheck.OK, text
    assert not metric_values(aggregator, "django_db.errors", "signature:prepared_statement_lost")
