"""Engines under the runtime: where the forward passes happen.

``inprocess`` owns a llama.cpp model and context in this process through
llama-cpp-python's public low-level API; ``base`` says what the runtime's
decode loop needs from one.
"""
