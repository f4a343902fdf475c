"""Development tools of the django_db check: sandbox servers, the command-line runner, the demo.

Installed in the development environment only; the Agent never loads them.
"""
