"""Benchmarks of the proxy side by side with nginx and exporter_exporter (issue 5).

`python -m benchmarks` is the one entry point; `--help` lists the flags. The proxy is measured as a
black box: a subprocess started with its command line, like every peer.
"""
