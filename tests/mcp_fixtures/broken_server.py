"""An MCP server that fails to start: it writes a reason to stderr and exits."""

import sys

sys.stderr.write("broken: starting up\n")
sys.stderr.write("broken: cannot open database /nonexistent/db.sqlite\n")
sys.exit(3)
