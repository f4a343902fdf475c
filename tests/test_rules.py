"""Health findings, message order, query normalisation and alignment rules. No database."""

from __future__ import annotations

from datadog_checks.django_db.config import parse
from datadog_checks.django_db.evaluate.alignment import alignment_failures, effective, possible_server_connections
from datadog_checks.django_db.evaluate.health import (
    normalize_query,
    pgbouncer_findings,
    postgres_findings,
    signature_findings,
)
from datadog_checks.django_db.evaluate.model import Finding, Status, Subject, message, worst
from datadog_checks.django_db.records import ActivityGroup, LeakSuspect, PgbSnapshot, PgSnapshot, ServerSettings
from datadog_checks.django_db.sources.pgbouncer import Result, snapshot_from_results

PG = {"host": "db", "port": 5432}
BOTH = {"postgres": PG, "pgbouncer": {"host": "db", "port": 6432}}


def server(max_connections=40, role_settings=(), statement=0, idle_tx=0):
    return ServerSettings(150000, "15.0", max_connections, 0, 0, statement, idle_tx, role_settings)


def pg(groups, settings=None, suspects=()):
    return PgSnapshot(settings or server(), tuple(groups), None, 0.0, False, tuple(suspects))


def pgb(pools=(), databases=(), config=None, lists=None) -> PgbSnapshot:
    base = {"max_client_conn": "100", "default_pool_size": "20", "pool_mode": "transaction",
            "server_idle_timeout": "600", "client_idle_timeout": "0", "reserve_pool_size": "0"}  # fmt: skip
    return snapshot_from_results(
        {
            "POOLS": Result.from_dicts(list(pools)),
            "DATABASES": Result.from_dicts(list(databases)),
            "LISTS": Result(["list", "items"], list((lists or {}).items())),
            "CONFIG": Result(["key", "value"], list({**base, **(config or {})}.items())),
        }
    )


def by_code(findings: list[Finding]) -> dict[str, Finding]:
    found = {f.code: f for f in findings}
    assert len(found) == len(findings), "one finding per code"
    return found


def test_message_lists_findings_worst_first():
    findings = [
        Finding("leaked_connections", Status.WARNING, "6 connections of app=web idle for over 600 s (leaked)"),
        Finding("fine", Status.OK, "fine"),
        Finding("utilization", Status.CRITICAL, "38 of 40 usable slots in use (95%)"),
        Finding("timeouts_unset", Status.WARNING, "timeouts unset for web@appdb", "set statement_timeout"),
        Finding("connection_churn", Status.WARNING, "20 a minute: app=web 20", "set CONN_MAX_AGE"),
    ]
    assert worst(findings) == Status.CRITICAL
    assert message(findings) == (
        "CRITICAL: 38 of 40 usable slots in use (95%); WARNING: 6 connections of app=web idle for over 600 s "
        "(leaked); WARNING: timeouts unset for web@appdb: set statement_timeout; "
        "WARNING: 20 a minute: app=web 20: set CONN_MAX_AGE"
    )


def test_postgres_findings_name_the_application():
    settings = parse({"postgres": PG, "leak_idle_seconds": 600})
    groups = [
        ActivityGroup("idle", "app", "u", "web", "", 30, leaked=6),
        ActivityGroup("idle in transaction", "app", "u", "worker", "", 2, max_age=320),
        ActivityGroup(None, "app", "other", "cron", "", 5),
    ]
    findings = by_code(postgres_findings(pg(groups), settings))
    assert set(findings) == {"utilization", "idle_in_transaction", "leaked_connections", "monitoring_role_blind"}
    slots = findings["utilization"]
    assert (slots.status, slots.figure, slots.threshold) == (Status.CRITICAL, 38 / 40, 0.9)
    # One finding for the sessions idle in a transaction, not one for their count and one for the oldest:
    # its figure is what earned the status (the oldest, 320 s, past the critical 300 s).
    in_tx = findings["idle_in_transaction"]
    assert (in_tx.status, in_tx.figure, in_tx.threshold) == (Status.CRITICAL, 320, 300)
    assert in_tx.subjects == (Subject(("app:worker",), 2),)
    leaked = findings["leaked_connections"]
    assert (leaked.status, leaked.figure, leaked.threshold) == (Status.CRITICAL, 6, 5)  # critical from 5 by default
    assert leaked.subjects == (Subject(("app:web",), 6),)
    blind = findings["monitoring_role_blind"]
    assert (blind.status, blind.figure, blind.advice) == (Status.WARNING, 5, "GRANT pg_monitor TO datadog")
    # How the message renders them.
    text = message(list(findings.values()))
    assert text.startswith("CRITICAL: 38 of 40 usable slots in use (95%; most: app=web 30)")
    assert "CRITICAL: 2 connections idle in transaction (app=worker 2), the oldest for 320 s (app=worker)" in text
    assert "CRITICAL: 6 connections of app=web idle for over 600 s (leaked)" in text
    assert "WARNING: 5 backends are hidden from the monitoring role: GRANT pg_monitor TO datadog" in text


def test_leak_suspects_only_when_asked_and_without_literals():
    groups = [ActivityGroup("idle", "app", "u", "web", "", 1, leaked=1)]
    suspect = LeakSuspect("web", "10.1.2.3", "app", "u", 700.0,
                          "SELECT * FROM page WHERE page_id = 12 AND owner = 'alice@example.com'")  # fmt: skip
    quiet = message(postgres_findings(pg(groups, suspects=[suspect]), parse({"postgres": PG})))
    assert "SELECT" not in quiet and "alice" not in quiet
    loud = message(
        postgres_findings(pg(groups, suspects=[suspect]), parse({"postgres": PG, "report_leak_queries": True}))
    )
    assert (
        "suspects: app=web from 10.1.2.3 idle 700 s, last query: SELECT * FROM page WHERE page_id = ? AND owner = ?"
        in loud
    )
    assert "alice" not in loud and "12" not in loud.split("last query")[1]


def test_normalize_query():
    assert normalize_query("SELECT 1") == "SELECT ?"
    assert normalize_query("select * from t1 where a = -3.5e2 and b = E'x''y' and c = $$z$$ and d = $f$q$f$") == (
        "select * from t1 where a = ? and b = ? and c = ? and d = ?"
    )
    assert normalize_query('SELECT "col2", t.x3 FROM "t 9" WHERE id IN (1, 2,\n 3)') == (
        'SELECT "col2", t.x3 FROM "t 9" WHERE id IN (?, ?, ?)'
    )
    long = normalize_query("SELECT " + ", ".join(f"c{i}" for i in range(100)))
    assert len(long) == 200 and long.endswith("…")
    assert normalize_query(None) == ""


def test_pgbouncer_findings():
    settings = parse(BOTH)
    pools = [
        {"database": "app", "user": "u", "cl_waiting": 4, "maxwait": 6, "maxwait_us": 500000},
        {"database": "pgbouncer", "user": "pgbouncer", "cl_waiting": 0, "maxwait": 90, "maxwait_us": 0},
    ]
    findings = by_code(pgbouncer_findings(pgb(pools, lists={"used_clients": 95}), settings))
    waiting = findings["pgbouncer_clients_waiting"]
    assert (waiting.status, waiting.figure, waiting.threshold) == (Status.CRITICAL, 6.5, 5)
    assert waiting.subjects == (Subject(("pgbouncer_db:app", "user:u"), 4),)
    clients = findings["pgbouncer_client_utilization"]
    assert (clients.status, clients.figure, clients.threshold) == (Status.CRITICAL, 0.95, 0.9)
    text = message(list(findings.values()))
    assert "CRITICAL: 4 clients waiting at PgBouncer pool app/u, the oldest for 6.5 s" in text
    assert "CRITICAL: 95 of 100 PgBouncer client connections in use (95% of max_client_conn)" in text


def test_signature_findings_count_sources():
    log = "log_file:/var/log/postgresql/postgresql.log"
    findings = signature_findings([("too_many_clients", "log", log), ("too_many_clients", "log", log),
                                   ("unknown", "postgres", "postgres_server:db:5432")])  # fmt: skip
    found = by_code(findings)
    assert found["too_many_clients"].status == Status.CRITICAL
    assert found["too_many_clients"].subjects == (Subject((log,), 2),)
    assert found["too_many_clients"].figure == 2
    assert found["unknown"].subjects == (Subject(("postgres_server:db:5432",), 1),)
    text = message(findings)
    assert text.startswith("CRITICAL: too_many_clients seen (2 from log): PostgreSQL reached max_connections")
    assert "WARNING: unknown seen (1 from postgres)" in text


def test_alignment_session_mode_and_idle_timeouts():
    settings = parse({**BOTH, "conn_max_age": 900})
    snap = pgb(pools=[{"database": "app", "user": "u", "pool_mode": "session"}],
               config={"client_idle_timeout": "300"})  # fmt: skip
    failures = by_code(alignment_failures(settings, pg([]), snap))
    assert failures["session_mode_pins_servers"].text == "conn_max_age=900 s while PgBouncer pools app in session mode"
    assert failures["session_mode_pins_servers"].server == "pgbouncer_server:db:6432"
    # server_idle_timeout closes only servers no client holds: no rule for CONN_MAX_AGE
    assert "conn_max_age_over_server_idle_timeout" not in failures
    assert {"session_mode_pins_servers", "conn_max_age_over_client_idle_timeout"} <= set(failures)
    over_client = failures["conn_max_age_over_client_idle_timeout"]
    assert (over_client.figure, over_client.threshold) == (900, 300)
    assert alignment_failures(parse({**BOTH, "conn_max_age": 0}), pg([], server(statement=30000)), pgb()) == []


def test_possible_server_connections_against_usable_slots():
    databases = [
        {"name": "app", "pool_size": 30, "reserve_pool": 5, "max_connections": 0},
        {"name": "reports", "pool_size": -1, "reserve_pool_size": 0, "max_connections": 10},
        {"name": "pgbouncer", "pool_size": 2, "reserve_pool": 0, "max_connections": 0},
    ]
    pools = [{"database": "app", "user": "a"}, {"database": "app", "user": "b"}, {"database": "reports", "user": "a"}]
    snap = pgb(pools, databases)
    assert possible_server_connections(snap) == 2 * 35 + 10
    (failure,) = alignment_failures(parse(BOTH), pg([], server(statement=1000)), snap)
    assert (failure.code, failure.figure, failure.threshold) == ("pool_sizes_over_slots", 80, 40)
    assert failure.server == "postgres_server:db:5432"
    assert failure.sentence() == (
        "PgBouncer may open 80 server connections (pool sizes plus reserve pools) but PostgreSQL has 40 usable "
        "slots: lower the pool sizes or set max_db_connections"
    )


def test_pools_of_a_database_missing_from_show_databases_count_with_the_defaults():
    # PgBouncer can leave a database made from `*` out of SHOW DATABASES while its pools serve clients.
    databases = [{"name": "app", "pool_size": 30, "reserve_pool": 5, "max_connections": 0}]
    pools = [{"database": "app", "user": "a"}, {"database": "auto", "user": "a"}, {"database": "auto", "user": "b"}]
    assert possible_server_connections(pgb(pools, databases, config={"reserve_pool_size": "3"})) == 35 + 2 * (20 + 3)
    capped = pgb(pools, databases, config={"reserve_pool_size": "3", "max_db_connections": "25"})
    assert possible_server_connections(capped) == 25 + 25


def test_timeouts_by_role_and_database():
    roles = (("", "app", {"statement_timeout": "30s"}), ("appdb", "", {"idle_in_transaction_session_timeout": "1min"}))
    settings = server(role_settings=roles)
    assert effective(settings, "appdb", "app", "statement_timeout", 0) == 30000
    assert effective(settings, "appdb", "web", "idle_in_transaction_session_timeout", 0) == 60000
    groups = [ActivityGroup("idle", "otherdb", "web", "x", "", 1), ActivityGroup("idle", "appdb", "app", "x", "", 1)]
    (failure,) = alignment_failures(parse(BOTH), pg(groups, settings), pgb())
    assert failure.code == "timeouts_unset"
    assert failure.subjects == (Subject(("user:web", "db:otherdb")),)
    assert failure.sentence() == (
        "statement_timeout and idle_in_transaction_session_timeout are both unset for web@otherdb: a stuck request "
        "holds its connection for ever; ALTER ROLE ... SET statement_timeout = '30s'"
    )


def test_one_failure_in_two_logs_is_counted_per_log_not_added_up():
    django, bouncer = "log_file:/var/log/shop/django.log", "log_file:/var/log/postgresql/pgbouncer.log"
    seen = [("query_wait_timeout", "log", django)] * 30 + [("query_wait_timeout", "log", bouncer)] * 30
    (finding,) = signature_findings(seen)
    assert (
        finding.text
        == "query_wait_timeout seen (30 in django.log, 30 in pgbouncer.log; a failure can show in each log)"
    )
    assert finding.figure == 30
    assert finding.subjects == (Subject((bouncer,), 30), Subject((django,), 30))
    assert "60" not in finding.line()


def test_query_wait_timeout_advice_follows_the_pool_mode():
    seen = [("query_wait_timeout", "log", "log_file:/var/log/pgbouncer.log")]
    generic = message(signature_findings(seen))
    assert "use transaction pool mode" in generic
    waiting = {"database": "app", "user": "u", "cl_waiting": 3, "maxwait": 2, "pool_mode": "transaction"}
    transaction = message(signature_findings(seen, pg([ActivityGroup("idle", "app", "u", "web", "", 6)]),
                                             pgb([waiting], config={"default_pool_size": "2"})))  # fmt: skip
    assert "transaction pool mode" not in transaction
    assert "the pool is saturated (app/u transaction pool_size 2)" in transaction
    assert "The pools are in transaction mode already: shorten transactions" in transaction
    assert "raise pool_size within PostgreSQL's free slots; PostgreSQL has 33 free slots of 40" in transaction
    session = message(signature_findings(seen, None, pgb([{**waiting, "pool_mode": "session"}])))
    assert "In session mode each Django connection holds a server connection" in session
    assert "use transaction pool mode" in session


def test_slots_advice_behind_pgbouncer_does_not_ask_for_pgbouncer():
    seen = [("too_many_clients", "log", "log_file:/var/log/postgresql/postgresql.log")]
    assert "pool through PgBouncer" in message(signature_findings(seen))
    pools = [{"database": "app", "user": "u", "pool_mode": "transaction"}]
    text = message(signature_findings(seen, pg([]), pgb(pools, config={"default_pool_size": "20"})))
    assert "pool through PgBouncer" not in text
    assert "PgBouncer is in front already (app/u transaction pool_size 20; its pools may open 20 server" in text
    assert "within max_connections=" in text


def test_pool_exhaustion_advice_gives_the_servers_free_slots():
    seen = [("pool_timeout", "log", "log_file:/var/log/shop/django.log")] * 3
    (finding,) = signature_findings(seen, pg([ActivityGroup("idle", "app", "u", "web", "", 6)]))
    assert finding.status == Status.CRITICAL
    assert (finding.code, finding.figure) == ("pool_timeout", 3)
    assert finding.text == "pool_timeout seen (3 from log)"
    assert finding.advice.startswith("Requests got no connection from the ")
    assert "max_size" in finding.advice and "gunicorn --threads" in finding.advice
    assert finding.advice.endswith("PostgreSQL has 33 free slots of 40")


def test_finding_series_one_per_active_finding_and_subject():
    from datadog_checks.django_db.evaluate.model import app_subjects, finding_metrics

    leaked = Finding("leaked_connections", Status.WARNING, "leaks", subjects=app_subjects({"web": 8, "leaky": 3}))
    slots = Finding("utilization", Status.CRITICAL, "slots", server="postgres_server:db:5432")
    quiet = Finding("utilization", Status.OK, "fine", server="mysql_server:db:3306")
    series = {m.tags: m.value for m in finding_metrics([leaked, slots, quiet], 50, ("env_name:test",))}
    assert series == {
        ("finding:leaked_connections", "app:web", "env_name:test"): 1,
        ("finding:leaked_connections", "app:leaky", "env_name:test"): 1,
        ("finding:utilization", "postgres_server:db:5432", "env_name:test"): 2,
    }


def test_finding_subjects_fold_past_max_tag_values():
    from datadog_checks.django_db.evaluate.model import app_subjects, finding_metrics

    names = {f"app-{i:03d}": 300 - i for i in range(300)}
    leaked = Finding("leaked_connections", Status.CRITICAL, "leaks", subjects=app_subjects(names))
    series = finding_metrics([leaked], 5)
    assert [m.tags for m in series] == [
        *(("finding:leaked_connections", f"app:app-{i:03d}") for i in range(5)),
        ("finding:leaked_connections", "app:other"),
    ]
    assert {m.value for m in series} == {2}
