"""Edges that translate foreign frame sources and sinks (ZMQ, files, Micro-Manager) into Frames."""
