"""Sources: I/O only. Each reads one kind of server or file and returns typed records."""
