"""Benchmarks behind `bin/bench.py`: one module per subcommand, each with `add_parser`."""
