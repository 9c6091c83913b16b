"""`python -m phi3mm.bench` (and `make bench`): the benchmark's command; see `phi3mm.bench`."""

from phi3mm.bench import main

main()
