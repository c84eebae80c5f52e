"""One adapter module per host framework; each alone knows its host's internals and checks at start that the
installed version still has the seams it uses (`check_host()`). The maths core and the monitor never import them."""
