"""windows-metrics-proxy: expose a Windows node's windows_exporter to Prometheus from a plain pod."""

__version__ = "0.1.0"
