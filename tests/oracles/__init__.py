"""Test oracles: reference transcriptions and brute-force solvers the tests compare the library with."""
