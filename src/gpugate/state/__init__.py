"""The pool's state in Redis: key names, scripts, connections, servers."""
