"""A minimal Django project run under gunicorn, configured by environment variables.

Tests start it against the sandbox's PostgreSQL or PgBouncer to see what real Django processes do
to the server: how many connections they open, how long those live, what a pool does when it runs
out. ``harness.py`` starts and stops it; ``settings.py`` lists the variables it reads.

    WEBAPP_DB_HOST=127.0.0.1 WEBAPP_DB_PORT=5432 ... gunicorn -c django_db_tools/webapp/gunicorn_conf.py
"""
