"""Benchmarks of portagent side by side with fwknop, fail2ban, firewalld and a per-rule baseline.

Run as root with `make bench` (or `python -m bench.run --help`). Everything happens inside
network namespaces created here (`pt-bench-<random>-*`); see bench/README.md.
"""
