"""Every row of the signature table, by SQLSTATE and by text, as clients and logs show them."""

from __future__ import annotations

import pytest

from datadog_checks.django_db.connection import ClientTimeout
from datadog_checks.django_db.evaluate.model import Status
from datadog_checks.django_db.evaluate.signatures import (
    TABLE,
    UNKNOWN,
    LogRecords,
    classify,
    classify_error,
    classify_failure,
    count_log_lines,
    match_text,
)
from datadog_checks.django_db.records import Failure

CASES = [
    # (text, sqlstate, signature)
    ("connection failed: FATAL:  sorry, too many clients already", "53300", "too_many_clients"),
    ("2026-11-21 05:00:00 UTC [123] FATAL:  sorry, too many clients already", None, "too_many_clients"),
    (
        "FATAL:  remaining connection slots are reserved for non-replication superuser connections",
        "53300",
        "reserved_slots",
    ),
    # PostgreSQL 16's wordings
    (
        "FATAL:  remaining connection slots are reserved for roles with the SUPERUSER attribute",
        "53300",
        "reserved_slots",
    ),
    (
        "FATAL:  remaining connection slots are reserved for roles with privileges of the "
        '"pg_use_reserved_connections" role',
        "53300",
        "reserved_slots",
    ),
    ("a 53300 without known words", "53300", "too_many_clients"),
    # RDS's wording, with its own reserves
    (
        "FATAL:  remaining connection slots are reserved for non-replication superuser, rds_reserved, and "
        "rds_superuser connections",
        "53300",
        "reserved_slots",
    ),
    (
        "the aws login token could not be made: Unable to locate credentials",
        None,
        "login_token_unavailable",
    ),
    (
        'connection to server at "10.0.0.5", port 6432 failed: ERROR:  no more connections allowed (max_client_conn)',
        "08P01",
        "max_client_conn",
    ),
    (
        "2026-11-21 05:00:00.000 UTC [9] WARNING C-0x55: appdb/app@127.0.0.1:4000 pooler error: no more connections "
        "allowed (max_client_conn)",
        None,
        "max_client_conn",
    ),
    ("ERROR:  query_wait_timeout", "08P01", "query_wait_timeout"),
    ("pooler error: query_wait_timeout", None, "query_wait_timeout"),
    ("ERROR:  pgbouncer cannot connect to server", "08P01", "server_login_retry"),
    # client-side pools, as Django logs their exhaustion
    ("psycopg_pool.PoolTimeout: couldn't get a connection after 1.00 sec", None, "pool_timeout"),
    ("django.db.utils.OperationalError: couldn't get a connection after 30.00 sec", None, "pool_timeout"),
    (
        "sqlalchemy.exc.TimeoutError: QueuePool limit of size 2 overflow 0 reached, connection timed out, "
        "timeout 1.00 (Background on this error at: https://sqlalche.me/e/20/3o7r)",
        None,
        "queuepool_limit",
    ),
    ('ERROR:  password authentication failed for user "app" (server_login_retry)', None, "server_login_retry"),
    (
        "server closed the connection unexpectedly\n\tThis probably means the server terminated abnormally",
        None,
        "server_closed",
    ),
    ("consuming input failed: server closed the connection unexpectedly", "08006", "server_closed"),
    ('connection to server at "127.0.0.1", port 5999 failed: Connection refused', None, "connection_refused"),
    ("could not connect to server: No such file or directory", "08001", "connection_refused"),
    ('connection to server at "127.0.0.1", port 5432 failed: timeout expired', None, "connect_timeout"),
    ('FATAL:  password authentication failed for user "datadog"', "28P01", "auth_failed"),
    ('FATAL:  database "nope" does not exist', "3D000", "database_missing"),
    ("ERROR:  no such database: nope", "08P01", "database_missing"),
    ("ERROR:  canceling statement due to statement timeout", "57014", "statement_timeout"),
    ("FATAL:  terminating connection due to administrator command", "57P01", "admin_shutdown"),
    ("FATAL:  memory quota exceeded", None, "memory_quota"),
    ('ERROR:  relation "x" does not exist', "42P01", "unknown"),
    (
        'connection failed: connection to server at "127.0.0.1", port 5432 failed: '
        "server does not support SSL, but SSL was required",
        None,
        "ssl_unavailable",
    ),
    (
        'connection failed: connection to server at "127.0.0.1", port 6432 failed: FATAL:  not allowed',
        None,
        "console_not_allowed",
    ),
    ("not allowed", "08P01", "console_not_allowed"),
    (
        "2026-11-21 05:00:00.000 UTC [9] WARNING C-0x55: pgbouncer/app@127.0.0.1:4000 pooler error: not allowed",
        None,
        "console_not_allowed",
    ),
    # Session state that transaction pooling loses, as psycopg, Django and PostgreSQL's log word it
    ('cursor "_django_curs_140462479124160_sync_5" does not exist', "34000", "server_side_cursor_lost"),
    ('portal "_django_curs_140462479124160_sync_1" does not exist', "34000", "server_side_cursor_lost"),
    ('cursor "_django_curs_140462479124160_sync_8" already exists', "42P03", "server_side_cursor_lost"),
    (
        'django.db.utils.ProgrammingError: cursor "_django_curs_140462479124160_sync_5" does not exist',
        None,
        "server_side_cursor_lost",
    ),
    (
        '2026-12-05 02:10:13.587 UTC [16455] app@appdb/web ERROR:  cursor "_django_curs_1_sync_2" does not exist',
        None,
        "server_side_cursor_lost",
    ),
    ('prepared statement "_pg3_0" does not exist', "26000", "prepared_statement_lost"),
    ('prepared statement "_pg3_0" already exists', "42P05", "prepared_statement_lost"),
    (
        'bind message supplies 1 parameters, but prepared statement "_pg3_2" requires 0',
        "08P01",
        "prepared_statement_lost",
    ),
    (
        'psycopg.errors.InvalidSqlStatementName: prepared statement "_pg3_0" does not exist',
        None,
        "prepared_statement_lost",
    ),
    (
        '2026-12-05 02:10:14.6 UTC [16460] app@appdb/web ERROR:  prepared statement "_pg3_0" already exists',
        None,
        "prepared_statement_lost",
    ),
    # Named by the SQLSTATE's class when no row names the code
    ("server rejected the connection", "08004", "connection_failed"),
    ("a PgBouncer error without known words", "08P01", "connection_failed"),
    ("could not extend file: No space left on device", "53100", "insufficient_resources"),
    ("out of memory", "53200", "memory_quota"),
    ("the database system is starting up", "57P03", "admin_shutdown"),
    # MySQL and MariaDB, as Django logs them (more in test_mysql_evaluation.py)
    ("django.db.utils.OperationalError: (1040, 'Too many connections')", None, "mysql_too_many_connections"),
    ("django.db.utils.OperationalError: (2006, 'MySQL server has gone away')", None, "mysql_server_gone"),
    ("(1045, \"Access denied for user 'app'@'10.0.0.7' (using password: YES)\")", None, "mysql_access_denied"),
    ("(1049, \"Unknown database 'shop'\")", None, "mysql_unknown_database"),
    (
        "(2003, \"Can't connect to MySQL server on 'db' ([Errno 111] Connection refused)\")",
        None,
        "mysql_cannot_connect",
    ),
]


@pytest.mark.parametrize("text, sqlstate, name", CASES)
def test_classify(text, sqlstate, name):
    assert classify(text, sqlstate).name == name


def test_every_row_has_a_case_advice_and_status():
    covered = {name for _, _, name in CASES}
    for signature in (*TABLE, UNKNOWN):
        assert signature.name in covered, signature.name
        assert signature.advice.endswith(".") and len(signature.advice) > 40
        assert signature.status in (Status.WARNING, Status.CRITICAL)


def test_log_lines_without_a_signature_are_not_errors():
    assert match_text("LOG:  checkpoint complete: wrote 3 buffers") is None
    assert match_text("LOG stats: 0 xacts/s, 0 queries/s, in 0 B/s") is None


def test_a_statement_that_quotes_a_cursor_or_a_statement_is_no_error():
    """log_statement and log_min_error_statement quote what ran: the names, never the error's words."""
    prefix = "2026-12-05 02:10:13.587 UTC [16455] app@appdb/web "
    for line in (
        'LOG:  statement: FETCH FORWARD 50 FROM "_django_curs_140462479124160_sync_2"',
        'STATEMENT:  CLOSE "_django_curs_140462479124160_sync_2"',
        'LOG:  execute <unnamed>: DECLARE "_django_curs_1_sync_1" NO SCROLL CURSOR WITH HOLD FOR SELECT 1',
        "LOG:  execute _pg3_0: SELECT count(*) FROM pg_class WHERE oid > $1",
        "LOG:  statement: SELECT 'a cursor \"x\" does not exist'",
        "LOG:  statement: SELECT 'prepared statement \"x\" already exists'",
    ):
        assert match_text(prefix + line) is None, line


def test_client_side_timeout_is_a_timeout():
    assert classify_error(ClientTimeout("query_timeout", 5)).name == "connect_timeout"
    assert "query_timeout (5 s)" in str(ClientTimeout("query_timeout", 5))


POOL_TRACEBACK = """\
2026-12-02 17:37:03,971 ERROR django.request 11174: Internal Server Error: /sleep/
Traceback (most recent call last):
  File "/venv/lib/python3.13/site-packages/django/db/backends/postgresql/base.py", line 330, in get_new_connection
    connection = self.pool.getconn()
  File "/venv/lib/python3.13/site-packages/psycopg_pool/pool.py", line 218, in getconn
    raise PoolTimeout(
        f"couldn't get a connection after {timeout:.2f} sec"
    ) from None
psycopg_pool.PoolTimeout: couldn't get a connection after 0.50 sec

The above exception was the direct cause of the following exception:

Traceback (most recent call last):
  File "/venv/lib/python3.13/site-packages/django/core/handlers/exception.py", line 55, in inner
    response = get_response(request)
  File "/venv/lib/python3.13/site-packages/psycopg_pool/pool.py", line 218, in getconn
    raise PoolTimeout(
        f"couldn't get a connection after {timeout:.2f} sec"
    ) from None
django.db.utils.OperationalError: couldn't get a connection after 0.50 sec
"""

HANDLING = """\
Traceback (most recent call last):
  File "/app/shop/views.py", line 12, in order
psycopg.errors.ProtocolViolation: query_wait_timeout

During handling of the above exception, another exception occurred:

Traceback (most recent call last):
  File "/app/shop/views.py", line 14, in order
django.db.utils.OperationalError: query_wait_timeout
    detail on a second line: query_wait_timeout
"""


def test_a_traceback_with_its_chained_parts_is_one_record():
    lines = (POOL_TRACEBACK * 3).splitlines()
    assert count_log_lines(lines) == {"pool_timeout": 3}
    assert count_log_lines((HANDLING + POOL_TRACEBACK + HANDLING).splitlines()) == {
        "query_wait_timeout": 2,
        "pool_timeout": 1,
    }


def test_lines_of_code_in_frames_are_never_matched():
    frames_only = [line for line in POOL_TRACEBACK.splitlines() if line.startswith(" ")]
    assert count_log_lines(["Traceback (most recent call last):", *frames_only]) == {}


def test_a_record_cut_between_two_runs_is_counted_once():
    lines = POOL_TRACEBACK.splitlines()
    records = LogRecords()
    for cut in (3, 9, 12):
        first, second = records.feed(lines[:cut]), records.feed(lines[cut:])
        assert first + second == {"pool_timeout": 1}, cut


def test_ordinary_log_lines_are_each_a_record():
    lines = [
        "2026-12-02 17:37:00.782 UTC [11157] WARNING C-0x5: appdb/app@127.0.0.1:40126 pooler error: query_wait_timeout",
        "2026-12-02 17:37:00.782 UTC [11157] WARNING C-0x6: appdb/app@127.0.0.1:40132 pooler error: query_wait_timeout",
        "server closed the connection unexpectedly",
        "\tThis probably means the server terminated abnormally: timed out",
    ]
    assert count_log_lines(lines) == {"query_wait_timeout": 2, "server_closed": 1}


def test_the_sqlstate_wins_over_the_text():
    # The text alone would say statement_timeout, server_closed, connection_refused.
    assert classify("canceling statement due to statement timeout", "57P01").name == "admin_shutdown"
    assert classify("server closed the connection unexpectedly", "53300").name == "too_many_clients"
    assert classify("connection refused", "3D000").name == "database_missing"


def test_the_sqlstate_class_comes_before_the_text():
    assert classify("server closed the connection unexpectedly", "53100").name == "insufficient_resources"
    assert classify("timeout expired", "08P01").name == "connection_failed"
    assert classify("too many clients already", "57P04").name == "admin_shutdown"
    assert classify("role is not permitted to log in", "28000").name == "auth_failed"
    assert classify("no such role", "28XYZ").name == "auth_failed"


def test_the_text_picks_only_among_the_rows_of_the_sqlstate():
    assert classify("no more connections allowed (max_client_conn)", "08P01").name == "max_client_conn"
    assert classify("query_wait_timeout", "08P01").name == "query_wait_timeout"
    # A text naming a row of another SQLSTATE does not pull the error there.
    assert classify("canceling statement due to statement timeout", "08P01").name == "connection_failed"


def test_the_mysql_error_number_comes_first():
    assert classify("sorry, too many clients already", "53300", 2006).name == "mysql_server_gone"
    assert classify("canceling statement due to statement timeout", None, 1040).name == "mysql_too_many_connections"


def test_the_checks_own_timeout_is_known_by_its_flag_not_its_words():
    assert classify_failure(Failure("no answer", None, "no answer", timeout=True)).name == "connect_timeout"
    # A flagged timeout wins over a SQLSTATE and over words that name something else.
    assert classify("server closed the connection unexpectedly", "08006", timeout=True).name == "connect_timeout"
    # Words alone: a statement the server cancelled is no timeout of the check's.
    assert classify_failure(Failure("x", "57014", "canceling statement due to statement timeout")).name == (
        "statement_timeout"
    )


def test_a_client_timeout_is_known_by_its_type():
    class Reworded(ClientTimeout):
        def __str__(self) -> str:
            return "the server said nothing"

    assert classify_error(Reworded("query_timeout", 5)).name == "connect_timeout"
    assert classify_error(RuntimeError("the server said nothing")).name == "unknown"


def test_a_failure_is_matched_on_the_servers_primary_message():
    failure = Failure(
        'connection failed: connection to server at "h", port 1 failed: FATAL:  sorry, too many clients already',
        None,
        "sorry, too many clients already",
    )
    assert classify_failure(failure).name == "too_many_clients"
    assert classify_failure(Failure("server closed the connection unexpectedly", None, "")).name == "server_closed"


# What process managers write about their workers, and what other clients than a database's say: no database error.
NOT_DATABASE = [
    "[2026-12-07 10:15:02 +0000] [4170] [ERROR] Worker (pid:4175) was sent SIGKILL! Perhaps out of memory?",
    "[2026-12-07 10:15:02 +0000] [4170] [CRITICAL] WORKER TIMEOUT (pid:4175)",
    "DAMN ! worker 2 (pid: 5123) died, killed by signal 9 :( trying respawn ...",
    "[2026-12-07 10:15:02,311: ERROR/MainProcess] Process 'ForkPoolWorker-3' pid:812 exited with 'signal 9 (SIGKILL)'",
    "[ 4123.554] Out of memory: Killed process 4175 (gunicorn) total-vm:812345kB",
    "redis.exceptions.ConnectionError: Error 111 connecting to 127.0.0.1:6379. Connection refused.",
    "requests.exceptions.ReadTimeout: HTTPSConnectionPool(host='api.example.com', port=443): Read timed out.",
    "FileNotFoundError: [Errno 2] No such file or directory: '/srv/static/app.css'",
]


@pytest.mark.parametrize("line", NOT_DATABASE)
def test_other_softwares_lines_are_no_database_error(line):
    assert count_log_lines([line]) == {}


def test_a_refused_mysql_connection_in_a_traceback_is_mysqls():
    """The socket's refusal comes first in the chain, then PyMySQL's 2003: MySQL's own signature counts, once."""
    lines = [
        "Internal Server Error: /items",
        "Traceback (most recent call last):",
        '  File "/srv/venv/lib/python3.13/site-packages/pymysql/connections.py", line 661, in connect',
        "    sock = socket.create_connection(",
        "ConnectionRefusedError: [Errno 111] Connection refused",
        "",
        "During handling of the above exception, another exception occurred:",
        "",
        "Traceback (most recent call last):",
        '  File "/srv/venv/lib/python3.13/site-packages/django/db/backends/base/base.py", line 279, in connect',
        "    self.connect()",
        "pymysql.err.OperationalError: (2003, \"Can't connect to MySQL server on '127.0.0.1' ([Errno 111] Connection "
        'refused)")',
    ]
    assert count_log_lines(lines) == {"mysql_cannot_connect": 1}


def test_a_database_refusal_still_counts():
    line = (
        'psycopg.OperationalError: connection failed: connection to server at "10.0.0.5", port 5432 failed: '
        "Connection refused"
    )
    assert count_log_lines([line]) == {"connection_refused": 1}
    assert count_log_lines(["2026-12-07 10:15:02.311 UTC [812] FATAL:  out of memory"]) == {"memory_quota": 1}


def test_one_cursor_told_twice_by_postgresql_counts_once():
    """The FETCH that failed, then Django's CLOSE of the same cursor (on another server connection through a pooler):
    one failure. Another process's cursor of the same name fails on its own."""
    prefix = "2026-12-07 10:15:02.311 UTC [{}] app@appdb/site "
    lines = [
        prefix.format(812) + 'ERROR:  cursor "_django_curs_1401_sync_3" does not exist',
        prefix.format(812) + 'STATEMENT:  FETCH FORWARD 2000 FROM "_django_curs_1401_sync_3"',
        prefix.format(815) + 'ERROR:  cursor "_django_curs_1401_sync_3" does not exist',
        prefix.format(815) + 'STATEMENT:  CLOSE "_django_curs_1401_sync_3"',
        prefix.format(816) + 'ERROR:  cursor "_django_curs_1401_sync_3" does not exist',
        prefix.format(816) + 'STATEMENT:  FETCH FORWARD 2000 FROM "_django_curs_1401_sync_3"',
    ]
    assert count_log_lines(lines) == {"server_side_cursor_lost": 2}
