"""MCP servers and a scripted model stand-in for the assistant's tests."""
